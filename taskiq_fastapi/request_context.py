"""The request that kicked a task, carried to the worker when the app asks.

Off by default: nothing about a request leaves the API process unless the
app adds `CarryRequestContext`. It remembers the request being handled (an
ASGI middleware setting a context variable, so routes, dependencies and
`BackgroundTasks` all see it) and adds a taskiq middleware to the broker that
writes what is chosen into a label of each message kicked meanwhile: method,
path, root path, path parameters, the query parameters and headers chosen.
Labels
travel in the message with every broker; a worker that does not know this
label ignores it.

In the worker the per-task Request is built from the label (`request.py`),
so FastAPI's own `Query`, `Header`, `Cookie` and `Path` parsing works in the
task's dependencies.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextvars import ContextVar, Token
from typing import Any, TypeVar
from urllib.parse import quote_plus, unquote_plus
from weakref import WeakSet

from starlette.types import ASGIApp, Receive, Scope, Send
from taskiq import AsyncBroker, TaskiqMessage, TaskiqMiddleware

from taskiq_fastapi._taskiq import require_broker
from taskiq_fastapi.exceptions import AppStartupError, RequestContextTooLargeError

LABEL = "taskiq_fastapi_request"
# Present when the kicking app passes its context on to tasks kicked by tasks.
PASS_ON_LABEL = "taskiq_fastapi_pass_on"
# Bumped if what the label holds changes: a worker ignores a format it does
# not know, as one of an older version ignores the whole label.
FORMAT = 1
DEFAULT_MAX_BYTES = 8192
# Credentials: carried only when named one by one, never by "*". Beside
# these names, "*" leaves out every header whose name contains one of
# _CREDENTIAL_PARTS (X-Auth-Token, X-CSRF-Token, X-Amz-Security-Token, ...)
# or has one of _CREDENTIAL_WORDS as a word (X-Functions-Key, X-OTP, ...).
SENSITIVE_HEADERS = frozenset(
    {"authorization", "cookie", "proxy-authorization", "x-api-key"}
)
_CREDENTIAL_PARTS = re.compile(
    rb"auth|token|secret|passw|passcode|passphrase|credential|cookie|session"
    rb"|signature|csrf|xsrf|jwt|bearer|hmac|apikey|accesskey|oidc|saml|assertion"
)
_CREDENTIAL_WORDS = frozenset(
    {
        b"key", b"keys", b"pass", b"pw", b"pwd", b"pin", b"sig", b"otp", b"totp",
        b"hotp", b"mfa", b"2fa", b"dpop", b"principal", b"cert", b"certificate",
        b"private", b"license", b"pat", b"sid", b"tfa",
    }
)  # fmt: skip
# Describe how the request was sent, not the request the task is about. The
# task's Request has the worker's own `host` (its base URL).
NEVER_CARRIED = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "upgrade"}
)
# What a header name may be (RFC 9110's token), or "*".
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def looks_like_a_credential(name: str) -> bool:
    """Whether "*" leaves the header or query parameter out: carried only when named.

    A query parameter's name keeps its case, so its camelCase words count
    too: `privateKey`, `userPin`, `otpCode` (a header's name comes in lower
    case, where no such word can be told apart).
    """
    lowered = name.lower()
    if _credential(lowered.encode("latin-1", "replace")):
        return True
    return lowered != name and _camel_credential(name)


@functools.lru_cache(maxsize=1024)
def _credential(name: bytes) -> bool:
    """For a lower-case name: a credential's name, part, or word.

    Words are split at any character but a letter or digit (`user[pin]`,
    `user:pwd` as `x-pin`).
    """
    if name in _SENSITIVE or _CREDENTIAL_PARTS.search(name) is not None:
        return True
    return any(word in _CREDENTIAL_WORDS for word in _NOT_A_WORD.split(name))


_NOT_A_WORD = re.compile(rb"[^a-z0-9]+")
# A camelCase word: `privateKey` is private, Key; `userPW` user, PW; `TOTPCode`
# TOTP, Code; `sigV4` sig, V, 4.
_CAMEL_WORD = re.compile(r"[A-Z]+(?![a-z])|[A-Z][a-z]*|[a-z]+|[0-9]+")


@functools.lru_cache(maxsize=1024)
def _camel_credential(name: str) -> bool:
    return any(
        word.lower().encode("latin-1", "replace") in _CREDENTIAL_WORDS
        for word in _CAMEL_WORD.findall(name)
    )


_SENSITIVE = frozenset(name.encode() for name in SENSITIVE_HEADERS)
_NEVER = frozenset(name.encode() for name in NEVER_CARRIED)


class _Carried:
    """What a worker task was kicked with, to pass on to the tasks it kicks.

    Only to its own broker: the label holds what the app's middleware for
    that broker chose (`authorization`, say); another broker's middleware
    may name less, and a kick there from the request carries only that.
    And only while the task runs: code it started that outlives it (an
    asyncio task) passes nothing on once it is over, as `_Handling`.
    """

    __slots__ = ("broker", "done", "label")

    def __init__(self, label: str, broker: AsyncBroker) -> None:
        self.label = label
        self.broker = broker
        self.done = False


class _Handling:
    """A request the app is handling, until its middleware returns.

    `by_broker`: the request (as each middleware saw it) and what to carry,
    for each broker a `CarryRequestContext` of this request names; a kick to
    another broker carries nothing. An app with one broker for its public
    tasks and one for internal ones, each with its own header list, would
    otherwise send the innermost middleware's list to both.

    Code the request started outlives it with the context variable (an
    asyncio task made in a route, say a refresher started by the first
    request): from then on its kicks carry nothing, or it would kick every
    task with that request's headers, and its user's, for as long as it runs.
    """

    __slots__ = ("by_broker", "done")

    def __init__(
        self, by_broker: dict[AsyncBroker, tuple[Scope, CarrySettings]]
    ) -> None:
        self.by_broker = by_broker
        self.done = False


# How many names a choice remembers its decision for, and how long each may
# be: what clients can send is unbounded, the names an app's clients send
# are few and short.
_REMEMBERED_NAMES = 1024
_REMEMBERED_LENGTH = 64
T = TypeVar("T")


def _remember(decided: dict[Any, Any], name: Any, carried: T) -> T:
    """Keep the decision on `name`, as `carries` is the same for each request.

    Encoding a request took about 14 us of a 180 us kick in a busy process
    (`make bench`), most of it deciding names met again on every request.
    """
    if len(decided) < _REMEMBERED_NAMES and len(name) <= _REMEMBERED_LENGTH:
        decided[name] = carried
    return carried


class _HeaderChoice:
    """Which headers to carry: the named ones, or all but credentials with "*".

    ASGI servers give header names in lower case, so names compare as bytes.
    A header carried by "*" whose value has a query string carries it as
    `query` does: proxies pass the request's own URI on (X-Forwarded-Uri,
    X-Original-URI), query string and all, and the `?token=` left out of the
    carried query would travel there instead. Cut, not left out: the check
    cannot know a header's value, and a task reading the header would fail
    on some requests only.
    """

    def __init__(self, names: Iterable[str], query: _QueryChoice) -> None:
        named = {name.lower() for name in names}
        self.everything = "*" in named
        wanted = (named - {"*"}) - NEVER_CARRIED
        self.named = frozenset(name.encode("latin-1") for name in wanted)
        self.query = query
        # By name: how its JSON pair opens, for the names carried; and the
        # names left out, apart: most of a request's headers are, and a test
        # of membership skips them for less than a look-up of their opening.
        self._decided: dict[bytes, str] = {}
        self._left_out: dict[bytes, None] = {}

    def carries(self, name: bytes) -> bool:
        """Whether the header `name` is carried.

        ASGI servers give names in lower case; one an ASGI middleware of the
        app added to the scope may have capitals (`Authorization`), and is
        decided as its lower case: a credential all the same.
        """
        name = name.lower()
        if name in self.named:
            return True
        return self.everything and name not in _NEVER and not _credential(name)

    def _cut(self, name: bytes, text: str) -> str:
        """The value `text` (with a "?" or "#"), cut unless `name` was named."""
        if name in self.named:
            return text
        return _cut_uri(text, self.query)

    def __call__(self, headers: Iterable[tuple[bytes, bytes]]) -> list[str]:
        """The chosen headers, each as a JSON `[name, value]` pair.

        Run on each kick, over every header of the request: most are not
        carried, and most carried values have nothing to cut, so neither
        costs more than a test of membership or a scan for "?" and "#".
        """
        decided, left_out = self._decided, self._left_out
        chosen = []
        for name, value in headers:
            if name in left_out:
                continue
            opening = decided.get(name)
            if opening is None:
                if not self.carries(name):
                    _remember(left_out, name, None)
                    continue
                opening = f"[{_string(name.decode('latin-1'))},"
                _remember(decided, name, opening)
            text = value.decode("latin-1")
            if "?" in text or "#" in text:
                text = self._cut(name, text)
            chosen.append(f"{opening}{_string(text)}]")
        return chosen


class _QueryChoice:
    """Which query parameters to carry: the named ones, or all but credentials.

    The same rule as for headers, by name: a webhook's `?token=`, FastAPI's
    own `APIKeyQuery`, a presigned URL's `signature` would otherwise travel
    in the broker, in plain text, whatever the headers list said. Names
    compare as FastAPI reads them: case-sensitive, percent-decoded.
    """

    def __init__(self, names: Iterable[str]) -> None:
        named = set(names)
        self.everything = "*" in named
        self.named = frozenset(named - {"*"})
        self._decided: dict[str, bool] = {}  # by the name as it came

    def carries(self, name: str) -> bool:
        """Whether the query parameter `name` is carried."""
        if name in self.named:
            return True
        return self.everything and not looks_like_a_credential(name)

    def kept(self, text: str, depth: int = 0) -> str:
        """The chosen parameters of the query string `text`, as they came.

        `depth`: how many URIs `text` is the query of, one within another.
        """
        if not text:
            return text
        decided = self._decided
        kept = []
        # Split as Starlette's QueryParams does (`parse_qsl`, on "&" only).
        for part in text.split("&"):
            raw = part.partition("=")[0]
            carried = decided.get(raw)
            if carried is None:
                carried = _remember(decided, raw, self.carries(unquote_plus(raw)))
            if carried:
                if (
                    "?" in part
                    or "#" in part
                    or ("%" in part and _ESCAPED_MARK.search(part))
                ):
                    part = self._cut_value(part, depth)
                kept.append(part)
        return "&".join(kept)

    def _cut_value(self, part: str, depth: int) -> str:
        """A parameter whose value is a URI, its query cut as this one.

        A login's `?next=/reset?token=...` (or `next=%2Freset%3Ftoken%3D...`)
        carried the token left out of the query itself, as a header holding
        the request's URI did. Carried as it came unless something is cut,
        or the parameter was named. A URI nested deeper than `_NESTED_URIS`
        has its query and fragment left out whole: cut level by level, a
        query of 400 (`?a=?a=?...`, 1.2 KB) raised RecursionError, and each
        level's cut value, percent-encoded again at each level above, grew
        a few hundred into tens of kilobytes.
        """
        raw, _, value = part.partition("=")
        text = unquote_plus(value)
        if ("?" not in text and "#" not in text) or unquote_plus(raw) in self.named:
            return part
        if depth < _NESTED_URIS:
            cut = _cut_uri(text, self, depth + 1)
        else:
            cut = _URI_END.split(text, maxsplit=1)[0]
        if cut == text:
            return part
        return f"{raw}={quote_plus(cut, safe='/:')}"

    def __call__(self, query_string: bytes) -> str:
        """The chosen parameters, as the raw query string they came in."""
        return self.kept(query_string.decode("latin-1"))


# A "?" or "#" percent-encoded: a value with "%" but neither holds no URI
# whose query could be cut (most "%" are a space's, an "@"'s, a letter's),
# and skips the decoding (3.6 us a kick otherwise).
_ESCAPED_MARK = re.compile("%(?:3[fF]|23)")
# A URI in a query parameter's value, in one in a parameter's, ...: past this
# many, one's query is left out whole (see `_QueryChoice._cut_value`).
_NESTED_URIS = 4
_URI_END = re.compile("[?#]")


def _cut_uri(text: str, query: _QueryChoice, depth: int = 0) -> str:
    """A URI (or a part of one) with its query cut as `query` chooses.

    So is a fragment of `name=value` pairs: see `_cut_fragment`.
    """
    head, mark, rest = text.partition("?")
    if not mark:  # a fragment only: "/callback#access_token=...&state=..."
        head, hash_, fragment = text.partition("#")
        return f"{head}{hash_}{_cut_fragment(fragment, query, depth)}"
    kept, hash_, fragment = rest.partition("#")
    return (
        f"{head}?{query.kept(kept, depth)}{hash_}"
        f"{_cut_fragment(fragment, query, depth)}"
    )


def _cut_fragment(fragment: str, query: _QueryChoice, depth: int) -> str:
    """A fragment of `name=value` pairs, cut as a query.

    OAuth's implicit flow returns `#access_token=...&id_token=...` to a
    page, whose URL a client may send whole (an error report's, an
    analytics header); a page's route (`#/reset?token=...`) has its own
    query.
    """
    if "=" not in fragment:
        return fragment  # "#section"
    route, mark, rest = fragment.partition("?")
    if mark:
        return f"{route}?{query.kept(rest, depth)}"
    return query.kept(fragment, depth)


class CarrySettings:
    """What one app carries: its `CarryRequestContext` arguments, checked."""

    def __init__(
        self,
        headers: Iterable[str],
        max_bytes: int,
        pass_on: bool,
        query: Iterable[str] = ("*",),
    ) -> None:
        self.names = _header_names(headers)
        self.query_names = _query_names(query)
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int):
            raise TypeError(
                f"CarryRequestContext max_bytes must be a number of bytes, "
                f"not {max_bytes!r}."
            )
        if max_bytes < 1:
            # 0 was taken, and then every kick made during a request raised.
            raise ValueError(
                f"CarryRequestContext max_bytes must be 1 or more, not {max_bytes}."
            )
        if not isinstance(pass_on, bool):
            # "false" from an environment variable would pass the context on.
            raise TypeError(
                f"CarryRequestContext pass_on must be True or False, not {pass_on!r}."
            )
        self.query = _QueryChoice(self.query_names)
        self.headers = _HeaderChoice(self.names, self.query)
        self.max_bytes = max_bytes
        self.pass_on = pass_on

    def carries_header(self, name: str) -> bool:
        """Whether a header of this name reaches the task (case-insensitive)."""
        if _HEADER_NAME.fullmatch(name) is None:
            return False  # not a name any request can have
        return self.headers.carries(name.lower().encode("latin-1"))

    def carries_query(self, name: str) -> bool:
        """Whether a query parameter of this name reaches the task."""
        return self.query.carries(name)

    def __repr__(self) -> str:
        query = "" if self.query_names == ["*"] else f", query={self.query_names!r}"
        return f"CarryRequestContext(headers={self.names!r}{query})"


def _header_names(headers: Iterable[str]) -> list[str]:
    """`headers` as a list, each checked to be a header name (or "*")."""
    return _names("headers", headers, "header", _HEADER_NAME.fullmatch)


def _query_names(query: Iterable[str]) -> list[str]:
    """`query` as a list of parameter names (or "*"), each checked."""
    return _names("query", query, "parameter", bool)


def _names(
    option: str, names: Iterable[str], kind: str, valid: Callable[[str], Any]
) -> list[str]:
    """The option's `names` as a list (read once: it may be an iterator)."""
    if isinstance(names, str):
        raise TypeError(
            f"CarryRequestContext {option} must be a list of names, not the "
            f"string {names!r}."
        )
    try:
        listed = list(names)
    except TypeError:
        raise TypeError(
            f"CarryRequestContext {option} must be a list of names, not {names!r}."
        ) from None
    for name in listed:
        if not isinstance(name, str) or not valid(name):
            raise ValueError(
                f"CarryRequestContext {option}: {name!r} is not a {kind} name."
            )
    return listed


