"""The broker the subprocess tests' workers serve: a real Redis, a per-test queue."""

import os

from taskiq import AsyncBroker

from workerapp.brokers import make_broker

broker = make_broker(
    os.environ["REDIS_URL"],
    os.environ["TASKIQ_TEST_QUEUE"],
    streams=os.environ.get("TASKIQ_TEST_STREAMS") == "1",
    defaults=os.environ.get("TASKIQ_TEST_REDIS_DEFAULTS") == "1",
)


def broker_factory() -> AsyncBroker:
    return broker
