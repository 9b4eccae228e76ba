"""`worker --metrics`: Prometheus metrics on the health port (issue 24).

The real command, its worker processes, Redis and NATS JetStream; the scrape
is read with prometheus_client's own parser.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis
from taskiq.kicker import AsyncKicker
from workers import COMMAND, TESTS_DIR, WorkerRun, commands_tmpdir, get_json

import taskiq_fastapi
from tools.processes import free_port
from tools.redis_server import running_server

pytestmark = pytest.mark.anyio

APP = ["workerapp.broker:broker", "workerapp.counted", "--app", "workerapp.app:app"]
DASHBOARD = Path(__file__).parent.parent / "examples" / "grafana-dashboard.json"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


class Metrics:
    def __init__(self, run: WorkerRun, *extra: str) -> None:
        self.port = free_port()
        run.env["RELEASE_FILE"] = str(run.tmp_path / "release")
        self.release_file = Path(run.env["RELEASE_FILE"])
        self.worker = run.start(
            "worker", *APP, "--health-port", str(self.port), "--metrics", *extra
        )
        get_json(self.url("/readyz"))  # answers once the command started

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def text(self) -> str:
        with urllib.request.urlopen(self.url("/metrics"), timeout=5) as response:
            assert response.headers["Content-Type"].startswith("text/plain")
            return str(response.read().decode())

    def samples(self) -> Samples:
        return {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(self.text())
            for sample in family.samples
        }

    def value(self, name: str, **labels: str) -> float | None:
        return self.samples().get((name, frozenset(labels.items())))

    def settled(self, want: list[tuple[str, dict[str, str], float]]) -> Samples:
        """A scrape that holds every wanted value at once.

        Each process writes its counts once a second: when one process's
        counts are seen, another's may not have been written yet.
        """
        deadline = time.monotonic() + 20
        while True:
            got = self.samples()
            seen = [
                got.get((name, frozenset(labels.items()))) for name, labels, _ in want
            ]
            if seen == [value for _, _, value in want]:
                return got
            assert time.monotonic() < deadline, list(zip(want, seen, strict=True))
            time.sleep(0.1)

    def until(
        self, name: str, test: Callable[[float | None], bool], **labels: str
    ) -> float | None:
        deadline = time.monotonic() + 20
        while True:
            value = self.value(name, **labels)
            if test(value):
                return value
            assert time.monotonic() < deadline, (name, labels, value)
            time.sleep(0.1)

    async def backlog_is(self, queue: str, server: Callable[[], Awaitable[int]]) -> int:
        """The server's own count, once the sampled backlog equals it."""
        deadline = time.monotonic() + 20
        while True:
            counted = await server()
            sampled = self.value("taskiq_backlog_messages", queue=queue)
            if sampled == counted:
                return counted
            assert time.monotonic() < deadline, (sampled, counted)
            await asyncio.sleep(0.2)

    def pids(self) -> list[int]:
        """The worker processes' pids, once every one is ready."""
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(self.url("/readyz"), timeout=5) as got:
                    return [
                        worker["pid"] for worker in json.loads(got.read())["workers"]
                    ]
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.1)

    def release(self) -> None:
        self.release_file.touch()


def task(name: str) -> str:
    return f"workerapp.counted:{name}"


async def kick(run: WorkerRun, name: str, *args: Any, **labels: Any) -> Any:
    return await AsyncKicker(task(name), run.sender, labels).kiq(*args)


