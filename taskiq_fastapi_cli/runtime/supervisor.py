"""The supervisor's signal handlers, safe whenever a signal lands.

Upstream issue worked around here: taskiq's ProcessManager handles SIGINT,
SIGTERM and SIGHUP by putting an action on a `multiprocessing.Queue` and
logging, inside the signal handler. Both take locks, and its own loop polls
that queue; a signal that lands while the main thread holds the queue's lock
runs the handler, which waits for that lock forever. The supervisor then
ignores every later signal (a burst of SIGTERMs hung it in 7 of 10 tries).

Here the handlers do one thing: put the action on a `queue.SimpleQueue`,
whose `put` is reentrant (the standard library documents it as safe to call
from code that interrupts other code). The manager's whole action queue is
that SimpleQueue: only threads of the main process use it, and a
`multiprocessing.Queue` left with unread actions at exit (a shutdown in the
middle of a burst of reloads) made the command hang joining its feeder thread.
The manager's loop calls the same `put`, `empty()` and `get()` as before, so
nothing else of taskiq's process manager changes.

Also worked around: a Ctrl-C that reached a worker process while it was
still importing (under spawn, as `--reload` uses) printed a KeyboardInterrupt
traceback from the middle of some import. Worker processes are started with
the stop signals blocked, and `worker_process` releases them once it is
running: a signal that arrived in between ends the process quietly there.

Also worked around: taskiq before 0.12 stops its workers by signalling each
one without checking that it still exists; a worker that had exited (say, on
a startup failure) made the supervisor crash with ProcessLookupError and exit
1 before it signalled the others.

Also worked around: taskiq's manager logs "Stopped process worker-0" as it
sends the stop signal, before the worker has finished its tasks; here that
line is "Stopping worker-0", and "stopped" is logged once the worker exits.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from multiprocessing import current_process
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING, Any

from taskiq.cli.worker.process_manager import (
    ProcessActionBase,
    ProcessManager,
    ReloadAllAction,
    ReloadOneAction,
    ShutdownAction,
)

from taskiq_fastapi_cli.exceptions import EXIT_STOPPED_UNCLEAN
from taskiq_fastapi_cli.runtime import preload
from taskiq_fastapi_cli.runtime.shutdown import GRACEFUL, KILL, NOW, StopStage
from taskiq_fastapi_cli.runtime.starting import ignore_further_stops

if TYPE_CHECKING:
    from taskiq_fastapi_cli.health.server import HealthServer
    from taskiq_fastapi_cli.runtime.args import FastAPIWorkerArgs

logger = logging.getLogger("taskiq_fastapi")

# After a second signal: time for a worker to exit once its lifespan has shut
# down (--shutdown-timeout), before it is killed.
KILL_GRACE_SECONDS = 3.0


def signal_handler(
    actions: queue.SimpleQueue[ProcessActionBase],
    action: ProcessActionBase,
    also: Callable[[], None] | None = None,
) -> Callable[[int, Any], None]:
    """A handler that takes no lock: it may interrupt any code, any time.

    `also` must be as safe: the health view's `drain` only sets an attribute.
    """

    def handle(signum: int, frame: Any) -> None:
        # As taskiq's: a forked worker that has not installed its own
        # handlers yet stops at once.
        if current_process().name.startswith("worker"):
            interrupt_once(signum, frame)
        if also is not None:
            also()
        actions.put(action)

    return handle


class StopSignals:
    """The main process's SIGINT/SIGTERM handler: counts them, takes no lock.

    One Ctrl-C reaching the whole process group is one signal here, however
    many processes it reached. The first stops gracefully (taskiq's shutdown,
    which signals each worker); the second tells each worker to stop now
    (in-flight tasks cancelled, lifespans still shut down) and sets the
    deadline past which a worker still running is killed; taskiq's
    --hardkill-count (at least 2) kills every worker at once.
    """

    def __init__(
        self,
        actions: queue.SimpleQueue[ProcessActionBase],
        args: FastAPIWorkerArgs,
        workers: Callable[[], Sequence[BaseProcess]],
        also: Callable[[], None] | None = None,
    ) -> None:
        self.actions = actions
        self.stage: StopStage = args.stop_stage
        self.hardkill_count = max(2, args.hardkill_count)
        self.kill_after = args.shutdown_timeout + KILL_GRACE_SECONDS
        self.workers = workers
        self.also = also
        self.count = 0
        self.kill_at: float | None = None

    def __call__(self, signum: int, frame: Any) -> None:
        # As taskiq's: a process named as a worker that still has this
        # handler stops at once. The command's own forked workers replace it
        # before they take any signal (`release_stop_signals`); a process the
        # project forks from the main process under such a name does not.
        if current_process().name.startswith("worker"):
            interrupt_once(signum, frame)
        self.count += 1
        if self.count == 1:
            if self.also is not None:
                self.also()
            self.stage.reach(GRACEFUL)
            self.actions.put(ShutdownAction())
        elif self.count < self.hardkill_count:
            self.stage.reach(NOW)
            if self.kill_at is None:
                self.kill_at = time.monotonic() + self.kill_after
            self.send(signal.SIGTERM)  # each worker reads the stage: now
        else:
            self.stage.reach(KILL)
            self.send(signal.SIGKILL)

    def send(self, signum: int) -> None:
        for worker in self.workers():
            if worker.pid:
                with suppress(ProcessLookupError):
                    os.kill(worker.pid, signum)


STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGHUP})


@contextmanager
def stop_signals_held() -> Iterator[None]:
    """Block the stop signals; processes started meanwhile inherit the block."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def release_stop_signals() -> None:
    """In a worker process: deliver the stop signals that arrived while it started.

    A SIGINT or SIGTERM waiting here raises KeyboardInterrupt, which
    `worker_process` takes as a quiet exit. A spawned worker (`--reload`,
    `--start-method spawn`) has Python's default handlers: its SIGTERM
    killed it, so a SIGTERM to the whole group (systemd's default) made the
    command exit 4 ("not cleanly") with no task in flight; and a SIGINT and
    the supervisor's SIGTERM both waiting raised twice, the second in the
    middle of the quiet exit. A forked worker has the main process's
    handlers, which raise on each signal: a SIGTERM to the group and the
    supervisor's SIGINT both waiting made the same traceback and exit 4.
    Here the first raises, the others are ignored; an ignored signal stays so.
    """
    for signum in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, interrupt_once)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def interrupt_once(_signum: int, _frame: Any) -> None:
    """A worker that has not started listening stops, once.

    Exiting, it has nothing left to stop: the stop signals still waiting
    (a Ctrl-C to the group and the supervisor's SIGTERM of a second one) are
    taken by a no-op, where each raised again in the middle of the quiet
    exit, with a traceback, and made the command exit 4.
    """
    ignore_further_stops()
    raise KeyboardInterrupt


