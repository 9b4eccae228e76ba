"""Every reliance on an internal of taskiq or taskiq-dependencies lives here.

And those of taskiq-redis, taskiq-nats, redis-py and nats-py that TaskStatus
relies on (its record storage). tests/test_taskiq_internals.py pins the
first, tests/test_task_status.py and tests/test_task_status_worker.py the
others, so an upgrade that changes them fails loudly instead of silently
breaking injection or status.
"""

from __future__ import annotations

import contextlib
import inspect
import json
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from typing import Any

from fastapi.params import Depends as FastAPIDepends
from starlette.requests import HTTPConnection, Request
from taskiq import AsyncBroker, AsyncResultBackend, Context, TaskiqResult

# taskiq's worker imports the broker with the current directory on sys.path;
# reusing its helper keeps app imports resolving exactly like broker imports.
from taskiq.cli.utils import add_cwd_in_path as cwd_in_sys_path
from taskiq.decor import AsyncTaskiqDecoratedTask
from taskiq.depends.progress_tracker import TaskProgress
from taskiq.message import BrokerMessage

# taskiq's marker class: `TaskiqDepends(...)` returns one of these.
from taskiq_dependencies.dependency import Dependency as TaskiqMarker

__all__ = [
    "MakeRequest",
    "PerTaskContext",
    "RecordStorage",
    "TaskiqMarker",
    "cwd_in_sys_path",
    "install_request_context",
    "keeps_results",
    "marker_of",
    "on_registration",
    "peek_result",
    "record_storage",
    "replace_task_function",
    "task_request",
]

Task = AsyncTaskiqDecoratedTask[Any, Any]
# Builds a task's Request from its message's labels (None outside the receiver).
MakeRequest = Callable[[Mapping[str, Any] | None], Request]


# The Context of the task whose dependencies the running asyncio task
# resolves: set by `PerTaskContext.update`, which taskiq's receiver calls in
# the task's own asyncio task (one per message) just before resolving them.
_task_context: ContextVar[Any] = ContextVar("taskiq_fastapi_task_context")
# That task's Request, once made, with the Context it was made for.
_task_request: ContextVar[tuple[Any, Request] | None] = ContextVar(
    "taskiq_fastapi_task_request", default=None
)


class PerTaskContext(dict[Any, Any]):
    """A broker dependency context that gives every task its own Request.

    taskiq's receiver writes each task's `Context` into the broker's one
    `custom_dependency_context` (with `update`) and passes that shared dict
    to taskiq-dependencies, which takes a `copy.copy` of it for the task and
    again for every `use_cache=False` sub-dependency, those after earlier
    awaits, when other tasks of the process may have written their own
    Context into it meanwhile. So nothing per task is read from the shared
    dict after `update`: the task's Context is kept in a context variable of
    its own asyncio task, and every copy made for that task gets that Context
    and one Request, made once per task from its message's labels. Tasks
    without dependencies are never copied, so they pay for no Request; and
    taskiq's prebuilt dependency graphs are kept (overrides would rebuild
    them for every task).
    """

    def __init__(
        self,
        values: dict[Any, Any],
        make_request: MakeRequest,
    ) -> None:
        super().__init__(values)
        self.make_request = make_request

    def update(self, *args: Any, **kwargs: Any) -> None:
        super().update(*args, **kwargs)
        # The receiver's update names the task's Context; other updates
        # (`broker.add_dependency_context` in a task) leave the task's own.
        written: Mapping[Any, Any] = (
            args[0] if args and isinstance(args[0], Mapping) else kwargs
        )
        if Context in written:
            _task_context.set(written[Context])

    def __copy__(self) -> dict[Any, Any]:
        values = dict(self)
        context = _task_context.get(None)
        if context is None:  # outside taskiq's receiver: a Request per copy
            request = _request_for(self.make_request, values.get(Context))
        else:
            values[Context] = context
            request = _this_tasks_request(self.make_request, context)
        # FastAPI hands the Request itself to HTTPConnection parameters too.
        values[Request] = request
        values[HTTPConnection] = request
        return values


def _request_for(make_request: MakeRequest, context: Any) -> Request:
    labels = context.message.labels if isinstance(context, Context) else None
    return make_request(labels)


def _this_tasks_request(make_request: MakeRequest, context: Any) -> Request:
    """The Request of the task whose Context this is, made on first use."""
    made = _task_request.get()
    if made is not None and made[0] is context:
        return made[1]
    request = _request_for(make_request, context)
    _task_request.set((context, request))
    return request


def task_request(broker: AsyncBroker) -> Request:
    """The running task's Request: the one its dependencies get, made once.

    For code that runs inside the task's call rather than in taskiq's
    dependency resolution (tasks whose FastAPI dependencies are solved
    there); the receiver has announced the task's Context by then.
    """
    context = broker.custom_dependency_context
    if not isinstance(context, PerTaskContext):
        raise RuntimeError(
            "This task uses FastAPI dependencies, but its broker was never "
            "given an app: call taskiq_fastapi.init(broker, app) in the broker "
            "module, or start the workers with taskiq-fastapi worker --app.",
        )
    task_context = _task_context.get(None)
    if task_context is None:
        return context.make_request(None)
    return _this_tasks_request(context.make_request, task_context)


