"""`TaskStatus`: the routes that show an app's tasks, and `202 Accepted` for kicks."""

from __future__ import annotations

import asyncio
import datetime as dt
import inspect
import logging
import typing
from collections.abc import AsyncIterator, Sequence
from typing import Annotated, Any, Literal
from urllib.parse import quote
from weakref import WeakKeyDictionary

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field, ValidationError, create_model
from pydantic.errors import PydanticUserError
from taskiq import (
    AsyncBroker,
    AsyncTaskiqDecoratedTask,
    AsyncTaskiqTask,
    InMemoryBroker,
)

from taskiq_fastapi._brokers import cancel_channel, record_storage
from taskiq_fastapi.exceptions import (
    TaskNotCancellableError,
    TaskNotFoundError,
    TaskStatusError,
)
from taskiq_fastapi.task_status.cancel import Canceller, canceller, stop_on_request
from taskiq_fastapi.task_status.records import (
    FINISHED,
    STARTED_AFTER,
    RecordStore,
    State,
    TaskError,
    TaskRecord,
    recorder,
)

Task = AsyncTaskiqDecoratedTask[Any, Any]

logger = logging.getLogger("taskiq_fastapi")

_JSON = "application/json"


class TaskAccepted(BaseModel):
    """The body of a `202 Accepted`: the task's id and where its status is."""

    task_id: str
    status_url: str


class TaskStatusBase(BaseModel):
    """A task's status as the API shows it; each exposed task has its own model."""

    task_id: str
    task: str
    state: State
    queued_at: dt.datetime
    started_at: dt.datetime | None = None
    finished_at: dt.datetime | None = None
    progress: Any = None
    error: TaskError | None = None


def _return_annotation(task: Task) -> Any:
    """The task function's return annotation; Any where it has none."""
    function = inspect.unwrap(task.original_func)
    try:
        hints = typing.get_type_hints(function, include_extras=True)
    except Exception:  # an unresolvable forward reference: shown as Any
        return Any
    return hints.get("return", Any)


def _status_model(task: Task, taken: set[str]) -> type[TaskStatusBase]:
    """`<Function>Status`, whose `result` is the task's return type."""
    # From the task's name: taskiq renames the function (`f__taskiq_original`).
    short = task.task_name.rpartition(":")[2].rpartition(".")[2]
    base = "".join(p[:1].upper() + p[1:] for p in short.split("_"))
    name, n = f"{base}Status", 1
    while name in taken:
        n += 1
        name = f"{base}Status{n}"
    taken.add(name)
    result = _return_annotation(task)
    literal: Any = Literal[task.task_name]
    return create_model(
        name,
        __base__=TaskStatusBase,
        task=(literal, ...),
        result=(result | None, None),
    )


