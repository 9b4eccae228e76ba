"""Broker outages: the worker waits, resumes in place, and gives up cleanly (issue 8).

Each test has its own Redis server, which it stops and starts again on the
same port; like a production server it keeps its data across restarts.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis
from workers import APP, BROKER, WorkerRun, error_line

from tools.processes import free_port
from tools.redis_server import RedisServer, running_server

pytestmark = pytest.mark.anyio

# Gave up at the deadline (2 s), give or take the last attempt's own time.
GAVE_UP = re.compile(
    r"^Error: Broker 'workerapp\.broker:broker' unreachable for [23]\.\d s "
    r"\(--broker-retry-timeout 2\): ConnectionError: ",
    re.MULTILINE,
)


@pytest.fixture
def server() -> Iterator[RedisServer]:
    with running_server(persistent=True) as redis:
        yield redis


@pytest.fixture
def outage_run(server: RedisServer, tmp_path: Path) -> Iterator[WorkerRun]:
    run = WorkerRun(server.url, tmp_path)
    yield run
    run.kill_all()


@pytest.fixture
def outage_stream_run(server: RedisServer, tmp_path: Path) -> Iterator[WorkerRun]:
    run = WorkerRun(server.url, tmp_path, streams=True)
    yield run
    run.kill_all()


async def results(run: WorkerRun, task: str, calls: list[tuple[Any, ...]]) -> list[Any]:
    await run.sender.startup()
    try:
        sent = [await run.kiq(task, *args) for args in calls]
        done = await asyncio.gather(*(t.wait_result(timeout=60) for t in sent))
    finally:
        await run.sender.shutdown()
    assert [r.error for r in done if r.is_err] == []
    return [r.return_value for r in done]


def one_process_one_lifespan(run: WorkerRun, replies: list[dict[str, Any]]) -> int:
    (pid,) = {reply["pid"] for reply in replies}
    assert run.count("startup") == {pid: 1}
    return int(pid)


async def test_an_idle_worker_with_redis_defaults_waits_quietly(
    outage_run: WorkerRun,
) -> None:
    run = outage_run
    run.env["TASKIQ_TEST_REDIS_DEFAULTS"] = "1"  # redis-py's 5 s socket timeout
    worker = run.start("worker", *BROKER, *APP, "--workers", "1")
    run.wait_for("startup", processes=1)
    # taskiq's line once its broker has started, the last as the worker starts.
    wait_for_line(run, worker, "Listening started.")
    settled = run.output(worker)
    time.sleep(16)  # more than three socket timeouts, idle
    assert run.output(worker) == settled  # nothing above DEBUG
    replies = await results(run, "whoami", [(1,)])
    one_process_one_lifespan(run, replies)
    assert run.stop(worker) == 0


async def test_a_4_s_outage_mid_run_resumes_in_the_same_process(
    outage_run: WorkerRun, server: RedisServer
) -> None:
    run = outage_run
    worker = run.start("worker", *BROKER, *APP, "--workers", "1")
    run.wait_for("startup", processes=1)
    before = await results(run, "whoami", [(n,) for n in range(5)])
    await run.sender.startup()
    running = await run.kiq("slow", 99, 2.0)
    await run.sender.shutdown()
    run.wait_for("task 99 started", processes=1)
    server.stop()  # mid-task: it finishes during the outage
    await asyncio.sleep(4)
    server.start()
    after = await results(run, "whoami", [(n,) for n in range(5, 10)])
    assert [r["n"] for r in before + after] == list(range(10))
    await run.sender.startup()
    try:
        finished = await running.wait_result(timeout=30)
    finally:
        await run.sender.shutdown()
    assert (finished.is_err, finished.return_value) == (False, 99)
    one_process_one_lifespan(run, before + after)
    output = run.output(worker)
    assert "Traceback" not in output
    retries = output.count("Broker 'workerapp.broker:broker' unreachable (")
    assert 1 <= retries <= 8, output  # one line per retry, backing off
    assert output.count("Broker 'workerapp.broker:broker' is back after ") == 1
    assert run.stop(worker) == 0
    assert run.count("shutdown") == run.count("startup")


@pytest.mark.parametrize("streams", [False, True], ids=["list", "stream"])
async def test_a_broker_that_starts_3_s_after_the_worker(
    server: RedisServer, tmp_path: Path, streams: bool
) -> None:
    run = WorkerRun(server.url, tmp_path, streams=streams)
    try:
        server.stop()
        worker = run.start("worker", *BROKER, *APP, "--workers", "1")
        await asyncio.sleep(3)
        server.start()
        replies = await results(run, "whoami", [(n,) for n in range(3)])
        one_process_one_lifespan(run, replies)
        assert "Traceback" not in run.output(worker)
        assert run.stop(worker) == 0
    finally:
        run.kill_all()


async def test_an_outage_longer_than_the_retry_timeout_stops_the_command(
    outage_run: WorkerRun, server: RedisServer
) -> None:
    run = outage_run
    worker = run.start(
        "worker", *BROKER, *APP, "--workers", "2", "--broker-retry-timeout", "2"
    )
    run.wait_for("startup", processes=2)
    server.stop()
    assert worker.wait(timeout=30) == 3
    output = run.output(worker)
    error = error_line(output)
    assert GAVE_UP.match(error), error
    assert "Traceback" not in output
    # Stopped gracefully: each process ran its lifespan shutdown once.
    assert run.count("shutdown") == run.count("startup")


async def test_the_retry_timeout_applies_at_startup_too(
    outage_stream_run: WorkerRun, server: RedisServer
) -> None:
    run = outage_stream_run  # the stream broker connects at startup
    server.stop()
    started = time.monotonic()
    worker = run.start("worker", *BROKER, *APP, "--broker-retry-timeout", "2")
    assert worker.wait(timeout=30) == 3
    output = run.output(worker)
    assert time.monotonic() - started < 15
    assert len(GAVE_UP.findall(output)) == 1, output
    assert "Broker 'workerapp.broker:broker' unreachable (" in output  # retried
    assert "Traceback" not in output


async def test_refused_credentials_are_one_clear_error_not_an_outage(
    server: RedisServer, tmp_path: Path
) -> None:
    """redis-py derives AuthenticationError from its ConnectionError: a wrong
    password was retried for the whole --broker-retry-timeout, then reported
    as "unreachable"."""
    async with Redis.from_url(server.url) as redis:
        await redis.config_set("requirepass", "right")
    wrong = server.url.replace("redis://", "redis://:wrong@")
    run = WorkerRun(wrong, tmp_path, streams=True)  # connects at startup
    try:
        started = time.monotonic()
        worker = run.start("worker", *BROKER, *APP, "--broker-retry-timeout", "60")
        assert worker.wait(timeout=30) == 3
        took = time.monotonic() - started
        output = run.output(worker)
    finally:
        run.kill_all()
    error = error_line(output)
    assert error.startswith(
        "Error: Broker 'workerapp.broker:broker' failed to start: AuthenticationError: "
    ), error
    assert "unreachable" not in output
    assert "Traceback" not in output
    assert took < 20, output


async def test_refused_credentials_met_by_a_fetch_are_one_clear_error(
    server: RedisServer, tmp_path: Path
) -> None:
    """The list broker connects at its first fetch: a wrong password crash-
    looped the workers (13 lifespans and 26 tracebacks in 15 s), no `Error:`."""
    async with Redis.from_url(server.url) as redis:
        await redis.config_set("requirepass", "right")
    wrong = server.url.replace("redis://", "redis://:wrong@")
    run = WorkerRun(wrong, tmp_path)
    try:
        started = time.monotonic()
        worker = run.start("worker", *BROKER, *APP, "--workers", "2")
        assert run.exit_status(worker, timeout=30) == 3
        took = time.monotonic() - started
        output = run.output(worker)
    finally:
        run.kill_all()
    error = error_line(output)
    assert error.startswith(
        "Error: Broker 'workerapp.broker:broker' refused the credentials: "
        "AuthenticationError: "
    ), error
    assert "Traceback" not in output
    assert took < 20, output  # at once, not after --broker-retry-timeout (120)
    assert len(run.count("startup")) == 2  # no process started again
    assert run.count("shutdown") == run.count("startup")


async def test_refused_credentials_of_the_result_backend_are_one_clear_error(
    redis_url: str, server: RedisServer, tmp_path: Path
) -> None:
    """Each result was dropped with a traceback, and SIGTERM exited 0."""
    async with Redis.from_url(server.url) as redis:
        await redis.config_set("requirepass", "right")
    run = WorkerRun(redis_url, tmp_path)
    run.env["TASKIQ_TEST_RESULTS_URL"] = server.url.replace(
        "redis://", "redis://:wrong@"
    )
    try:
        worker = run.start("worker", *BROKER, *APP, "--workers", "1")
        run.wait_for("startup", processes=1)
        await run.sender.startup()
        try:
            await run.kiq("slow", 1, 0.1)
        finally:
            await run.sender.shutdown()
        assert run.exit_status(worker, timeout=30) == 3
        output = run.output(worker)
    finally:
        run.kill_all()
    error = error_line(output)
    assert error.startswith(
        "Error: Result backend of broker 'workerapp.broker:broker' refused the "
        "credentials: AuthenticationError: "
    ), error
    assert "Traceback" not in output
    assert run.count("shutdown") == run.count("startup")


async def spoil_queue(run: WorkerRun, url: str) -> None:
    """Make the broker's key a string: every fetch then answers WRONGTYPE."""
    async with Redis.from_url(url) as redis:
        await redis.delete(run.queue)
        await redis.set(run.queue, "not a queue")


