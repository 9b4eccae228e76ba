"""What each worker process tells the main process about its health.

One row of shared memory per worker slot (taskiq's `worker-N`; a restarted
process takes over its slot), written by the worker without locks and read
by the main process's health endpoint (`server.py`): the pid, a state,
when it started and became ready, tasks finished and when the last one did,
and a heartbeat its event loop writes every second (more often under a
short --stall-timeout). A loop blocked by a task (a sync `time.sleep`, a CPU
loop) stops writing it, which is what the liveness probe looks for. Per task
it costs one counter update.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncGenerator, Callable
from multiprocessing import current_process, sharedctypes
from typing import Any

from taskiq import (
    AsyncBroker,
    TaskiqEvents,
    TaskiqMessage,
    TaskiqMiddleware,
    TaskiqResult,
    TaskiqState,
)

HEARTBEAT_SECONDS = 1.0
# Beats per --stall-timeout, when that is shorter than a few heartbeats: a
# loop that runs is then never silent for as long as the timeout.
BEATS_PER_STALL_TIMEOUT = 4
# Columns of a slot's row.
PID, STATE, STARTED, READY_AT, DONE, LAST_DONE, BEAT = range(7)
COLUMNS = 7
# States a worker writes; the main process adds "restarting" for a dead one.
STATES = {
    0.0: "absent",
    1.0: "starting",
    2.0: "ready",
    3.0: "stopping",
    4.0: "broker unreachable",
}
STARTING, READY, STOPPING, UNREACHABLE = 1.0, 2.0, 3.0, 4.0


class Slots:
    """The shared rows, created by the main process before any worker starts.

    Travels to the workers inside their arguments (pickled under spawn, as
    multiprocessing allows for shared memory handed to a new process).
    """

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.values: Any = sharedctypes.RawArray("d", workers * COLUMNS)

    def row(self, slot: int) -> list[float]:
        start = slot * COLUMNS
        return list(self.values[start : start + COLUMNS])

    def set(self, slot: int, column: int, value: float) -> None:
        self.values[slot * COLUMNS + column] = value

    def add(self, slot: int, column: int, value: float) -> None:
        self.values[slot * COLUMNS + column] += value


def worker_slot() -> int:
    """The slot of the calling worker process: taskiq names them `worker-N`."""
    return int(current_process().name.rpartition("-")[2])


class _Counter(TaskiqMiddleware):
    """Counts finished tasks; the only work health reporting does per task."""

    def __init__(self, report: WorkerHealth) -> None:
        super().__init__()
        self.report = report

    def post_execute(self, message: TaskiqMessage, result: TaskiqResult[Any]) -> None:
        self.report.task_finished()


class WorkerHealth:
    """Installed on the broker of a worker process when --health-port is set."""

    def __init__(self, slots: Slots, slot: int, stall_timeout: float = 0.0) -> None:
        self.slots = slots
        self.slot = slot
        # Once a second, or more often under a --stall-timeout of a few seconds
        # or less: beating once a second, an idle worker looked stalled for
        # part of each second under --stall-timeout 0.5.
        self.every = HEARTBEAT_SECONDS
        if stall_timeout:
            self.every = min(self.every, stall_timeout / BEATS_PER_STALL_TIMEOUT)
        self.beating: asyncio.Task[None] | None = None
        now = time.time()
        for column, value in (
            (PID, float(os.getpid())),
            (STATE, STARTING),
            (STARTED, now),
            (READY_AT, 0.0),
            (DONE, 0.0),
            (LAST_DONE, 0.0),
            (BEAT, now),
        ):
            slots.set(slot, column, value)

    def install(self, broker: AsyncBroker, max_tasks: int | None = None) -> None:
        """Beat from the start of the broker's startup; ready once it listens.

        With `max_tasks` (--max-tasks-per-child), stopping once it handed out
        the last message the process takes: it fetches nothing more, and is
        replaced once its last tasks are done.
        """
        startup: Callable[[], Any] = broker.startup
        listen: Callable[[], Any] = broker.listen

        async def beating_startup() -> None:
            if self.beating is None:
                self.beating = asyncio.create_task(self._beat())
            await startup()

        async def listen_ready() -> AsyncGenerator[Any, None]:
            self.slots.set(self.slot, READY_AT, time.time())
            self.slots.set(self.slot, STATE, READY)
            source = listen()
            left = max_tasks or 0
            try:
                async for message in source:
                    if left:
                        left -= 1
                        if not left:
                            self.stopping()
                    yield message
            finally:
                await source.aclose()  # closed with this one, not by the GC

        broker.startup = beating_startup  # type: ignore[method-assign]
        broker.listen = listen_ready  # type: ignore[method-assign]
        broker.add_middlewares(_Counter(self))
        broker.add_event_handler(TaskiqEvents.WORKER_SHUTDOWN, self._stop_beating)

    def stopping(self) -> None:
        """A stop signal arrived: no longer ready, in-flight tasks finishing."""
        self.slots.set(self.slot, STATE, STOPPING)

    def broker_outage(self, unreachable: bool) -> None:
        """Not ready while the broker is unreachable: the worker cannot fetch."""
        state = self.slots.row(self.slot)[STATE]
        if state in (READY, UNREACHABLE):
            self.slots.set(self.slot, STATE, UNREACHABLE if unreachable else READY)

    def task_finished(self) -> None:
        self.slots.add(self.slot, DONE, 1.0)
        self.slots.set(self.slot, LAST_DONE, time.time())

    def _stop_beating(self, _state: TaskiqState) -> None:
        if self.beating is not None:
            self.beating.cancel()

    async def _beat(self) -> None:
        while True:
            self.slots.set(self.slot, BEAT, time.time())
            await asyncio.sleep(self.every)