def install_request_context(broker: AsyncBroker, make_request: MakeRequest) -> None:
    """Make `make_request` the source of the Request the broker's tasks get."""
    current = broker.custom_dependency_context
    if isinstance(current, PerTaskContext):
        current.make_request = make_request
        return
    broker.custom_dependency_context = PerTaskContext(current, make_request)


def marker_of(parameter: inspect.Parameter) -> Any:
    """The dependency marker taskiq-dependencies reads for a parameter.

    As taskiq-dependencies does: the last taskiq or FastAPI marker in
    `Annotated[...]` metadata wins over the default value.
    """
    for meta in reversed(getattr(parameter.annotation, "__metadata__", ())):
        if isinstance(meta, (TaskiqMarker, FastAPIDepends)):
            return meta
    return parameter.default


def on_registration(broker: AsyncBroker, callback: Callable[[Task], None]) -> None:
    """Call `callback` with every task registered on the broker from now on.

    `broker.task` and `broker.register_task` both end in `_register_task`.
    """
    register = broker._register_task

    def registering(task_name: str, task: Task) -> None:
        register(task_name, task)
        callback(task)

    broker._register_task = registering  # type: ignore[method-assign]


def replace_task_function(task: Task, function: Callable[..., Any]) -> None:
    """Make workers call `function` for the task and build its graph from it.

    taskiq's receiver reads `task.original_func` for both, when it is created
    and for each message.
    """
    task.original_func = function


class ProgressSlots:
    """Records kept through the result backend's public progress storage.

    It never deletes what it reads (unlike `get_result` with
    keep_results=False in taskiq-redis and taskiq-nats), and taskiq-redis
    gives each entry the result's expiry.
    """

    def __init__(self, backend: AsyncResultBackend[Any]) -> None:
        self.backend = backend

    async def put(self, key: str, record: dict[str, Any], first: bool = False) -> None:
        """Write it; `first`: the first write of a key (a worker's never are)."""
        progress = TaskProgress[Any](state=str(record.get("state")), meta=record)
        await self.backend.set_progress(key, progress)

    async def get(self, key: str) -> dict[str, Any] | None:
        progress = await self.backend.get_progress(key)
        if progress is None or not isinstance(progress.meta, dict):
            return None
        return progress.meta

    async def delete(self, key: str) -> None:
        """Left to the backend's own expiry: the API has no delete."""


class NatsKeyValues:
    """Records in a JetStream key-value bucket next to taskiq-nats' results.

    taskiq-nats 0.6 stores no progress (its backend keeps the base class's
    no-op `set_progress`), and its object store (`backend.object_store`)
    has no expiry, and a read racing a rewrite of the same object can wait
    forever for chunks the rewrite purged. A key-value bucket has neither
    problem: each value is one message, and the bucket's `ttl` is
    TaskStatus' `keep_for`. It uses the backend's JetStream context
    (`backend.nats_jetstream`, made by its startup).
    """

    def __init__(self, backend: AsyncResultBackend[Any], ttl: float) -> None:
        self.backend = backend
        self.ttl = ttl
        self.bucket: Any = None

    async def _bucket(self) -> Any:
        if self.bucket is None:
            from nats.js.errors import BucketNotFoundError

            jetstream = self.backend.nats_jetstream  # type: ignore[attr-defined]
            name = f"{self.backend.bucket_name}-taskiq-fastapi"  # type: ignore[attr-defined]
            try:
                self.bucket = await jetstream.key_value(name)
            except BucketNotFoundError:
                self.bucket = await jetstream.create_key_value(
                    bucket=name, ttl=self.ttl
                )
        return self.bucket

    async def put(self, key: str, record: dict[str, Any], first: bool = False) -> None:
        from nats.js.errors import KeyWrongLastSequenceError

        bucket, value = await self._bucket(), json.dumps(record).encode()
        if not first:
            await bucket.put(key, value)
            return
        with contextlib.suppress(KeyWrongLastSequenceError):  # a worker's is there
            await bucket.create(key, value)

    async def get(self, key: str) -> dict[str, Any] | None:
        from nats.js.errors import KeyNotFoundError

        try:
            entry = await (await self._bucket()).get(key)
        except KeyNotFoundError:  # and KeyDeletedError, its subclass
            return None
        return json.loads(entry.value)  # type: ignore[no-any-return]

    async def delete(self, key: str) -> None:
        await (await self._bucket()).delete(key)