# The request the running code serves, with its app's settings, in the API;
# in a worker task whose kicker passed its context on, what that task carried.
_current: ContextVar[_Handling | _Carried | None] = ContextVar(
    "taskiq_fastapi_request", default=None
)


# The label is written with the json module's C string encoder: json.dumps of
# the whole context cost more than taskiq's making of the message itself.
_string = json.encoder.encode_basestring


def _value(value: Any) -> str:
    """A path parameter as JSON: FastAPI parses it again in the task.

    Routes' parameters are nearly all strings and ints, tested first: the
    checks for the rest cost more than encoding one of those.
    """
    if type(value) is str:
        return _string(value)
    if type(value) is int:
        return str(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return _string(str(value))
    return json.dumps(value) if isinstance(value, float) else str(value)


def _encode(scope: Scope, settings: CarrySettings) -> str:
    """The label for the request in `scope`: JSON text, see `carried_scope`.

    The root path carried is the app's, not a mounted app's (Starlette keeps
    the app's as `app_root_path` in a mount's scope): the task runs in the
    app, where the mount's as its root path doubled the mount in its links.
    """
    root_path = scope.get("app_root_path", scope.get("root_path", ""))
    params = ""  # a loop: a route has one or two, a comprehension cost more
    for key, value in scope.get("path_params", {}).items():
        pair = f"{_string(str(key))}:{_value(value)}"
        params = f"{params},{pair}" if params else pair
    return (
        f'{{"v":{FORMAT},"method":{_string(scope.get("method", "GET"))},'
        f'"path":{_string(scope["path"])},'
        f'"root_path":{_string(root_path)},'
        f'"path_params":{{{params}}},'
        f'"query_string":{_string(settings.query(scope.get("query_string", b"")))},'
        f'"headers":[{",".join(settings.headers(scope.get("headers", ())))}]}}'
    )


class _KickWithContext(TaskiqMiddleware):
    """On the broker: labels each message kicked while a request is handled.

    It holds no setting: what a message carries is decided by the app whose
    request is being handled (its `CarryRequestContext`), so apps sharing a
    broker each carry exactly what they named.
    """

    async def pre_send(self, message: TaskiqMessage) -> TaskiqMessage:
        """Label the message with the request being handled, if any.

        A coroutine: taskiq awaits what `pre_send` returns if it is awaitable,
        which it tells of a coroutine at once, of a message only after an ABC
        check that cost more than making and awaiting the coroutine.
        """
        current = _current.get()
        if current is None:
            return message
        if isinstance(current, _Carried):
            if current.broker is not self.broker or current.done:
                return message  # another broker's, or after the task was over
            message.labels[LABEL] = current.label  # passed on as it came
            message.labels[PASS_ON_LABEL] = "1"
            return message
        chosen = current.by_broker.get(self.broker)
        if chosen is None or current.done:
            return message  # not this broker's, or after the request was handled
        scope, settings = chosen
        encoded = _encode(scope, settings)
        # Its length is its size in UTF-8 when it is ASCII, as nearly always.
        size = len(encoded) if encoded.isascii() else len(encoded.encode())
        if size > settings.max_bytes:
            raise RequestContextTooLargeError(
                f"Task {message.task_name!r}: the request context to carry is "
                f"{size} bytes, over the limit of {settings.max_bytes} "
                f"(CarryRequestContext max_bytes); the largest part is "
                f"{_largest_part(json.loads(encoded))}.",
            )
        message.labels[LABEL] = encoded
        if settings.pass_on:
            message.labels[PASS_ON_LABEL] = "1"
        return message

    def pre_execute(self, message: TaskiqMessage) -> TaskiqMessage:
        """Tasks this task kicks carry what it was kicked with, if asked.

        The app that kicked it asks, with `pass_on` (a label says so).
        Otherwise they carry nothing, as in a worker, also where the task
        runs in the process that kicked it (an in-memory broker), whose
        asyncio task would otherwise inherit the kicking request.
        """
        carried = message.labels.get(LABEL)
        passed_on = message.labels.get(PASS_ON_LABEL)
        token = _current.set(
            _Carried(carried, self.broker)
            if isinstance(carried, str) and passed_on
            else None
        )
        _restore.set((*_restore.get(), token))
        return message

    def post_execute(self, message: TaskiqMessage, result: Any) -> None:
        """Give back what was current before the task; keep the result free of it.

        A task run in place (`InMemoryBroker(await_inplace=True)`) runs in
        the kicking request's own context, which must carry on after it.
        taskiq saves the message's labels with the result, after this: what
        the request carried (its named headers) would stay in the result
        backend, with no expiry by default, and come back with every
        `wait_result`, where it was meant to travel in the message only.
        """
        if LABEL in result.labels or PASS_ON_LABEL in result.labels:
            result.labels = {
                name: value
                for name, value in result.labels.items()
                if name not in (LABEL, PASS_ON_LABEL)
            }
        current = _current.get()
        if isinstance(current, _Carried):
            current.done = True
        tokens = _restore.get()
        if tokens:
            _restore.set(tokens[:-1])
            _current.reset(tokens[-1])


# What `pre_execute` replaced, for `post_execute`: a stack, as a task run in
# place may kick another one in place.
_restore: ContextVar[tuple[Token[Any], ...]] = ContextVar(
    "taskiq_fastapi_restore", default=()
)


# The brokers given the (setting-free) middleware above.
_labelling: WeakSet[AsyncBroker] = WeakSet()


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
    `x-api-key`, and any header whose name has a word such as token, secret,
    key, auth, session, password, signature, csrf or jwt in it), which are
    carried only when named. `query` names the query parameters to carry;
    its default `"*"` carries all but those whose names look like
    credentials, by the same rule. `max_bytes` bounds what one message carries:
    over it, `.kiq()` raises. With `pass_on`, a task that kicks another task
    of the same broker in the worker passes on what it was kicked with. The
    settings are this
    app's: other apps on the same broker carry what they name.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        broker: AsyncBroker,
        headers: Iterable[str] = (),
        max_bytes: int = DEFAULT_MAX_BYTES,
        pass_on: bool = False,
        query: Iterable[str] = ("*",),
    ) -> None:
        require_broker("CarryRequestContext", broker)
        self.app = app
        self.broker = broker
        self.settings = CarrySettings(headers, max_bytes, pass_on, query)
        if broker not in _labelling:
            _labelling.add(broker)
            broker.add_middlewares(_KickWithContext())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        outer = _current.get()
        by_broker = {self.broker: (scope, self.settings)}
        if isinstance(outer, _Handling) and not outer.done:
            by_broker = {**outer.by_broker, **by_broker}
        handling = _Handling(by_broker)
        token = _current.set(handling)
        try:
            await self.app(scope, receive, send)
        finally:
            handling.done = True
            _current.reset(token)


