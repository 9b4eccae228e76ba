"""`worker --metrics`: Prometheus metrics of every worker process, on /metrics.

prometheus_client's multiprocess mode, not an aggregation of our own: each
worker process writes its values to memory-mapped files of its own in a
directory the command creates fresh for each run (and removes at exit), and
the main process's health endpoint merges them on each scrape. So a scrape
covers every process, and the counts of a process that died stay in the sum
(its files outlive it), which is what a counter must do across restarts;
the gauges of a dead process are dropped at the next scrape ("live" modes),
so nothing it left is reported as current. Task names are only known as
tasks arrive, which fixed shared-memory rows (as health's `Slots`) cannot
hold, and histograms merged across processes are what the library already
does right.

prometheus_client chooses file-backed values when it is first imported
with PROMETHEUS_MULTIPROC_DIR set: the command sets it and imports it before
it imports the project, and worker processes inherit both (or, spawned,
import it with the variable set). The files' names end in the writer's pid
(`_dead_gauge_files`), as prometheus_client's `mark_process_dead` assumes.

Per task: a few additions, written to the files once a second (and at
shutdown), so a scrape lags by up to a second and a process killed loses at
most its last second of counts. Kick-to-start is measured for tasks whose kick carries
`QUEUED_LABEL` (kicked by a process recording their status, see
taskiq_fastapi.task_status): others are not counted.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import datetime as dt
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from multiprocessing.process import BaseProcess
from typing import Any

from taskiq import (
    AsyncBroker,
    TaskiqEvents,
    TaskiqMessage,
    TaskiqMiddleware,
    TaskiqResult,
    TaskiqState,
)

from taskiq_fastapi.connections import is_connection_error
from taskiq_fastapi.task_status.records import CANCELLED_LABEL, QUEUED_LABEL
from taskiq_fastapi_cli.exceptions import CLIError
from taskiq_fastapi_cli.health.backlog import backlog_reader

logger = logging.getLogger("taskiq_fastapi")

DIRECTORY_ENV = "PROMETHEUS_MULTIPROC_DIR"
# How often a worker writes its counts and how long its broker has been
# unreachable, and worker-0 the backlog.
SAMPLE_SECONDS = 1.0
# Longer than this, a backlog sample is given up (and tried again).
BACKLOG_TIMEOUT = 5.0
# The worker process that samples the backlog: a restarted one takes its slot.
SAMPLING_SLOT = 0
# taskiq's retry middlewares (Simple and Smart) count runs in this label.
RETRIES_LABEL = "_retries"
# A tally's counts, in the order of its children.
RECEIVED, SUCCEEDED, FAILED, RETRIED, CANCELLED = range(5)
# prometheus_client's default buckets end at 10 s; tasks run longer.
_EXECUTION_BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5)
_EXECUTION_BUCKETS += (1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
_GAUGE_FILE = re.compile(r"gauge_live\w+_(\d+)\.db")


def use_directory() -> str:
    """A fresh directory for this run's metrics, set up for every process.

    Raises CLIError, before any worker starts, without prometheus_client or
    a writable temporary directory.
    """
    try:
        directory = tempfile.mkdtemp(prefix="taskiq-fastapi-metrics-")
    except OSError as exc:  # a read-only filesystem, no usable TMPDIR
        where = tempfile.tempdir or "a temporary directory"  # none found usable
        raise CLIError(
            f"--metrics cannot make its directory in {where}: "
            f"{exc.strerror or exc}; set TMPDIR to a writable directory."
        ) from None
    os.environ[DIRECTORY_ENV] = directory  # spawned workers inherit it
    try:
        import prometheus_client  # noqa: F401 - chooses file-backed values now
    except ImportError as exc:
        shutil.rmtree(directory, ignore_errors=True)
        raise CLIError(
            f"--metrics needs prometheus_client ({exc}): "
            "pip install 'taskiq-fastapi[metrics]'."
        ) from None
    return directory


def keep_directory(directory: str) -> str | None:
    """After the project's imports: the directory is still ours, or a warning.

    taskiq's own PrometheusMiddleware points PROMETHEUS_MULTIPROC_DIR at a
    directory of its own (kept from run to run) as it is made, in the broker
    module; the workers would then write there, not where /metrics reads.
    Its metrics are written to ours instead, and served with them.
    """
    theirs = os.environ.get(DIRECTORY_ENV)
    if theirs == directory:
        return None
    os.environ[DIRECTORY_ENV] = directory
    return (
        f"the project set {DIRECTORY_ENV} to {theirs!r} (taskiq's "
        "PrometheusMiddleware does): with --metrics every worker process "
        "writes its metrics to the command's own directory, served on /metrics."
    )


def write_to(directory: str | None) -> None:
    """In a worker, before its metrics are made: into the command's directory.

    prometheus_client reads PROMETHEUS_MULTIPROC_DIR as each value is made.
    """
    if directory is not None:
        os.environ[DIRECTORY_ENV] = directory


def remove_directory(directory: str) -> None:
    shutil.rmtree(directory, ignore_errors=True)


class Exposition:
    """The main process's side: /metrics, merged from the workers' files."""

    def __init__(
        self, directory: str, processes: Callable[[], Sequence[BaseProcess]]
    ) -> None:
        self.directory = directory
        self.processes = processes
        self.scraping = threading.Lock()

    def scrape(self) -> tuple[bytes, str]:
        """(body, content type) of one scrape, one at a time.

        Two at once could each list a dead process's gauge file that the
        other removes before it is read.
        """
        with self.scraping:
            return self._scrape()

    def _scrape(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry
        from prometheus_client.exposition import generate_latest
        from prometheus_client.multiprocess import MultiProcessCollector

        for path in self._dead_gauge_files():
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, self.directory)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST

    def _dead_gauge_files(self) -> list[str]:
        """Gauge files of processes no longer alive: their values are not current.

        prometheus_client's `mark_process_dead` does this for one pid; here the
        pids are those of the files, and the live ones the manager's workers.
        """
        live = {p.pid for p in self.processes() if p.is_alive()}
        dead = []
        for name in os.listdir(self.directory):
            found = _GAUGE_FILE.fullmatch(name)
            if found is not None and int(found.group(1)) not in live:
                dead.append(os.path.join(self.directory, name))
        return dead


class _Metrics:
    """The metric families, made in each worker process (files of its pid)."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        def counter(name: str, text: str) -> Any:
            return Counter(name, text, ["task_name"], registry=None)

        self.received = counter("taskiq_tasks_received", "Tasks a worker began.")
        self.succeeded = counter("taskiq_tasks_succeeded", "Tasks that returned.")
        self.failed = counter("taskiq_tasks_failed", "Task runs that raised.")
        self.retried = counter(
            "taskiq_tasks_retried", "Runs that retried a failed task (its retry)."
        )
        self.cancelled = counter(
            "taskiq_tasks_cancelled", "Runs cancelled on request (TaskStatus)."
        )
        self.execution = Histogram(
            "taskiq_task_execution_seconds",
            "Time a task ran.",
            ["task_name"],
            buckets=_EXECUTION_BUCKETS,
            registry=None,
        )
        self.waited = Histogram(
            "taskiq_task_queue_seconds",
            "Time from kick to start, for kicks that carry when they were made.",
            ["task_name"],
            buckets=(0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600),
            registry=None,
        )
        self.in_flight = Gauge(
            "taskiq_tasks_in_flight",
            "Tasks running now.",
            ["task_name"],
            multiprocess_mode="livesum",
            registry=None,
        )
        self.restarts = Counter(
            "taskiq_worker_restarts",
            "Worker processes started again after one exited.",
            registry=None,
        )
        self.unreachable = Gauge(
            "taskiq_broker_unreachable_seconds",
            "How long the broker has been unreachable (0: reachable).",
            multiprocess_mode="livemax",
            registry=None,
        )
        self.backlog = Gauge(
            "taskiq_backlog_messages",
            "Messages waiting in the broker (sampled by worker-0).",
            ["queue"],
            multiprocess_mode="livemax",
            registry=None,
        )


