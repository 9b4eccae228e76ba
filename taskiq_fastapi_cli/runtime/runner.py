"""Hand over to taskiq's worker runner with `init` applied in every worker process.

The CLI's reliance on taskiq internals is all here, pinned by
tests/test_taskiq_internals.py and the subprocess tests: taskiq's `run_worker`
creates the module-level `ProcessManager` with the module-level `start_listen`
as the worker function, so for the duration of the call those names point to
`SafeProcessManager` (supervisor.py) and `worker_process`, which applies
`init` to the broker and then runs taskiq's own `start_listen` (or what an
instrumentor replaced it with), whose import of the broker's path returns
that broker (`_listen`).
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING, Any

from taskiq import AsyncBroker
from taskiq.cli.worker import run as taskiq_run
from taskiq.cli.worker.run import start_listen as taskiq_start_listen

import taskiq_fastapi
from taskiq_fastapi import task_logs
from taskiq_fastapi.exceptions import TaskiqFastAPIError
from taskiq_fastapi.integration import app_source
from taskiq_fastapi_cli.exceptions import (
    EXIT_STARTUP_FAILURE,
    EXIT_STOPPED_UNCLEAN,
    CLIError,
)
from taskiq_fastapi_cli.runtime import lineage, logs
from taskiq_fastapi_cli.runtime.args import FastAPIWorkerArgs
from taskiq_fastapi_cli.runtime.discover import (
    check_servable,
    import_task_modules,
    load_broker,
)
from taskiq_fastapi_cli.runtime.fetch_limit import fetch_at_most
from taskiq_fastapi_cli.runtime.forksafe import renew_after_fork
from taskiq_fastapi_cli.runtime.outages import BrokerOutages, WorkerStopped
from taskiq_fastapi_cli.runtime.shutdown import ShutdownGuard, StopStage
from taskiq_fastapi_cli.runtime.supervisor import (
    STOP_SIGNALS,
    SafeProcessManager,
    release_stop_signals,
)
from taskiq_fastapi_cli.runtime.tracing import flush_spans

if TYPE_CHECKING:
    from taskiq_fastapi_cli.health.server import HealthServer

logger = logging.getLogger("taskiq_fastapi")


def worker_process(args: FastAPIWorkerArgs) -> None:
    """Body of every worker process, including ones restarted by taskiq."""
    try:
        release_stop_signals()
        # taskiq configures a spawned worker's logging in `start_listen`;
        # what is logged before it (a module that fails to import under
        # --reload) would otherwise come out bare. A no-op under fork.
        logs.configure(args)
        broker = load_broker(args.broker)
        check_servable(broker, args.broker)
        # Before taskiq's own import, which logs a broken module's traceback
        # and goes on without its tasks: here it is one line.
        import_task_modules(args.modules, args.tasks_pattern, args.fs_discover)
        guard = compose(broker, args)
        _listen(args, broker, guard)
        _say_unfinished(guard)
        if not guard.clean:
            # A second signal cancelled tasks, taskiq stopped waiting for
            # tasks, or the lifespan did not shut down within
            # --shutdown-timeout: the command must not exit 0.
            sys.exit(EXIT_STOPPED_UNCLEAN)
    except (WorkerStopped, KeyboardInterrupt):
        # Stopped by a signal while starting or waiting for the broker.
        sys.exit(0)
    except TaskiqFastAPIError as exc:
        if args.reload:
            _wait_for_a_change(str(exc))
            sys.exit(0)
        # Stop the whole command instead of taskiq restarting this process
        # forever.
        _stop_command(args, str(exc))
        sys.exit(EXIT_STARTUP_FAILURE)
    finally:
        flush_spans(args.shutdown_timeout)
        # Done: the main process's next stop signal (it signals every worker
        # as it shuts down) must not kill this process as Python finalizes,
        # when the default handlers are back, and turn its exit status into
        # "killed by SIGINT".
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)


def _say_unfinished(guard: ShutdownGuard) -> None:
    """Say how the tasks taskiq stopped waiting for ended.

    The event loop ran them on while taskiq waited for its executor's
    threads and through the broker's shutdown (the app's lifespan
    shutdown), where some finished and saved their results.
    """
    given_up = guard.unfinished - guard.cancelled
    running = len(given_up & guard.in_flight)
    if running:
        logger.warning(
            "%d task(s) still running past --wait-tasks-timeout: stopped "
            "unfinished, with no result.",
            running,
        )
    if len(given_up) > running:
        logger.warning(
            "%d task(s) still running past --wait-tasks-timeout: finished "
            "later, before this process exited.",
            len(given_up) - running,
        )


def _wait_for_a_change(message: str) -> None:
    """Under --reload, as uvicorn's reloader: say what is wrong, then wait.

    This process stays alive, so taskiq's manager does not restart it every
    second; the next source change restarts it (taskiq terminates it), and a
    stop signal ends it quietly, as does the main process killed outright
    (with one line): waiting on, nobody would ever end it.
    """
    logger.error("%s Waiting for a change to restart the workers.", message)

    def interrupt(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, interrupt)
    with suppress(KeyboardInterrupt):
        pid = lineage.wait_for_parent()
        logger.warning("The main process (pid %s) is gone: stopping.", pid)


def compose(broker: AsyncBroker, args: FastAPIWorkerArgs) -> ShutdownGuard:
    """Put the worker runtime's layers around the broker, in this order.

    Each layer replaces some of `broker.startup`, `shutdown`, `listen` and
    the result backend's `set_result` with a wrapper around what is there,
    so the later a layer, the further out it sits:

    1. fork safety (forksafe.py): the broker's clients renewed, before any
       of them connects;
    2. `taskiq_fastapi.init`: the app's lifespan in the worker startup and
       shutdown events, FastAPI dependencies in tasks;
    3. outage retries (outages.py): startup, fetch, results and acks retried
       while the broker is unreachable, innermost so that every layer above
       sees a fetch that waits instead of failing; under it, a list broker's
       fetch that no socket timeout cuts off (`_brokers.py`);
    4. the fetch limit (fetch_limit.py): counts the messages the retries
       hand out;
    5. health (health/report.py): ready once listening, one counter per task;
       with --metrics (health/metrics.py), counts per task and samples;
    6. the stop (shutdown.py), outermost: it remembers the fetch the
       receiver awaits, decides whether a result is saved and a message
       acknowledged, and notes that the whole shutdown completed.

    One close discipline: every `listen` wrapper closes the fetch it wraps
    when it is closed itself. One failure path: a layer that must end the
    command reports to the main process through `Failures` (`give_up`,
    `_stop_command`), which stops every worker gracefully and exits 3; a stop
    signal reaches every layer through the guard's `on_signal`.
    """
    renew_after_fork(broker)
    # Without --app, the broker module's own init names the app (the main
    # process checked that it did).
    source = args.app or app_source(broker)
    taskiq_fastapi.init(broker, source, base_url=args.base_url)  # type: ignore[arg-type]
    outages = BrokerOutages(
        broker,
        args.broker,
        args.broker_retry_timeout,
        give_up=lambda message: _stop_command(args, message),
    )
    fetch_at_most(broker, args.max_tasks_per_child)
    if args.task_logs or args.log_json:
        task_logs.add_to(broker)
    on_signal = outages.stop
    if args.health_slots is not None:
        from taskiq_fastapi_cli.health.report import PID, WorkerHealth, worker_slot

        slot = worker_slot()
        if args.metrics:
            from taskiq_fastapi_cli.health.metrics import WorkerMetrics, write_to

            # A spawned worker, or the fork server, imported the project again
            # (taskiq's PrometheusMiddleware sets the directory as it is made).
            write_to(args.metrics_directory)
            restarted = args.health_slots.row(slot)[PID] != 0  # a pid before us
            WorkerMetrics(slot, restarted, lambda: outages.broker.since).install(broker)
        health = WorkerHealth(args.health_slots, slot, args.stall_timeout)
        health.install(broker, args.max_tasks_per_child)
        outages.on_broker_outage = health.broker_outage
        on_signal = _both(outages.stop, health.stopping)
    return ShutdownGuard(broker, args.stop_stage, on_signal=on_signal)


def _both(first: Callable[[], None], second: Callable[[], None]) -> Callable[[], None]:
    def call() -> None:
        first()
        second()

    return call


def _listen(args: FastAPIWorkerArgs, broker: AsyncBroker, guard: ShutdownGuard) -> None:
    """Run taskiq's `start_listen` with the broker this process initialised.

    `start_listen` imports the broker by its path with the run module's
    `import_object` (taskiq 0.12 also takes an instance, 0.11 does not), so
    for that path it returns this instance: a broker factory is called once
    and `init` applies to its result. For the receiver's path it returns the
    receiver class made stoppable by `guard` (shutdown.py). Its process pool
    (`--use-process-pool`) is one whose processes die with this one
    (lineage.py).
    """
    import_object = taskiq_run.import_object  # type: ignore[attr-defined]

    def this_broker(spec: str, *args_: Any, **kwargs: Any) -> Any:
        if spec == args.broker:
            return broker
        imported = import_object(spec, *args_, **kwargs)
        if spec == args.receiver:
            return guard.receiver(imported)
        return imported

    with _taskiq_run_uses(
        import_object=this_broker, ProcessPoolExecutor=lineage.process_pool
    ):
        _start_listen()(args)


# What taskiq's run module had as `start_listen` when `run` put
# `worker_process` there: taskiq's own, or what an instrumentor replaced it
# with (taskiq 0.12's TaskiqInstrumentor sets up OpenTelemetry's automatic
# instrumentation in each worker process, then calls taskiq's). A forked
# worker inherits it.
_replaced_start_listen: Callable[[Any], None] = taskiq_start_listen


def _start_listen() -> Callable[[Any], None]:
    """The `start_listen` this process's taskiq has, as `taskiq worker` runs it.

    A forked worker finds `worker_process` there (`run` put it there in the
    main process); a spawned one, or one forked by the fork server, finds
    whatever its own imports of the broker and task modules put there.
    """
    current: Callable[[Any], None] = taskiq_run.start_listen
    return _replaced_start_listen if current is worker_process else current


def _stop_command(args: FastAPIWorkerArgs, message: str) -> None:
    """End the whole command with `message`, once, whichever process fails.

    The first failing process reports its cause; the main process's loop
    sees it within a second and stops every worker gracefully; the command
    then exits 3.
    """
    args.failures.report(message)


class Failures:
    """The channel from worker processes to the main process: fatal failures.

    Shared memory and a pipe created by the main process and handed to each
    worker in its arguments, which multiprocessing supports under fork, spawn
    and forkserver alike. Not a signal to the parent: under forkserver a
    worker's parent is the fork server, not the main process.
    """

    def __init__(self) -> None:
        self._messages: Any = multiprocessing.SimpleQueue()
        self._reported: Any = multiprocessing.Value("b", 0)

    def report(self, message: str) -> bool:
        """Keep `message` if it is the first; return whether it was."""
        with self._reported.get_lock():
            if self._reported.value:
                return False
            self._messages.put(message)
            self._reported.value = 1
            return True

    def reported(self) -> bool:
        """Whether a worker reported a failure (read by the main process's loop)."""
        return bool(self._reported.value)

    def first(self) -> str | None:
        """The first failure reported, if any."""
        return None if self._messages.empty() else str(self._messages.get())


@contextmanager
def _taskiq_run_uses(**names: Any) -> Iterator[None]:
    """For the duration of the call, taskiq's run module uses our versions."""
    originals = {name: getattr(taskiq_run, name) for name in names}
    for name, value in names.items():
        setattr(taskiq_run, name, value)
    try:
        yield
    finally:
        for name, value in originals.items():
            setattr(taskiq_run, name, value)


# taskiq's `run_worker` logs how many processes it starts, then, with
# --reload, that it set the number to 1.
TASKIQ_STARTING = "Starting %s worker processes."
TASKIQ_SET_TO_ONE = "Reload on change enabled. Number of worker processes set to 1."
RELOAD_STARTING = (
    "--reload: starting 1 worker process, so that each restart imports the "
    "changed code."
)


class _ProcessCount(logging.Filter):
    """The process count taskiq logs, as one true line.

    "Starting 1 worker process.", and with --reload one line saying so,
    instead of "Starting 2 worker processes." then "set to 1".
    """

    def __init__(self, reload: bool) -> None:
        super().__init__()
        self.reload = reload

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == TASKIQ_STARTING and record.args:
            if self.reload:
                record.msg, record.args = RELOAD_STARTING, ()
            elif record.args == (1,):
                record.msg = "Starting %s worker process."
        return record.msg != TASKIQ_SET_TO_ONE


@contextmanager
def _process_count_said_once(reload: bool) -> Iterator[None]:
    said = _ProcessCount(reload)
    loggers = [logging.getLogger("taskiq.worker"), logging.getLogger()]
    for each in loggers:
        each.addFilter(said)
    try:
        yield
    finally:
        for each in loggers:
            each.removeFilter(said)


def run(args: FastAPIWorkerArgs, health: HealthServer | None = None) -> int:
    """Run taskiq's worker: taskiq's exit code, or 3 when an app failed to start."""
    failures = Failures()
    args.failures = failures
    args.stop_stage = StopStage()
    manager = functools.partial(SafeProcessManager, health=health)
    global _replaced_start_listen  # read by forked workers
    _replaced_start_listen = taskiq_run.start_listen
    if args.task_logs or args.log_json:
        logs.configure(args)  # before taskiq's own, which then changes nothing
    try:
        with (
            _taskiq_run_uses(start_listen=worker_process, ProcessManager=manager),
            _process_count_said_once(args.reload),
        ):
            status = taskiq_run.run_worker(args)
    finally:
        if health is not None:
            health.stop()
    message = failures.first()
    if message is not None:
        raise CLIError(message, EXIT_STARTUP_FAILURE)
    return status or 0
