"""FastAPI dependencies in tasks, solved by FastAPI exactly as for a route.

taskiq resolves a task's parameters with taskiq-dependencies, which knows
`TaskiqDepends` but not FastAPI's rules (a bare `request: Request`, `Annotated`
chains written for routes, overrides, scopes, threadpools). So for each task
whose tree uses FastAPI dependencies, taskiq is shown a stand-in with a
rewritten signature: every FastAPI dependency becomes a `TaskiqDepends` on one
per-task step that solves all of them at once with FastAPI (one cache per
task, as one per request), and a bare `Request`/`HTTPConnection` takes the
per-task Request. `TaskiqDepends` functions on the way to FastAPI dependencies
get stand-ins too; the user's own functions are never modified, and tasks
without FastAPI dependencies are left exactly as taskiq has them.

The same walk finds what cannot work outside an HTTP request (query, header,
body parameters, security schemes, ...) so the worker refuses to start and
`taskiq-fastapi check` can report it, instead of a task getting a marker
object as a value.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Annotated, Any, get_args, get_origin, get_type_hints
from weakref import WeakKeyDictionary

from fastapi import BackgroundTasks, Response, WebSocket
from fastapi.security import SecurityScopes
from starlette.requests import HTTPConnection, Request
from taskiq import AsyncBroker, TaskiqDepends

from taskiq_fastapi import _fastapi
from taskiq_fastapi._taskiq import (
    CONTEXT_TYPES,
    Task,
    TaskiqMarker,
    marker_of,
    on_registration,
    own_function,
    replace_task_function,
    task_request,
)
from taskiq_fastapi.exceptions import DependencyError, RequestContextError
from taskiq_fastapi.request_context import (
    NEVER_CARRIED,
    CarrySettings,
    looks_like_a_credential,
)

logger = logging.getLogger("taskiq_fastapi")

# Objects FastAPI only has while serving an HTTP request or a websocket.
_REQUEST_ONLY_TYPES = (WebSocket, Response, BackgroundTasks, SecurityScopes)
_PLAN = "__taskiq_fastapi_plan__"
# FastAPI parameters a carried request context provides.
_CARRIED_KINDS = ("Query", "Header", "Cookie", "Path")
_CARRY_HINT = (
    " (the app can carry it from the request that kicked the task: CarryRequestContext)"
)
_DECLARE_IN_A_DEPENDENCY = (
    " (to read it from the request that kicked the task, declare it in a "
    "dependency: the task's own parameters are its arguments)"
)


@dataclass
class Node:
    """One parameter in a task's dependency tree, and where its value comes from.

    `source` is one of: message (a task argument), taskiq (TaskiqDepends),
    fastapi (Depends, solved by FastAPI), request (the per-task Request, whose
    state is the app's lifespan state), context (taskiq's Context, TaskiqState
    and the like), carried (a query, header, cookie or path parameter: from
    the request the task was kicked from when the app carries it, a problem
    otherwise), http (only an HTTP request has it: a problem).
    """

    parameter: str
    source: str
    target: str
    dependencies: list[Node] = field(default_factory=list)
    # For a "carried" node: what the app must carry for it.
    need: CarriedNeed | None = field(default=None, repr=False)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form, for `check --json`."""
        return {
            "parameter": self.parameter,
            "source": self.source,
            "target": self.target,
            "dependencies": [child.as_dict() for child in self.dependencies],
        }


