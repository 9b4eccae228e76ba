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

Upstream behaviour relied on here: prometheus_client chooses between
in-process and file-backed values (`values.ValueClass`) from
PROMETHEUS_MULTIPROC_DIR when it is first imported. The command sets that
variable and chooses again (`use_directory`), so an app that imported
prometheus_client before still writes to the command's directory; the
files' names end in the writer's pid (`_dead_gauge_files`).

Per task: a few counter and histogram updates, each a locked write to a
memory map. Kick-to-start is measured for tasks whose kick carries
`QUEUED_LABEL` (kicked by a process recording their status, see
taskiq_fastapi.task_status): others are not counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import re
import shutil
import tempfile
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

from taskiq_fastapi.task_status.records import QUEUED_LABEL
from taskiq_fastapi_cli.exceptions import CLIError
from taskiq_fastapi_cli.health.backlog import backlog_reader

logger = logging.getLogger("taskiq_fastapi")

DIRECTORY_ENV = "PROMETHEUS_MULTIPROC_DIR"
# How often a worker writes how long its broker has been unreachable, and
# worker-0 the backlog.
SAMPLE_SECONDS = 1.0
# The worker process that samples the backlog: a restarted one takes its slot.
SAMPLING_SLOT = 0
# taskiq's retry middlewares (Simple and Smart) count runs in this label.
RETRIES_LABEL = "_retries"
_GAUGE_FILE = re.compile(r"gauge_live\w+_(\d+)\.db")


def use_directory() -> str:
    """A fresh directory for this run's metrics, set up for every process.

    Raises CLIError, before any worker starts, without prometheus_client.
    """
    directory = tempfile.mkdtemp(prefix="taskiq-fastapi-metrics-")
    os.environ[DIRECTORY_ENV] = directory  # spawned workers inherit it
    try:
        _write_to_directory()
    except ImportError as exc:
        shutil.rmtree(directory, ignore_errors=True)
        raise CLIError(
            f"--metrics needs prometheus_client ({exc}): "
            "pip install 'taskiq-fastapi[metrics]'."
        ) from None
    return directory


def _write_to_directory() -> None:
    """Make prometheus_client choose file-backed values now (see above)."""
    from prometheus_client import values

    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]


def remove_directory(directory: str) -> None:
    shutil.rmtree(directory, ignore_errors=True)


class Exposition:
    """The main process's side: /metrics, merged from the workers' files."""

    def __init__(
        self, directory: str, processes: Callable[[], Sequence[BaseProcess]]
    ) -> None:
        self.directory = directory
        self.processes = processes

    def scrape(self) -> tuple[bytes, str]:
        """(body, content type) of one scrape."""
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry
        from prometheus_client.exposition import generate_latest
        from prometheus_client.multiprocess import MultiProcessCollector

        for path in self._dead_gauge_files():
            with contextlib.suppress(FileNotFoundError):  # a scrape beside us
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
        self.execution = Histogram(
            "taskiq_task_execution_seconds",
            "Time a task ran.",
            ["task_name"],
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


class _TaskMetrics(TaskiqMiddleware):
    """Counts each task; the per-task cost of --metrics."""

    def __init__(self, metrics: _Metrics) -> None:
        super().__init__()
        self.metrics = metrics
        # Per task name: its labelled children, looked up once.
        self.children: dict[str, tuple[Any, ...]] = {}
        # When each running task began, by the message object's id (the
        # receiver hands the same one to post_execute). Not taskiq's
        # `execution_time`: rounded to 10 ms, it makes short tasks take 0 s.
        self.began: dict[int, float] = {}

    def _of(self, name: str) -> tuple[Any, ...]:
        children = self.children.get(name)
        if children is None:
            m = self.metrics
            children = tuple(
                family.labels(name)
                for family in (
                    m.received,
                    m.succeeded,
                    m.failed,
                    m.retried,
                    m.execution,
                    m.in_flight,
                )
            )
            self.children[name] = children
        return children

    def pre_execute(self, message: TaskiqMessage) -> TaskiqMessage:
        received, _, _, retried, _, in_flight = self._of(message.task_name)
        received.inc()
        in_flight.inc()
        labels = message.labels
        if str(labels.get(RETRIES_LABEL, "0")) != "0":
            retried.inc()
        queued = labels.get(QUEUED_LABEL)
        if queued is not None:
            with contextlib.suppress(ValueError):  # not written by this package
                since = dt.datetime.fromisoformat(str(queued)).timestamp()
                waited = self.metrics.waited.labels(message.task_name)
                waited.observe(max(0.0, time.time() - since))  # clocks differ
        self.began[id(message)] = time.perf_counter()
        return message

    def post_execute(self, message: TaskiqMessage, result: TaskiqResult[Any]) -> None:
        _, succeeded, failed, _, execution, in_flight = self._of(message.task_name)
        in_flight.dec()
        (failed if result.is_err else succeeded).inc()
        began = self.began.pop(id(message), None)
        if began is not None:
            execution.observe(time.perf_counter() - began)


class WorkerMetrics:
    """Installed on the broker of a worker process with --metrics."""

    def __init__(
        self,
        slot: int,
        restarted: bool,
        unreachable_since: Callable[[], float | None],
    ) -> None:
        # Under fork this process inherited the main process's choice; under
        # spawn it made its own, maybe while importing the app.
        _write_to_directory()
        self.metrics = _Metrics()
        self.slot = slot
        self.unreachable_since = unreachable_since
        self.sampling: asyncio.Task[None] | None = None
        self.metrics.unreachable.set(0)
        if restarted:
            self.metrics.restarts.inc()

    def install(self, broker: AsyncBroker) -> None:
        """Count tasks; sample from the start of the broker's startup."""
        broker.add_middlewares(_TaskMetrics(self.metrics))
        startup: Callable[[], Any] = broker.startup
        backlog = backlog_reader(broker) if self.slot == SAMPLING_SLOT else None

        async def sampling_startup() -> None:
            if self.sampling is None:
                self.sampling = asyncio.create_task(self._sample(backlog))
            await startup()

        broker.startup = sampling_startup  # type: ignore[method-assign]
        broker.add_event_handler(TaskiqEvents.WORKER_SHUTDOWN, self._stop_sampling)

    def _stop_sampling(self, _state: TaskiqState) -> None:
        if self.sampling is not None:
            self.sampling.cancel()

    async def _sample(
        self, backlog: Callable[[], Awaitable[dict[str, int]]] | None
    ) -> None:
        while True:
            since = self.unreachable_since()
            unreachable = 0.0 if since is None else time.monotonic() - since
            self.metrics.unreachable.set(unreachable)
            if backlog is not None and not unreachable:
                try:
                    for queue, waiting in (await backlog()).items():
                        self.metrics.backlog.labels(queue).set(waiting)
                except Exception as exc:  # the next sample tries again
                    logger.debug("Backlog not sampled: %s", exc)
            await asyncio.sleep(SAMPLE_SECONDS)
