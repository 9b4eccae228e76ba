"""A broker module that calls init itself, as taskiq-fastapi 0.5 users write it."""

import taskiq_fastapi
from workerapp.broker import broker

taskiq_fastapi.init(broker, "workerapp.app:app")
