"""A broker a worker can serve, made without connecting: for the tests that
stop at the command's parsing and loading (none of them starts a worker)."""

from taskiq import AsyncBroker
from taskiq_redis import ListQueueBroker

ADDRESS = "redis://127.0.0.1:1"  # never connected to by these tests

broker = ListQueueBroker(ADDRESS)
not_a_broker = "just a string"


def broker_factory() -> AsyncBroker:
    return ListQueueBroker(ADDRESS)


def raising_broker_factory() -> AsyncBroker:
    raise RuntimeError("BROKER_URL is not set")
