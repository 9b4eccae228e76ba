"""What is recorded about a task kicked with status recording, and when.

A taskiq middleware records a task's states without the task doing
anything: `queued` when it is kicked (written while the message is sent, and
never over a worker's record), `started` when a worker begins it, and its
outcome. Records live in the broker's result backend under ids of their own
(`_brokers.record_storage` says where, per backend), so the backend's expiry
applies, taskiq's `ProgressTracker` keeps the task's own progress slot, and
reading a status never takes a result that reading would delete.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any, Literal

from pydantic import BaseModel
from pydantic_core import to_jsonable_python
from taskiq import (
    AsyncBroker,
    Context,
    NoResultError,
    TaskiqDepends,
    TaskiqMessage,
    TaskiqMiddleware,
    TaskiqResult,
)

from taskiq_fastapi._brokers import (
    RecordStorage,
    RedisRecords,
    keeps_results,
    peek_result,
)
from taskiq_fastapi.connections import describe

logger = logging.getLogger("taskiq_fastapi")

State = Literal["queued", "started", "succeeded", "failed", "cancelled"]
FINISHED: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})

# When the task was queued, on the kicking process's clock: the worker writes
# its records without reading the queued one first.
QUEUED_LABEL = "taskiq_fastapi_queued_at"
# When the worker began it: the finished record is written without a read too.
# Seconds since the epoch (time.time()): ISO text cost a task a microsecond
# each, and a record reads either as its datetime (earlier versions wrote text).
STARTED_LABEL = "taskiq_fastapi_started_at"
# When it ended, likewise; both are saved with the result, in its labels.
FINISHED_LABEL = "taskiq_fastapi_finished_at"
# By default, a task's `started` record is written once it has run this long
# (seconds): long enough that most short tasks write no record but their
# outcome, shorter than the router's default poll interval, so that a client
# following a task is not shown `queued` for a task that runs.
STARTED_AFTER = 0.05
# Set by a cancel request that stopped the task (cancel.py), saved likewise:
# "queued" where its function never began, else "started".
CANCELLED_LABEL = "taskiq_fastapi_cancelled"
# Labels of this package, never part of what a record keeps.
_OWN_LABELS = "taskiq_fastapi_"
# The record's id in the result backend.
_RECORD_SUFFIX = ".taskiq_fastapi_status"
# Where `Progress` keeps what a task reports.
_PROGRESS_SUFFIX = ".taskiq_fastapi_progress"


def _not_queued(task_id: str, exc: Exception) -> None:
    logger.warning(
        "Task %s: its queued state was not recorded: %s: %s",
        task_id, type(exc).__name__, exc,
    )  # fmt: skip


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class TaskError(BaseModel):
    """How a task failed: its exception's type, and its message if the app opts in."""

    type: str
    message: str | None = None


class TaskRecord(BaseModel):
    """Everything recorded about one task; what a per-task check is given.

    `labels` are the kick's labels (`task.kicker().with_labels(...)`), so an
    app can record at kick who may see the task and check it on reads.
    `result` is the task's return value as JSON, validated against the
    task's return annotation when it is read.
    """

    task_id: str
    task_name: str
    state: State
    queued_at: dt.datetime
    started_at: dt.datetime | None = None
    finished_at: dt.datetime | None = None
    labels: dict[str, Any] = {}
    result: Any = None
    error: TaskError | None = None

    @property
    def changed_at(self) -> dt.datetime:
        return self.finished_at or self.started_at or self.queued_at


def _kick_labels(labels: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in labels.items() if not k.startswith(_OWN_LABELS)}