class _Observed:
    """Observations of one histogram child since the last flush.

    Flushed through the child's `_sum` and `_buckets` (prometheus_client's
    `Histogram.observe` updates the same two, one observation at a time).
    """

    __slots__ = ("bounds", "child", "counts", "total")

    def __init__(self, child: Any) -> None:
        self.child = child
        self.bounds: list[float] = list(child._upper_bounds)
        self.counts = [0] * len(self.bounds)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def flush(self) -> None:
        if not any(self.counts):
            return
        self.child._sum.inc(self.total)
        for i, count in enumerate(self.counts):
            if count:
                self.child._buckets[i].inc(count)
                self.counts[i] = 0
        self.total = 0.0


class _Tally:
    """One task name's counts since the last flush, and its tasks running."""

    __slots__ = (
        "children",
        "counts",
        "execution",
        "flushed_running",
        "in_flight",
        "running",
        "waited",
    )

    def __init__(self, metrics: _Metrics, name: str) -> None:
        # Received, succeeded, failed, retried, cancelled: made now, so each
        # shows 0.
        families = (metrics.received, metrics.succeeded, metrics.failed,
                    metrics.retried, metrics.cancelled)  # fmt: skip
        self.children = [f.labels(name) for f in families]
        self.counts = [0, 0, 0, 0, 0]
        self.in_flight = metrics.in_flight.labels(name)
        self.running = self.flushed_running = 0
        self.execution = _Observed(metrics.execution.labels(name))
        self.waited: _Observed | None = None  # for kicks that carry their time

    def flush(self) -> None:
        for i, count in enumerate(self.counts):
            if count:
                self.children[i].inc(count)
                self.counts[i] = 0
        self.execution.flush()
        if self.waited is not None:
            self.waited.flush()
        # Written last: a scrape that sees a run end sees its counts.
        if self.running != self.flushed_running:
            self.in_flight.set(self.running)
            self.flushed_running = self.running