async def test_counts_of_every_process_summed_across_a_kill_and_a_new_run(
    run: WorkerRun,
) -> None:
    temp = run.tmp_path / "tmp"
    temp.mkdir()
    run.env["TMPDIR"] = str(temp)  # where the command keeps this run's metrics
    m = Metrics(run, "--workers", "2", "--max-async-tasks", "1")

    async def fine_(n: int) -> int:
        return n

    # Kicked as an app recording their status kicks them (TaskStatus).
    fine = run.sender.register_task(fine_, task_name=task("fine"))
    taskiq_fastapi.TaskStatus(run.sender, [fine])
    await run.sender.startup()
    try:
        sent = [await fine.kiq(n) for n in range(6)]
        sent += [await kick(run, "broken", 1)]
        sent += [await kick(run, "broken", 2, retry_on_error=True)]  # runs twice
        for each in sent:
            await each.wait_result(timeout=20)
        fine_n = {"task_name": task("fine")}
        broken = {"task_name": task("broken")}
        got = m.settled(
            [
                ("taskiq_tasks_received_total", fine_n, 6),
                ("taskiq_tasks_succeeded_total", fine_n, 6),
                ("taskiq_tasks_failed_total", fine_n, 0),
                ("taskiq_tasks_received_total", broken, 3),
                ("taskiq_tasks_failed_total", broken, 3),
                ("taskiq_tasks_retried_total", broken, 1),
                ("taskiq_tasks_succeeded_total", broken, 0),
                ("taskiq_task_execution_seconds_count", fine_n, 6),
                ("taskiq_task_queue_seconds_count", fine_n, 6),
                ("taskiq_worker_restarts_total", {}, 0),
                ("taskiq_broker_unreachable_seconds", {}, 0),
            ]
        )
        assert ("taskiq_task_queue_seconds_count", frozenset(broken.items())) not in got
        dashboard_queries_exist(got)

        # One task held in each process; then one process is killed.
        await kick(run, "held", 1)
        await kick(run, "held", 2)
        held = {"task_name": task("held")}
        m.until("taskiq_tasks_in_flight", lambda v: v == 2, **held)
        os.kill(m.pids()[1], signal.SIGKILL)
        # Its task no longer counts as running, its counts still do.
        m.until("taskiq_tasks_in_flight", lambda v: v == 1, **held)
        m.release()
        m.until("taskiq_worker_restarts_total", lambda v: v == 1)
        m.until("taskiq_tasks_in_flight", lambda v: v == 0, **held)
        for each in [await fine.kiq(n) for n in range(4)]:
            await each.wait_result(timeout=20)
        m.until("taskiq_tasks_received_total", lambda v: v == 10, **fine_n)
        assert m.value("taskiq_tasks_received_total", **held) == 2
        assert (m.value("taskiq_task_execution_seconds_sum", **held) or 0) > 0
        assert m.value("taskiq_tasks_failed_total", **broken) == 3
    finally:
        await run.sender.shutdown()
    assert run.stop(m.worker) == 0
    assert list(temp.iterdir()) == []
    run.env["TMPDIR"] = commands_tmpdir()  # the suite's own again

    # The next run of the command starts from nothing.
    again = Metrics(run, "--workers", "1")
    again.pids()
    assert not [key for key in again.samples() if key[0].startswith("taskiq_tasks")]


async def test_a_run_that_ends_without_post_execute_is_no_longer_in_flight(
    run: WorkerRun,
) -> None:
    """A dependency whose teardown raises ends the run inside taskiq's
    receiver, which then calls no middleware's post_execute: the run was
    counted in flight for ever, and neither succeeded nor failed."""
    m = Metrics(run, "--workers", "1")
    m.pids()
    await run.sender.startup()
    try:
        for n in range(3):
            await kick(run, "torn_down", n)
    finally:
        await run.sender.shutdown()
    named = {"task_name": task("torn_down")}
    m.until("taskiq_tasks_received_total", lambda v: v == 3, **named)
    m.until("taskiq_tasks_in_flight", lambda v: v == 0, **named)
    ended = sum(
        m.value(f"taskiq_tasks_{outcome}_total", **named) or 0
        for outcome in ("succeeded", "failed")
    )
    assert ended == 3
    assert m.value("taskiq_task_execution_seconds_count", **named) == 3


async def test_a_run_without_post_execute_is_timed_to_its_end_not_to_a_flush() -> None:
    """A run that skips post_execute was timed when the once-a-second flush
    found it done: up to a second more than it ran, in the histogram that
    alerts on slow tasks. In a running loop, as the receiver calls
    middlewares in its asyncio task."""
    from taskiq import TaskiqMessage

    from taskiq_fastapi_cli.health.metrics import _Metrics, _TaskMetrics

    counted = _TaskMetrics(_Metrics())

    async def run_skipping_post_execute() -> None:
        message = TaskiqMessage(
            task_id="t", task_name="t", labels={}, args=[], kwargs={}
        )
        counted.pre_execute(message)

    await asyncio.create_task(run_skipping_post_execute())
    await asyncio.sleep(0.5)  # the flush comes later
    counted.flush()
    families = {m.name: m for m in counted.metrics.execution.collect()}
    samples = {
        s.name: s.value for s in families["taskiq_task_execution_seconds"].samples
    }
    assert samples["taskiq_task_execution_seconds_count"] == 1
    assert samples["taskiq_task_execution_seconds_sum"] < 0.25
    ended = {m.name: m for m in counted.metrics.failed.collect()}
    failed = {s.name: s.value for s in ended["taskiq_tasks_failed"].samples}
    assert failed["taskiq_tasks_failed_total"] == 1