@dataclass
class CarriedNeed:
    """A query, header, cookie or path parameter of a dependency.

    The request that kicked the task has it when the app carries it: path
    always, a query parameter when the app's `CarryRequestContext` carries
    one of `names`, a header or a cookie only when it carries that header
    (one of `names`; `host` is always there: the worker's base URL).
    """

    owner: str
    parameter: str
    what: str
    part: str
    names: frozenset[str] = frozenset()

    def problem(self, task_name: str, carry: CarrySettings | None) -> str | None:
        """What stops the worker, given what the app carries; None if nothing."""
        if carry is None:
            return (
                f"Task {task_name!r}: parameter {self.parameter!r} of {self.owner} "
                f"is {self.what}, which only an HTTP request has{_CARRY_HINT}."
            )
        if self.part == "query":
            return self._query_problem(task_name, carry)
        if self.part == "path" or "host" in self.names:
            return None
        if any(carry.carries_header(name) for name in self.names):
            return None
        names = " or ".join(repr(name) for name in sorted(self.names))
        if self.part == "cookie":
            subject = f"cookie {self.parameter!r}"
        else:
            subject = f"header {names}"
        if self.names <= NEVER_CARRIED:
            why = "it describes how the request was sent, so no app carries it"
        else:
            why = f"{carry!r} does not name the {names} header"
            if carry.headers.everything and any(
                looks_like_a_credential(name) for name in self.names
            ):
                why += ', and "*" leaves out headers that look like credentials'
            why += " (name it in headers=[...] to carry it)"
        return f"Task {task_name!r}: {subject} of {self.owner} is not carried: {why}."

    def _query_problem(self, task_name: str, carry: CarrySettings) -> str | None:
        if not self.names or any(carry.carries_query(name) for name in self.names):
            return None
        names = " or ".join(repr(name) for name in sorted(self.names))
        why = f"{carry!r} does not carry the {names} query parameter"
        if carry.query.everything:
            why += ': "*" leaves out query parameters that look like credentials'
        why += " (name it in query=[...] to carry it)"
        return (
            f"Task {task_name!r}: query parameter {names} of {self.owner} is not "
            f"carried: {why}."
        )


@dataclass
class TaskPlan:
    """What the walk found for one task, and the stand-in workers call."""

    task_name: str
    tree: list[Node]
    problems: list[str]
    # Problems or not, depending on what the app carries to tasks.
    needs_carried: list[CarriedNeed] = field(default_factory=list)
    replacement: Callable[..., Any] | None = None

    def problems_when(self, carry: CarrySettings | None) -> list[str]:
        """What stops the worker, given what the app carries to tasks."""
        found = list(self.problems)
        for need in self.needs_carried:
            problem = need.problem(self.task_name, carry)
            if problem is not None:
                found.append(problem)
        return found


def describe(target: Any) -> str:
    """Name a dependency the way its author wrote it: `get_db()`."""
    name = getattr(target, "__qualname__", None)
    if isinstance(name, str) and (inspect.isroutine(target) or inspect.isclass(target)):
        name = name.rpartition("<locals>.")[2].removesuffix("__taskiq_original")
        return f"{name}()"
    return f"{type(target).__qualname__} instance"


class _StandIn:
    """Calls a `TaskiqDepends` function; taskiq reads the rewritten signature.

    It compares and hashes as the function it stands for, so that taskiq's
    `broker.dependency_overrides` and its per-task cache still find it.
    """

    def __init__(self, target: Any, signature: inspect.Signature) -> None:
        self.target = target
        self.__signature__ = signature

    def __call__(self, **kwargs: Any) -> Any:
        return self.target(**kwargs)

    def __eq__(self, other: object) -> bool:
        return bool(self.target == other)

    def __hash__(self) -> int:
        return hash(self.target)


def _strip_annotated(annotation: Any) -> Any:
    return (
        get_args(annotation)[0] if get_origin(annotation) is Annotated else annotation
    )


def _is_type(annotation: Any, types: tuple[type, ...]) -> bool:
    return inspect.isclass(annotation) and issubclass(annotation, types)


def _request_only_marker(parameter: inspect.Parameter) -> Any:
    """A Query(), Header(), Body()... marker on the parameter, if any."""
    metadata = getattr(parameter.annotation, "__metadata__", ())
    for marker in (parameter.default, *metadata):
        if isinstance(marker, _fastapi.ParamMarker):
            return marker
    return None


