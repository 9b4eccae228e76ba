"""The supervisor's signal handlers, safe whenever a signal lands.

Upstream issue worked around here: taskiq's ProcessManager handles SIGINT,
SIGTERM and SIGHUP by putting an action on a `multiprocessing.Queue` and
logging, inside the signal handler. Both take locks, and its own loop polls
that queue; a signal that lands while the main thread holds the queue's lock
runs the handler, which waits for that lock forever. The supervisor then
ignores every later signal (a burst of SIGTERMs hung it in 7 of 10 tries).

Here the handlers do one thing: put the action on a `queue.SimpleQueue`,
whose `put` is reentrant (the standard library documents it as safe to call
from code that interrupts other code). The manager's loop reads those actions
through the same `empty()` and `get()` it already calls, so nothing else of
taskiq's process manager changes.

Also worked around: taskiq before 0.12 stops its workers by signalling each
one without checking that it still exists; a worker that had exited (say, on
a startup failure) made the supervisor crash with ProcessLookupError and exit
1 before it signalled the others.
"""

from __future__ import annotations

import os
import queue
import signal
import sys
from collections.abc import Callable
from contextlib import suppress
from multiprocessing import current_process
from typing import Any

from taskiq.cli.worker.process_manager import (
    ProcessActionBase,
    ProcessManager,
    ReloadAllAction,
    ShutdownAction,
)


class ActionQueue:
    """The manager's action queue, plus the actions signal handlers left."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.signalled: queue.SimpleQueue[ProcessActionBase] = queue.SimpleQueue()

    def put(self, action: ProcessActionBase) -> None:
        self.inner.put(action)

    def empty(self) -> bool:
        return self.signalled.empty() and bool(self.inner.empty())

    def get(self) -> ProcessActionBase:
        try:
            return self.signalled.get_nowait()
        except queue.Empty:
            return self.inner.get()  # type: ignore[no-any-return]


def signal_handler(
    actions: queue.SimpleQueue[ProcessActionBase], action: ProcessActionBase
) -> Callable[[int, Any], None]:
    """A handler that takes no lock: it may interrupt any code, any time."""

    def handle(_signum: int, _frame: Any) -> None:
        # As taskiq's: a forked worker that has not installed its own
        # handlers yet stops at once.
        if current_process().name.startswith("worker"):
            raise KeyboardInterrupt
        actions.put(action)

    return handle


class SafeProcessManager(ProcessManager):
    """taskiq's ProcessManager with signal handlers that cannot deadlock."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.action_queue = ActionQueue(self.action_queue)  # type: ignore[assignment]
        signalled = self.action_queue.signalled  # type: ignore[attr-defined]
        shutdown = signal_handler(signalled, ShutdownAction())
        signal.signal(signal.SIGINT, shutdown)
        signal.signal(signal.SIGTERM, shutdown)
        if sys.platform != "win32":
            signal.signal(signal.SIGHUP, signal_handler(signalled, ReloadAllAction()))

    def start(self) -> int | None:
        """Run taskiq's loop; a worker gone by shutdown is not an error."""
        try:
            return super().start()
        except ProcessLookupError:
            for worker in self.workers:
                if worker.pid and worker.is_alive():
                    with suppress(ProcessLookupError):
                        os.kill(worker.pid, signal.SIGINT)
            return None