def carried_scope(label: Any, template: Mapping[str, Any]) -> dict[str, Any]:
    """Scope keys of the request a task was kicked from, from its label.

    Host, scheme and server stay the worker's (its base URL). A label this
    version cannot read changes nothing, whole: one that is not JSON, nests
    deeper than the parser goes, or holds values of other types than
    `_encode` writes (a message written by hand, or corrupted) would
    otherwise fail the task deep in Starlette or FastAPI, with a traceback.
    """
    try:
        carried = read_label(label)
        headers = [
            (name.encode("latin-1"), value.encode("latin-1"))
            for name, value in carried["headers"]
        ]
    except ValueError:  # UnicodeEncodeError too: a header beyond latin-1
        return {}
    return {
        "method": carried["method"],
        "path": carried["path"],
        "raw_path": carried["path"].encode(),
        "root_path": carried["root_path"],
        "path_params": carried["path_params"],
        "query_string": carried["query_string"].encode("latin-1"),
        "headers": [*template["headers"], *headers],
    }


_TEXTS = ("method", "path", "root_path", "query_string")
_PARTS = frozenset({"v", "path_params", "headers", *_TEXTS})


def read_label(label: Any) -> dict[str, Any]:
    """The label as `_encode` writes it; ValueError for anything else.

    Headers are `[name, value]` lists of strings, path parameters strings or
    numbers, the rest strings.
    """
    try:
        carried = json.loads(label)
    except (TypeError, RecursionError):  # not text, or "[[[[..." too deep
        raise ValueError("not a label of this version") from None
    if not isinstance(carried, dict) or not carried.keys() >= _PARTS:
        raise ValueError("not a label of this version")
    params, headers = carried["path_params"], carried["headers"]
    if (
        carried["v"] != FORMAT
        or not all(isinstance(carried[key], str) for key in _TEXTS)
        or not isinstance(params, dict)
        or not all(isinstance(value, str | int | float) for value in params.values())
        or not isinstance(headers, list)
        or not all(_is_header(pair) for pair in headers)
    ):
        raise ValueError("not a label of this version: a part of another type")
    return carried


