"""A broker module and an app module that import each other, as in many projects."""

from taskiq import InMemoryBroker

import taskiq_fastapi

broker = InMemoryBroker()
taskiq_fastapi.init(broker, "sampleapp.circular_app:app")

from sampleapp import circular_app  # noqa: E402, F401  (the app registers its routes)