def _taskiq_signature(
    target: Any,
) -> tuple[list[inspect.Parameter], dict[str, Any]] | None:
    """The parameters and hints taskiq-dependencies reads, as it reads them."""
    try:
        if inspect.isclass(target):
            hints = get_type_hints(target.__init__)
            signature = inspect.signature(target.__init__, eval_str=True)
            return list(signature.parameters.values())[1:], hints
        hints = get_type_hints(
            target if inspect.isfunction(target) else target.__call__
        )
        signature = inspect.signature(target, eval_str=True)
    except Exception:  # taskiq reports what it cannot read; so does the worker
        return None
    return list(signature.parameters.values()), hints


class _Planner:
    """Walks one task's tree; builds its stand-ins and its FastAPI solving step."""

    def __init__(self, task_name: str, broker: AsyncBroker) -> None:
        self.task_name = task_name
        self.broker = broker
        self.context_types = (*CONTEXT_TYPES, *broker.custom_dependency_context)
        self.problems: list[str] = []
        self.needs_carried: list[CarriedNeed] = []
        # Each FastAPI parameter: its node, the parameter, the function that
        # declares it, and the parameter FastAPI analyses (renamed to its key).
        self.fastapi: list[tuple[Node, inspect.Parameter, Any, inspect.Parameter]] = []
        self.stand_ins: dict[Any, tuple[list[Node], Any]] = {}
        self.dependant: _fastapi.Dependant | None = None
        self.solve = self._make_solver()

    def plan(self, function: Callable[..., Any]) -> TaskPlan:
        walked = self.walk(function, task_level=True)
        tree, signature = walked if walked else ([], None)
        self.solve_fastapi_parameters()
        plan = TaskPlan(self.task_name, tree, self.problems, self.needs_carried)
        if signature is not None and not self.problems:
            direct = self.direct_solve(function)
            plan.replacement = _replacement(function, signature, plan, direct)
        return plan

    def direct_solve(self, function: Callable[..., Any]) -> _DirectSolve | None:
        """FastAPI's solve inside the task's call, where that is exact.

        When every FastAPI dependency is a parameter of an async task itself
        (none under a `TaskiqDepends`), FastAPI solves them around the call,
        as it does around an endpoint, with no taskiq step in between.
        Otherwise (a `TaskiqDepends` function that needs a FastAPI value
        before the task is called, or a sync task, which taskiq runs in its
        executor), the solve is a taskiq dependency, shared by all.
        """
        if self.dependant is None or not inspect.iscoroutinefunction(function):
            return None
        if any(owner is not function for _, _, owner, _ in self.fastapi):
            return None
        names = [
            (typed.name, parameter.name) for _, parameter, _, typed in self.fastapi
        ]
        return _DirectSolve(self.task_name, self.broker, self.dependant, names)

    def problem(self, owner: Any, parameter: str, what: str) -> None:
        self.problems.append(
            f"Task {self.task_name!r}: parameter {parameter!r} of "
            f"{describe(owner)} {what}.",
        )

    def walk(
        self, target: Any, task_level: bool = False
    ) -> tuple[list[Node], inspect.Signature | None] | None:
        """Nodes for `target`'s parameters, and its signature for taskiq.

        The signature is None when taskiq can resolve `target` as it is.
        """
        read = _taskiq_signature(target)
        if read is None:
            return None
        parameters, hints = read
        nodes: list[Node] = []
        rewritten: list[inspect.Parameter] = []
        changed = False
        for parameter in parameters:
            node, replacement = self.parameter(target, parameter, hints, task_level)
            if node is not None:
                nodes.append(node)
            changed = changed or replacement is not parameter
            rewritten.append(replacement)
        if not changed:
            return nodes, None
        # A stand-in has no type hints of its own: name what hints named.
        rewritten = [_explicit(parameter, hints) for parameter in rewritten]
        # Parameters keep their kinds and order: a rewritten one may now have
        # a default before one that has none, which only a check forbids.
        return nodes, inspect.Signature(rewritten, __validate_parameters__=False)

    def parameter(
        self,
        owner: Any,
        parameter: inspect.Parameter,
        hints: dict[str, Any],
        task_level: bool,
    ) -> tuple[Node | None, inspect.Parameter]:
        name = parameter.name
        marker = marker_of(parameter)
        if isinstance(marker, _fastapi.DependencyMarker):
            return self.fastapi_parameter(owner, parameter, marker)
        if isinstance(marker, TaskiqMarker):
            return self.taskiq_parameter(parameter, marker, hints.get(name))
        annotation = _strip_annotated(hints.get(name, parameter.annotation))
        if _is_type(annotation, _REQUEST_ONLY_TYPES):
            self.problem(
                owner,
                name,
                f"is a {annotation.__name__}, which only an HTTP request has",
            )
            return Node(name, "http", annotation.__name__), parameter
        if (
            _is_type(annotation, (HTTPConnection,))
            and parameter.empty is parameter.default
        ):
            # As in FastAPI: a parameter typed Request needs no marker.
            provided = Request if issubclass(annotation, Request) else HTTPConnection
            node = Node(name, "request", provided.__name__)
            return node, _marked(parameter, TaskiqMarker(provided))
        request_only = _request_only_marker(parameter)
        if request_only is not None:
            what = type(request_only).__name__
            self.problem(
                owner,
                name,
                f"is a {what} parameter, which only an HTTP request has"
                # Only a dependency's are read from a carried request: a
                # task's own parameters are its message's arguments.
                + (_DECLARE_IN_A_DEPENDENCY if what in _CARRIED_KINDS else ""),
            )
            return Node(name, "http", what), parameter
        if task_level:
            return Node(name, "message", "task argument"), parameter
        return None, parameter

    def taskiq_parameter(
        self, parameter: inspect.Parameter, marker: Any, hint: Any
    ) -> tuple[Node, inspect.Parameter]:
        target = marker.dependency if marker.dependency is not None else hint
        if target is None or target in self.context_types:
            source = "request" if _is_type(target, (HTTPConnection,)) else "context"
            label = getattr(target, "__name__", "unknown")
            return Node(parameter.name, source, label), parameter
        if target not in self.stand_ins:
            self.stand_ins[target] = ([], target)  # a cycle stops here
            walked = self.walk(target)
            nodes, signature = walked if walked else ([], None)
            stand_in = target if signature is None else _StandIn(target, signature)
            self.stand_ins[target] = (nodes, stand_in)
        nodes, stand_in = self.stand_ins[target]
        node = Node(parameter.name, "taskiq", describe(target), nodes)
        if stand_in is target:
            return node, parameter
        explicit = TaskiqMarker(
            stand_in, use_cache=marker.use_cache, kwargs=marker.kwargs
        )
        return node, _marked(parameter, explicit)

    def fastapi_parameter(
        self, owner: Any, parameter: inspect.Parameter, marker: Any
    ) -> tuple[Node, inspect.Parameter]:
        key = f"p{len(self.fastapi)}"
        try:
            typed = _fastapi.typed_signature(owner).parameters[parameter.name]
        except Exception:  # FastAPI's own analysis below reports it
            typed = parameter
        # `Annotated[Pager, Depends()]`: FastAPI calls the annotated class.
        target = marker.dependency
        if target is None:
            target = _strip_annotated(typed.annotation)
        node = Node(parameter.name, "fastapi", describe(target))
        self.fastapi.append((node, parameter, owner, typed.replace(name=key)))
        return node, _marked(parameter, TaskiqMarker(self._getter(key)))

    def solve_fastapi_parameters(self) -> None:
        """Analyse the FastAPI dependencies with FastAPI.

        One by one first, so an error names its parameter; then all together,
        so they share one cache per task as a route's share one per request.
        """
        analysed = []
        for node, parameter, owner, typed in self.fastapi:
            try:
                (dependant,) = _fastapi.analyse([typed]).dependencies
            except Exception as exc:
                why = " ".join(str(exc).split()).rstrip(".")
                self.problem(
                    owner,
                    parameter.name,
                    f"cannot be used by FastAPI: {type(exc).__name__}: {why}",
                )
                continue
            node.dependencies = list(self.fastapi_children(dependant))
            analysed.append(typed)
        if analysed and len(analysed) == len(self.fastapi):
            self.dependant = _fastapi.analyse(analysed)

    def fastapi_children(self, dependant: _fastapi.Dependant) -> Iterator[Node]:
        call = dependant.call
        for sub in dependant.dependencies:
            node = Node(sub.name or "", "fastapi", describe(sub.call))
            if isinstance(sub.call, _fastapi.SecurityBase):
                self.problem(
                    call,
                    node.parameter,
                    f"is the security scheme "
                    f"{type(sub.call).__name__}, which reads the HTTP "
                    "request's headers",
                )
                node.source = "http"
            else:
                node.dependencies = list(self.fastapi_children(sub))
            yield node
        for name in (
            dependant.request_param_name,
            dependant.http_connection_param_name,
        ):
            if name is not None:
                yield Node(name, "request", "Request")
        for name, what, default, part, names in _fastapi.request_only_parameters(
            dependant
        ):
            need = None
            if isinstance(default, TaskiqMarker):
                self.problem(
                    call,
                    name,
                    "uses TaskiqDepends inside a FastAPI "
                    "dependency, which FastAPI solves: use Depends",
                )
            elif part is None:
                self.problem(call, name, f"is {what}, which only an HTTP request has")
            else:
                need = CarriedNeed(describe(call), name, what, part, names)
                self.needs_carried.append(need)
            target = what.removeprefix("a ")
            if need is None:
                yield Node(name, "http", target)
            else:
                yield Node(name, "carried", target, need=need)

    def _getter(self, key: str) -> Callable[..., Any]:
        def fastapi_dependency(values: Any = TaskiqDepends(self.solve)) -> Any:
            return values[key]

        return fastapi_dependency

    def _make_solver(self) -> Callable[..., AsyncIterator[dict[str, Any]]]:
        """The taskiq step that solves the task's FastAPI dependencies.

        Once per task, as FastAPI solves once per request: taskiq resolves a
        `use_cache=False` dependency with a fresh cache, so the step can run
        again in the same task; then it hands out what the first run solved
        (the task's Request tells the task apart).
        """
        planner = self
        solved_for: ContextVar[tuple[Any, dict[str, Any]] | None] = ContextVar(
            f"taskiq_fastapi_solved_{self.task_name}", default=None
        )

        async def solve_fastapi_dependencies(
            request: Any = TaskiqDepends(Request),
        ) -> AsyncIterator[dict[str, Any]]:
            assert planner.dependant is not None  # a task with problems never runs
            done = solved_for.get()
            if done is not None and done[0] is request:
                try:
                    yield done[1]
                except BaseException:
                    return  # the task's error: the first run's generators see it
                return
            thrown: BaseException | None = None
            yielded = False
            try:
                overrides = planner.broker.dependency_overrides
                async with _fastapi.solved(
                    request, planner.dependant, overrides
                ) as values:
                    solved_for.set((request, values))
                    yielded = True
                    try:
                        yield values
                    except BaseException as exc:
                        thrown = exc
                        raise
            except _fastapi.RequestRejected as exc:
                raise RequestContextError(
                    _rejected(planner.task_name, exc.errors)
                ) from None
            except BaseException as exc:
                if exc is thrown:
                    return  # the task's own error: taskiq reports it already
                if yielded and thrown is None and isinstance(exc, Exception):
                    logger.exception(
                        "Task %r: a FastAPI dependency failed while closing",
                        planner.task_name,
                    )
                    return
                raise

        return solve_fastapi_dependencies


