"""One deadline per dependency: the broker and the result backend (issue 18, item 3).

Each has one clock, from the first failed attempt to the next success,
whatever the client library does inside; past `--broker-retry-timeout` the
command exits 3 with one line naming what was unreachable and for how long.
A server that accepts connections and never answers (a silent port; a real
Sentinel master or cluster node frozen with SIGSTOP) is found out by PINGs.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from subprocess import Popen

import pytest
from redis.asyncio import Redis
from taskiq import TaskiqResult
from workers import APP, BROKER, WorkerRun, error_line

from taskiq_fastapi_cli.runtime.outages import Dependency
from tools.processes import free_port, frozen, silent_port
from tools.redis_server import (
    MASTER_NAME,
    RedisServer,
    running_cluster,
    running_sentinel,
    running_server,
)

pytestmark = pytest.mark.anyio

BROKER_NAME = "Broker 'workerapp.broker:broker'"
BACKEND_NAME = "Result backend of broker 'workerapp.broker:broker'"


@pytest.fixture
def server() -> Iterator[RedisServer]:
    with running_server(persistent=True) as redis:
        yield redis


def gave_up(output: str, name: str, retry_timeout: int) -> float:
    """The one `Error:` line names `name`; the real duration it reports."""
    error = error_line(output)
    said = re.match(
        rf"Error: {re.escape(name)} unreachable for (\d+\.\d) s "
        rf"\(--broker-retry-timeout {retry_timeout}\): \w+",
        error,
    )
    assert said is not None, output
    return float(said[1])


def retry_times(output: str, name: str) -> list[str]:
    return [line for line in output.splitlines() if f"{name} unreachable (" in line]


def test_a_broker_that_accepts_and_never_answers_is_exit_3(tmp_path: Path) -> None:
    with silent_port() as port:
        run = WorkerRun(f"redis://127.0.0.1:{port}", tmp_path)
        started = time.monotonic()
        worker = run.start(
            "worker", *BROKER, *APP, "--workers", "1", "--broker-retry-timeout", "4"
        )
        try:
            code = worker.wait(timeout=60)
        finally:
            run.kill_all()
    took = time.monotonic() - started
    output = run.output(worker)
    assert code == 3, output
    assert 4 <= gave_up(output, BROKER_NAME, 4) < 7, output
    assert took < 4 + 20, output  # the command's own start and stop included
    # Each unanswered PING logged, not only the first.
    assert len(retry_times(output, BROKER_NAME)) >= 2, output
    assert "Traceback" not in output


async def test_result_backend_down_with_the_broker_up_is_exit_3_unacknowledged(
    server: RedisServer, tmp_path: Path
) -> None:
    run = WorkerRun(server.url, tmp_path, streams=True)
    run.env["TASKIQ_TEST_RESULTS_URL"] = f"redis://127.0.0.1:{free_port()}"
    try:
        worker = run.start(
            "worker", *BROKER, *APP, "--workers", "1",
            "--broker-retry-timeout", "6", "--ack-type", "when_saved",
        )  # fmt: skip
        run.wait_for("startup", processes=1)
        await run.sender.startup()
        try:
            await run.kiq("mark", 1)
        finally:
            await run.sender.shutdown()
        code = await asyncio.to_thread(worker.wait, 60)
    finally:
        run.kill_all()
    output = run.output(worker)
    assert code == 3, output
    # It ran (again, where taskiq-redis claims a message left unacknowledged
    # for 1 s while its result waits), and its result could not be saved.
    assert "ran 1" in [event for _, event in run.events()]
    assert 6 <= gave_up(output, BACKEND_NAME, 6) < 9, output
    # Backing off 0.5, 1, 2, 4 s: a line for each attempt.
    assert len(retry_times(output, BACKEND_NAME)) >= 3, output
    assert "Traceback" not in output
    # Not acknowledged: the message waits in the group for another worker.
    async with Redis.from_url(server.url) as redis:
        pending = await redis.xpending(run.queue, "taskiq")
    assert pending["pending"] == 1, output


async def test_back_is_logged_when_the_broker_returns_while_idle(
    server: RedisServer, tmp_path: Path
) -> None:
    run = WorkerRun(server.url, tmp_path)
    try:
        worker = run.start("worker", *BROKER, *APP, "--workers", "1")
        run.wait_for("startup", processes=1)
        await asyncio.sleep(1)
        server.stop()
        await asyncio.sleep(3)
        server.start()
        deadline = time.monotonic() + 20
        back = f"{BROKER_NAME} is back after "
        while back not in run.output(worker):  # no message sent meanwhile
            assert time.monotonic() < deadline, run.output(worker)
            await asyncio.sleep(0.1)
        output = run.output(worker)
        assert len(retry_times(output, BROKER_NAME)) >= 2, output
        assert run.stop(worker) == 0
    finally:
        run.kill_all()


async def test_an_outage_after_an_idle_wait_longer_than_the_timeout_is_ridden_out(
    server: RedisServer, tmp_path: Path
) -> None:
    """The clock starts at the failure, not when the idle fetch began."""
    run = WorkerRun(server.url, tmp_path)
    try:
        worker = run.start(
            "worker", *BROKER, *APP, "--workers", "1", "--broker-retry-timeout", "3"
        )
        run.wait_for("startup", processes=1)
        await asyncio.sleep(5)  # one blocking fetch, longer than the timeout
        server.stop()
        await asyncio.sleep(1)
        server.start()
        await run.sender.startup()
        try:
            done = await (await run.kiq("mark", 1)).wait_result(timeout=30)
        finally:
            await run.sender.shutdown()
        assert done.return_value == 1
        assert worker.poll() is None, run.output(worker)
        assert run.stop(worker) == 0
    finally:
        run.kill_all()


async def test_a_result_save_stuck_on_a_silent_backend_is_cut_at_the_give_up(
    server: RedisServer, tmp_path: Path
) -> None:
    """Results on a server that accepts and never answers, the broker fine:
    the save waits for ever. At the give-up it is cancelled (not acknowledged,
    so the broker delivers the message again), and the command stops then,
    not after the in-flight task's wait for the stop."""
    with silent_port() as port:
        run = WorkerRun(server.url, tmp_path, streams=True)
        run.env["TASKIQ_TEST_RESULTS_URL"] = f"redis://127.0.0.1:{port}"
        try:
            worker = run.start(
                "worker", *BROKER, *APP, "--workers", "1",
                "--broker-retry-timeout", "4", "--ack-type", "when_saved",
                "--wait-tasks-timeout", "60",
            )  # fmt: skip
            run.wait_for("startup", processes=1)
            await run.sender.startup()
            try:
                await run.kiq("mark", 1)
            finally:
                await run.sender.shutdown()
            run.wait_for("ran 1", 1)
            kicked = time.monotonic()
            code = await asyncio.to_thread(worker.wait, 60)
            took = time.monotonic() - kicked
        finally:
            run.kill_all()
    output = run.output(worker)
    assert code == 3, output
    assert 4 <= gave_up(output, BACKEND_NAME, 4) < 7, output
    assert took < 4 + 20, output  # not the 60 s the stop waits for a task
    assert "Traceback" not in output
    async with Redis.from_url(server.url) as redis:
        pending = await redis.xpending(run.queue, "taskiq")
    assert pending["pending"] == 1, output


