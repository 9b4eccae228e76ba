"""Cancelling tasks: a request on the records' server, honoured by every worker.

`TaskStatus(..., cancellable=True)` adds one `Canceller` middleware to the
broker and wraps the listed tasks' functions, outside any other wrapper.
A cancel request is sent on the server that keeps the records
(`_brokers.cancel_channel`: a Redis stream, or keys of the NATS records
bucket), never kept in one process: every worker process follows it from
its first task on, reading first the requests still kept (so one sent
while it was down is honoured), and keeps the ids in a dict.
InMemoryBroker runs its tasks in the process that cancels them: there the
request is handed over directly.

Per task, when nothing is cancelled: a context variable set, one dict
lookup, its asyncio task kept in a dict while it runs (with a done
callback), one more coroutine call, and for a task with dependencies to
set up one more for taskiq to resolve (the gate); the only thing that
reads the server is the watch, one blocking read at a time.

- A task whose id was cancelled is not run when a worker begins it (fetched
  later, or delivered again after it was cancelled): the gate, a dependency
  taskiq resolves before any other (`_taskiq.gated`), ends it, so none of
  its dependencies is set up and its function is never called; its result
  is the cancellation. Sync tasks too: the gate runs on the event loop. An
  async task with nothing to set up is checked by its wrapper instead.
- A running task's asyncio task is cancelled, from when a worker begins it
  (in its dependencies' setup too) until its function ends; every one
  running its id (a message delivered again while it runs runs twice).
  Only a CancelledError that then ends it makes it `cancelled`: its
  generator dependencies see that CancelledError, its result holds a
  `TaskCancelledError` (an Exception), and taskiq's retry middlewares do not
  retry it. A task that catches or shields itself from it ends as it ends,
  and one that blocks its event loop keeps running until it awaits. A
  worker's own stop cancels tasks too: those were not asked to stop, and
  stay as the stop leaves them.
- A running sync task runs in taskiq's executor thread, which cannot be
  stopped: only its gate is added, and a cancel request for one that has
  started is refused.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from taskiq import AsyncBroker, TaskiqMessage, TaskiqMiddleware, TaskiqResult

from taskiq_fastapi._brokers import CancelChannel
from taskiq_fastapi._taskiq import (
    DEPENDENCIES_LOGGER,
    GATE,
    RECEIVER_LOGGER,
    RETRY_LABEL,
    SyncBehindGate,
    executing,
    gated,
    set_executing,
    sets_up_dependencies,
    wrap_outermost,
)
from taskiq_fastapi.connections import backoff, describe, is_connection_error
from taskiq_fastapi.exceptions import TaskCancelledError
from taskiq_fastapi.task_status.records import CANCELLED_LABEL, STOPPING

logger = logging.getLogger("taskiq_fastapi")

# A task still running this long after it was cancelled is logged.
STILL_RUNNING_AFTER = 1.0
# The watch's retries after losing the server.
_FIRST_RETRY_SECONDS = 0.1
_MAX_RETRY_SECONDS = 2.0
# Marks a task function wrapped by `stop_on_request`.
_WRAPPED = "__taskiq_fastapi_cancellable__"


class Canceller(TaskiqMiddleware):
    """One per broker: follows the cancel requests and stops the tasks they name."""

    def __init__(self, channel: CancelChannel | None, keep: float) -> None:
        super().__init__()
        self.channel = channel
        self.keep = keep
        # The names of the wrapped async tasks: only those can be stopped
        # once they run.
        self.names: set[str] = set()
        # Cancelled task ids, and when each request expires (epoch seconds).
        self.cancelled: dict[str, float] = {}
        # The asyncio tasks running each task id, from pre_execute until its
        # function ends (or post_execute, if it never began), with each one's
        # message: one id can run more than once at a time (a message
        # delivered again while it runs, as RedisStreamBroker's reclaim does).
        self.running: dict[str, dict[asyncio.Task[Any], TaskiqMessage]] = {}
        # Set once the requests kept on the server are read.
        self._ready: asyncio.Event | None = None
        self._watch: asyncio.Task[None] | None = None

        def gate() -> None:
            """The first dependency of every gated task: see `_taskiq.gated`."""
            message = executing()
            if message is not None and message.task_id in self.cancelled:
                self._skip(message)

        self.gate = gate

    def _skip(self, message: TaskiqMessage) -> None:
        """End a task cancelled before it began: nothing of it is set up yet.

        The CancelledError goes on to taskiq, as a stopped task's does;
        on_error puts a TaskCancelledError in its result instead.
        """
        task = asyncio.current_task()
        assert task is not None  # resolved by the receiver, in the message's task
        self._end(message.task_id, task)
        message.labels[CANCELLED_LABEL] = "queued"
        message.labels[RETRY_LABEL] = False
        raise asyncio.CancelledError

    async def send(self, task_id: str) -> None:
        """Ask every worker to cancel the task."""
        if self.channel is None:  # InMemoryBroker: the tasks run here
            self.request(task_id, time.time())
        else:
            await self.channel.send(task_id)

    def request(self, task_id: str, sent_at: float) -> None:
        """A cancel request came: remember it, and stop the task if it runs here."""
        expires = sent_at + self.keep
        if expires <= time.time():
            return
        self.cancelled[task_id] = expires
        self._forget_expired()
        for task, message in self.running.get(task_id, {}).items():
            if task in STOPPING:
                continue
            STOPPING.add(task)
            # Asked to stop: not a failure for taskiq's retry middlewares to
            # kick again (a retry would not run: its id is cancelled).
            message.labels[RETRY_LABEL] = False
            task.cancel()
            task.get_loop().call_later(
                STILL_RUNNING_AFTER, self._still_running, task_id, task
            )

    def _forget_expired(self) -> None:
        # Requests come about in the order they were sent: oldest first.
        now = time.time()
        while self.cancelled:
            task_id, expires = next(iter(self.cancelled.items()))
            if expires > now:
                return
            del self.cancelled[task_id]

    def _still_running(self, task_id: str, task: asyncio.Task[Any]) -> None:
        if task in self.running.get(task_id, ()):
            logger.warning(
                "Task %s is still running %g s after it was cancelled: it caught "
                "or shielded itself from the cancellation, or blocks its event "
                "loop; its state stays started.",
                task_id,
                STILL_RUNNING_AFTER,
            )

    def pre_execute(
        self, message: TaskiqMessage
    ) -> TaskiqMessage | Coroutine[Any, Any, TaskiqMessage]:
        set_executing(message)  # a sync call: set in the task's own context
        if self._ready is not None and self._ready.is_set():
            self._begin(message)
            return message
        return self._after_kept_requests(message)

    def _begin(self, message: TaskiqMessage) -> None:
        """Follow the asyncio task running the message from here.

        taskiq resolves the task's dependencies and calls its function in the
        asyncio task that runs the middlewares' pre_execute: one cancelled
        while waiting in a dependency's setup stops there.
        """
        if message.task_name in self.names:
            task = asyncio.current_task()
            assert task is not None  # called by the receiver, in the message's task
            self.running.setdefault(message.task_id, {})[task] = message
            # Forgotten when its function ends, or at post_execute; and if
            # the message's task ends before either (an error in the
            # receiver), when it ends.
            task.add_done_callback(functools.partial(self._end, message.task_id))

    def _end(self, task_id: str, task: asyncio.Task[Any]) -> None:
        tasks = self.running.get(task_id)
        if tasks is not None:
            tasks.pop(task, None)
            if not tasks:
                del self.running[task_id]

    async def _after_kept_requests(self, message: TaskiqMessage) -> TaskiqMessage:
        """The first tasks of a process wait until the kept requests are read.

        So a task cancelled while every worker was down never starts. The
        watch starts with the first task: by then the broker and its result
        backend, whose connection settings it uses, have started (the
        backend starts after the middlewares), and a process that runs no
        task (the API's) never watches.
        """
        if self._ready is None:
            self._ready = asyncio.Event()
            if self.channel is None:  # InMemoryBroker: requests come directly
                self._ready.set()
            else:
                self._watch = asyncio.create_task(
                    self._follow(self.channel, self._ready)
                )
        await self._ready.wait()
        self._begin(message)
        return message

    async def run(
        self,
        message: TaskiqMessage,
        function: Callable[..., Awaitable[Any]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        """Run the task's function unless it was cancelled; stop it if it is.

        The CancelledError goes on to taskiq, so that the task's generator
        dependencies see one; on_error puts a TaskCancelledError in the
        result instead.
        """
        task_id = message.task_id
        task = asyncio.current_task()
        assert task is not None  # called by the receiver, in the message's task
        if task_id in self.cancelled:  # a task without a gate: nothing set up
            self._skip(message)
        try:
            return await function(*args, **kwargs)
        except asyncio.CancelledError:
            if task in STOPPING:
                if sys.version_info >= (3, 11):
                    task.uncancel()  # handled here: what follows runs as usual
                message.labels[CANCELLED_LABEL] = "started"
            raise
        finally:
            # Its teardown and result saving are not cancelled.
            self._end(task_id, task)

    def on_error(
        self,
        message: TaskiqMessage,
        result: TaskiqResult[Any],
        exception: BaseException,
    ) -> None:
        """A run ended by a request holds a TaskCancelledError, not a CancelledError.

        Here, not in post_execute: taskiq calls the middlewares' post_execute
        in the order they were added up to 0.11, in reverse since, and the
        Recorder's (added first) reads the result.
        """
        if not isinstance(exception, asyncio.CancelledError):
            return
        how = message.labels.get(CANCELLED_LABEL)
        task = asyncio.current_task()
        stopped = task is not None and task in STOPPING
        if how is None and stopped:  # stopped before its function began
            if sys.version_info >= (3, 11):
                task.uncancel()
            how = "started"
        if how is not None:
            # The result's labels are a copy of the message's, made before.
            result.labels[CANCELLED_LABEL] = how
            result.error = TaskCancelledError(_cancelled_message(message.task_id, how))

    def post_execute(self, message: TaskiqMessage, result: TaskiqResult[Any]) -> None:
        # Most runs are forgotten already (their function ended) and none is
        # stopping: each test costs less than what it skips, per task.
        if message.task_id in self.running or STOPPING:
            task = asyncio.current_task()
            assert task is not None
            self._end(message.task_id, task)
            STOPPING.discard(task)

    async def _follow(self, channel: CancelChannel, ready: asyncio.Event) -> None:
        """Read the requests for ever; one line when it fails, one when back.

        While the server cannot be reached, a process's first tasks wait
        for the requests kept there. Any other error (a Redis user without
        stream commands: ACL `-@stream`) may never pass: one ERROR, and the
        tasks run, not cancellable in this process until it is read again.
        """
        attempt = 0

        def caught_up() -> None:
            nonlocal attempt
            if attempt:
                logger.warning("Cancel requests are read again.")
            attempt = 0
            ready.set()

        while True:
            try:
                await channel.watch(self.request, caught_up)
            except Exception as exc:
                outage = is_connection_error(exc)
                if attempt == 0 and outage:
                    logger.warning(
                        "Cancel requests cannot be read, trying again: %s",
                        describe(exc),
                    )
                elif attempt == 0:
                    logger.error(
                        "Cancel requests cannot be read: %s. Tasks run, but are "
                        "not cancelled in this process until they can be; "
                        "trying again.",
                        describe(exc),
                    )
                if not outage:
                    ready.set()
                await asyncio.sleep(
                    backoff(attempt, _FIRST_RETRY_SECONDS, _MAX_RETRY_SECONDS)
                )
                attempt += 1

    async def shutdown(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
            self._watch = None
        self._ready = None


def _cancelled_message(task_id: str, how: str) -> str:
    if how == "queued":
        return f"Task {task_id} was cancelled before it began."
    return f"Task {task_id} was cancelled."


def canceller(
    broker: AsyncBroker, channel: CancelChannel | None, keep: float
) -> Canceller:
    """The broker's Canceller, added to its middlewares on first use."""
    for middleware in broker.middlewares:
        if isinstance(middleware, Canceller):
            return middleware
    made = Canceller(channel, keep)
    broker.add_middlewares(made)
    logging.getLogger(RECEIVER_LOGGER).addFilter(_no_traceback)
    logging.getLogger(DEPENDENCIES_LOGGER).addFilter(_not_again)
    return made


def stop_on_request(task: Any, canceller: Canceller) -> bool:
    """Gate the task and stop it on request; False for a sync one.

    A sync task is only gated: once it runs, in taskiq's executor thread,
    nothing can stop it. The wrapper stays outermost (`wrap_outermost`), so
    that the gate comes before the FastAPI dependencies of the task, whether
    `init` adopts it before or after.
    """
    if not getattr(task.original_func, _WRAPPED, False):
        wrap_outermost(task, functools.partial(_behind_gate, canceller, task.task_name))
    stoppable = inspect.iscoroutinefunction(task.original_func)
    if stoppable:
        canceller.names.add(task.task_name)
    return stoppable


def _behind_gate(
    canceller: Canceller, name: str, function: Callable[..., Any]
) -> Callable[..., Any]:
    """`function` stopped on request, and not begun once cancelled.

    An async task whose dependencies (if any) are only values of the
    dependency context (its Context, its Request) is not gated: its wrapper
    checks before anything is set up, without the cost of resolving one
    more dependency per task (for a task without any, a dependency context,
    and with `init` a Request). A sync one always is: its wrapper runs in
    taskiq's executor, and in another process with `--use-process-pool`.
    """
    if not inspect.iscoroutinefunction(function):
        behind = SyncBehindGate(function, canceller.gate)
        setattr(behind, _WRAPPED, True)
        return behind

    @functools.wraps(function)
    async def run(*args: Any, **kwargs: Any) -> Any:
        kwargs.pop(GATE, None)
        message = executing()
        if message is None or message.task_name != name:
            return await function(*args, **kwargs)  # called, not by the receiver
        return await canceller.run(message, function, args, kwargs)

    if sets_up_dependencies(function):
        run.__signature__ = gated(function, canceller.gate)  # type: ignore[attr-defined]
    setattr(run, _WRAPPED, True)
    return run


def _cancellation(record: logging.LogRecord) -> str | None:
    """What to say of a record logging a task's cancellation on request."""
    error = record.exc_info[1] if record.exc_info else None
    if not isinstance(error, asyncio.CancelledError):
        return None
    message = executing()
    if message is None:
        return None
    how = message.labels.get(CANCELLED_LABEL)
    if how is None and _current_task() not in STOPPING:
        return None  # the worker's own stop, or the task's own doing
    return _cancelled_message(message.task_id, str(how or "started"))


def _current_task() -> asyncio.Task[Any] | None:
    try:
        return asyncio.current_task()
    except RuntimeError:  # logged from a thread without an event loop
        return None


def _not_again(record: logging.LogRecord) -> bool:
    """A dependency that passes the cancellation on is not a teardown failure."""
    return _cancellation(record) is None


def _no_traceback(record: logging.LogRecord) -> bool:
    """A cancellation on request is one INFO line.

    taskiq's receiver logs every exception a task raises with its traceback.
    Called for every record it makes (one or more a task): most have none.
    """
    if record.exc_info is None:
        return True
    cancellation = _cancellation(record)
    if cancellation is not None:
        record.msg, record.args, record.exc_info = cancellation, (), None
        record.levelno, record.levelname = logging.INFO, "INFO"
    return True