class _DirectSolve:
    """Calls an async task inside FastAPI's solve of its FastAPI parameters."""

    def __init__(
        self,
        task_name: str,
        broker: AsyncBroker,
        dependant: _fastapi.Dependant,
        names: list[tuple[str, str]],
    ) -> None:
        self.task_name = task_name
        self.broker = broker
        self.dependant = dependant
        # (key FastAPI solved the value as, the task's parameter it goes to)
        self.names = names

    async def __call__(
        self, function: Callable[..., Any], args: Any, kwargs: dict[str, Any]
    ) -> Any:
        request = task_request(self.broker)
        overrides = self.broker.dependency_overrides
        returned = finished = None
        try:
            async with AsyncExitStack() as outer, AsyncExitStack() as inner:
                values = await _fastapi.solve(
                    request, self.dependant, overrides, outer, inner
                )
                for key, name in self.names:
                    kwargs[name] = values[key]
                returned = await function(*args, **kwargs)
                finished = True
        except _fastapi.RequestRejected as exc:
            raise RequestContextError(_rejected(self.task_name, exc.errors)) from None
        except Exception:
            if not finished:
                raise  # the task's own error, or its dependencies'
            logger.exception(
                "Task %r: a FastAPI dependency failed while closing", self.task_name
            )
        return returned