SWALLOWING = "workerapp.swallowed_cancel:broker"


async def saves_swallowing_a_cancel(
    server: RedisServer, tmp_path: Path, slow: float | None
) -> tuple[WorkerRun, str]:
    """A worker whose result saves swallow their first cancellation, on a
    port that never answers (retry timeout 2 s): `mark 1` kicked, then
    `slow 2` for `slow` seconds if given. It exits 3 at the give-up, naming
    the result backend; the run and its output."""
    with silent_port() as port:
        run = WorkerRun(server.url, tmp_path, streams=True)
        run.env["TASKIQ_TEST_RESULTS_URL"] = f"redis://127.0.0.1:{port}"
        try:
            worker = run.start(
                "worker", SWALLOWING, *BROKER[1:], *APP,
                "--workers", "1", "--broker-retry-timeout", "2",
                "--ack-type", "when_saved", "--wait-tasks-timeout", "60",
            )  # fmt: skip
            run.wait_for("startup", processes=1)
            await run.sender.startup()
            try:
                await run.kiq("mark", 1)  # its save starts the outage
                if slow is not None:
                    await run.kiq("slow", 2, slow)
            finally:
                await run.sender.shutdown()
            run.wait_for("ran 1", 1)
            code = await asyncio.to_thread(run.exit_status, worker, (slow or 2) + 20)
        finally:
            run.kill_all()
    output = run.output(worker)
    assert code == 3, output
    name = f"Result backend of broker {SWALLOWING!r}"
    assert 2 <= gave_up(output, name, 2) < 5, output
    assert "Traceback" not in output
    return run, output