def dashboard_queries_exist(scraped: Samples) -> None:
    """Every metric a query of the example dashboard names is in the scrape."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [
        target["expr"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]
    assert queries
    names = {name for query in queries for name in re.findall(r"taskiq_\w+", query)}
    assert names - {name for name, _ in scraped} == set()


async def test_backlog_of_a_redis_list_leaves_out_what_workers_took(
    run: WorkerRun,
) -> None:
    m = Metrics(run, "--workers", "2", "--max-async-tasks", "1", "--max-prefetch", "1")
    queue = {"queue": run.queue}
    m.until("taskiq_backlog_messages", lambda v: v == 0, **queue)
    await run.sender.startup()
    try:
        for n in range(12):
            await kick(run, "held", n)
        run.wait_for("held 0", 1)
        redis = Redis.from_url(run.env["REDIS_URL"])
        length = await m.backlog_is(run.queue, lambda: redis.llen(run.queue))
        await redis.aclose()
        # Taken by each: running, waiting to run, prefetched, being put.
        assert 12 - 2 * 4 <= length <= 12 - 2
        m.release()
        m.until("taskiq_backlog_messages", lambda v: v == 0, **queue)
    finally:
        await run.sender.shutdown()


async def test_backlog_of_a_jetstream_consumer(nats_run: WorkerRun) -> None:
    m = Metrics(nats_run, "--max-async-tasks", "1", "--max-prefetch", "1")
    stream = {"queue": nats_run.queue}
    m.until("taskiq_backlog_messages", lambda v: v == 0, **stream)
    await nats_run.sender.startup()
    try:
        for n in range(8):
            await kick(nats_run, "held", n)
        nats_run.wait_for("held 0", 1)
        js: Any = nats_run.sender.js  # type: ignore[attr-defined]

        async def pending() -> int:
            info = await js.consumer_info(nats_run.queue, nats_run.queue)
            return int(info.num_pending)

        # Taken by the worker: running, waiting to run, prefetched, being put
        # (taskiq 0.11's receiver takes more of them than 0.12's); the gauge
        # is the server's count, and some are still waiting there.
        assert 1 <= await m.backlog_is(nats_run.queue, pending) <= 8 - 1
        m.release()
        m.until("taskiq_backlog_messages", lambda v: v == 0, **stream)
    finally:
        await nats_run.sender.shutdown()


def metrics_command_with(site: Path) -> subprocess.CompletedProcess[str]:
    """`worker --metrics` run to its end, with `site` (a sitecustomize.py
    that breaks something) first on the path, before what the suite put there
    (conftest.py: uvloop hidden where the suite runs on asyncio's loop)."""
    return subprocess.run(
        [COMMAND, "worker", *APP, "--health-port", str(free_port()), "--metrics"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=TESTS_DIR,
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join(
                filter(None, [str(site), os.environ.get("PYTHONPATH")])
            ),
        },
    )


def test_without_prometheus_client_one_line_before_start(tmp_path: Path) -> None:
    # A Python where importing prometheus_client fails, as without the extra.
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\n"
        "class Blocked:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'prometheus_client':\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}')\n"
        "sys.meta_path.insert(0, Blocked())\n"
    )
    done = metrics_command_with(tmp_path)
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        "Error: --metrics needs prometheus_client (No module named "
        "'prometheus_client'): pip install 'taskiq-fastapi[metrics]'."
    ]


def test_no_writable_temporary_directory_is_one_line_before_start(
    tmp_path: Path,
) -> None:
    """A read-only root filesystem (a hardened container) without a writable
    TMPDIR: making the metrics directory raised, and the command died with
    a traceback. tempfile's directory is a file here, as root can write
    anywhere else."""
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")
    (tmp_path / "sitecustomize.py").write_text(
        f"import tempfile\ntempfile.tempdir = {str(blocked)!r}\n"
    )
    done = metrics_command_with(tmp_path)
    assert done.returncode == 1
    assert done.stdout == ""
    [line] = done.stderr.splitlines()
    assert line.startswith(
        f"Error: --metrics cannot make its directory in {blocked}: "
    ), line
    assert line.endswith("set TMPDIR to a writable directory."), line


