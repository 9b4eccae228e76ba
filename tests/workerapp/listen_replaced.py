"""A broker module that replaces taskiq's `start_listen`, as taskiq 0.12's
`TaskiqInstrumentor().instrument()` does (its OpenTelemetry setup, then
taskiq's); here the replacement notes which process ran it."""

import taskiq.cli.worker.run

from workerapp.app import record
from workerapp.broker import broker

__all__ = ["broker"]

_taskiqs = taskiq.cli.worker.run.start_listen


def start_listen(args: object) -> None:
    record("replaced start_listen")
    _taskiqs(args)  # type: ignore[arg-type]


taskiq.cli.worker.run.start_listen = start_listen