class RedisRecords:
    """Records as keys of taskiq-redis' `RedisAsyncResultBackend`'s server.

    Through its connection pool (`backend.redis_pool`) with one client for
    the process, as JSON, expiring with the backend's results
    (`result_ex_time` / `result_px_time`) or, where it sets none, after
    `keep_for`: half the cost of its `set_progress`, which makes a client
    and pickles a model per call, so that recording a kick stays cheap. A
    kick's write is `SET NX`, so it can never overwrite a worker's.
    """

    def __init__(self, backend: AsyncResultBackend[Any], keep_for: float) -> None:
        from redis.asyncio import Redis

        self.pool = backend.redis_pool  # type: ignore[attr-defined]
        self.client = Redis(connection_pool=self.pool)
        self.prefix = backend.prefix_str  # type: ignore[attr-defined]
        self.ex: int | None = backend.result_ex_time  # type: ignore[attr-defined]
        self.px: int | None = backend.result_px_time  # type: ignore[attr-defined]
        if not (self.ex or self.px):
            self.ex = max(1, int(keep_for))

    def _key(self, key: str) -> str:
        return key if self.prefix is None else f"{self.prefix}:{key}"

    async def put(self, key: str, record: dict[str, Any], first: bool = False) -> None:
        value = json.dumps(record)
        await self.client.set(self._key(key), value, ex=self.ex, px=self.px, nx=first)

    async def get(self, key: str) -> dict[str, Any] | None:
        found = await self.client.get(self._key(key))
        return None if found is None else json.loads(found)

    async def delete(self, key: str) -> None:
        await self.client.delete(self._key(key))

    def send_with_kicks(
        self, broker: AsyncBroker
    ) -> Callable[[str, str, dict[str, Any]], bool]:
        """Send each kick's first write in the kick's own command, if it can.

        For taskiq-redis' ListQueueBroker on the records' server, whose
        `kick` is an LPUSH of the message to its `queue_name` label or its
        queue (`broker.queue_name`, through `broker.connection_pool`): the
        broker's kick is replaced by one that runs a script doing the SET NX
        and the LPUSH, one round trip and one command (a pipeline of two
        costs nearly as much as two). Returns what stashes a record for its
        task's kick; it returns False where kicks cannot carry it (write it
        yourself then).
        """
        from redis.asyncio import Redis
        from taskiq_redis import ListQueueBroker

        if type(broker) is not ListQueueBroker or _server(
            broker.connection_pool
        ) != _server(self.pool):
            return lambda _task_id, _key, _record: False
        stashed: dict[str, tuple[str, str]] = {}
        kick = broker.kick
        script = Redis(connection_pool=broker.connection_pool).register_script(
            _SET_AND_LPUSH
        )
        expiry = ["EX", self.ex] if self.ex else ["PX", self.px]

        async def kick_with_record(message: BrokerMessage) -> None:
            record = stashed.pop(message.task_id, None)
            if record is None:
                await kick(message)
                return
            queue = message.labels.get("queue_name") or broker.queue_name
            key, value = record
            await script(keys=[key, queue], args=[value, message.message, *expiry])

        def stash(task_id: str, key: str, record: dict[str, Any]) -> bool:
            stashed[task_id] = (self._key(key), json.dumps(record))
            return True

        broker.kick = kick_with_record  # type: ignore[method-assign]
        return stash


# A kick's record (unless a worker's is there) and its message, at once.
_SET_AND_LPUSH = """
redis.call('SET', KEYS[1], ARGV[1], ARGV[3], ARGV[4], 'NX')
return redis.call('LPUSH', KEYS[2], ARGV[2])
"""


def _server(pool: Any) -> tuple[Any, ...]:
    """What tells two redis-py connection pools' servers apart."""
    kwargs = {"port": 6379, "db": 0, **pool.connection_kwargs}  # redis-py's defaults
    fields = ("host", "port", "path", "db", "username", "password")
    return (pool.connection_class, *(kwargs.get(f) for f in fields))


RecordStorage = ProgressSlots | NatsKeyValues | RedisRecords


def record_storage(
    backend: AsyncResultBackend[Any], keep_for: float
) -> RecordStorage | None:
    """Where TaskStatus can keep records in this result backend; None: nowhere.

    `AsyncResultBackend.set_progress` does nothing (taskiq#464); the backends
    that store progress override it: InMemoryBroker's, taskiq-redis', and
    taskiq-nats' from 0.7; for taskiq-nats, at every version, records go to
    a key-value bucket of their own instead (NatsKeyValues says why), and
    for taskiq-redis' RedisAsyncResultBackend to keys of their own
    (RedisRecords says why).
    """
    if type(backend).__name__ == "NATSObjectStoreResultBackend" and type(
        backend
    ).__module__.startswith("taskiq_nats"):
        return NatsKeyValues(backend, keep_for)
    if type(backend).__name__ == "RedisAsyncResultBackend" and type(
        backend
    ).__module__.startswith("taskiq_redis"):
        return RedisRecords(backend, keep_for)
    if type(backend).set_progress is not AsyncResultBackend.set_progress:
        return ProgressSlots(backend)
    return None


def keeps_results(backend: AsyncResultBackend[Any]) -> bool:
    """Whether reading a result leaves it in the backend.

    taskiq-redis' and taskiq-nats' backends delete it on read with
    `keep_results=False`; InMemoryBroker's never does (it has no such flag).
    """
    return getattr(backend, "keep_results", True) is not False


async def peek_result(
    backend: AsyncResultBackend[Any], task_id: str
) -> TaskiqResult[Any] | None:
    """The task's result if it is ready and reading it does not take it."""
    if not keeps_results(backend) or not await backend.is_result_ready(task_id):
        return None
    return await backend.get_result(task_id)
