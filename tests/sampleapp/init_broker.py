"""A 0.5-style broker module: it names the app itself, by a factory path."""

from taskiq_redis import ListQueueBroker

import taskiq_fastapi

broker = ListQueueBroker("redis://127.0.0.1:1")  # never connected to
taskiq_fastapi.init(broker, "sampleapp.apps:create_app")