class RecordStore:
    """Reads and writes records in one broker's result backend."""

    def __init__(self, broker: AsyncBroker, storage: RecordStorage) -> None:
        self.broker = broker
        self.storage = storage
        self._with_kick: Callable[[str, str, dict[str, Any]], bool] = (
            lambda _task_id, _key, _record: False
        )

    def send_with_kicks(self) -> None:
        """Send kicks' records with their messages where the broker allows."""
        if isinstance(self.storage, RedisRecords):
            self._with_kick = self.storage.send_with_kicks(self.broker)

    def with_kick(self, record: TaskRecord) -> bool:
        """Send the record with its task's kick; False: write it yourself."""
        return self._with_kick(
            record.task_id,
            record.task_id + _RECORD_SUFFIX,
            record.model_dump(mode="json"),
        )

    async def write(self, record: TaskRecord, first: bool = False) -> None:
        await self.storage.put(
            record.task_id + _RECORD_SUFFIX, record.model_dump(mode="json"), first
        )

    async def read(self, task_id: str) -> TaskRecord | None:
        found = await self.storage.get(task_id + _RECORD_SUFFIX)
        return None if found is None else TaskRecord.model_validate(found)

    async def delete(self, task_id: str) -> None:
        await self.storage.delete(task_id + _RECORD_SUFFIX)

    async def current(self, task_id: str, error_messages: bool) -> TaskRecord | None:
        """The task's record, with its outcome where the result holds it.

        A failure's message is kept in the record (the result backend holds
        it anyway) and shown only to a reader that asks for it.
        """
        record = await self.read(task_id)
        if record is not None and record.state not in FINISHED:
            result = await peek_result(self.broker.result_backend, task_id)
            if result is not None:
                record = finished(record, result)
        if record is None or record.error is None or error_messages:
            return record
        return record.model_copy(
            update={"error": record.error.model_copy(update={"message": None})}
        )

    async def set_progress(self, task_id: str, progress: Any) -> None:
        value = {"progress": to_jsonable_python(progress, fallback=repr)}
        await self.storage.put(task_id + _PROGRESS_SUFFIX, value)

    async def progress(self, task_id: str) -> Any:
        """What the task last reported (Progress, else taskiq's ProgressTracker)."""
        own = await self.storage.get(task_id + _PROGRESS_SUFFIX)
        if own is not None:
            return own.get("progress")
        progress = await self.broker.result_backend.get_progress(task_id)
        return None if progress is None else progress.meta


def finished(record: TaskRecord, result: TaskiqResult[Any]) -> TaskRecord:
    """The record of a task that ended with `result`.

    Its start and end times come from the result's labels, where the worker
    put them (post_execute, before taskiq saves the result).
    """
    done = record.model_dump()
    done["started_at"] = result.labels.get(STARTED_LABEL, record.started_at)
    done["finished_at"] = result.labels.get(FINISHED_LABEL, record.finished_at)
    if CANCELLED_LABEL in result.labels:
        done["state"] = "cancelled"
        if result.labels[CANCELLED_LABEL] == "queued":
            done["started_at"] = None
    elif result.is_err:
        done["state"] = "failed"
        done["error"] = TaskError(
            type=type(result.error).__name__,
            message=str(result.error),
        )
    else:
        done["state"] = "succeeded"
        done["result"] = _jsonable_result(record, result.return_value)
    return TaskRecord.model_validate(done)


def _jsonable_result(record: TaskRecord, value: Any) -> Any:
    """The return value as JSON holds it; None, logged, where JSON cannot.

    Bytes that are not UTF-8, for instance (a backend that keeps Python
    values returns them as they are): the task's doing, not the reader's,
    so neither a status read nor the worker's outcome record fails on it.
    """
    try:
        return to_jsonable_python(value, fallback=repr)
    except ValueError as exc:  # PydanticSerializationError, UnicodeDecodeError
        logger.warning(
            "Task %r (%s): its result cannot be shown as JSON, so its status "
            "shows none: %s",
            record.task_name,
            record.task_id,
            describe(exc),
        )
        return None


def _record(message: TaskiqMessage) -> TaskRecord | None:
    queued_at = message.labels.get(QUEUED_LABEL)
    if queued_at is None:
        return None
    return TaskRecord(
        task_id=message.task_id,
        task_name=message.task_name,
        state="started",
        queued_at=dt.datetime.fromisoformat(str(queued_at)),
        started_at=message.labels.get(STARTED_LABEL),
        labels=_kick_labels(message.labels),
    )


class _Start:
    """A running task's `started` write: due at `due` (the loop's clock), or sooner.

    No timer of its own: the Recorder keeps one for every running task. With
    no delay it is due at once, and begins at the task's first await.
    """

    __slots__ = ("due", "message", "store", "write")

    def __init__(self, store: RecordStore, message: TaskiqMessage, due: float) -> None:
        self.store = store
        self.message = message
        self.due = due
        self.write: asyncio.Future[None] | None = None

    def begin(self) -> asyncio.Future[None]:
        if self.write is None:
            # Made only now: most tasks end before, and never need it.
            record = _record(self.message)
            assert record is not None  # only made for messages with QUEUED_LABEL
            self.write = asyncio.ensure_future(
                _recorded(self.store.write(record), record, "started")
            )
        return self.write

    async def now(self) -> None:
        await self.begin()

    async def settle(self) -> None:
        """At the task's end: wait for the write if one began.

        So that a `started` record cannot land after the outcome.
        """
        if self.write is not None:
            await self.write


