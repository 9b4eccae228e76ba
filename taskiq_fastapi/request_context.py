"""The request that kicked a task, carried to the worker when the app asks.

Off by default: nothing about a request leaves the API process unless the
app adds `CarryRequestContext`. It remembers the request being handled (an
ASGI middleware setting a context variable, so routes, dependencies and
`BackgroundTasks` all see it) and adds a taskiq middleware to the broker that
writes what is chosen into a label of each message kicked meanwhile: method,
path, root path, path parameters, query string and the named headers. Labels
travel in the message with every broker; a worker that does not know this
label ignores it.

In the worker the per-task Request is built from the label (`request.py`),
so FastAPI's own `Query`, `Header`, `Cookie` and `Path` parsing works in the
task's dependencies.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from contextvars import ContextVar
from typing import Any
from weakref import WeakKeyDictionary

from starlette.types import ASGIApp, Receive, Scope, Send
from taskiq import AsyncBroker, TaskiqMessage, TaskiqMiddleware

from taskiq_fastapi.exceptions import RequestContextTooLargeError

LABEL = "taskiq_fastapi_request"
# Bumped if what the label holds changes: a worker ignores a format it does
# not know, as one of an older version ignores the whole label.
FORMAT = 1
DEFAULT_MAX_BYTES = 8192
# Credentials: carried only when named one by one, never by "*".
SENSITIVE_HEADERS = frozenset(
    {"authorization", "cookie", "proxy-authorization", "x-api-key"}
)
# Describe the hop or the body, not the request the task is about.
_NEVER_CARRIED = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "upgrade"}
)


class _Carried:
    """What a worker task was kicked with, to pass on to the tasks it kicks."""

    __slots__ = ("label",)

    def __init__(self, label: str) -> None:
        self.label = label


# The request the running code serves: its HTTP scope in the API; in a worker
# task that passes its context on, what that task carried.
_current: ContextVar[Scope | _Carried | None] = ContextVar(
    "taskiq_fastapi_request", default=None
)


class _HeaderChoice:
    """Which headers to carry: the named ones, or all but credentials with "*".

    ASGI servers give header names in lower case, so names compare as bytes.
    """

    def __init__(self, names: Iterable[str]) -> None:
        named = {name.lower() for name in names}
        self.everything = "*" in named
        wanted = (named - {"*"}) - _NEVER_CARRIED
        self.named = frozenset(name.encode("latin-1") for name in wanted)
        self.excluded = frozenset(
            name.encode("latin-1") for name in SENSITIVE_HEADERS | _NEVER_CARRIED
        )

    def __call__(self, headers: Iterable[tuple[bytes, bytes]]) -> list[str]:
        """The chosen headers, each as a JSON `[name, value]` pair."""
        return [
            f"[{_string(name.decode('latin-1'))},{_string(value.decode('latin-1'))}]"
            for name, value in headers
            if name in self.named or (self.everything and name not in self.excluded)
        ]


# The label is written with the json module's C string encoder: json.dumps of
# the whole context cost more than taskiq's making of the message itself.
_string = json.encoder.encode_basestring


def _value(value: Any) -> str:
    """A path parameter as JSON: FastAPI parses it again in the task."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return _string(str(value))
    return json.dumps(value) if isinstance(value, float) else str(value)


def _encode(scope: Scope, headers: _HeaderChoice) -> str:
    """The label for the request in `scope`: JSON text, see `carried_scope`."""
    params = ",".join(
        f"{_string(str(key))}:{_value(value)}"
        for key, value in scope.get("path_params", {}).items()
    )
    return (
        f'{{"v":{FORMAT},"method":{_string(scope.get("method", "GET"))},'
        f'"path":{_string(scope["path"])},'
        f'"root_path":{_string(scope.get("root_path", ""))},'
        f'"path_params":{{{params}}},'
        f'"query_string":{_string(scope.get("query_string", b"").decode("latin-1"))},'
        f'"headers":[{",".join(headers(scope.get("headers", ())))}]}}'
    )


