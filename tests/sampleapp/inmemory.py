"""An InMemoryBroker, which projects pick for their tests: no worker can serve it."""

from taskiq import InMemoryBroker

broker = InMemoryBroker()
