"""How a worker process stops: on the supervisor's count of stop signals.

Signals are counted by the main process (supervisor.py), where one Ctrl-C
reaching the whole process group is one signal; it writes the stage reached
into shared memory (`StopStage`) and signals each worker. A worker reads the
stage whenever a stop signal reaches it (any it receives is at least the
first):

1. graceful: stop fetching, let in-flight tasks finish (taskiq's own
   shutdown: the receiver's finish event), then the broker's shutdown, the
   app's lifespan included, within --shutdown-timeout;
2. now: in-flight tasks are cancelled as well; a cancelled task gets no
   result and is not acknowledged, so the broker delivers it again where its
   ack type allows. The lifespan still shuts down within --shutdown-timeout.

(Past --hardkill-count signals the supervisor kills every process; nothing
runs here for that.) The worker exits 0 only when no task was cancelled and
the broker's shutdown completed.

Upstream behaviours replaced here:

- taskiq's worker installs its handlers with `signal.signal`, which does not
  wake an event loop asleep in `select()` with no timer due: a worker idle on
  a blocking fetch ignored the signal until a message arrived. Ours are
  installed with `loop.add_signal_handler` as the receiver starts listening,
  replacing taskiq's, whatever way taskiq installed them: the receiver's
  finish event is set here, not read from taskiq's handler.
- taskiq counts signals in each process: a Ctrl-C reached each worker twice
  (from the terminal and from the supervisor), and a worker killed itself
  ("Hard kill") with its lifespan shutdown skipped.
- On shutdown taskiq cancels the broker's pending fetch and waits for it.
  A cancellation that lands as redis-py 8's read timeout expires is
  swallowed, and taskiq-redis's idle stream fetch loop then never returns.
  Waking on the signal makes that race rare; for the rest, a fetch still
  running after a grace period is cancelled again, until it ends.
- taskiq shuts its task executor down, waiting for its threads, before the
  broker's, with its event loop stopped: a sync task's thread (which
  nothing can stop) held the app's lifespan shutdown back until the process
  was killed, on a stop now too, and a second signal during that wait
  reached nobody. The wait runs the loop, a stop now ends it, and on a stop
  now the executor does not wait; a process pool's processes are killed
  (`ShutdownGuard.hold_executor`, `_stop_waiting_for`).

Per task this costs a set insertion and removal; per acknowledged message,
one more ack wrapper.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import multiprocessing
import signal
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine
from concurrent.futures import Executor
from typing import Any

from taskiq import AckableMessage, AsyncBroker
from taskiq.receiver import Receiver
from taskiq.utils import maybe_awaitable

from taskiq_fastapi._taskiq import with_ack
from taskiq_fastapi_cli.runtime.lineage import watch_parent

logger = logging.getLogger("taskiq_fastapi")

FETCH_GRACE_SECONDS = 2.0
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
RUNNING, GRACEFUL, NOW, KILL = 0, 1, 2, 3


class StopStage:
    """Shared by the main process (writes) and the workers (read), lock-free."""

    def __init__(self) -> None:
        self.shared: Any = multiprocessing.RawValue("i", RUNNING)

    @property
    def value(self) -> int:
        return int(self.shared.value)

    def reach(self, stage: int) -> None:
        """Called from the main process's signal handler: one store."""
        if stage > self.shared.value:
            self.shared.value = stage


async def _nothing() -> None:
    return None


def _not_cut(cancelled: set[asyncio.Task[Any]], record: logging.LogRecord) -> bool:
    """Drop taskiq's traceback for a task cancelled here (said in one line)."""
    error = record.exc_info[1] if record.exc_info else None
    if not isinstance(error, asyncio.CancelledError):
        return True
    try:
        return asyncio.current_task() not in cancelled
    except RuntimeError:  # no running loop
        return True