def _rejected(task_name: str, errors: list[Any]) -> str:
    """FastAPI's 422 errors for the carried request, on one line."""
    found = []
    for error in errors:
        where, *names = error.get("loc", ("request",))
        name = ".".join(str(part) for part in names)
        found.append(f"{where} {name!r}: {error.get('msg', error)}")
    return (
        f"Task {task_name!r}: the request it was kicked from does not satisfy "
        f"its dependencies, as a route would answer 422: {'; '.join(found)}."
    )


def _explicit(parameter: inspect.Parameter, hints: dict[str, Any]) -> inspect.Parameter:
    """`TaskiqDepends()` typed by a hint becomes `TaskiqDepends(that type)`."""
    marker = marker_of(parameter)
    if not isinstance(marker, TaskiqMarker) or marker.dependency is not None:
        return parameter
    if hints.get(parameter.name) is None:
        return parameter  # taskiq reports it, naming the parameter
    explicit = TaskiqMarker(
        hints[parameter.name], use_cache=marker.use_cache, kwargs=marker.kwargs
    )
    return _marked(parameter, explicit)


def _marked(parameter: inspect.Parameter, marker: Any) -> inspect.Parameter:
    """The parameter with `marker` as its only dependency declaration."""
    return parameter.replace(default=marker, annotation=inspect.Parameter.empty)


