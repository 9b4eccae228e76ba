"""Cancelling tasks: a request on the records' server, honoured by every worker.

`TaskStatus(..., cancellable=True)` adds one `Canceller` middleware to the
broker and wraps the listed async tasks' functions. A cancel request is
sent on the server that keeps the records (`_brokers.cancel_channel`: a
Redis stream, or keys of the NATS records bucket), never kept in one
process: every worker process follows it from its first task on, reading
first the requests still kept (so one sent while it was down is honoured),
and keeps the ids in a dict. InMemoryBroker runs its tasks in the process
that cancels them: there the request is handed over directly.

Per task, when nothing is cancelled: a context variable set, one dict
lookup, one more coroutine call; the only thing that reads the server is
the watch, one blocking read at a time.

- A task whose id was cancelled is not run when a worker begins it (fetched
  later, or delivered again after it was cancelled): its function is never
  called, and its result is the cancellation.
- A running task's asyncio task is cancelled. Only a CancelledError that
  then ends its function makes it `cancelled` (raised again as
  `TaskCancelledError`, which its generator dependencies see); a task that
  catches or shields itself from it ends as it ends, and one that blocks
  its event loop keeps running until it awaits. A worker's own stop cancels
  tasks too: those are not in `requested`, and stay as the stop leaves them.
- Sync tasks run in taskiq's executor threads, which cannot be stopped:
  they are not wrapped, and a cancel request for one is refused.
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

from taskiq import AsyncBroker, TaskiqMessage, TaskiqMiddleware

from taskiq_fastapi._brokers import CancelChannel
from taskiq_fastapi._taskiq import (
    DEPENDENCIES_LOGGER,
    RECEIVER_LOGGER,
    executing,
    replace_task_function,
    set_executing,
)
from taskiq_fastapi.connections import backoff, describe
from taskiq_fastapi.exceptions import TaskCancelledError
from taskiq_fastapi.task_status.records import CANCELLED_LABEL

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
        # Cancelled task ids, and when each request expires (epoch seconds).
        self.cancelled: dict[str, float] = {}
        # The asyncio task running each wrapped task's function, by task id.
        self.running: dict[str, asyncio.Task[Any]] = {}
        # Running tasks this process cancelled on request.
        self.requested: set[str] = set()
        # Set once the requests kept on the server are read.
        self._ready: asyncio.Event | None = None
        self._watch: asyncio.Task[None] | None = None

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
        task = self.running.get(task_id)
        if task is None or task_id in self.requested:
            return
        self.requested.add(task_id)
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
        if self.running.get(task_id) is task:
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
            return message
        return self._after_kept_requests(message)

    async def _after_kept_requests(self, message: TaskiqMessage) -> TaskiqMessage:
        """The first tasks of a process wait until the kept requests are read.

        So a task cancelled while every worker was down never starts. The
        watch starts with the first task: by then the broker and its result
        backend, whose client it uses, have started (the backend starts
        after the middlewares), and a process that runs no task (the API's)
        never watches.
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
        return message

    async def run(
        self,
        message: TaskiqMessage,
        function: Callable[..., Awaitable[Any]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        """Run the task's function unless it was cancelled; stop it if it is."""
        task_id = message.task_id
        if task_id in self.cancelled:
            message.labels[CANCELLED_LABEL] = "queued"
            raise TaskCancelledError(f"Task {task_id} was cancelled before it began.")
        task = asyncio.current_task()
        assert task is not None  # called by the receiver, in the message's task
        self.running[task_id] = task
        try:
            return await function(*args, **kwargs)
        except asyncio.CancelledError:
            if task_id not in self.requested:
                raise  # the worker's own stop, or the task's own doing
            if sys.version_info >= (3, 11):
                task.uncancel()  # handled here: what follows runs as usual
            message.labels[CANCELLED_LABEL] = "started"
            raise TaskCancelledError(f"Task {task_id} was cancelled.") from None
        finally:
            self.running.pop(task_id, None)
            self.requested.discard(task_id)

    async def _follow(self, channel: CancelChannel, ready: asyncio.Event) -> None:
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
                if attempt == 0:
                    logger.warning(
                        "Cancel requests cannot be read, trying again: %s",
                        describe(exc),
                    )
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
    """Make the task stop on request; False for a sync task, which cannot."""
    function = task.original_func
    if getattr(function, _WRAPPED, False):
        return True
    if not inspect.iscoroutinefunction(function):
        return False

    name = task.task_name

    @functools.wraps(function)
    async def run(*args: Any, **kwargs: Any) -> Any:
        message = executing()
        if message is None or message.task_name != name:
            return await function(*args, **kwargs)  # called, not by the receiver
        return await canceller.run(message, function, args, kwargs)

    setattr(run, _WRAPPED, True)
    replace_task_function(task, run)
    return True


def _cancellation(record: logging.LogRecord) -> TaskCancelledError | None:
    error = record.exc_info[1] if record.exc_info else None
    return error if isinstance(error, TaskCancelledError) else None


def _not_again(record: logging.LogRecord) -> bool:
    """A dependency that passes the cancellation on is not a teardown failure."""
    return _cancellation(record) is None


def _no_traceback(record: logging.LogRecord) -> bool:
    """A cancellation on request is one INFO line.

    taskiq's receiver logs every exception a task raises with its traceback.
    """
    cancellation = _cancellation(record)
    if cancellation is not None:
        record.msg, record.args, record.exc_info = str(cancellation), (), None
        record.levelno, record.levelname = logging.INFO, "INFO"
    return True