class _TaskMetrics(TaskiqMiddleware):
    """Counts each task in plain numbers; `flush` writes them every second.

    A write to prometheus_client's files takes a lock and a system call
    (about 1 us each, 7 us a task): that much per task cost 3.5% of a real
    worker's throughput. Counted here, and written once a second by the
    sampler (and at shutdown), a task costs about 1 us.
    """

    def __init__(self, metrics: _Metrics) -> None:
        super().__init__()
        self.metrics = metrics
        self.tallies: dict[str, _Tally] = {}
        # Each running task's tally and when it began, by the asyncio task
        # taskiq's receiver runs the message in (pre_execute and post_execute
        # both run there, whatever message object a middleware returns). Not
        # taskiq's `execution_time`: rounded to 10 ms, short tasks take 0 s.
        self.runs: dict[asyncio.Task[Any], tuple[_Tally, float]] = {}
        # Made once: added to each run's asyncio task, and taken off again by
        # post_execute (compared by equality, as a bound method made anew).
        self.skipped = self._skipped

    def _tally(self, name: str) -> _Tally:
        tally = self.tallies.get(name)
        if tally is None:
            tally = self.tallies[name] = _Tally(self.metrics, name)
        return tally

    def pre_execute(self, message: TaskiqMessage) -> TaskiqMessage:
        tally = self._tally(message.task_name)
        tally.counts[RECEIVED] += 1
        tally.running += 1
        labels = message.labels
        queued = labels.get(QUEUED_LABEL)
        if str(labels.get(RETRIES_LABEL, "0")) != "0":
            # A retry keeps its first kick's time: its wait would include
            # the failed runs and the retry's delay.
            tally.counts[RETRIED] += 1
        elif queued is not None:
            with contextlib.suppress(ValueError):  # not written by this package
                since = dt.datetime.fromisoformat(str(queued)).timestamp()
                if tally.waited is None:
                    child = self.metrics.waited.labels(message.task_name)
                    tally.waited = _Observed(child)
                tally.waited.observe(max(0.0, time.time() - since))  # clocks differ
        run = asyncio.current_task()
        if run is not None:
            self.runs[run] = (tally, time.perf_counter())
            run.add_done_callback(self.skipped)
        return message

    def post_execute(self, message: TaskiqMessage, result: TaskiqResult[Any]) -> None:
        run = asyncio.current_task()
        if run is not None:
            run.remove_done_callback(self.skipped)
            # A run cancelled on request (TaskStatus(cancellable=True)) has
            # an error for a result, but its status says `cancelled`, not
            # `failed`: counted apart, so a failure ratio leaves it out.
            # Its Canceller's on_error, called before any post_execute,
            # marks it.
            if result.is_err and CANCELLED_LABEL in result.labels:
                self._ended(run, CANCELLED)
            else:
                self._ended(run, FAILED if result.is_err else SUCCEEDED)

    def _skipped(self, run: asyncio.Task[Any]) -> None:
        """A run's asyncio task ended, and post_execute had not been called.

        taskiq's receiver skips post_execute when the run raises after the
        task (a dependency's teardown, an invalid ack_type label): such a
        run failed, and ended now. Only such runs call this (post_execute
        takes the callback off), so a run costs no call more; found by the
        once-a-second flush instead, it was timed up to a second too long.
        """
        self._ended(run, FAILED)

    def _ended(self, run: asyncio.Task[Any], outcome: int) -> None:
        """Counted once per run: by post_execute, or by `_skipped`."""
        began = self.runs.pop(run, None)
        if began is None:
            return
        tally, at = began
        tally.running -= 1
        tally.counts[outcome] += 1
        tally.execution.observe(time.perf_counter() - at)

    def flush(self) -> None:
        for tally in list(self.tallies.values()):
            tally.flush()