class _KickWithContext(TaskiqMiddleware):
    """On the broker: labels each message kicked while a request is handled."""

    def __init__(self, headers: _HeaderChoice, max_bytes: int, pass_on: bool) -> None:
        super().__init__()
        self.configure(headers, max_bytes, pass_on)

    def configure(self, headers: _HeaderChoice, max_bytes: int, pass_on: bool) -> None:
        self.headers = headers
        self.max_bytes = max_bytes
        self.pass_on = pass_on

    def pre_send(self, message: TaskiqMessage) -> TaskiqMessage:
        current = _current.get()
        if current is None:
            return message
        if isinstance(current, _Carried):
            encoded = current.label  # passed on as it came
        else:
            encoded = _encode(current, self.headers)
        size = len(encoded.encode())
        if size > self.max_bytes:
            raise RequestContextTooLargeError(
                f"Task {message.task_name!r}: the request context to carry is "
                f"{size} bytes, over the limit of {self.max_bytes} "
                f"(CarryRequestContext max_bytes); the largest part is "
                f"{_largest_part(json.loads(encoded))}.",
            )
        message.labels[LABEL] = encoded
        return message

    def pre_execute(self, message: TaskiqMessage) -> TaskiqMessage:
        """In a worker, tasks kicked by this task carry what it was kicked with."""
        if self.pass_on:
            carried = message.labels.get(LABEL)
            # Set in the task's own context, which ends with the task.
            _current.set(_Carried(carried) if carried else None)
        return message


# The middleware on each broker an app carries request context for.
_carrying: WeakKeyDictionary[AsyncBroker, _KickWithContext] = WeakKeyDictionary()


def _largest_part(carried: Mapping[str, Any]) -> str:
    parts = [
        (len(value.encode()), f"header {name!r}") for name, value in carried["headers"]
    ]
    parts.append((len(carried["query_string"].encode()), "the query string"))
    parts.append((len(carried["path"].encode()), "the path"))
    parts.append(
        (len(json.dumps(carried["path_params"]).encode()), "the path parameters")
    )
    size, what = max(parts)
    return f"{what} ({size} bytes)"


class CarryRequestContext:
    """ASGI middleware: tasks kicked while a request is handled carry its context.

    `app.add_middleware(CarryRequestContext, broker=broker, headers=[...])`.
    `headers` names the headers to carry (case-insensitive); `"*"` carries
    all except credentials (`authorization`, `cookie`, `proxy-authorization`,
    `x-api-key`), which are carried only when named. `max_bytes` bounds what
    one message carries: over it, `.kiq()` raises. With `pass_on`, a task
    that kicks another task in the worker passes on what it was kicked with.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        broker: AsyncBroker,
        headers: Iterable[str] = (),
        max_bytes: int = DEFAULT_MAX_BYTES,
        pass_on: bool = False,
    ) -> None:
        if isinstance(headers, str):
            raise TypeError(
                f"CarryRequestContext headers must be a list of names, not the "
                f"string {headers!r}."
            )
        self.app = app
        settings = (_HeaderChoice(headers), max_bytes, pass_on)
        kicks = _carrying.get(broker)
        if kicks is None:
            _carrying[broker] = kicks = _KickWithContext(*settings)
            broker.add_middlewares(kicks)
        else:
            # One setting per broker: an app built again (in tests) replaces it.
            kicks.configure(*settings)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        token = _current.set(scope)
        try:
            await self.app(scope, receive, send)
        finally:
            _current.reset(token)


def carried_scope(label: Any, template: Mapping[str, Any]) -> dict[str, Any]:
    """Scope keys of the request a task was kicked from, from its label.

    Host, scheme and server stay the worker's (its base URL). A label this
    version cannot read changes nothing.
    """
    try:
        carried = json.loads(label)
        if carried.get("v") != FORMAT:
            return {}
        headers = [
            (name.encode("latin-1"), value.encode("latin-1"))
            for name, value in carried["headers"]
        ]
        return {
            "method": carried["method"],
            "path": carried["path"],
            "raw_path": carried["path"].encode(),
            "root_path": carried["root_path"],
            "path_params": carried["path_params"],
            "query_string": carried["query_string"].encode("latin-1"),
            "headers": [*template["headers"], *headers],
        }
    except (ValueError, TypeError, KeyError, AttributeError, UnicodeError):
        return {}


def carrying(app: Any) -> bool:
    """Whether the app carries request context to its tasks (the worker asks)."""
    return any(
        getattr(middleware, "cls", None) is CarryRequestContext
        for middleware in getattr(app, "user_middleware", ())
    )