class HeldRestart(ReloadOneAction):
    """taskiq's restart of one worker, started with the stop signals held."""

    def handle(self, *args: Any, **kwargs: Any) -> None:
        with stop_signals_held():
            super().handle(*args, **kwargs)


class ActionQueue(queue.SimpleQueue[ProcessActionBase]):
    """The manager's queue: reentrant `put`, restarts that hold signals.

    It also carries the workers' failure channel into taskiq's loop, which
    reads this queue every second: once `failed()` says a worker reported a
    fatal failure, the next action is a shutdown, ahead of any restart.
    """

    def __init__(
        self,
        failed: Callable[[], bool] = lambda: False,
        stopping: Callable[[], None] = lambda: None,
    ) -> None:
        super().__init__()
        self.failed = failed
        self.stopping = stopping  # called as the manager takes a shutdown
        self.failure_seen = False

    def _failure_pending(self) -> bool:
        return not self.failure_seen and self.failed()

    def empty(self) -> bool:
        return super().empty() and not self._failure_pending()

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        action: ProcessActionBase
        if self._failure_pending():
            self.failure_seen = True
            action = ShutdownAction()
        else:
            action = super().get(block, timeout)
        if isinstance(action, ShutdownAction):
            self.stopping()
        elif type(action) is ReloadOneAction:
            return HeldRestart(action.worker_num, action.is_reload_all)
        return action