def _seconds(value: object) -> float:
    """A number of seconds as given; NaN (never in range) for anything else."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return float("nan")


# The TaskStatus objects made for each broker (they share its records).
_serving: WeakKeyDictionary[AsyncBroker, list[TaskStatus]] = WeakKeyDictionary()


class TaskStatus:
    """Records the listed tasks' states and serves them to the app's clients.

    Creating it turns recording on for these tasks (a taskiq middleware on
    the broker); `router()` gives the routes to include, `kicked` is a
    dependency giving the record of the path's task (404 where there is
    none, or it belongs to a task not listed), for per-task checks, and
    `accepted()` answers a route that kicked a task.

    `started_after`: a worker records `started` once the task has run this
    many seconds; 0 records it at the task's first await. Each such record
    is one more write per task, which is why the default leaves it out for
    tasks shorter than a client could follow (as Celery records STARTED only
    when asked).
    """

    def __init__(
        self,
        broker: AsyncBroker,
        tasks: Sequence[Task],
        *,
        error_messages: bool = False,
        keep_for: dt.timedelta = dt.timedelta(days=1),
        poll_interval: float = 0.25,
        started_after: float = STARTED_AFTER,
        name: str = "task_status",
        cancellable: bool = False,
    ) -> None:
        if not _seconds(started_after) >= 0:  # NaN too
            raise TaskStatusError(
                f"started_after={started_after!r}: expected seconds, 0 or more."
            )
        # Else every record would be hidden at once, and each event stream
        # would read the records without pause.
        if not isinstance(keep_for, dt.timedelta) or keep_for <= dt.timedelta(0):
            raise TaskStatusError(
                f"keep_for={keep_for!r}: expected a timedelta longer than 0."
            )
        # Infinite, each event stream would send its first status, then
        # nothing, and never end.
        if not 0 < _seconds(poll_interval) < float("inf"):
            raise TaskStatusError(
                f"poll_interval={poll_interval!r}: expected seconds, more than 0 "
                "and finite."
            )
        storage = record_storage(broker.result_backend, keep_for.total_seconds())
        if storage is None:
            raise TaskStatusError(
                f"TaskStatus needs a result backend that stores progress; "
                f"the broker's is {type(broker.result_backend).__name__}: "
                f"give the broker one with .with_result_backend(...) "
                f"(taskiq-redis' RedisAsyncResultBackend, for instance)."
            )
        if not tasks:
            raise TaskStatusError("TaskStatus was given no tasks to show.")
        taken: set[str] = set()
        self.models: dict[str, type[TaskStatusBase]] = {}
        for task in tasks:
            if broker.find_task(task.task_name) is not task:
                raise TaskStatusError(
                    f"Task {task.task_name!r} is not a task of this broker."
                )
            try:
                self.models[task.task_name] = _status_model(task, taken)
            except PydanticUserError as exc:
                raise TaskStatusError(
                    f"Task {task.task_name!r}: its return annotation cannot be "
                    f"shown as a result: {' '.join(str(exc).split())}"
                ) from None
        for other in _serving.get(broker, []):
            if other.name == name:
                raise TaskStatusError(
                    f"Another TaskStatus named {name!r} already serves this "
                    f"broker: give this one a name of its own (name=...), so "
                    f"that its 202 Location points at its own routes."
                )
            if other.keep_for != keep_for:
                raise TaskStatusError(
                    f"Another TaskStatus serves this broker with keep_for="
                    f"{other.keep_for}: the records of one broker are kept "
                    f"alike, so give this one the same keep_for."
                )
        _serving.setdefault(broker, []).append(self)
        self.store = RecordStore(broker, storage)
        self.keep_for: dt.timedelta = keep_for
        self.poll_interval = poll_interval
        self.name: str = name
        self._recorder = recorder(self.store)
        self._recorder.started_after.update(dict.fromkeys(self.models, started_after))
        self.error_messages = error_messages
        self._canceller: Canceller | None = None
        # The listed tasks that can be stopped once running (async ones).
        self._stoppable: set[str] = set()
        if cancellable:
            self._cancellable(broker, tasks)

    def _cancellable(self, broker: AsyncBroker, tasks: Sequence[Task]) -> None:
        storage = self.store.storage
        channel = cancel_channel(storage)
        if channel is None and not isinstance(broker, InMemoryBroker):
            raise TaskStatusError(
                f"TaskStatus(cancellable=True) needs its records on Redis "
                f"(taskiq-redis' RedisAsyncResultBackend) or NATS (taskiq-nats' "
                f"NATSObjectStoreResultBackend), where every worker can follow "
                f"cancel requests; the broker's result backend is "
                f"{type(broker.result_backend).__name__}."
            )
        keep = self.keep_for.total_seconds() if channel is None else channel.keep
        self._canceller = canceller(broker, channel, keep)
        for task in tasks:
            if stop_on_request(task, self._canceller):
                self._stoppable.add(task.task_name)
            else:
                # A sync task cannot be stopped once in its thread: recorded
                # `started` as it goes there, so that a cancel sent while it
                # runs is refused (409) instead of accepted and not honoured.
                self._recorder.started_after[task.task_name] = 0.0

    async def cancel(self, task_id: str) -> TaskRecord:
        """Cancel a queued or running task; its record as it stands now.

        The task becomes `cancelled` once a worker has stopped it or
        skipped it; until then its record stays `queued` or `started`.
        Raises TaskNotFoundError where `GET` would answer 404 (a route's
        own access checks are the route's), TaskNotCancellableError (409)
        for a finished task or a sync one that is running, and TaskStatusError if this
        TaskStatus was not made with `cancellable=True`.
        """
        if self._canceller is None:
            raise TaskStatusError(
                f"TaskStatus {self.name!r} was made without cancellable=True."
            )
        record = await self._find(task_id)
        if record is None:
            raise TaskNotFoundError(f"Task {task_id} not found")
        return await self._cancel(record, self._canceller)

    async def _cancel(self, record: TaskRecord, canceller: Canceller) -> TaskRecord:
        if record.state in FINISHED:
            raise TaskNotCancellableError(
                f"Task {record.task_id} has already finished: {record.state}",
                record.state,
            )
        if record.task_name not in self._stoppable and record.state != "queued":
            raise TaskNotCancellableError(
                f"Task {record.task_id} is running: {record.task_name!r} is a "
                f"sync function, which runs in a thread that cannot be stopped",
                record.state,
            )
        await canceller.send(record.task_id)
        return record

    async def kicked(self, task_id: str) -> TaskRecord:
        """What was recorded about the path's task; 404 if it is not shown."""
        record = await self._find(task_id)
        if record is None:
            raise HTTPException(status_code=404, detail="Task not found")
        return record

    async def _find(self, task_id: str) -> TaskRecord | None:
        record = await self.store.current(task_id, self.error_messages)
        if record is not None and self._expired(record):
            await self.store.delete(task_id)
            record = None
        if record is None or record.task_name not in self.models:
            return None
        return record

    def _expired(self, record: TaskRecord) -> bool:
        return dt.datetime.now(dt.timezone.utc) - record.changed_at > self.keep_for

    async def _status(self, record: TaskRecord) -> str:
        """The record as the task's own status model, as JSON text.

        A result that does not match the task's return annotation is the
        task's bug, not the client's: the status answers without it (and
        says so in the log) instead of failing every read. Written by
        Pydantic, whose JSON has null for a float that is infinite or NaN
        (which a backend keeping Python values, InMemoryBroker's, returns
        as they are), where JSONResponse refuses them: a 500 on every read.
        """
        model = self.models[record.task_name]
        progress = await self.store.progress(record.task_id)
        if progress is not None and record.state == "queued":
            # Read before the task reported it: a task's `started` is written
            # before any progress, so it is there now.
            record = (
                await self.store.current(record.task_id, self.error_messages) or record
            )
        fields = {
            "task": record.task_name,
            "progress": progress,
            **record.model_dump(exclude={"task_name", "labels"}),
        }
        try:
            status = model.model_validate(fields)
        except ValidationError as exc:
            logger.warning(
                "Task %r (%s): its result does not match its return annotation, "
                "so its status shows none: %s",
                record.task_name,
                record.task_id,
                " ".join(str(exc).split()),
            )
            status = model.model_validate({**fields, "result": None})
        return status.model_dump_json()

    def router(self, *, prefix: str = "/tasks", **kwargs: Any) -> APIRouter:
        """The routes: `GET {prefix}/{task_id}` and `GET {prefix}/{task_id}/events`.

        Keyword arguments go to APIRouter: `dependencies=[Depends(...)]`
        authenticate, and a dependency using `Depends(status.kicked)` can
        check a task's kick labels against the caller.
        """
        router = APIRouter(prefix=prefix, **kwargs)
        models = list(self.models.values())
        response_model: Any = (
            Annotated[typing.Union[tuple(models)], Field(discriminator="task")]  # noqa: UP007
            if len(models) > 1
            else models[0]
        )

        # `:path`: a task id may hold "/" (`with_task_id`, a tenant's
        # prefix), which the server decodes before routing, so `{task_id}`
        # matched nothing. The events route first, or the status route
        # would take "<id>/events" as an id.
        @router.get(
            "/{task_id:path}/events",
            name=f"{self.name}_events",
            response_class=StreamingResponse,
            responses={
                200: {
                    "description": "Server-sent events: one `status` event per "
                    "change, the current status first, until the task ends",
                    "content": {"text/event-stream": {}},
                },
                404: {"description": "No such task, or not shown"},
            },
        )
        async def task_events(
            record: TaskRecord = Depends(self.kicked),
        ) -> StreamingResponse:
            return StreamingResponse(
                self._events(record),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )

        @router.get(
            "/{task_id:path}",
            name=self.name,
            response_model=response_model,
            responses={404: {"description": "No such task, or not shown"}},
        )
        async def task_status(
            record: TaskRecord = Depends(self.kicked),
        ) -> Response:
            return Response(await self._status(record), media_type=_JSON)

        if self._canceller is not None:
            self._cancel_route(router, response_model, self._canceller)
        return router

    def _cancel_route(
        self, router: APIRouter, response_model: Any, canceller: Canceller
    ) -> None:
        @router.delete(
            "/{task_id:path}",
            name=f"{self.name}_cancel",
            status_code=202,
            response_model=response_model,
            responses={
                202: {"description": "Cancel requested: the status as it stands"},
                404: {"description": "No such task, or not shown"},
                409: {"description": "Finished already, or a sync task running"},
            },
        )
        async def cancel_task(
            request: Request, record: TaskRecord = Depends(self.kicked)
        ) -> Response:
            try:
                await self._cancel(record, canceller)
            except TaskNotCancellableError as exc:
                raise HTTPException(status_code=409, detail=str(exc)) from None
            url = self._status_url(request, record.task_id)
            return Response(
                await self._status(record),
                status_code=202,
                headers={"Location": url},
                media_type=_JSON,
            )

    async def _events(self, record: TaskRecord | None) -> AsyncIterator[str]:
        sent = None
        while record is not None:
            status = await self._status(record)
            if status != sent:
                sent = status
                yield f"event: status\ndata: {status}\n\n"
            if record.state in FINISHED:
                return
            await asyncio.sleep(self.poll_interval)
            record = await self.store.current(record.task_id, self.error_messages)

    def _status_url(self, request: Request, task_id: str) -> str:
        """The task's status URL, its id percent-encoded.

        Starlette puts a path parameter in a URL as it is, and taskiq lets a
        kick choose its id (`with_task_id`): `#` or `?` would cut the path
        short, `%` escape what follows, and a character Latin-1 has not
        fail the response's Location header.
        """
        return str(request.url_for(self.name, task_id=quote(task_id, safe="")))

    def accepted(self, task: AsyncTaskiqTask[Any], request: Request) -> JSONResponse:
        """`202 Accepted` for a kicked task: its id, and its status URL as Location.

        Declare the route with `status_code=202, response_model=TaskAccepted`
        so its OpenAPI says so too.
        """
        url = self._status_url(request, task.task_id)
        body = TaskAccepted(task_id=task.task_id, status_url=url)
        return JSONResponse(
            body.model_dump(), status_code=202, headers={"Location": url}
        )