def _replacement(
    function: Callable[..., Any],
    signature: inspect.Signature,
    plan: TaskPlan,
    direct: _DirectSolve | None,
) -> Callable[..., Any]:
    """The function taskiq calls for the task, with `signature` as its own.

    In the signature, the task's arguments come first and its dependencies
    after them, keyword-only: FastAPI-style tasks often declare an
    `Annotated` dependency before the arguments, and taskiq maps a message's
    positional arguments (and parses them) by position. With `direct`, the
    FastAPI parameters are not shown to taskiq at all: `direct` solves them
    around the call.
    """
    parameters = list(signature.parameters.values())
    if direct is not None:
        solved_here = {name for _, name in direct.names}
        parameters = [p for p in parameters if p.name not in solved_here]
    arguments = [p for p in parameters if not _is_dependency(p)]
    if any(p.kind in (p.POSITIONAL_ONLY, p.VAR_POSITIONAL) for p in arguments):
        names: list[str] | None = None  # keep the order: args pass through as is
    else:
        names = [p.name for p in arguments if p.kind is p.POSITIONAL_OR_KEYWORD]
        variadic = [p for p in arguments if p.kind is p.VAR_KEYWORD]
        fixed = [p for p in arguments if p.kind is not p.VAR_KEYWORD]
        dependencies = [
            p.replace(kind=p.KEYWORD_ONLY) for p in parameters if _is_dependency(p)
        ]
        parameters = fixed + dependencies + variadic

    def named(args: tuple[Any, ...]) -> dict[str, Any] | None:
        """Positional arguments by name; None when they do not map onto them."""
        if names is None or len(args) > len(names):
            return None
        return dict(zip(names, args, strict=False))  # fewer is fine: defaults

    task: Callable[..., Any]
    if direct is not None:

        @functools.wraps(function)
        async def task(*args: Any, **kwargs: Any) -> Any:
            mapped = named(args)
            if mapped is None:
                return await direct(function, args, kwargs)
            return await direct(function, (), {**mapped, **kwargs})

    elif inspect.iscoroutinefunction(function):

        @functools.wraps(function)
        async def task(*args: Any, **kwargs: Any) -> Any:
            mapped = named(args)
            if mapped is None:
                return await function(*args, **kwargs)
            return await function(**mapped, **kwargs)

    else:
        task = _SyncTask(function, names)

    shown = inspect.Signature(parameters, __validate_parameters__=False)
    task.__signature__ = shown  # type: ignore[attr-defined]
    setattr(task, _PLAN, plan)
    return task