async def test_a_stuck_result_save_that_swallows_a_cancellation_is_cut_too(
    server: RedisServer, tmp_path: Path
) -> None:
    """The same, with a save that swallows the first cancellation it gets and
    goes on waiting, as redis-py or nats-py may before Python 3.12: cancelled
    once at the give-up, its task stayed in flight and the stop waited for it
    (here, the 60 s of --wait-tasks-timeout)."""
    run, output = await saves_swallowing_a_cancel(server, tmp_path, slow=None)
    assert "save swallowed a cancellation" in [event for _, event in run.events()]
    async with Redis.from_url(server.url) as redis:
        pending = await redis.xpending(run.queue, "taskiq")
    assert pending["pending"] == 1, output


async def test_a_result_save_begun_after_the_give_up_fails_at_once(
    server: RedisServer, tmp_path: Path
) -> None:
    """A task still running at the give-up finishes during the stop: its save
    waited on the server that never answers (no socket timeout: for ever),
    with nothing left to cut it, and the stop for it. Not tried: the result
    is not saved, the message not acknowledged."""
    run, output = await saves_swallowing_a_cancel(server, tmp_path, slow=8)
    # The stop came while the slow task ran; it finished after the give-up.
    # (taskiq-redis 1.1 claims idle messages again, so that more may run.)
    assert re.search(r"Waiting for \d+ running tasks", output), output
    assert "task 2 done" in [event for _, event in run.events()]
    async with Redis.from_url(server.url) as redis:
        pending = await redis.xpending(run.queue, "taskiq")
    assert pending["pending"] == 2, output


async def test_a_result_save_is_still_watched_after_the_broker_is_given_up_on(
    server: RedisServer, tmp_path: Path
) -> None:
    """Broker and results on one server, frozen while a task runs: the idle
    fetch finds it out first, and the broker is given up on. The task then
    finishes and its save waits on the frozen server (no socket timeout: for
    ever); the watch had ended at the broker's give-up, so nothing cut the
    save, and the stop waited for it. Watched still, it is given up on in
    turn and cut; the message is not acknowledged."""
    run = WorkerRun(server.url, tmp_path, streams=True)
    run.env["TASKIQ_TEST_RESULTS_URL"] = server.url
    try:
        worker = run.start(
            "worker", "workerapp.swallowed_cancel:broker", *BROKER[1:], *APP,
            "--workers", "1", "--broker-retry-timeout", "2",
            "--ack-type", "when_saved", "--wait-tasks-timeout", "60",
        )  # fmt: skip
        run.wait_for("startup", processes=1)
        await run.sender.startup()
        try:
            await run.kiq("slow", 2, 3)
        finally:
            await run.sender.shutdown()
        run.wait_for("task 2 started", 1)
        with frozen(server):
            code = await asyncio.to_thread(run.exit_status, worker, 3 + 2 + 2 + 20)
    finally:
        run.kill_all()
    output = run.output(worker)
    assert code == 3, output
    name = "Broker 'workerapp.swallowed_cancel:broker'"
    assert 2 <= gave_up(output, name, 2) < 5, output
    assert "task 2 done" in [event for _, event in run.events()]
    assert retry_times(output, f"Result backend of broker {name[7:]}"), output
    assert "Traceback" not in output
    async with Redis.from_url(server.url) as redis:
        pending = await redis.xpending(run.queue, "taskiq")
    assert pending["pending"] == 1, output


