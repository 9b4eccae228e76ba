"""Broker outages at awkward moments, through the real command and real servers.

Found in a second review of `runtime/outages.py`; each test failed before
its fix.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis
from workers import APP, BROKER, WorkerRun, error_line

from tools.nats_server import NatsServer, running_server
from tools.redis_server import RedisServer
from tools.redis_server import running_server as running_redis

pytestmark = pytest.mark.anyio


@pytest.fixture
def own_server() -> Iterator[NatsServer]:
    with running_server() as nats:
        yield nats


@pytest.mark.parametrize("then", ["back", "never", "second"])
async def test_a_stop_while_nats_results_wait_shuts_down_without_a_traceback(
    own_server: NatsServer, redis_url: str, tmp_path: Path, then: str
) -> None:
    """SIGTERM while the NATS server was gone and results waited to be saved:
    the exit status was right (3 at the deadline, 4 after a second signal),
    but the broker's shutdown then logged a traceback: taskiq-nats' result
    backend closes a client of its own, which raised ConnectionResetError,
    and only an outage of the broker (whose fetch had ended with the stop,
    no outage) let that pass."""
    run = WorkerRun(redis_url, tmp_path, nats_url=own_server.url)
    try:
        worker = run.start(
            "worker", *BROKER, *APP, "--workers", "1", "--max-async-tasks", "10",
            "--broker-retry-timeout", "8",
        )  # fmt: skip
        run.wait_for("startup", processes=1)
        await run.sender.startup()
        try:
            sent = [await run.kiq("slow", n, 1.0) for n in range(10)]
        finally:
            await run.sender.shutdown()
        run.wait_for("task 9 started", processes=1)
        own_server.stop()
        await asyncio.sleep(2)  # the tasks have finished; their results wait
        worker.send_signal(signal.SIGTERM)
        await asyncio.sleep(2)
        assert worker.poll() is None, run.output(worker)  # still saving
        if then == "back":
            own_server.start()
        elif then == "second":
            worker.send_signal(signal.SIGTERM)
        status = await asyncio.to_thread(run.exit_status, worker, 40)
    finally:
        run.kill_all()
    output = run.output(worker)
    assert status == {"back": 0, "never": 3, "second": 4}[then], output
    assert "Traceback" not in output
    if then == "never":
        assert error_line(output).startswith(
            "Error: Result backend of broker 'workerapp.broker:broker' unreachable "
        )
    if then == "back":
        await run.sender.startup()
        try:
            done = [await t.wait_result(timeout=10) for t in sent]
        finally:
            await run.sender.shutdown()
        assert [r.return_value for r in done] == list(range(10))
    # Each process ran its lifespan's shutdown once: not again.
    assert run.count("shutdown") == run.count("startup")


@pytest.fixture
def broker_server() -> Iterator[RedisServer]:
    with running_redis(persistent=True) as redis:
        yield redis


@pytest.fixture
def results_server() -> Iterator[RedisServer]:
    with running_redis(persistent=True) as redis:
        yield redis


async def test_a_task_finishing_after_the_broker_was_given_up_saves_its_result(
    broker_server: RedisServer, results_server: RedisServer, tmp_path: Path
) -> None:
    """The broker's server gone past the deadline while a task ran, its
    results' server up: the task finished during the stop, its ack
    (`when_executed`, before the save) raised "not tried" out of taskiq's
    callback, which nobody awaits, and the result was never saved, with
    nothing logged. Now the ack is skipped (the message is delivered again)
    and the result saved."""
    run = WorkerRun(broker_server.url, tmp_path, streams=True)
    run.env["TASKIQ_TEST_RESULTS_URL"] = results_server.url
    try:
        worker = run.start(
            "worker", *BROKER, *APP, "--workers", "1", "--ack-type", "when_executed",
            "--broker-retry-timeout", "2",
        )  # fmt: skip
        run.wait_for("startup", processes=1)
        await run.sender.startup()
        try:
            sent = await run.kiq("slow", 1, 5.0)
        finally:
            await run.sender.shutdown()
        run.wait_for("task 1 started", processes=1)
        broker_server.stop()
        status = await asyncio.to_thread(run.exit_status, worker, 40)
    finally:
        run.kill_all()
    output = run.output(worker)
    assert status == 3, output
    assert "task 1 done" in [event for _, event in run.events()]
    async with Redis.from_url(results_server.url) as redis:
        saved = await redis.exists(sent.task_id)
    assert saved == 1, output
    assert "Traceback" not in output
    broker_server.start()
    async with Redis.from_url(broker_server.url) as redis:
        pending = await redis.xpending(run.queue, "taskiq")
    assert pending["pending"] == 1, output  # not acknowledged: delivered again
