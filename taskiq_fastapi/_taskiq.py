"""Every reliance on an internal of taskiq or taskiq-dependencies lives here.

tests/test_taskiq_internals.py pins each one, so an upgrade that changes them
fails loudly instead of silently breaking injection. Those of taskiq-redis,
taskiq-nats, redis-py and nats-py live in `_brokers.py`.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from typing import Annotated, Any, get_type_hints

from fastapi.params import Depends as FastAPIDepends
from pydantic import ValidationError
from starlette.requests import HTTPConnection, Request
from taskiq import (
    AckableMessage,
    AsyncBroker,
    Context,
    TaskiqEvents,
    TaskiqMessage,
    TaskiqState,
)

# taskiq's worker imports the broker with the current directory on sys.path;
# reusing its helper keeps app imports resolving exactly like broker imports.
from taskiq.cli.utils import add_cwd_in_path as cwd_in_sys_path
from taskiq.decor import AsyncTaskiqDecoratedTask

# taskiq's marker class: `TaskiqDepends(...)` returns one of these.
from taskiq_dependencies.dependency import Dependency as TaskiqMarker
from taskiq_dependencies.utils import ParamInfo

__all__ = [
    "CONTEXT_TYPES",
    "DEPENDENCIES_LOGGER",
    "GATE",
    "RECEIVER_LOGGER",
    "RETRY_LABEL",
    "MakeRequest",
    "PerTaskContext",
    "SyncBehindGate",
    "TaskiqMarker",
    "cwd_in_sys_path",
    "executing",
    "gated",
    "install_request_context",
    "marker_of",
    "on_registration",
    "own_function",
    "replace_task_function",
    "set_executing",
    "sets_up_dependencies",
    "shutdown_handlers_noted",
    "task_request",
    "with_ack",
    "wrap_outermost",
]

Task = AsyncTaskiqDecoratedTask[Any, Any]
# What a task's dependency context holds (taskiq's receiver puts Context and
# TaskiqState in it, `PerTaskContext` the Request): `TaskiqDepends()` of
# these is a value, nothing is called.
CONTEXT_TYPES = (Request, HTTPConnection, Context, TaskiqState, ParamInfo)
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

    def update(self, other: Any = (), /, **kwargs: Any) -> None:
        dict.update(self, other, **kwargs)
        # The receiver's update names the task's Context; other updates
        # (`broker.add_dependency_context` in a task) leave the task's own.
        # Every task pays for this line: a lookup, not an isinstance.
        try:
            context = other[Context]
        except (KeyError, TypeError, IndexError):
            return
        _task_context.set(context)

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


def with_ack(message: AckableMessage, ack: Callable[[], Any]) -> AckableMessage:
    """The broker's message with `ack` as its acknowledgement; type and fields kept.

    Set in place: the broker made the message for this one delivery, and a
    pydantic copy cost each task about 2 us. On a copy where the broker's
    own message type is frozen (pydantic refuses the assignment).
    """
    try:
        message.ack = ack
    except ValidationError:
        return message.model_copy(update={"ack": ack})
    return message


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
    and for each message. Under a wrapper put there by `wrap_outermost`,
    `function` replaces what it wraps, and is wrapped the same way.
    """
    outer = getattr(task.original_func, _OUTERMOST, None)
    if outer is not None:
        _, wrap = outer
        function = _wrapped(function, wrap)
    task.original_func = function


def wrap_outermost(task: Task, wrap: Callable[[Callable[..., Any]], Any]) -> None:
    """Make `wrap(function)` the task's function, staying around later ones.

    So the cancel gate stays outside FastAPI's solve however the app orders
    `TaskStatus` and `init`.
    """
    task.original_func = _wrapped(task.original_func, wrap)


def own_function(task: Task) -> Callable[..., Any]:
    """The task's function under any `wrap_outermost` wrapper."""
    outer = getattr(task.original_func, _OUTERMOST, None)
    return task.original_func if outer is None else outer[0]


def _wrapped(function: Callable[..., Any], wrap: Callable[..., Any]) -> Any:
    wrapper = wrap(function)
    setattr(wrapper, _OUTERMOST, (function, wrap))
    return wrapper


_OUTERMOST = "__taskiq_fastapi_outermost__"
# The hidden parameter a gated task function takes first (see `gated`).
GATE = "__taskiq_fastapi_gate__"


def gated(function: Callable[..., Any], gate: Callable[[], None]) -> inspect.Signature:
    """`function`'s signature, as taskiq reads it, with `gate` resolved first.

    taskiq-dependencies resolves a task's dependencies in the order of
    `graphlib.TopologicalSorter(...).static_order()` over its graph
    (`DependencyGraph._build_graph`), whose first batch is every dependency
    without parameters of its own in the order they were added: the task's
    own parameters first, in order. So a parameter-less dependency declared
    first runs before any other is set up, and what it raises ends the task
    with nothing to tear down (tests/test_taskiq_internals.py pins it).
    Keyword-only, so taskiq's positional arguments keep their positions;
    hence an unchecked signature (a keyword-only parameter first).

    The other parameters as taskiq-dependencies would read them from
    `function`: annotations evaluated (it evaluates the ones it reads from a
    function, not from a signature), and a `TaskiqDepends()` without a
    dependency naming its hint (it reads an object's hints from `__call__`).
    """
    signature, hints = _as_taskiq_reads(function)
    first = inspect.Parameter(
        GATE, inspect.Parameter.KEYWORD_ONLY, default=TaskiqMarker(gate)
    )
    parameters = [first]
    for parameter in signature.parameters.values():
        marker = marker_of(parameter)
        hint = hints.get(parameter.name)
        if (
            isinstance(marker, (TaskiqMarker, FastAPIDepends))
            and marker.dependency is None
            and hint is not None
        ):
            explicit = TaskiqMarker(
                hint,
                use_cache=marker.use_cache,
                kwargs=getattr(marker, "kwargs", None),
            )
            # What a dependency reads through ParamInfo stays as declared:
            # the annotation (its Annotated metadata too), with the marker
            # naming its dependency where it stood.
            annotation = parameter.annotation
            metadata = getattr(annotation, "__metadata__", None)
            if metadata is not None and any(meta is marker for meta in metadata):
                named = (explicit if meta is marker else meta for meta in metadata)
                declared: Any = Annotated
                params = (annotation.__origin__, *named)
                parameter = parameter.replace(annotation=declared[params])
            else:
                parameter = parameter.replace(default=explicit, annotation=hint)
        parameters.append(parameter)
    return inspect.Signature(
        parameters,
        return_annotation=signature.return_annotation,
        __validate_parameters__=False,
    )