@contextmanager
def variant(name: str, tmp_path: Path) -> Iterator[tuple[RedisServer, WorkerRun]]:
    """taskiq-redis' stream broker and results behind a real Sentinel, or on a
    real one-node cluster; and the server holding the data (the master, the
    node)."""
    if name == "sentinel":
        with running_server() as master, running_sentinel(master) as sentinel:
            where = f"{sentinel.url}/{MASTER_NAME}"
            yield master, WorkerRun(master.url, tmp_path, sentinel=where)
    else:
        with running_cluster() as node:
            yield node, WorkerRun(node.url, tmp_path, cluster=True)


VARIANTS = pytest.mark.parametrize("name", ["sentinel", "cluster"])


async def logged(run: WorkerRun, worker: Popen[bytes], text: str) -> None:
    """Wait until the worker command's output holds `text`."""
    deadline = time.monotonic() + 30
    while text not in run.output(worker):
        assert time.monotonic() < deadline, run.output(worker)
        await asyncio.sleep(0.1)


async def run_tasks_and_stop(run: WorkerRun, worker: Popen[bytes], wait: float) -> None:
    """Kick 5 tasks: each runs within `wait` s; the worker, still up, stops with 0."""
    await run.sender.startup()
    try:
        tasks = await run.kiq_all("mark", [(n,) for n in range(5)])
        results = [await task.wait_result(timeout=wait) for task in tasks]
    finally:
        await run.sender.shutdown()
    assert [result.return_value for result in results] == list(range(5))
    assert worker.poll() is None, run.output(worker)
    assert run.stop(worker) == 0


@VARIANTS
async def test_a_frozen_sentinel_master_or_cluster_node_is_exit_3(
    name: str, tmp_path: Path
) -> None:
    """Its socket accepts, nothing answers: the worker's PINGs go unanswered."""
    with variant(name, tmp_path) as (server, run):
        try:
            worker = run.start(
                "worker", *BROKER, *APP, "--workers", "1", "--broker-retry-timeout", "4"
            )
            await logged(run, worker, "Listening started")  # the broker started
            with frozen(server):
                froze = time.monotonic()
                code = await asyncio.to_thread(worker.wait, 60)
                took = time.monotonic() - froze
        finally:
            run.kill_all()
    output = run.output(worker)
    assert code == 3, output
    assert 4 <= gave_up(output, BROKER_NAME, 4) < 7, output
    assert took < 4 + 20, output  # the PINGs' period and the stop included
    # Found out by the PINGs (redis-py's own socket timeouts come later, and
    # behind Sentinel the sentinel's 30 s to call the master down), each one
    # unanswered logged.
    retries = retry_times(output, BROKER_NAME)
    assert len(retries) >= 2, output
    assert "(ConnectionError: no answer to a PING within " in retries[0], output
    assert "Traceback" not in output


@VARIANTS
async def test_a_sentinel_master_or_cluster_node_frozen_a_while_is_ridden_out(
    name: str, tmp_path: Path
) -> None:
    """Frozen for less than the timeout, then continued: "back", tasks run."""
    with variant(name, tmp_path) as (server, run):
        try:
            worker = run.start(
                "worker",
                *BROKER,
                *APP,
                "--workers",
                "1",
                "--broker-retry-timeout",
                "12",
            )
            await logged(run, worker, "Listening started")  # the broker started
            with frozen(server):
                await logged(run, worker, f"{BROKER_NAME} unreachable (")
            # No message sent meanwhile: a PING answered.
            await logged(run, worker, f"{BROKER_NAME} is back after ")
            await run_tasks_and_stop(run, worker, wait=30)
        finally:
            run.kill_all()
    output = run.output(worker)
    assert not [line for line in output.splitlines() if line.startswith("Error: ")]
    assert "Traceback" not in output


