"""The broker the subprocess tests' workers serve: a real server, a per-test queue."""

import os

from taskiq import AsyncBroker

from workerapp.brokers import (
    make_broker,
    make_cluster_broker,
    make_nats_broker,
    make_sentinel_broker,
)

if os.environ.get("NATS_URL"):
    broker = make_nats_broker(os.environ["NATS_URL"], os.environ["TASKIQ_TEST_QUEUE"])
elif os.environ.get("TASKIQ_TEST_SENTINEL"):
    broker = make_sentinel_broker(
        os.environ["TASKIQ_TEST_SENTINEL"], os.environ["TASKIQ_TEST_QUEUE"]
    )
elif os.environ.get("TASKIQ_TEST_CLUSTER"):
    broker = make_cluster_broker(
        os.environ["REDIS_URL"], os.environ["TASKIQ_TEST_QUEUE"]
    )
else:
    broker = make_broker(
        os.environ["REDIS_URL"],
        os.environ["TASKIQ_TEST_QUEUE"],
        streams=os.environ.get("TASKIQ_TEST_STREAMS") == "1",
        defaults=os.environ.get("TASKIQ_TEST_REDIS_DEFAULTS") == "1",
        # Results on another server than the broker's, when a test says so.
        results_url=os.environ.get("TASKIQ_TEST_RESULTS_URL"),
        consumer_id=os.environ.get("TASKIQ_TEST_CONSUMER_ID", "$"),
    )


def broker_factory() -> AsyncBroker:
    return broker