class SafeProcessManager(ProcessManager):
    """taskiq's ProcessManager: handlers that cannot deadlock, our file watcher."""

    def __init__(
        self,
        args: FastAPIWorkerArgs,
        worker_function: Callable[[Any], None],
        observer: Any = None,
        health: HealthServer | None = None,
    ) -> None:
        # Held until ours replace the handlers taskiq's constructor installs:
        # a signal taken by those is put on a queue nothing reads any more,
        # and the command served on; a held one reaches ours. Without the
        # observer, taskiq's constructor schedules no watcher.
        with stop_signals_held():
            super().__init__(args=args, worker_function=worker_function)
            self._take_signals(args, health)
        # After ours replace taskiq's handlers: watching a large tree takes
        # seconds, and a stop signal then was lost.
        if args.reload and observer is not None:
            # Imported here: it needs taskiq's `reload` extra.
            from taskiq_fastapi_cli.runtime import reload

            reload.watch(
                observer,
                args.reload_dirs,
                reload.ReloadFilter(args.reload_includes, args.reload_excludes),
                self.action_queue.put,
                use_gitignore=not args.no_gitignore,
            )

    def _take_signals(
        self, args: FastAPIWorkerArgs, health: HealthServer | None
    ) -> None:
        """Our action queue and stop handlers, in place of taskiq's."""
        view = None
        if health is not None:
            from taskiq_fastapi_cli.health.report import Slots
            from taskiq_fastapi_cli.health.server import HealthView

            # Here, where taskiq has settled the number of processes (1 with
            # --reload), and before any starts: they inherit the rows.
            args.health_slots = Slots(args.workers)
            view = HealthView(args.health_slots, args.stall_timeout)
            health.start(view, lambda: self.workers)
        actions = ActionQueue(args.failures.reported, self._log_stopping)
        self.action_queue = actions  # type: ignore[assignment]
        self.stop = StopSignals(
            actions, args, lambda: self.workers, view.drain if view else None
        )
        signal.signal(signal.SIGINT, self.stop)
        signal.signal(signal.SIGTERM, self.stop)
        if sys.platform != "win32":
            signal.signal(signal.SIGHUP, signal_handler(actions, ReloadAllAction()))

    def prepare_workers(self) -> None:
        preload.ready_to_fork()
        with stop_signals_held():
            super().prepare_workers()

    def start(self) -> int | None:
        """Run taskiq's loop, then wait for the workers to exit.

        A worker gone by shutdown is not an error. Waiting here, not in
        multiprocessing's exit handler, matters: that handler first releases
        the semaphores the workers' arguments carry, and a worker restarted
        just before a Ctrl-C still needs them to start (and stop).
        """
        try:
            status = super().start()
        except ProcessLookupError:
            status = None
            self._stop_live_workers()
        if status is not None:  # --max-fails reached: taskiq leaves them running
            self._stop_live_workers()
        self._wait_for_workers()
        # Exiting: a later signal would only kill this process half-way
        # through (Python restores the default handlers as it finalizes).
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_IGN)
        if status is None and any(worker.exitcode for worker in self.workers):
            # A task cancelled, a lifespan not shut down, a process killed.
            status = EXIT_STOPPED_UNCLEAN
        return status

    def _log_stopping(self) -> None:
        """Said as the manager takes a shutdown, right before it signals them."""
        for worker in self.workers:
            if worker.pid and worker.is_alive():
                logger.info(
                    "Stopping %s (pid %s): it finishes its running tasks first.",
                    worker.name,
                    worker.pid,
                )

    def _shutdown_workers(self) -> None:
        """The graceful stop of taskiq's manager (0.12+), without its log.

        taskiq logs "Stopped process" as it sends the signal, before the
        worker has finished its tasks; `_log_stopping` says "Stopping" (on
        every taskiq version), and `_wait_for_workers` logs each worker once
        it has exited.
        """
        for worker in self.workers:
            if worker.pid and worker.is_alive():
                with suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGINT)

    def _wait_for_workers(self) -> None:
        """Until every worker exits; past a second signal's deadline, kill them."""
        running = [worker for worker in self.workers if worker.is_alive()]
        while True:
            alive = [worker for worker in running if worker.is_alive()]
            for worker in running:
                if worker not in alive:
                    logger.info("%s (pid %s) stopped.", worker.name, worker.pid)
            running = alive
            if not alive:
                return
            kill_at = self.stop.kill_at
            if kill_at is not None and time.monotonic() >= kill_at:
                for worker in alive:
                    logger.warning(
                        "%s (pid %s) did not stop within --shutdown-timeout "
                        "%g s (+%g s); killing it.",
                        worker.name,
                        worker.pid,
                        self.args.shutdown_timeout,
                        KILL_GRACE_SECONDS,
                    )
                    with suppress(ProcessLookupError):
                        os.kill(worker.pid, signal.SIGKILL)  # type: ignore[arg-type]
                self.stop.kill_at = None
            wait([worker.sentinel for worker in alive], timeout=0.25)

    def _stop_live_workers(self) -> None:
        for worker in self.workers:
            if worker.pid and worker.is_alive():
                with suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGINT)