def wait_for_line(run: WorkerRun, worker: Any, text: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while text not in run.output(worker):
        assert worker.poll() is None, run.output(worker)
        assert time.monotonic() < deadline, run.output(worker)
        time.sleep(0.05)


FAILING = "Broker 'workerapp.broker:broker' failing (ResponseError: WRONGTYPE "


@pytest.mark.parametrize("streams", [False, True], ids=["list", "stream"])
async def test_a_fetch_that_keeps_failing_stops_the_command_with_one_line(
    server: RedisServer, tmp_path: Path, streams: bool
) -> None:
    """An error of the server's answer (not of reaching it) crashed the worker
    process with a traceback, and taskiq started another, over and over (16
    lifespans in 20 s): now it runs the broker's clock as an outage does."""
    run = WorkerRun(server.url, tmp_path, streams=streams)
    try:
        if not streams:  # the list broker's fetch meets it at once
            await spoil_queue(run, server.url)
        worker = run.start(
            "worker", *BROKER, *APP, "--workers", "2", "--broker-retry-timeout", "3"
        )
        run.wait_for("startup", processes=2)
        if streams:  # its startup would: a startup error is said at once
            await spoil_queue(run, server.url)
        assert run.exit_status(worker, timeout=30) == 3
        output = run.output(worker)
    finally:
        run.kill_all()
    error = error_line(output)
    assert re.match(
        r"Error: Broker 'workerapp\.broker:broker' failing for [3-6]\.\d s "
        r"\(--broker-retry-timeout 3\): ResponseError: WRONGTYPE ",
        error,
    ), error
    assert FAILING in output
    assert "unreachable" not in output
    assert "Traceback" not in output
    # No process started again; each stopped gracefully.
    assert len(run.count("startup")) == 2
    assert run.count("shutdown") == run.count("startup")


@pytest.mark.parametrize("streams", [False, True], ids=["list", "stream"])
async def test_a_fetch_failing_for_a_while_resumes_in_the_same_process(
    server: RedisServer, tmp_path: Path, streams: bool
) -> None:
    run = WorkerRun(server.url, tmp_path, streams=streams)
    try:
        if not streams:  # a BRPOP under way is not woken by it
            await spoil_queue(run, server.url)
        worker = run.start("worker", *BROKER, *APP, "--workers", "1")
        run.wait_for("startup", processes=1)
        if streams:
            await spoil_queue(run, server.url)
        wait_for_line(run, worker, FAILING)
        async with Redis.from_url(server.url) as redis:
            await redis.delete(run.queue)
        replies = await results(run, "whoami", [(n,) for n in range(5)])
        assert [reply["n"] for reply in replies] == list(range(5))
        one_process_one_lifespan(run, replies)
        output = run.output(worker)
        assert "Broker 'workerapp.broker:broker' is back after " in output
        assert "Traceback" not in output
        assert run.stop(worker) == 0
    finally:
        run.kill_all()


async def test_an_idle_worker_whose_fetch_failed_for_a_while_is_back(
    server: RedisServer, tmp_path: Path
) -> None:
    """A failover (READONLY for 2 s) passed while no message came: the fetch
    worked again, but a fetch that works and finds nothing returns nothing,
    and a PING answered did not end a failing fetch. The broker stayed
    failing: no "is back", /readyz 503, and its clock ran on, so that one
    connection the server dropped 8 s later stopped the command (exit 3,
    "unreachable for 10.0 s" with a 4 s retry timeout)."""
    run = WorkerRun(server.url, tmp_path)
    try:
        worker = run.start(
            "worker", *BROKER, *APP, "--workers", "1", "--broker-retry-timeout", "4"
        )
        run.wait_for("startup", processes=1)
        async with Redis.from_url(server.url) as redis:
            await redis.execute_command("REPLICAOF", "127.0.0.1", str(free_port()))
            wait_for_line(run, worker, "Broker 'workerapp.broker:broker' failing (")
            await asyncio.sleep(1)
            await redis.execute_command("REPLICAOF", "NO", "ONE")
        wait_for_line(
            run, worker, "Broker 'workerapp.broker:broker' is back after ", 15
        )
        await asyncio.sleep(5)  # longer than the retry timeout, idle
        async with Redis.from_url(server.url) as redis:
            await redis.client_kill_filter(_type="normal", skipme=True)
        await asyncio.sleep(3)
        assert worker.poll() is None, run.output(worker)
        replies = await results(run, "whoami", [(1,)])
        one_process_one_lifespan(run, replies)
        assert run.stop(worker) == 0
    finally:
        run.kill_all()
    assert "Traceback" not in run.output(worker)


async def test_stream_broker_outage_loses_nothing_and_runs_nothing_twice(
    outage_stream_run: WorkerRun, server: RedisServer
) -> None:
    run = outage_stream_run
    worker = run.start(
        "worker", *BROKER, *APP, "--workers", "2", "--ack-type", "when_executed"
    )
    run.wait_for("startup", processes=2)
    before = await results(run, "mark", [(n,) for n in range(20)])
    server.stop()
    await asyncio.sleep(4)
    server.start()
    after = await results(run, "mark", [(n,) for n in range(20, 40)])
    assert before + after == list(range(40))
    ran = [event for _, event in run.events() if event.startswith("ran ")]
    assert sorted(ran, key=lambda e: int(e.split()[1])) == [
        f"ran {n}" for n in range(40)
    ]
    assert len(run.count("startup")) == 2  # no process restarted
    assert "Traceback" not in run.output(worker)
    assert run.stop(worker) == 0
