"""taskiq's async_shared_broker with a shared task: it declares tasks, it
cannot listen (they run on the broker given to its default_broker)."""

from taskiq import async_shared_broker

broker = async_shared_broker


@async_shared_broker.task
async def add(a: int, b: int) -> int:
    return a + b
