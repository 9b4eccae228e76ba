"""A 0.5-style broker module: it names the app itself, by a factory path."""

from taskiq import InMemoryBroker

import taskiq_fastapi

broker = InMemoryBroker()
taskiq_fastapi.init(broker, "sampleapp.apps:create_app")