class _SyncTask:
    """A sync task's stand-in: its arguments passed on by name.

    A class, not a closure: taskiq's `worker --use-process-pool` pickles the
    function it calls, and this pickles as the task's own function (which
    taskiq keeps importable by name) and the names; a closure failed every
    such task with a PicklingError.
    """

    def __init__(self, function: Callable[..., Any], names: list[str] | None) -> None:
        functools.update_wrapper(self, function)
        self.function = function
        self.names = names

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return _call_by_name(self.function, self.names, *args, **kwargs)

    def __reduce__(self) -> tuple[Any, ...]:
        return functools.partial, (_call_by_name, self.function, self.names)


def _call_by_name(
    function: Callable[..., Any], names: list[str] | None, *args: Any, **kwargs: Any
) -> Any:
    if names is None or len(args) > len(names):
        return function(*args, **kwargs)
    return function(**dict(zip(names, args, strict=False)), **kwargs)


def _is_dependency(parameter: inspect.Parameter) -> bool:
    return isinstance(marker_of(parameter), TaskiqMarker)


_plans: WeakKeyDictionary[AsyncBroker, dict[str, TaskPlan]] = WeakKeyDictionary()


def adopt(broker: AsyncBroker) -> None:
    """Give the broker's tasks, present and future, FastAPI dependencies.

    Must happen before taskiq's receiver reads the tasks (it builds their
    dependency graphs once): `init` in the broker module is early enough.
    """
    if broker in _plans:
        return
    _plans[broker] = {}
    for task in broker.get_all_tasks().values():
        _adopt(broker, task)
    on_registration(broker, functools.partial(_adopt, broker))


def _adopt(broker: AsyncBroker, task: Task) -> None:
    function = own_function(task)  # under the cancel gate, if it came first
    if hasattr(function, _PLAN):
        return
    plan = _Planner(task.task_name, broker).plan(function)
    _plans[broker][task.task_name] = plan
    if plan.replacement is not None:
        replace_task_function(task, plan.replacement)


def plans(broker: AsyncBroker) -> list[TaskPlan]:
    """Every task of the broker with its dependency tree and problems."""
    found = []
    known = _plans.get(broker, {})
    for name, task in sorted(broker.get_all_tasks().items()):
        function = own_function(task)
        plan = getattr(function, _PLAN, None) or known.get(name)
        if plan is None:
            plan = _Planner(name, broker).plan(function)
        found.append(plan)
    return found


def check(broker: AsyncBroker, carry: CarrySettings | None = None) -> None:
    """Raise DependencyError for the first problem, before any task runs.

    `carry` is what the app carries to tasks (`request_context.carried`):
    query and path parameters of dependencies, and the headers and cookies
    it names, come from the request that kicked the task.
    """
    problems = [
        problem for plan in plans(broker) for problem in plan.problems_when(carry)
    ]
    if not problems:
        return
    more = len(problems) - 1
    suffix = f" ({more} more: run `taskiq-fastapi check`)" if more else ""
    raise DependencyError(problems[0] + suffix)