class WorkerMetrics:
    """Installed on the broker of a worker process with --metrics."""

    def __init__(
        self,
        slot: int,
        restarted: bool,
        unreachable_since: Callable[[], float | None],
    ) -> None:
        self.metrics = _Metrics()
        self.tasks = _TaskMetrics(self.metrics)
        self.slot = slot
        self.unreachable_since = unreachable_since
        self.sampling: asyncio.Task[None] | None = None
        self.metrics.unreachable.set(0)
        if restarted:
            self.metrics.restarts.inc()

    def install(self, broker: AsyncBroker) -> None:
        """Count tasks; sample from the start of the broker's startup."""
        broker.add_middlewares(self.tasks)
        startup: Callable[[], Any] = broker.startup
        backlog = backlog_reader(broker) if self.slot == SAMPLING_SLOT else None

        async def sampling_startup() -> None:
            if self.sampling is None:
                self.sampling = asyncio.create_task(self._sample(backlog))
            await startup()

        broker.startup = sampling_startup  # type: ignore[method-assign]
        broker.add_event_handler(TaskiqEvents.WORKER_SHUTDOWN, self._stop_sampling)

    def _stop_sampling(self, _state: TaskiqState) -> None:
        """Once the tasks are done: the last counts written, sampling over."""
        if self.sampling is not None:
            self.sampling.cancel()
        self.tasks.flush()

    async def _sample(
        self, backlog: Callable[[], Awaitable[dict[str, int]]] | None
    ) -> None:
        # Since when worker-0's backlog reads find the broker unreachable: a
        # worker whose every slot is taken fetches nothing, so its fetches
        # cannot tell.
        failing: float | None = None
        while True:
            self.tasks.flush()
            since = self.unreachable_since()
            if backlog is not None and since is None:
                try:
                    # A server that accepts and never answers must not stop
                    # the counts from being written.
                    sampled = await asyncio.wait_for(backlog(), BACKLOG_TIMEOUT)
                except Exception as exc:  # the next sample tries again
                    logger.debug("Backlog not sampled: %s", exc)
                    unreachable = isinstance(exc, asyncio.TimeoutError)
                    if unreachable or is_connection_error(exc):
                        failing = failing or time.monotonic()
                else:
                    failing = None
                    for queue, waiting in sampled.items():
                        self.metrics.backlog.labels(queue).set(waiting)
            since = since or failing
            self.metrics.unreachable.set(
                0.0 if since is None else time.monotonic() - since
            )
            await asyncio.sleep(SAMPLE_SECONDS)