def test_metrics_need_the_health_port() -> None:
    done = subprocess.run(
        [COMMAND, "worker", *APP, "--metrics"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=TESTS_DIR,
    )
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "Error: --metrics needs --health-port: /metrics is served there."
    ]


async def test_a_stream_on_redis_before_7_has_no_backlog(stream_run: WorkerRun) -> None:
    # The suite's Redis is 6.2: XINFO GROUPS has no `lag` yet.
    m = Metrics(stream_run)
    m.pids()
    line = "no backlog metric (its Redis server does not report the group's lag"
    deadline = time.monotonic() + 20
    while line not in stream_run.output(m.worker):
        assert time.monotonic() < deadline, stream_run.output(m.worker)
        time.sleep(0.1)
    assert not [key for key in m.samples() if key[0] == "taskiq_backlog_messages"]


@pytest.mark.parametrize("start_method", ["fork", "forkserver"])
async def test_taskiq_prometheus_middleware_writes_where_metrics_reads(
    run: WorkerRun, start_method: str
) -> None:
    """Under forkserver (and spawn) the worker imports the project again, and
    the middleware sets the directory again: the counts are ours all the same."""
    run.env["TMPDIR"] = str(run.tmp_path)  # where the middleware makes its own
    run.env["TASKIQ_PROMETHEUS_PORT"] = str(free_port())
    m = Metrics(run, "workerapp.taskiq_prometheus", "--start-method", start_method)
    m.pids()
    assert (
        "Warning: the project set PROMETHEUS_MULTIPROC_DIR to "
        f"'{run.tmp_path / 'taskiq-own'}' (taskiq's PrometheusMiddleware does)"
    ) in run.output(m.worker)
    await run.sender.startup()
    try:
        await (await kick(run, "fine", 1)).wait_result(timeout=20)
    finally:
        await run.sender.shutdown()
    named = {"task_name": task("fine")}
    m.until("taskiq_tasks_received_total", lambda v: v == 1, **named)
    if start_method == "fork":  # made before the fork: in our directory
        assert m.value("received_tasks_total", **named) == 1  # the middleware's


@pytest.mark.parametrize("busy", [False, True])
async def test_seconds_the_broker_has_been_unreachable(
    tmp_path: Path, busy: bool
) -> None:
    """Idle, the worker's PING every 4 s finds the server gone; busy (every
    slot taken, nothing fetched), worker-0's backlog reads do."""
    with running_server(persistent=True) as server:
        run = WorkerRun(server.url, tmp_path)
        try:
            slots = ["--max-async-tasks", "1", "--max-prefetch", "1"] if busy else []
            m = Metrics(run, "--broker-retry-timeout", "16", *slots)
            m.pids()
            unreachable = "taskiq_broker_unreachable_seconds"
            m.until(unreachable, lambda v: v == 0)
            if busy:
                await run.sender.startup()
                for n in range(6):
                    await kick(run, "held", n)
                await run.sender.shutdown()
                run.wait_for("held 0", 1)
            server.stop()
            m.until(unreachable, lambda v: v is not None and v >= 1)
            server.start()
            m.until(unreachable, lambda v: v == 0)
            m.release()
            assert run.stop(m.worker) == 0
        finally:
            run.kill_all()


async def test_a_retry_is_not_counted_as_a_wait_from_its_first_kick() -> None:
    """A retried task keeps its first kick's time: its wait would include the
    failed run. Only first runs are in the kick-to-start histogram. In a
    running loop, as the receiver calls middlewares in its asyncio task."""
    import datetime as dt

    from taskiq import TaskiqMessage

    from taskiq_fastapi.task_status.records import QUEUED_LABEL
    from taskiq_fastapi_cli.health.metrics import _Metrics, _TaskMetrics

    counted = _TaskMetrics(_Metrics())
    kicked = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=30)).isoformat()
    for retries in ("0", "1", "2"):
        message = TaskiqMessage(
            task_id=f"t{retries}",
            task_name="t",
            labels={QUEUED_LABEL: kicked, "_retries": retries},
            args=[],
            kwargs={},
        )
        counted.pre_execute(message)
    counted.flush()
    families = {m.name: m for m in counted.metrics.waited.collect()}
    samples = {s.name: s.value for s in families["taskiq_task_queue_seconds"].samples}
    assert samples["taskiq_task_queue_seconds_count"] == 1
    assert 30 <= samples["taskiq_task_queue_seconds_sum"] < 60