class ShutdownGuard:
    """Installed on the broker of every worker process."""

    def __init__(
        self,
        broker: AsyncBroker,
        stage: StopStage | None = None,
        on_signal: Callable[[], None] = lambda: None,
    ) -> None:
        self.stage = stage
        self.notify = on_signal
        self.fetching: asyncio.Task[Any] | None = None
        self.watchdog: asyncio.Task[None] | None = None
        self.finish: asyncio.Event | None = None
        self.stopping = False
        self.now = False
        self.stopped_now: asyncio.Event | None = None
        self.in_flight: set[asyncio.Task[Any]] = set()
        self.cancelled: set[asyncio.Task[Any]] = set()
        # Running as the receiver stopped waiting for them (--wait-tasks-timeout).
        self.unfinished: set[asyncio.Task[Any]] = set()
        self.shut_down = False
        self.filtering = False  # taskiq's traceback of a task cancelled here
        # The main process is gone (lineage.py): nobody counts the signals
        # but this process, where its death was the first.
        self.orphaned = False
        self.own_stage = RUNNING
        self._remember_fetch(broker)
        self._no_result_when_cancelled(broker)
        self._note_shutdown(broker)

    @property
    def clean(self) -> bool:
        """Every task finished, none cancelled; the broker's shutdown completed.

        taskiq shuts down with tasks still running once --wait-tasks-timeout
        is over; the broker's shutdown runs the app's lifespan shutdown.
        Those tasks are counted as taskiq gives up on them, not once the
        shutdown is over: a sync task's thread holds taskiq's executor until
        it ends, and its task then saves its result during the broker's
        shutdown, which closes the result backend under it. Only at a
        stop: a process that reached --max-tasks-per-child waits for its
        tasks the same way, and taskiq restarts it; its exit status made
        the command's when a stop came before taskiq replaced it.
        """
        unfinished = self.unfinished and self.stopping
        return self.shut_down and not self.cancelled and not unfinished

    def _remember_fetch(self, broker: AsyncBroker) -> None:
        listen: Callable[[], AsyncIterator[Any]] = broker.listen

        async def remembered_listen() -> AsyncGenerator[Any, None]:
            source = listen()
            try:
                while True:
                    # Looked up at each fetch: taskiq runs each fetch in a
                    # task of its own.
                    self.fetching = asyncio.current_task()
                    try:
                        message = await anext(source)
                    except StopAsyncIteration:
                        return
                    finally:
                        self.fetching = None
                    yield message
            finally:
                await source.aclose()  # type: ignore[attr-defined]

        broker.listen = remembered_listen  # type: ignore[method-assign]

    def _no_result_when_cancelled(self, broker: AsyncBroker) -> None:
        backend = broker.result_backend
        set_result = backend.set_result

        def set_result_unless_cancelled(
            task_id: str, result: Any
        ) -> Coroutine[Any, Any, None]:
            # Not a coroutine of its own: the save is awaited through one
            # frame fewer each time it waits for the server. No task is
            # looked up until one was cancelled (a stop now).
            if not self.cancelled or asyncio.current_task() not in self.cancelled:
                return set_result(task_id, result)
            return _nothing()

        backend.set_result = set_result_unless_cancelled  # type: ignore[method-assign]

    def _note_shutdown(self, broker: AsyncBroker) -> None:
        shutdown = broker.shutdown

        async def noted_shutdown() -> None:
            await shutdown()
            self.shut_down = True

        broker.shutdown = noted_shutdown  # type: ignore[method-assign]

    def receiver(self, receiver_type: type[Receiver]) -> type[Receiver]:
        """The receiver class taskiq (or --receiver) names, stoppable from here."""
        guard = self

        class StoppableReceiver(receiver_type):  # type: ignore[valid-type,misc]
            async def listen(self, finish_event: asyncio.Event) -> None:
                guard.start(finish_event)
                await super().listen(finish_event)
                guard.unfinished = guard.in_flight - guard.cancelled
                if self.executor is not None:
                    guard.hold_executor(self.executor)

            async def callback(self, message: Any, raise_err: bool = False) -> None:
                await guard.run(super().callback, message, raise_err)

        return StoppableReceiver

    def hold_executor(self, executor: Executor) -> None:
        """Taskiq's executor, shut down as the stop stage says.

        taskiq's `start_listen` leaves its `with executor` block, which waits
        for every thread (or pool process), before it shuts the broker down,
        and its event loop does not run meanwhile: a stop signal reached
        nobody. A sync task still running past --wait-tasks-timeout held the
        app's lifespan shutdown back through a second signal, until the
        supervisor killed the process. Here the wait runs the loop: a stop
        now ends it, and the broker's shutdown, the app's lifespan included,
        comes next; on a stop now the executor does not wait at all.
        """
        shutdown = executor.shutdown
        loop = asyncio.get_running_loop()

        def shutdown_by_stage(
            wait: bool = True, *, cancel_futures: bool = False
        ) -> None:
            executor.shutdown = shutdown  # type: ignore[method-assign]
            if wait and not self.now and not loop.is_running():
                loop.run_until_complete(self._executor_done_or_now(shutdown))
            if self.now:
                _stop_waiting_for(executor)
            else:
                shutdown(wait=wait, cancel_futures=cancel_futures)

        executor.shutdown = shutdown_by_stage  # type: ignore[method-assign]

    async def _executor_done_or_now(self, shutdown: Callable[..., None]) -> None:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        threading.Thread(
            target=_wait_in_thread, args=(shutdown, done), daemon=True
        ).start()
        assert self.stopped_now is not None
        now = asyncio.ensure_future(self.stopped_now.wait())
        try:
            waited: list[asyncio.Future[Any]] = [done, now]
            await asyncio.wait(waited, return_when=asyncio.FIRST_COMPLETED)
        finally:
            now.cancel()

    def start(self, finish: asyncio.Event) -> None:
        """The receiver starts: stop signals go through the loop from now on."""
        self.finish = finish
        self.stopped_now = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in SIGNALS:
            loop.add_signal_handler(signum, self.signalled)
        watch_parent(self.parent_gone)
        if self.stage is not None and self.stage.value:
            self.on_signal()  # the command was stopping before this process ran

    def parent_gone(self, pid: int) -> None:
        """The main process was killed outright: stop as at a first stop signal.

        A stop already under way goes on as it was: one that cancelled the
        running tasks (a stop now) was said to let them finish.
        """
        if self.now:
            said = "stopping now, as before; running tasks were cancelled."
        elif self.stopping:
            said = "stopping, as before; running tasks finish first."
        else:
            said = "stopping; running tasks finish first."
        logger.warning("The main process (pid %s) is gone: %s", pid, said)
        self.orphaned = True
        self.on_signal()

    def signalled(self) -> None:
        """A stop signal reached this process.

        Once the main process is gone, nobody else counts them: its death
        was the first, so any signal stops now, as a second would.
        """
        if self.orphaned:
            self.own_stage = NOW
        self.on_signal()

    async def run(
        self,
        callback: Callable[[Any, bool], Any],
        message: Any,
        raise_err: bool,
    ) -> None:
        """One task: remembered while in flight; no ack once cancelled."""
        task = asyncio.current_task()
        assert task is not None
        if self.now:
            # Fetched before the stop, started after it: not run, not acked.
            self.cancelled.add(task)
            return
        if isinstance(message, AckableMessage):
            message = self._ack_unless_cancelled(message, task)
        self.in_flight.add(task)
        try:
            await callback(message, raise_err)
        except asyncio.CancelledError:
            if task not in self.cancelled:
                raise
        finally:
            self.in_flight.discard(task)

    def _ack_unless_cancelled(
        self, message: AckableMessage, task: asyncio.Task[Any]
    ) -> AckableMessage:
        ack = message.ack

        async def ack_unless_cancelled() -> None:
            if task not in self.cancelled:
                await maybe_awaitable(ack())

        return with_ack(message, ack_unless_cancelled)

    def on_signal(self) -> None:
        """A stop signal: apply the stage the supervisor has reached."""
        shared = self.stage.value if self.stage is not None else RUNNING
        stage = max(GRACEFUL, shared, self.own_stage)
        self.now = stage >= NOW
        if self.now and self.stopped_now is not None:
            self.stopped_now.set()
        if not self.stopping:
            self.stopping = True
            self.notify()
            if self.finish is not None:
                self.finish.set()
            if self.fetching is not None:
                # taskiq 0.11 leaves the fetch under way at a stop, never
                # awaited: how it ends (StopAsyncIteration, once the broker
                # shut down) was logged as "Task exception was never
                # retrieved" with a traceback as the loop closed.
                self.fetching.add_done_callback(_retrieved)
            self.watchdog = asyncio.get_running_loop().create_task(self.unstick())
        cut = self.in_flight - self.cancelled if self.now else set()
        if cut:
            if not self.filtering:
                self.filtering = True
                # From the first cut on, not before: a filter costs every
                # record taskiq's receiver makes, one or more a task. A
                # partial of a function, not a bound method: logging first
                # asks each filter for a `filter` attribute, and a bound
                # method answers by raising AttributeError.
                logging.getLogger("taskiq.receiver.receiver").addFilter(
                    functools.partial(_not_cut, self.cancelled)
                )
            logger.warning(
                "Stopping now: %d task(s) cancelled, with no result and no "
                "acknowledgement.",
                len(cut),
            )
        for task in cut:
            self.cancelled.add(task)
            task.cancel()

    async def unstick(self) -> None:
        """Cancel a fetch that outlives the grace period again, until it ends."""
        await asyncio.sleep(FETCH_GRACE_SECONDS)
        while self.fetching is not None and not self.fetching.done():
            logger.warning("The broker's fetch ignored cancellation; cancelling again.")
            self.fetching.cancel()
            await asyncio.sleep(FETCH_GRACE_SECONDS / 4)


def _retrieved(task: asyncio.Task[Any]) -> None:
    """Take a done task's exception, so that asyncio does not log it unseen."""
    if not task.cancelled():
        task.exception()


def _stop_waiting_for(executor: Executor) -> None:
    """Stop now: queued calls dropped, a process pool's processes killed.

    A thread cannot be stopped: it runs on as the lifespan shuts down, and
    the supervisor kills a process whose thread never ends. A process pool's
    process can: left running, it held this process at exit (the pool's
    manager thread waits for it) until the supervisor killed this process,
    and then ran on, orphaned, with the pool's idle processes.
    """
    processes = getattr(executor, "_processes", None) or {}
    for process in list(processes.values()):
        with contextlib.suppress(OSError, ValueError):
            process.kill()
    executor.shutdown(wait=False, cancel_futures=True)


def _wait_in_thread(shutdown: Callable[..., None], done: asyncio.Future[None]) -> None:
    loop = done.get_loop()
    shutdown(wait=True)
    with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits
        loop.call_soon_threadsafe(
            lambda: None if done.done() else done.set_result(None)
        )
