from taskiq_redis import ListQueueBroker, RedisAsyncResultBackend


def make_broker(url: str, queue: str) -> ListQueueBroker:
    # No socket timeout: BRPOP waits for messages (see examples/signup/broker.py).
    return ListQueueBroker(
        url, queue_name=queue, socket_timeout=None
    ).with_result_backend(RedisAsyncResultBackend(url))
