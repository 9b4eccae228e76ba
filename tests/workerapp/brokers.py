"""Brokers on a real Redis: the workers' (broker.py) and the tests' senders."""

from taskiq import AsyncBroker
from taskiq_redis import ListQueueBroker, RedisAsyncResultBackend, RedisStreamBroker


def make_broker(
    url: str, queue: str, streams: bool = False, defaults: bool = False
) -> AsyncBroker:
    backend: RedisAsyncResultBackend[object] = RedisAsyncResultBackend(url)
    if defaults:
        # As generated projects write it: redis-py's 5 s socket timeout.
        return ListQueueBroker(url, queue_name=queue).with_result_backend(backend)
    if streams:
        # Acknowledges after execution when the worker asks for it; a message
        # left unacknowledged by a dead worker is claimed again after 1 s.
        return RedisStreamBroker(
            url, queue_name=queue, idle_timeout=1000
        ).with_result_backend(backend)
    # BRPOP blocks until a message comes; redis-py 8's default 5 s socket
    # timeout would end it with an error taskiq-redis does not catch.
    return ListQueueBroker(
        url, queue_name=queue, socket_timeout=None
    ).with_result_backend(backend)