async def test_a_frozen_sentinel_first_in_the_list_is_ridden_out(
    tmp_path: Path,
) -> None:
    """Two sentinels, the first frozen, the master fine: the worker goes on.

    A lookup of the master waits for the frozen sentinel until its socket
    times out (here 10 s, and no retries of redis-py's: the same stall with
    either redis-py), then asks the next one, which redis-py asks first from
    then on (`discover_master`). No new connection to the master is made
    meanwhile, which the worker logs as an outage, and ends; within the retry
    timeout it is none to exit on: tasks kicked meanwhile run.
    """
    with (
        running_server() as master,
        running_sentinel(master) as first,
        running_sentinel(master) as second,
    ):
        options = "socket_timeout=10&retries=0"
        sentinels = f"{first.url},{second.url}/{MASTER_NAME}?{options}"
        run = WorkerRun(master.url, tmp_path, sentinel=sentinels)
        try:
            worker = run.start(
                "worker",
                *BROKER,
                *APP,
                "--workers",
                "1",
                "--broker-retry-timeout",
                "30",
            )
            await logged(run, worker, "Listening started")  # the broker started
            with frozen(first):
                await run_tasks_and_stop(run, worker, wait=60)
        finally:
            run.kill_all()
    output = run.output(worker)
    assert re.search(r"(Broker|Result backend) .* unreachable \(", output), output
    assert re.search(r"(Broker|Result backend) .* is back after ", output), output
    assert not [line for line in output.splitlines() if line.startswith("Error: ")]
    assert "Traceback" not in output


async def test_no_sentinel_answering_is_named_by_address_without_its_password(
    tmp_path: Path,
) -> None:
    """redis-py's MasterNotFoundError names each sentinel it asked by the repr
    of its client: a kilobyte each, and the password in it before redis-py 8.
    The worker's lines name each by its address."""
    refused = sorted({free_port() for _ in range(2)})
    password = "sentinel-password-7f3a"
    sentinels = ",".join(f"127.0.0.1:{port}" for port in refused)
    where = f"{sentinels}/{MASTER_NAME}?password={password}&socket_timeout=1"
    run = WorkerRun(f"redis://127.0.0.1:{refused[0]}/0", tmp_path, sentinel=where)
    try:
        worker = run.start(
            "worker", *BROKER, *APP, "--workers", "1", "--broker-retry-timeout", "10"
        )
        code = await asyncio.to_thread(worker.wait, 60)
    finally:
        run.kill_all()
    output = run.output(worker)
    assert code == 3, output
    gave_up(output, BROKER_NAME, 10)
    # The failed lookups, logged as the startup is retried.
    lookups = [line for line in output.splitlines() if "MasterNotFoundError" in line]
    assert lookups, output
    asked = " - .*, ".join(f"127\\.0\\.0\\.1:{port}" for port in refused)
    for line in lookups:
        assert re.search(
            f"MasterNotFoundError: No master found for '{MASTER_NAME}' : {asked} - ",
            line,
        ), line
    assert password not in output
    assert max(map(len, output.splitlines())) < 500, output
    assert "Traceback" not in output


@VARIANTS
async def test_their_result_backends_ping_the_frozen_server_with_a_deadline(
    name: str, tmp_path: Path
) -> None:
    """The result backends' PING: answered; unanswered within its deadline
    while the server is frozen; answered again once it is continued, on
    connections still in step (no late PONG read as another reply)."""
    with variant(name, tmp_path) as (server, run):
        backend = run.sender.result_backend
        await backend.startup()
        try:
            results = Dependency(BACKEND_NAME, backend, 4, lambda unreachable: None)
            assert await results.unanswered() is None
            with frozen(server):
                asked = time.monotonic()
                unanswered = await results.unanswered()
                took = time.monotonic() - asked
            assert isinstance(unanswered, ConnectionError), unanswered
            assert took < results.ping_timeout + 5
            assert await results.unanswered() is None
            await backend.set_result("answered", TaskiqResult(
                is_err=False, return_value=1, execution_time=0.0
            ))  # fmt: skip
            assert (await backend.get_result("answered")).return_value == 1
        finally:
            await backend.shutdown()