def _is_header(pair: Any) -> bool:
    return (
        isinstance(pair, list)
        and len(pair) == 2
        and all(isinstance(part, str) for part in pair)
    )


def carried(app: Any, broker: AsyncBroker) -> CarrySettings | None:
    """What the app carries to the broker's tasks, if anything (worker, `check`).

    Read from the app's middleware list, so the app's middleware stack is not
    built and nothing is started. An app with a broker per kind of task has a
    middleware for each: the one naming `broker`, else (a broker the worker
    imported as another object) the first, as before there was a choice. An
    invalid argument is the app's startup failing, as it would fail when the
    stack is built.
    """
    middlewares = [
        middleware
        for middleware in getattr(app, "user_middleware", ())
        if getattr(middleware, "cls", None) is CarryRequestContext
    ]
    if not middlewares:
        return None
    middleware = next(
        (m for m in middlewares if getattr(m, "kwargs", {}).get("broker") is broker),
        middlewares[0],
    )
    options = getattr(middleware, "kwargs", {})
    headers = options.get("headers", ())
    query = options.get("query", ("*",))
    try:
        settings = CarrySettings(
            headers,
            options.get("max_bytes", DEFAULT_MAX_BYTES),
            options.get("pass_on", False),
            query,
        )
    except (TypeError, ValueError) as exc:
        raise AppStartupError(
            f"The app's CarryRequestContext is invalid: {exc}"
        ) from None
    # Read once here: the middleware, built later, reads a list.
    if isinstance(headers, Iterator):
        options["headers"] = settings.names
    if isinstance(query, Iterator):
        options["query"] = settings.query_names
    return settings