class Recorder(TaskiqMiddleware):
    """Writes the records of the tasks an app exposes; one per broker.

    Only kicks of exposed tasks are recorded, and a worker records only
    messages whose kick was (they carry QUEUED_LABEL), so a task kicked by a
    process that records nothing costs nothing anywhere.

    A worker writes as little as it can: `started` only once the task has
    run for its TaskStatus's `started_after` seconds (a shorter task goes
    from `queued` to its outcome, its start time kept), and the outcome not
    at all where the result backend keeps results: the result is the
    outcome, read without taking it, with the start and end times the worker
    put in its labels.
    Where reading a result deletes it (keep_results=False), the outcome is
    written as a record too.
    """

    def __init__(self, store: RecordStore) -> None:
        super().__init__()
        self.store = store
        # The tasks recorded, each with when its `started` record is due.
        self.started_after: dict[str, float] = {}
        # The `queued` write of each kick being sent, by task id.
        self._queueing: dict[str, asyncio.Future[None]] = {}
        # The `started` write of each running task.
        # By the message object's id: a retry (same task id) can begin in this
        # process before the failed run's post_execute.
        self._starting: dict[int, _Start] = {}
        # One timer for all of them, at the earliest `started` due. A timer
        # per task, cancelled as nearly every task ends first, left the
        # event loop's heap full of cancelled timers, which every other
        # timer then sifted through.
        # (A loop of its own: a broker may outlive the loop a timer was on.)
        self._wake: asyncio.TimerHandle | None = None
        self._wake_loop: asyncio.AbstractEventLoop | None = None

    async def pre_send(self, message: TaskiqMessage) -> TaskiqMessage:
        if message.task_name not in self.started_after:
            return message
        queued = message.labels.get(QUEUED_LABEL)
        # A retry kicks the task again with its labels: it was queued then.
        queued_at = _now() if queued is None else dt.datetime.fromisoformat(queued)
        record = TaskRecord(
            task_id=message.task_id,
            task_name=message.task_name,
            state="queued",
            queued_at=queued_at,
            labels=_kick_labels(message.labels),
        )
        message.labels[QUEUED_LABEL] = queued_at.isoformat()
        if self.store.with_kick(record):
            return message
        # Written while the message is sent; post_send waits for it, so the
        # status URL answers once kiq() returns.
        write = asyncio.ensure_future(self._queue(record))
        self._queueing[message.task_id] = write
        write.add_done_callback(lambda _: self._queueing.pop(message.task_id, None))
        return message

    async def _queue(self, record: TaskRecord) -> None:
        """The kick's write; it failing fails no kick (the task is sent)."""
        try:
            await self.store.write(record, first=True)
        except Exception as exc:
            _not_queued(record.task_id, exc)

    async def post_send(self, message: TaskiqMessage) -> None:
        write = self._queueing.get(message.task_id)
        if write is not None:
            await write

    def pre_execute(self, message: TaskiqMessage) -> TaskiqMessage:
        # The receiver hands this same message to post_execute.
        labels = message.labels
        if QUEUED_LABEL in labels:
            labels[STARTED_LABEL] = time.time()
            loop = asyncio.get_running_loop()
            due = loop.time() + self.started_after.get(message.task_name, STARTED_AFTER)
            self._starting[id(message)] = _Start(self.store, message, due)
            wake = self._wake
            if wake is None or due < wake.when() or self._wake_loop is not loop:
                self._wake_at(loop, due)
        return message

    def _wake_at(self, loop: asyncio.AbstractEventLoop, due: float) -> None:
        if self._wake is not None:
            self._wake.cancel()
        self._wake = loop.call_at(due, self._begin_due, loop)
        self._wake_loop = loop

    def _begin_due(self, loop: asyncio.AbstractEventLoop) -> None:
        """Begin the `started` writes now due; wake again at the next one."""
        self._wake = None
        now = loop.time()
        later = []
        for start in self._starting.values():
            if start.write is None:
                if start.due <= now:
                    start.begin()
                else:
                    later.append(start.due)
        if later:
            self._wake_at(loop, min(later))

    async def started(self, message: TaskiqMessage) -> None:
        """Write the task's `started` record now, if it is still to come."""
        start = self._starting.get(id(message))
        if start is not None:
            await start.now()

    def post_execute(
        self, message: TaskiqMessage, result: TaskiqResult[Any]
    ) -> Coroutine[Any, Any, None] | None:
        """Record the times; an awaitable only where there is more to do.

        Most tasks have nothing to wait for, so no coroutine is made: taskiq
        awaits what this returns only if it is awaitable.
        """
        start = self._starting.pop(id(message), None)
        if start is None:
            return None
        # Saved with the result, which taskiq writes after post_execute.
        labels = result.labels
        labels[STARTED_LABEL] = message.labels[STARTED_LABEL]
        labels[FINISHED_LABEL] = time.time()
        if start.write is None and (
            isinstance(result.error, NoResultError)
            or keeps_results(self.store.broker.result_backend)
        ):
            return None
        return self._finish(start, message, result)

    async def _finish(
        self, start: _Start, message: TaskiqMessage, result: TaskiqResult[Any]
    ) -> None:
        await start.settle()
        if isinstance(result.error, NoResultError):
            return  # no outcome: saved by no one (a retry's will be)
        if not keeps_results(self.store.broker.result_backend):
            record = _record(message)
            assert record is not None  # it has QUEUED_LABEL, as it has a _Start
            done = finished(record, result)
            await _recorded(self.store.write(done), done, done.state)