def sets_up_dependencies(function: Callable[..., Any]) -> bool:
    """Whether taskiq calls anything to resolve the function's parameters.

    Values of the dependency context (`CONTEXT_TYPES`) are taken as they are.
    """
    signature, hints = _as_taskiq_reads(function)
    for parameter in signature.parameters.values():
        marker = marker_of(parameter)
        if not isinstance(marker, (TaskiqMarker, FastAPIDepends)):
            continue
        target = marker.dependency or hints.get(parameter.name)
        if target not in CONTEXT_TYPES:
            return True
    return False


def _as_taskiq_reads(
    function: Callable[..., Any],
) -> tuple[inspect.Signature, dict[str, Any]]:
    """The function's signature, annotations evaluated, and its type hints."""
    try:
        return inspect.signature(function, eval_str=True), get_type_hints(function)
    except Exception:  # taskiq reports what it cannot read, as before
        return inspect.signature(function), {}


class SyncBehindGate:
    """A sync task's function as taskiq sees it once gated (see `gated`).

    A class, not a closure: taskiq's `worker --use-process-pool` pickles the
    function it calls, and this pickles as the task's own function, which
    taskiq keeps importable by name (`AsyncTaskiqDecoratedTask.__init__`).
    """

    def __init__(self, function: Callable[..., Any], gate: Callable[[], None]) -> None:
        functools.update_wrapper(self, function)
        self.function = function
        self.__signature__ = gated(function, gate)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return _without_gate(self.function, *args, **kwargs)

    def __reduce__(self) -> tuple[Any, ...]:
        return functools.partial, (_without_gate, self.function)


def _without_gate(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    kwargs.pop(GATE, None)
    return function(*args, **kwargs)


# The logger of taskiq's receiver, which logs each exception a task raises
# ("Exception found while executing function.") with its traceback; and
# taskiq-dependencies', which logs a generator dependency that raises the
# task's exception again when it is thrown in ("Exception found on
# dependency teardown"), as one that cleans up on cancellation should.
RECEIVER_LOGGER = "taskiq.receiver.receiver"
DEPENDENCIES_LOGGER = "taskiq.dependencies.ctx"
# The message whose task the running asyncio task executes. taskiq's receiver
# runs each message in one asyncio task of its own (`Receiver.callback`): the
# middlewares' `pre_execute`, then the task's dependencies and function, then
# the result, built with a copy of the message's labels as they are once the
# function returned (so `on_error` sets a result's labels itself).
_executing: ContextVar[TaskiqMessage | None] = ContextVar(
    "taskiq_fastapi_executing", default=None
)


# The label taskiq's retry middlewares (SimpleRetryMiddleware,
# SmartRetryMiddleware) read to retry a task that failed: False, no retry.
RETRY_LABEL = "retry_on_error"


def set_executing(message: TaskiqMessage) -> None:
    """From a middleware's sync `pre_execute`: the message being executed."""
    _executing.set(message)


def executing() -> TaskiqMessage | None:
    """In a task's function: its message, if `set_executing` named it."""
    return _executing.get()


def require_broker(owner: str, broker: object) -> None:
    """Refuse what is not a taskiq broker at once, naming it.

    A module path or None given by mistake otherwise failed far from the call,
    as "cannot create weak reference to 'NoneType' object".
    """
    if not isinstance(broker, AsyncBroker):
        raise TypeError(f"{owner} broker must be a taskiq broker, not {broker!r}.")


@contextlib.contextmanager
def shutdown_handlers_noted(broker: AsyncBroker) -> Iterator[list[bool]]:
    """A list that gets an item once the broker's shutdown handlers begin.

    A first handler of our own, for the length of the block, in
    `event_handlers`, which `AsyncBroker.shutdown` runs before the
    middlewares' shutdown and the result backend's (as `InMemoryBroker`'s
    own shutdown does); a broker such as taskiq-nats' closes its client
    before it calls that. Empty at the end: none of them ran.
    """
    begun: list[bool] = []

    def note(_state: TaskiqState) -> None:
        begun.append(True)

    lists = [broker.event_handlers[event] for event in _SHUTDOWN_EVENTS]
    for handlers in lists:
        handlers.insert(0, note)
    try:
        yield begun
    finally:
        for handlers in lists:
            handlers.remove(note)


_SHUTDOWN_EVENTS = (TaskiqEvents.CLIENT_SHUTDOWN, TaskiqEvents.WORKER_SHUTDOWN)
