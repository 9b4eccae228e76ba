import taskiq_fastapi
from workerapp.broker import broker

taskiq_fastapi.init(broker, "workerapp.app:other_app")