async def _recorded(write: Awaitable[None], record: TaskRecord, state: str) -> None:
    """A worker's write of a record; it failing fails no task.

    The task's result is saved after this (taskiq saves it once the
    middlewares are done): a record that cannot be written (the server is
    down, or it lost its state, or the result is too large for a record)
    must not keep the result from being saved, nor the message from being
    acknowledged. Logged, one line; the status shows the last state written.
    """
    try:
        await write
    except Exception as exc:
        logger.warning(
            "Task %r (%s): its %s state was not recorded: %s",
            record.task_name,
            record.task_id,
            state,
            describe(exc),
        )


def recorder(store: RecordStore) -> Recorder:
    """The broker's Recorder, added to its middlewares on first use."""
    for middleware in store.broker.middlewares:
        if isinstance(middleware, Recorder):
            return middleware
    store.send_with_kicks()
    made = Recorder(store)
    store.broker.add_middlewares(made)
    return made


class Progress:
    """A task's dependency to report progress, shown by TaskStatus.

    `progress: Progress = TaskiqDepends()`, then `await progress.set(value)`
    with anything JSON can hold. Unlike taskiq's ProgressTracker (which
    TaskStatus shows too), it works with every result backend TaskStatus
    does, taskiq-nats 0.6's included. Where TaskStatus records nothing for
    the task, it does nothing.
    """

    def __init__(self, context: Context = TaskiqDepends()) -> None:
        self.context = context

    async def set(self, progress: Any) -> None:
        """Report it; a report that cannot be written is logged, not raised.

        As a record that cannot be written (the server is down, or the value
        is over its size limit): how far a task got must not fail the task.
        """
        message = self.context.message
        if QUEUED_LABEL not in message.labels:
            return
        for middleware in self.context.broker.middlewares:
            if isinstance(middleware, Recorder):
                task = asyncio.current_task()
                asked = _cancelling(task)
                was_stopping = task in STOPPING
                # A task reporting progress has started, however soon.
                await middleware.started(message)
                try:
                    await middleware.store.set_progress(message.task_id, progress)
                except Exception as exc:
                    logger.warning(
                        "Task %r (%s): its progress was not recorded: %s",
                        message.task_name,
                        message.task_id,
                        describe(exc),
                    )
                if _cancelling(task) > asked or (task in STOPPING and not was_stopping):
                    # Cancelled during the writes, and the client returned
                    # all the same: redis-py waiting for a connection of a
                    # full BlockingConnectionPool (taskiq-redis') swallows
                    # the CancelledError, on Python 3.11 and on 3.10 (redis-
                    # py 8.1). The task was asked to stop (a cancel request,
                    # the worker's stop). Before 3.11 there is no
                    # `cancelling()`: only a cancel request is seen, in
                    # STOPPING.
                    raise asyncio.CancelledError


# The asyncio tasks cancelled on request (cancel.py), until their message's
# post_execute.
STOPPING: weakref.WeakSet[asyncio.Task[Any]] = weakref.WeakSet()


def _cancelling(task: asyncio.Task[Any] | None) -> int:
    """How many cancellations of `task` are pending (0 before Python 3.11)."""
    cancelling = getattr(task, "cancelling", None)
    return 0 if cancelling is None else int(cancelling())
