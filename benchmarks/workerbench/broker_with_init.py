"""The 0.5 way: the broker module calls init, started by plain `taskiq worker`."""

import taskiq_fastapi
from benchmarks.workerbench.broker import broker

taskiq_fastapi.init(broker, "benchmarks.workerbench.app:app")
