"""A broker module that never names an app (only the missing-app test uses it)."""

from taskiq import InMemoryBroker

broker = InMemoryBroker()
