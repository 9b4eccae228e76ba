"""A broker whose class's `listen` is an unhashable object (an `eq=True`
dataclass): not one of taskiq's brokers that cannot listen, so `check` passes
it. For the tests that stop at `check` (none of them starts a worker)."""

from dataclasses import dataclass

from taskiq_redis import ListQueueBroker


@dataclass
class Listener:
    """Unhashable: a dataclass that compares by value gets `__hash__ = None`."""

    queue: str


class ListenedBroker(ListQueueBroker):
    listen = Listener("tasks")  # type: ignore[assignment]


broker = ListenedBroker("redis://127.0.0.1:1")  # never connected to
