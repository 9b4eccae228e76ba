from taskiq_redis import ListQueueBroker, RedisAsyncResultBackend


def make_broker(url: str, queue: str) -> ListQueueBroker:
    return ListQueueBroker(url, queue_name=queue).with_result_backend(
        RedisAsyncResultBackend(url)
    )
