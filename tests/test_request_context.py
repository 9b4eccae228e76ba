"""Tasks see the request that kicked them, when the app asks (issue 11)."""

# No `from __future__ import annotations`: FastAPI reads the annotations of
# the functions defined inside the tests.
import asyncio
import json
import re
from typing import Annotated, Any
from urllib.parse import parse_qsl, quote_plus, unquote_plus, urlencode

import pytest
from fastapi import (
    BackgroundTasks,
    Cookie,
    Depends,
    FastAPI,
    Header,
    Query,
    Request,
)
from fastapi import (
    Path as PathParam,
)
from fastapi.testclient import TestClient
from hypothesis import given
from hypothesis import strategies as st
from pydantic import AliasChoices, BaseModel, Field
from starlette.datastructures import QueryParams
from taskiq import AsyncBroker, InMemoryBroker, TaskiqMessage, TaskiqMiddleware

import taskiq_fastapi
from taskiq_fastapi import dependencies
from taskiq_fastapi.request_context import (
    _CREDENTIAL_WORDS,
    LABEL,
    CarrySettings,
    looks_like_a_credential,
)

pytestmark = pytest.mark.anyio


def echo_request(request: Request) -> dict[str, Any]:
    return {
        "method": request.method,
        "url": str(request.url),
        "path_params": request.path_params,
        "query": dict(request.query_params),
        "headers": dict(request.headers),
        "cookies": request.cookies,
    }


def make_app(broker: AsyncBroker, carry: dict[str, Any] | None) -> tuple[FastAPI, Any]:
    """An app whose routes kick `seen` in the ways a route can."""

    @broker.task
    async def seen(request: Request) -> dict[str, Any]:
        return echo_request(request)

    app = FastAPI(lifespan=taskiq_fastapi.broker_lifespan(broker))
    if carry is not None:
        app.add_middleware(taskiq_fastapi.CarryRequestContext, broker=broker, **carry)

    @app.get("/users/{user_id}/seen")
    async def route(user_id: int) -> Any:
        task = await seen.kiq()
        return (await task.wait_result(timeout=5)).return_value

    return app, seen


def get(app: FastAPI, url: str, **kwargs: Any) -> Any:
    with TestClient(app) as client:
        response = client.get(url, **kwargs)
    assert response.status_code == 200, response.text
    return response.json()


HEADERS = {
    "X-Request-ID": "req-42",
    "Accept-Language": "fr",
    "Authorization": "Bearer secret",
    "X-Api-Key": "key",
    "Cookie": "session=s3cret",
}


def test_off_by_default_the_task_gets_the_plain_request() -> None:
    app, _ = make_app(InMemoryBroker(), carry=None)
    seen = get(app, "/users/7/seen?page=2", headers=HEADERS)
    assert seen == {
        "method": "GET",
        "url": "http://localhost:8000/",
        "path_params": {},
        "query": {},
        "headers": {"host": "localhost:8000"},
        "cookies": {},
    }


def test_named_headers_path_and_query_are_carried() -> None:
    app, _ = make_app(
        InMemoryBroker(), carry={"headers": ["x-request-id", "ACCEPT-LANGUAGE"]}
    )
    seen = get(app, "/users/7/seen?page=2&sort=name", headers=HEADERS)
    assert seen == {
        "method": "GET",
        # Host and scheme are the worker's base URL; the rest is the request's.
        "url": "http://localhost:8000/users/7/seen?page=2&sort=name",
        "path_params": {"user_id": "7"},
        "query": {"page": "2", "sort": "name"},
        "headers": {
            "host": "localhost:8000",
            "x-request-id": "req-42",
            "accept-language": "fr",
        },
        "cookies": {},  # not named: not carried
    }


def test_credentials_only_when_named_one_by_one() -> None:
    app, _ = make_app(InMemoryBroker(), carry={"headers": ["*"]})
    everything = get(app, "/users/7/seen", headers=HEADERS)["headers"]
    assert "x-request-id" in everything
    assert "accept-language" in everything
    for secret in ("authorization", "x-api-key", "cookie"):
        assert secret not in everything

    app, _ = make_app(InMemoryBroker(), carry={"headers": ["authorization", "cookie"]})
    seen = get(app, "/users/7/seen", headers=HEADERS)
    assert seen["headers"]["authorization"] == "Bearer secret"
    assert seen["cookies"] == {"session": "s3cret"}
    assert "x-api-key" not in seen["headers"]


def test_outside_a_request_nothing_is_carried() -> None:
    broker = InMemoryBroker()
    app, seen = make_app(broker, carry={"headers": ["x-request-id"]})

    with TestClient(app) as client:
        # A script, the scheduler: kicked while the app runs, outside a request.
        result = client.portal.call(lambda: _kick_and_wait(seen))  # type: ignore[union-attr]
    assert result["url"] == "http://localhost:8000/"
    assert result["headers"] == {"host": "localhost:8000"}


async def _kick_and_wait(task: Any) -> Any:
    return (await (await task.kiq()).wait_result(timeout=5)).return_value


def test_background_tasks_kick_with_the_request_context() -> None:
    broker = InMemoryBroker()
    app, seen = make_app(broker, carry={"headers": ["x-request-id"]})
    results: list[Any] = []

    async def later() -> None:
        results.append(await _kick_and_wait(seen))

    @app.post("/later")
    async def schedule(background: BackgroundTasks) -> None:
        background.add_task(later)

    with TestClient(app) as client:
        assert client.post("/later?from=bg", headers=HEADERS).status_code == 200
    assert results[0]["query"] == {"from": "bg"}
    assert results[0]["headers"]["x-request-id"] == "req-42"


def test_code_a_request_started_kicks_with_nothing_once_it_is_handled() -> None:
    """A refresher the first request started (an asyncio task, which keeps the
    context variable) kicked every task with that request's Authorization for
    as long as it ran: tasks from nobody's request acted as that user. Kicks
    it makes before the request is handled still carry it."""
    broker = InMemoryBroker()
    app, seen = make_app(broker, carry={"headers": ["authorization"]})
    kicked: list[Any] = []
    handled = asyncio.Event()

    async def refresher() -> None:
        kicked.append(await _kick_and_wait(seen))  # while the request is handled
        await handled.wait()
        kicked.append(await _kick_and_wait(seen))

    @app.get("/start")
    async def start() -> None:
        app.state.refresher = asyncio.create_task(refresher())
        while not kicked:
            await asyncio.sleep(0.01)

    async def finish() -> None:
        handled.set()
        await app.state.refresher

    with TestClient(app) as client:
        assert client.get("/start", headers=HEADERS).status_code == 200
        client.portal.call(finish)  # type: ignore[union-attr]
    assert kicked[0]["headers"]["authorization"] == "Bearer secret"
    assert kicked[1]["headers"] == {"host": "localhost:8000"}


def test_an_oversize_context_is_refused_at_kick_time() -> None:
    broker = InMemoryBroker()
    app, seen = make_app(broker, carry={"headers": ["x-trace"], "max_bytes": 1024})
    with (
        TestClient(app) as client,
        pytest.raises(taskiq_fastapi.RequestContextTooLargeError) as raised,
    ):
        client.get("/users/7/seen", headers={"X-Trace": "t" * 2000})
    message = str(raised.value)
    size = re.search(r"is (\d+) bytes", message)
    assert size is not None
    assert 2000 < int(size[1]) < 2300  # the header, and the rest of the context
    assert message == (
        f"Task {seen.task_name!r}: the request context to carry is {size[1]} "
        "bytes, over the limit of 1024 (CarryRequestContext max_bytes); the "
        "largest part is header 'x-trace' (2000 bytes)."
    )


def dependency_app(broker: AsyncBroker, carry: bool) -> tuple[FastAPI, Any]:
    def listing(
        page: Annotated[int, Query(ge=1)],
        x_request_id: Annotated[str, Header()],
        theme: Annotated[str, Cookie()] = "light",
        user_id: Annotated[int, PathParam()] = 0,
    ) -> dict[str, Any]:
        return {
            "page": page,
            "request_id": x_request_id,
            "theme": theme,
            "user": user_id,
        }

    @broker.task
    async def report(shown: Annotated[dict[str, Any], Depends(listing)]) -> Any:
        return shown

    app = FastAPI(lifespan=taskiq_fastapi.broker_lifespan(broker))
    if carry:
        app.add_middleware(
            taskiq_fastapi.CarryRequestContext, broker=broker,
            headers=["x-request-id", "cookie"],
        )  # fmt: skip

    @app.get("/users/{user_id}/report")
    async def route(user_id: int) -> Any:
        result = await (await report.kiq()).wait_result(timeout=5)
        return {"value": result.return_value, "error": str(result.error or "")}

    return app, report


def test_query_header_cookie_and_path_dependencies_read_the_carried_request() -> None:
    app, _ = dependency_app(InMemoryBroker(), carry=True)
    got = get(
        app, "/users/9/report?page=3",
        headers={"X-Request-ID": "req-7", "Cookie": "theme=dark"},
    )  # fmt: skip
    assert got == {
        "value": {"page": 3, "request_id": "req-7", "theme": "dark", "user": 9},
        "error": "",
    }


@pytest.mark.parametrize(
    ("query", "headers", "error"),
    [
        (
            "page=0",
            {"X-Request-ID": "r"},
            "query 'page': Input should be greater than or equal to 1",
        ),
        (
            "page=x",
            {"X-Request-ID": "r"},
            "query 'page': Input should be a valid integer",
        ),
        ("page=1", {}, "header 'x-request-id': Field required"),
    ],
)
def test_an_invalid_or_missing_value_fails_the_task_naming_it(
    query: str, headers: dict[str, str], error: str
) -> None:
    app, report = dependency_app(InMemoryBroker(), carry=True)
    got = get(app, f"/users/9/report?{query}", headers=headers)
    assert got["value"] is None
    assert got["error"].startswith(
        f"Task {report.task_name!r}: the request it was kicked from does not "
        "satisfy its dependencies, as a route would answer 422: " + error
    ), got["error"]


def test_with_carrying_off_such_dependencies_stay_startup_errors() -> None:
    broker = InMemoryBroker()
    app, report = dependency_app(broker, carry=False)
    with pytest.raises(taskiq_fastapi.DependencyError) as raised:
        dependencies.check(
            broker, carry=taskiq_fastapi.request_context.carried(app, broker)
        )
    assert str(raised.value) == (
        f"Task {report.task_name!r}: parameter 'user_id' of listing() is a Path "
        "parameter, which only an HTTP request has (the app can carry it from "
        "the request that kicked the task: CarryRequestContext). (3 more: run "
        "`taskiq-fastapi check`)"
    )

    broker = InMemoryBroker()
    app, _ = dependency_app(broker, carry=True)
    dependencies.check(
        broker, carry=taskiq_fastapi.request_context.carried(app, broker)
    )


def test_the_label_is_plain_json_any_broker_transports() -> None:
    broker = InMemoryBroker()
    app, _ = make_app(broker, carry={"headers": ["x-request-id"]})
    sent: list[Any] = []
    kick = broker.kick

    async def recording(message: Any) -> None:
        sent.append(message)
        await kick(message)

    broker.kick = recording  # type: ignore[method-assign]
    get(app, "/users/7/seen?page=2", headers=HEADERS)
    label = sent[0].labels[LABEL]
    assert isinstance(label, str)
    assert json.loads(label) == {
        "v": 1,
        "method": "GET",
        "path": "/users/7/seen",
        "root_path": "",
        "path_params": {"user_id": "7"},
        "query_string": "page=2",
        "headers": [["x-request-id", "req-42"]],
    }


@pytest.mark.parametrize("pass_on", [False, True])
def test_a_task_passes_its_context_on_only_when_its_app_asks(pass_on: bool) -> None:
    broker = InMemoryBroker()
    app, seen = make_app(
        broker, carry={"headers": ["x-request-id"], "pass_on": pass_on}
    )

    @broker.task
    async def relay() -> Any:
        return (await (await seen.kiq()).wait_result(timeout=5)).return_value

    @app.get("/relay")
    async def route() -> Any:
        return (await (await relay.kiq()).wait_result(timeout=5)).return_value

    got = get(app, "/relay?page=2", headers=HEADERS)
    assert got["headers"].get("x-request-id") == ("req-42" if pass_on else None)
    assert got["query"] == ({"page": "2"} if pass_on else {})


def test_an_app_built_again_for_the_same_broker_replaces_the_setting() -> None:
    """As test suites do: one module-level broker, an app per test."""
    broker = InMemoryBroker()
    first, _ = make_app(broker, carry={"headers": ["x-request-id"]})
    get(first, "/users/1/seen")
    second, _ = make_app(broker, carry={"headers": ["accept-language"]})
    seen = get(second, "/users/1/seen", headers=HEADERS)
    assert seen["headers"] == {"host": "localhost:8000", "accept-language": "fr"}
    kicks = [m for m in broker.middlewares if type(m).__name__ == "_KickWithContext"]
    assert len(kicks) == 1


def test_two_apps_on_one_broker_each_carry_what_they_name() -> None:
    """A public API and an internal admin app share a broker: the public
    app's kicks never carry the credentials only the admin app names."""
    broker = InMemoryBroker()
    public, _ = make_app(broker, carry={"headers": ["x-request-id"]})
    admin, _ = make_app(broker, carry={"headers": ["authorization", "x-request-id"]})
    with TestClient(public) as public_client, TestClient(admin) as admin_client:
        seen = [
            client.get("/users/1/seen", headers=HEADERS).json()["headers"]
            for client in (public_client, admin_client, public_client, admin_client)
        ]
    public_sees = {"host": "localhost:8000", "x-request-id": "req-42"}
    admin_sees = {**public_sees, "authorization": "Bearer secret"}
    assert seen == [public_sees, admin_sees, public_sees, admin_sees]


class Sent(TaskiqMiddleware):
    """Notes the carried label of each message the broker sent."""

    def __init__(self) -> None:
        super().__init__()
        self.carried: list[Any] = []

    def post_send(self, message: TaskiqMessage) -> None:
        self.carried.append(json.loads(message.labels[LABEL])["headers"])


def test_one_app_with_two_brokers_carries_to_each_what_its_middleware_names() -> None:
    """Public tasks on one broker, internal ones on another, each broker with
    its own CarryRequestContext: the public broker's messages carried the
    Authorization header only the internal broker's names (the innermost
    middleware's list went to both)."""
    public, internal = InMemoryBroker(), InMemoryBroker()
    sent = {"public": Sent(), "internal": Sent()}
    public.add_middlewares(sent["public"])
    internal.add_middlewares(sent["internal"])
    email = public.register_task(lambda: None, task_name="email")
    audit = internal.register_task(lambda: None, task_name="audit")
    app = FastAPI()
    app.add_middleware(
        taskiq_fastapi.CarryRequestContext,
        broker=internal,
        headers=["authorization", "x-request-id"],
    )
    app.add_middleware(
        taskiq_fastapi.CarryRequestContext, broker=public, headers=["x-request-id"]
    )

    @app.get("/signup")
    async def signup() -> None:
        await email.kiq()
        await audit.kiq()

    with TestClient(app) as client:
        assert client.get("/signup", headers=HEADERS).status_code == 200
    assert sent["public"].carried == [[["x-request-id", "req-42"]]]
    assert sent["internal"].carried == [
        [["x-request-id", "req-42"], ["authorization", "Bearer secret"]]
    ]


CREDENTIAL_LIKE = [
    "X-Auth-Token", "X-Access-Token", "X-CSRF-Token", "X-XSRF-TOKEN",
    "X-Amz-Security-Token", "X-Client-Secret", "X-Session-Id", "X-Api-Key",
    "X-Hub-Signature-256", "X-JWT-Assertion", "X-Forwarded-Authorization",
    "X-Password", "X-Credentials", "Proxy-Authorization", "Cookie",
    "X-Shopify-Hmac-Sha256", "X-OTP", "X-MFA-Code", "X-Passcode", "X-Pass", "DPoP",
    "X-MS-Client-Principal", "X-Forwarded-Client-Cert", "X-Functions-Key", "X-PIN",
    # AWS ALB's signed claims of the signed-in user, Bunny's API key header.
    "X-Amzn-Oidc-Data", "AccessKey", "X-API-Keys", "X-TOTP", "X-2FA-Code", "X-Pwd",
    # A SAML assertion is a bearer credential, a PAT a personal access token,
    # a sid a session id, a TFA code a second factor.
    "X-SAML-Assertion", "X-Assertion", "X-GitHub-PAT", "X-Sid", "X-TFA-Code",
]  # fmt: skip


def test_star_leaves_out_every_header_that_looks_like_a_credential() -> None:
    headers = {name: f"value of {name}" for name in CREDENTIAL_LIKE}
    ordinary = {
        "X-Request-ID": "req-42", "Accept-Language": "fr", "X-Tenant": "t1",
        "X-Monkey": "m", "X-Keyword": "k",  # "key" only as a word of the name
        "X-Path": "p", "X-Side": "s",  # nor "pat" or "sid"
    }  # fmt: skip
    app, _ = make_app(InMemoryBroker(), carry={"headers": ["*"]})
    seen = get(app, "/users/1/seen", headers={**headers, **ordinary})["headers"]
    assert seen == {
        "host": "localhost:8000", "x-request-id": "req-42",
        "accept-language": "fr", "x-tenant": "t1", "x-monkey": "m", "x-keyword": "k",
        "x-path": "p", "x-side": "s",
        # What the test client sends on its own.
        "accept": "*/*", "accept-encoding": "gzip, deflate", "user-agent": "testclient",
    }  # fmt: skip
    # Each is carried when named one by one.
    app, _ = make_app(InMemoryBroker(), carry={"headers": ["*", *CREDENTIAL_LIKE]})
    seen = get(app, "/users/1/seen", headers={**headers, **ordinary})["headers"]
    assert {name.lower(): value for name, value in headers.items()}.items() <= (
        seen.items()
    )


QUERY = "/users/1/seen?page=2&api_key=sk_live_SECRET&q=x&access_token=tok_SECRET&sig=s1"


class Spy(TaskiqMiddleware):
    """Records each message's labels as sent, once every middleware wrote its own.

    In `post_send`: the app adds its label-writer to the broker only when its
    middleware stack is built, after a spy added with the app, so a spy's
    `pre_send` saw the message before the label was written.
    """

    def __init__(self, labels: list[str]) -> None:
        super().__init__()
        self.labels = labels

    def post_send(self, message: TaskiqMessage) -> None:
        self.labels.append(str(message.labels))


def test_star_leaves_out_query_parameters_that_look_like_credentials() -> None:
    """FastAPI's own APIKeyQuery, a webhook's ?token=, a presigned URL's
    signature: the whole query string went into the broker whatever the
    headers list said."""
    broker = InMemoryBroker()
    app, _ = make_app(broker, carry={"headers": ["x-request-id"]})
    labels: list[str] = []

    broker.add_middlewares(Spy(labels))
    seen = get(app, QUERY)
    assert seen["query"] == {"page": "2", "q": "x"}
    assert labels
    assert all(LABEL in label for label in labels)
    assert not any("SECRET" in label or "sig=" in label for label in labels)
    # Named, a credential is carried; naming some carries only those.
    app, _ = make_app(InMemoryBroker(), carry={"query": ["*", "api_key"]})
    assert get(app, QUERY)["query"] == {
        "page": "2",
        "q": "x",
        "api_key": "sk_live_SECRET",
    }
    app, _ = make_app(InMemoryBroker(), carry={"query": ["page"]})
    assert get(app, QUERY)["query"] == {"page": "2"}
    app, _ = make_app(InMemoryBroker(), carry={"query": []})
    assert get(app, QUERY)["query"] == {}


# Query parameter names keep their case: camelCase ones, as JavaScript
# clients name them, and bracketed ones, as form libraries do.
CAMEL_QUERY = "/users/1/seen?pageSize=10&privateKey=S1&userPin=S2&otpCode=S3" + (
    "&licenseKey=S4&dbPass=S5&sigV4=S6&user%5Bpin%5D=S7&TOTPCode=S8&myKeyword=k"
)


def test_star_leaves_out_camel_case_and_bracketed_credential_query_names() -> None:
    """`?privateKey=`, `?userPin=`, `?user[pin]=` went into the broker with
    the default query=["*"]: only "-", "_" and "." split a name into words."""
    broker = InMemoryBroker()
    app, _ = make_app(broker, carry={"headers": ["x-request-id"]})
    labels: list[str] = []
    broker.add_middlewares(Spy(labels))
    assert get(app, CAMEL_QUERY)["query"] == {"pageSize": "10", "myKeyword": "k"}
    assert labels
    assert not any(re.search(r"S[0-9]", label) for label in labels)


@pytest.mark.parametrize("word", sorted(word.decode() for word in _CREDENTIAL_WORDS))
def test_each_credential_word_counts_in_camel_case_and_brackets(word: str) -> None:
    assert looks_like_a_credential(f"user[{word}]")
    assert looks_like_a_credential(f"user:{word}")
    if word[0].isalpha():
        assert looks_like_a_credential(f"user{word.capitalize()}")
        assert looks_like_a_credential(f"{word}Code")
        assert looks_like_a_credential(f"user{word.upper()}")


class AddsHeaders:
    """An ASGI middleware of the app that adds headers to the scope as it
    writes them, not in lower case."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            scope["headers"] = [
                *scope["headers"],
                (b"Authorization", b"Bearer S3CRET"),
                (b"X-Internal-Token", b"S3CRET"),
                (b"Cookie", b"session=S3CRET"),
            ]
        await self.app(scope, receive, send)


def test_a_credential_header_an_app_middleware_added_in_capitals_is_left_out() -> None:
    broker = InMemoryBroker()
    app, _ = make_app(broker, carry={"headers": ["*"]})
    app.add_middleware(AddsHeaders)  # outermost: CarryRequestContext sees them
    labels: list[str] = []
    broker.add_middlewares(Spy(labels))
    seen = get(app, "/users/1/seen", headers={"X-Request-ID": "req-1"})
    assert seen["headers"]["x-request-id"] == "req-1"
    assert labels
    assert not any("S3CRET" in label for label in labels)


URI_HEADERS = {
    # Traefik's ForwardAuth, nginx's auth_request, IIS, Envoy: the request's
    # own URI, query string and all; a Referer holds the page's.
    "X-Forwarded-Uri": "/users/1/seen?page=2&token=tok_SECRET",
    "X-Original-URI": "/users/1/seen?page=2&token=tok_SECRET",
    "X-Original-URL": "https://api.example/users/1/seen?api_key=sk_SECRET",
    "X-Envoy-Original-Path": "/users/1/seen?sig=sig_SECRET",
    "Referer": "https://app.example/login?access_token=tok_SECRET#top",
}


FRAGMENT_HEADERS = {
    # A page's URL, sent whole by its client (error reports, analytics):
    # OAuth's implicit flow returns the tokens in the fragment; a hash-routed
    # page's route has its own query.
    "X-Page-URL": "https://app.example/callback#access_token=tok_SECRET&state=s1",
    "X-Page-Route": "https://app.example/?lang=fr#/reset?token=tok_SECRET&step=2",
    "X-Error-Page": "https://app.example/a#id_token=tok_SECRET",
}


def test_star_cuts_what_a_header_uri_fragment_holds_as_its_query() -> None:
    """A fragment's `access_token=` (OAuth's implicit flow) or a hash route's
    `?token=` was carried under "*": only the query before "#" was cut."""
    broker = InMemoryBroker()
    app, _ = make_app(broker, carry={"headers": ["*"]})
    labels: list[str] = []
    broker.add_middlewares(Spy(labels))
    plain = {"X-Section": "/docs#install", "X-Next": "/users/2?page=3#top"}
    seen = get(app, "/users/1/seen", headers={**FRAGMENT_HEADERS, **plain})
    names = [*FRAGMENT_HEADERS, *plain]
    assert {name: seen["headers"][name.lower()] for name in names} == {
        "X-Page-URL": "https://app.example/callback#state=s1",
        "X-Page-Route": "https://app.example/?lang=fr#/reset?step=2",
        "X-Error-Page": "https://app.example/a#",
        **plain,
    }
    assert labels
    assert not any("SECRET" in label for label in labels)


def test_star_cuts_the_query_parameters_left_out_from_a_header_uri() -> None:
    """A URI in a header held the query credentials the query choice left
    out: `?token=` was dropped from the query string and carried, under
    "*", in X-Forwarded-Uri. The header is still carried (a task may read
    it), without them; a header named one by one is carried as it is."""
    broker = InMemoryBroker()
    app, _ = make_app(broker, carry={"headers": ["*"]})
    labels: list[str] = []
    broker.add_middlewares(Spy(labels))
    plain = {"X-Next": "/users/2?page=3", "X-Request-ID": "a?b"}
    seen = get(app, "/users/1/seen?page=2", headers={**URI_HEADERS, **plain})
    assert {name: seen["headers"][name.lower()] for name in [*URI_HEADERS, *plain]} == {
        "X-Forwarded-Uri": "/users/1/seen?page=2",
        "X-Original-URI": "/users/1/seen?page=2",
        "X-Original-URL": "https://api.example/users/1/seen?",
        "X-Envoy-Original-Path": "/users/1/seen?",
        "Referer": "https://app.example/login?#top",
        **plain,
    }
    assert labels
    assert all(LABEL in label for label in labels)
    assert not any("SECRET" in label for label in labels)
    app, _ = make_app(InMemoryBroker(), carry={"headers": ["*", "referer"]})
    seen = get(app, "/users/1/seen", headers=URI_HEADERS)
    assert seen["headers"]["referer"] == URI_HEADERS["Referer"]
    assert seen["headers"]["x-forwarded-uri"] == "/users/1/seen?page=2"
    app, _ = make_app(
        InMemoryBroker(), carry={"headers": ["*"], "query": ["*", "token"]}
    )
    seen = get(app, "/users/1/seen", headers=URI_HEADERS)
    assert seen["headers"]["x-forwarded-uri"] == URI_HEADERS["X-Forwarded-Uri"]


# A login's or an OAuth flow's return address, as a query parameter's value:
# raw ("?" may appear in a query's values) and percent-encoded.
URI_QUERY = "/users/1/seen?" + "&".join(
    [
        "next=/reset?token=tok_SECRET&page=2",
        "back=" + quote_plus("/reset?token=tok_SECRET&step=2"),
        "return_to=" + quote_plus("https://app.example/cb#access_token=tok_SECRET&s=1"),
        "q=" + quote_plus("why? 100%"),
    ]
)


def test_star_cuts_the_query_of_a_uri_a_query_parameter_holds() -> None:
    """`?next=/reset?token=...` carried the token the query choice left out of
    the query itself, as a header holding a URI did before it was cut. A
    parameter named one by one is carried as it came."""
    broker = InMemoryBroker()
    app, _ = make_app(broker, carry={})
    labels: list[str] = []
    broker.add_middlewares(Spy(labels))
    assert get(app, URI_QUERY)["query"] == {
        "next": "/reset?",
        "page": "2",
        "back": "/reset?step=2",
        "return_to": "https://app.example/cb#s=1",
        "q": "why? 100%",
    }
    assert labels
    assert not any("SECRET" in label for label in labels)
    app, _ = make_app(InMemoryBroker(), carry={"query": ["*", "back"]})
    assert get(app, URI_QUERY)["query"]["back"] == "/reset?token=tok_SECRET&step=2"


@pytest.mark.parametrize("levels", [3, 150, 400])
def test_a_query_of_uris_nested_deep_is_cut_in_bounded_time_and_size(
    levels: int,
) -> None:
    """`?a=?a=?...&token=` (3 bytes a level): each level was cut as a URI in
    a call of its own, its cut value percent-encoded again at each level
    above. 400 levels (1.2 KB) raised RecursionError in the kick (the
    route failed); 150 grew to 45 KB, over max_bytes, in 0.1 s of the event
    loop. A URI nested deeper than a login's return address's return
    address has its query left out whole; the parameter is carried."""
    broker = InMemoryBroker()
    app, _ = make_app(broker, carry={})
    labels: list[str] = []
    broker.add_middlewares(Spy(labels))
    seen = get(app, "/users/1/seen?" + "a=?" * levels + "token=tok_SECRET&page=2")
    assert seen["query"]["page"] == "2"
    assert seen["query"]["a"].startswith("?a=")
    assert not any("SECRET" in label for label in labels)
    assert sum(map(len, labels)) < 8192


def _names_read_in(uri: str, depth: int = 0) -> list[str]:
    """Every parameter name a reader of `uri` as a URI finds, in its query,
    its fragment's, and the URIs their values hold, as Starlette reads them.

    A URI four deep has its query left out whole: a "token" stands for it.
    """
    if depth >= 4:
        return ["token"] if "?" in uri or "#" in uri else []
    if "?" in uri:
        query, _, fragment = uri.partition("?")[2].partition("#")
    else:
        query, fragment = "", uri.partition("#")[2]
    if "=" not in fragment:
        fragment = ""  # "#section", an anchor
    queries = [query, fragment.partition("?")[2] if "?" in fragment else fragment]
    return [
        name
        for part in queries
        for key, value in QueryParams(part).multi_items()
        for name in [key, *_names_read_in(value, depth + 1)]
    ]


_QUERY_PIECES = st.sampled_from(
    [
        *("a", "b", "token", "key", "=", "&", "?", "#", "%", "%3F", "%3D"),
        *("%26", "%23", "%25", "%zz", "%ff", "+", ";", "\u00e9", "/", " ", "%2F"),
    ]
)


@given(st.lists(_QUERY_PIECES, max_size=30).map("".join))
def test_any_query_string_keeps_its_names_and_values_but_nested_credentials(
    raw: str,
) -> None:
    """Starlette as the oracle, on any query string (odd escapes, raw "?",
    "#", ";", "+", non-ASCII): the task reads each parameter the route read
    but credentials, in order; a value changes only where a URI it holds
    has a credential's name, and no credential's name is left in any."""
    route = QueryParams(raw.encode().decode("latin-1")).multi_items()
    carried = CarrySettings([], 8192, False, ["*"]).query(raw.encode())
    task = QueryParams(carried).multi_items()
    kept = [(k, v) for k, v in route if not looks_like_a_credential(k)]
    assert [k for k, _ in task] == [k for k, _ in kept]
    for (_, before), (_, after) in zip(kept, task, strict=True):
        if after != before:
            assert any(map(looks_like_a_credential, _names_read_in(before)))
        assert not any(map(looks_like_a_credential, _names_read_in(after)))


_NESTED_NAMES = st.sampled_from(["page", "token", "api_key", "state", "a b", "sig"])


@given(
    st.lists(st.tuples(_NESTED_NAMES, st.text(max_size=6)), max_size=5),
    st.sampled_from(["/p?", "https://h.example/p?", "/p#", "/p#/r?"]),
    st.sampled_from([["*"], ["*", "token"], ["page", "next"], ["next"]]),
)
def test_a_uri_in_a_carried_value_keeps_what_the_choice_keeps(
    nested: list[tuple[str, str]], prefix: str, names: list[str]
) -> None:
    """urllib as the oracle: the URI carried in `next` (percent-encoded, as
    a client's URL library sends it) holds, in order, the pairs the choice
    would carry as the query's own; `next` named, it is carried whole."""
    inner = prefix + urlencode(nested)
    raw = urlencode([("next", inner)]).encode()
    chosen = QueryParams(CarrySettings([], 8192, False, names).query(raw))
    if "next" in names:
        assert chosen["next"] == inner
        return
    carried = chosen["next"]
    assert carried.startswith(prefix)
    kept = parse_qsl(carried[len(prefix) :], keep_blank_values=True)
    assert kept == [
        (name, value)
        for name, value in parse_qsl(urlencode(nested), keep_blank_values=True)
        if name in names or ("*" in names and not looks_like_a_credential(name))
    ]


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["page", "q", "api_key", "token", "Sort", "a b", "ünï", ""])
            | st.text(max_size=8),
            st.text(max_size=8),
        ),
        max_size=6,
    ),
    st.sampled_from([["*"], ["*", "token"], ["page", "a b"], []]),
)
def test_the_carried_query_is_what_starlette_reads_minus_what_is_left_out(
    pairs: list[tuple[str, str]], names: list[str]
) -> None:
    """Starlette as the oracle: what the task reads is what the route read,
    in order and repeated, minus the parameters the choice leaves out."""
    raw = urlencode(pairs).encode("latin-1", "replace")
    chosen = CarrySettings([], 8192, False, names).query(raw)
    expected = [
        (name, value)
        for name, value in QueryParams(raw.decode("latin-1")).multi_items()
        if name in names or ("*" in names and not looks_like_a_credential(name))
    ]
    assert QueryParams(chosen).multi_items() == expected


# One set of settings per choice, used for every example, having met each
# of these names first: each remembers its decisions per name, as it does
# across an app's requests.
_USED: dict[tuple[tuple[str, ...], tuple[str, ...]], CarrySettings] = {}
_SOME_HEADERS = [
    *("authorization", "cookie", "x-api-key", "x-request-id", "host"),
    *("referer", "x-forwarded-uri", "x-session-token", "accept-language"),
    *("x" * 70, "x" * 64 + "-token"),  # the same past the memo's length
]
_SOME_QUERY = ["page", "PAGE", "token", "Sort", "a+b", "a%20b", "a b", "api_key"]
_HEADER_NAMES = st.sampled_from(_SOME_HEADERS) | st.text(
    "abcdefghijklmnopqrstuvwxyz0123456789-_.", min_size=1, max_size=80
)


def _used(headers: tuple[str, ...], query: tuple[str, ...]) -> CarrySettings:
    if (headers, query) not in _USED:
        used = _USED[headers, query] = CarrySettings(headers, 8192, False, query)
        used.headers([(name.encode(), b"/?page=1") for name in _SOME_HEADERS])
        used.query(urlencode([(name, "1") for name in _SOME_QUERY]).encode())
    return _USED[headers, query]


@given(
    st.lists(
        st.tuples(_HEADER_NAMES, st.sampled_from(["1", "/p?token=s&page=2", ""])),
        max_size=8,
    ),
    st.lists(
        st.tuples(
            st.sampled_from(_SOME_QUERY) | st.text(max_size=70), st.text(max_size=4)
        )
    ),
    st.sampled_from([("*",), ("*", "cookie"), ("x-request-id", "referer"), ()]),
    st.sampled_from([("*",), ("*", "token"), ("page", "a b"), ()]),
)
def test_a_name_met_before_is_decided_as_the_first_time(
    headers: list[tuple[str, str]],
    pairs: list[tuple[str, str]],
    header_choice: tuple[str, ...],
    query_choice: tuple[str, ...],
) -> None:
    """What settings used for many requests carry is what new ones carry,
    and what each name's own decision (`carries`) says, for the headers and
    the query: remembered names and names past the memo's length alike."""
    raw_headers = [(n.encode(), v.encode()) for n, v in headers]
    raw_query = urlencode(pairs).encode("latin-1", "replace")
    used = _used(header_choice, query_choice)
    new = CarrySettings(header_choice, 8192, False, query_choice)
    chosen = used.headers(raw_headers)
    assert chosen == new.headers(raw_headers)
    assert [json.loads(pair)[0].encode("latin-1") for pair in chosen] == [
        name for name, _ in raw_headers if used.headers.carries(name)
    ]
    kept = used.query(raw_query)
    assert kept == new.query(raw_query)
    assert kept == "&".join(
        part
        for part in raw_query.decode("latin-1").split("&")
        if used.query.carries(unquote_plus(part.partition("=")[0]))
    )


def test_past_the_memos_count_names_are_still_decided() -> None:
    settings = CarrySettings(["*"], 8192, False, ["*"])
    for n in range(2000):
        settings.headers([(f"x-junk-{n}".encode(), b"1")])
        settings.query(f"junk{n}=1".encode())
    headers = [(b"x-auth-token", b"s"), (b"x-request-id", b"r")]
    assert settings.headers(headers) == ['["x-request-id","r"]']
    assert settings.query(b"token=s&page=2") == "page=2"


@pytest.mark.parametrize("query", ["page", [3], [""], 5])
def test_a_query_choice_that_is_not_a_list_of_names_is_refused(query: Any) -> None:
    with pytest.raises((TypeError, ValueError), match="CarryRequestContext query"):
        taskiq_fastapi.CarryRequestContext(
            FastAPI(), broker=InMemoryBroker(), query=query
        )


def checked_and_kicked(
    app: FastAPI,
    broker: AsyncBroker,
    task: Any,
    url: str,
    headers: dict[str, str] | None = None,
) -> tuple[str | None, Any]:
    """What the check says of the task given what the app carries, and what
    the task returns kicked from a request to `url`: FastAPI as the oracle."""

    @app.get("/kick")
    async def kick() -> Any:
        result = await (await task.kiq()).wait_result(timeout=5)
        return {"value": result.return_value, "error": str(result.error or "")}

    return check_problem(app, broker), get(app, url, headers=headers or {})


def check_problem(app: FastAPI, broker: Any) -> str | None:
    """What the startup check says of the broker's tasks, given what `app` carries."""
    try:
        dependencies.check(
            broker, carry=taskiq_fastapi.request_context.carried(app, broker)
        )
    except taskiq_fastapi.DependencyError as exc:
        return str(exc)
    return None


class Trace(BaseModel):
    x_request_id: str
    x_span: str = "none"


def header_readers() -> dict[str, Any]:
    """Each way FastAPI reads a header, reading X-Request-ID."""

    def by_validation_alias(
        rid: Annotated[str, Header(validation_alias="x-request-id")],
    ) -> str:
        return rid

    def by_choices(
        rid: Annotated[str, Header(validation_alias=AliasChoices("x-request-id"))],
    ) -> str:
        return rid

    def by_model(trace: Annotated[Trace, Header()]) -> str:
        return trace.x_request_id

    def by_host(host: Annotated[str, Header()]) -> str:
        return host

    return {
        "validation_alias": by_validation_alias,
        "AliasChoices": by_choices,
        "a Header model": by_model,
        "host": by_host,
    }


@pytest.mark.parametrize("way", ["validation_alias", "AliasChoices", "a Header model"])
def test_check_reads_header_names_as_fastapi_reads_them(way: str) -> None:
    """The app carries x-request-id: the check passes exactly when the task
    works (FastAPI before 0.140 or so reads no AliasChoices in headers: then
    both fail), and with only authorization carried the check says so."""
    broker = InMemoryBroker()
    reader = header_readers()[way]

    @broker.task
    async def task(rid: Annotated[str, Depends(reader)]) -> str:
        return rid

    app = FastAPI(lifespan=taskiq_fastapi.broker_lifespan(broker))
    app.add_middleware(
        taskiq_fastapi.CarryRequestContext, broker=broker, headers=["x-request-id"]
    )

    problem, got = checked_and_kicked(
        app, broker, task, "/kick", {"X-Request-ID": "abc"}
    )
    works = got == {"value": "abc", "error": ""}
    assert (problem is None) == works, (problem, got)
    if way != "AliasChoices":
        assert works  # on every FastAPI this package supports

    credential = taskiq_fastapi.request_context.CarrySettings(
        ["authorization"], 1, False
    )
    with pytest.raises(taskiq_fastapi.DependencyError, match=r"header .* not carried"):
        dependencies.check(broker, carry=credential)


class Paging(BaseModel):
    api_key: str
    page: int = 1


def query_readers() -> dict[str, Any]:
    """Each way FastAPI reads a query parameter, reading `api_key`."""

    def by_name(api_key: Annotated[str, Query()]) -> str:
        return api_key

    def by_alias(key: Annotated[str, Query(alias="api_key")]) -> str:
        return key

    def by_validation_alias(
        key: Annotated[str, Query(validation_alias="api_key")],
    ) -> str:
        return key

    def by_model(paging: Annotated[Paging, Query()]) -> str:
        return paging.api_key

    return {
        "name": by_name,
        "alias": by_alias,
        "validation_alias": by_validation_alias,
        "model": by_model,
    }


@pytest.mark.parametrize(
    "query", [["*"], ["*", "api_key"], ["api_key", "page"], ["page"]]
)
@pytest.mark.parametrize("way", list(query_readers()))
def test_the_check_of_a_query_parameter_agrees_with_what_the_task_gets(
    way: str, query: list[str]
) -> None:
    """FastAPI as the oracle: the check finds a problem exactly when the
    task, kicked from a request that has the parameter, fails for lack of it."""
    broker = InMemoryBroker()
    reader = query_readers()[way]

    @broker.task
    async def task(key: Annotated[str, Depends(reader)]) -> str:
        return key

    app = FastAPI(lifespan=taskiq_fastapi.broker_lifespan(broker))
    app.add_middleware(taskiq_fastapi.CarryRequestContext, broker=broker, query=query)

    problem, got = checked_and_kicked(app, broker, task, "/kick?api_key=k1&page=2")
    works = got == {"value": "k1", "error": ""}
    assert (problem is None) == works, (problem, got)
    assert works == ("api_key" in query)
    if problem is not None:
        assert "query parameter 'api_key' of " in problem
        assert "(name it in query=[...] to carry it)" in problem


class OptionalKey(BaseModel):
    api_key: str | None = None


class KeyByValidationAlias(BaseModel):
    key: str = Field(validation_alias="api_key")


def model_readers() -> dict[str, Any]:
    """Query models whose `api_key` field the check read wrongly."""

    def optional(model: Annotated[OptionalKey, Query()]) -> Any:
        return model.api_key

    def validation_alias(model: Annotated[KeyByValidationAlias, Query()]) -> Any:
        return model.key

    return {"optional": optional, "validation_alias": validation_alias}


@pytest.mark.parametrize("query", [["*"], ["*", "api_key"]])
@pytest.mark.parametrize("way", list(model_readers()))
def test_the_check_of_a_query_model_agrees_with_the_route(
    way: str, query: list[str]
) -> None:
    """The same dependency in a route and in a task: the check passes exactly
    when the task gets what the route got. An optional field left out passed
    the check and the task got None; a field read by its validation alias
    was looked for by its name, so naming the alias was refused."""
    broker = InMemoryBroker()
    reader = model_readers()[way]

    @broker.task
    async def task(key: Annotated[Any, Depends(reader)]) -> Any:
        return key

    app = FastAPI(lifespan=taskiq_fastapi.broker_lifespan(broker))
    app.add_middleware(taskiq_fastapi.CarryRequestContext, broker=broker, query=query)

    @app.get("/kick")
    async def kick(key: Annotated[Any, Depends(reader)]) -> Any:
        result = await (await task.kiq()).wait_result(timeout=5)
        return {"route": key, "task": result.return_value}

    problem = check_problem(app, broker)
    got = get(app, "/kick?api_key=k1")
    assert got["route"] == "k1"
    assert (problem is None) == (got["task"] == "k1"), (problem, got)
    assert (problem is None) == ("api_key" in query), problem
    if problem is not None:
        assert "query parameter 'api_key' of " in problem


def test_host_is_there_and_how_the_request_was_sent_never_is() -> None:
    broker = InMemoryBroker()
    by_host = header_readers()["host"]

    def by_length(content_length: Annotated[int, Header()]) -> int:
        return content_length

    @broker.task
    async def task(host: str = Depends(by_host), size: int = Depends(by_length)) -> Any:
        return host, size

    carry = taskiq_fastapi.request_context.CarrySettings(["*"], 8192, False)
    with pytest.raises(taskiq_fastapi.DependencyError) as raised:
        dependencies.check(broker, carry=carry)
    assert str(raised.value) == (
        f"Task {task.task_name!r}: header 'content-length' of by_length() is not "
        "carried: it describes how the request was sent, so no app carries it."
    )


@pytest.mark.parametrize(
    ("headers", "error"),
    [
        (
            "x-request-id",
            "headers must be a list of names, not the string 'x-request-id'",
        ),
        (5, "headers must be a list of names, not 5"),
        (["x-währung"], "headers: 'x-währung' is not a header name"),
        (["x id"], "headers: 'x id' is not a header name"),
        ([None], "headers: None is not a header name"),
    ],
)
def test_invalid_headers_are_one_clear_error_naming_the_value(
    headers: Any, error: str
) -> None:
    app, broker = FastAPI(), InMemoryBroker()
    app.add_middleware(
        taskiq_fastapi.CarryRequestContext, broker=broker, headers=headers
    )
    with pytest.raises(taskiq_fastapi.AppStartupError) as raised:
        taskiq_fastapi.request_context.carried(app, broker)
    assert str(raised.value) == (
        f"The app's CarryRequestContext is invalid: CarryRequestContext {error}."
    )


@pytest.mark.parametrize("pass_on", ["false", 0, None])
def test_pass_on_other_than_true_or_false_is_one_clear_error(pass_on: Any) -> None:
    """pass_on="false" (read from an environment variable, say) was taken as
    true: tasks kicked by tasks carried the request on, with its headers."""
    app, broker = FastAPI(), InMemoryBroker()
    app.add_middleware(
        taskiq_fastapi.CarryRequestContext, broker=broker, pass_on=pass_on
    )
    with pytest.raises(taskiq_fastapi.AppStartupError) as raised:
        taskiq_fastapi.request_context.carried(app, broker)
    assert str(raised.value) == (
        "The app's CarryRequestContext is invalid: CarryRequestContext pass_on "
        f"must be True or False, not {pass_on!r}."
    )


def test_headers_given_as_an_iterator_are_read_once_and_carried() -> None:
    """The worker reads the settings before the middleware is built."""
    broker = InMemoryBroker()
    names = map(str.lower, ["X-Request-ID"])
    app, _ = make_app(broker, carry={"headers": names})
    carry = taskiq_fastapi.request_context.carried(app, broker)
    assert carry is not None
    assert carry.names == ["x-request-id"]
    seen = get(app, "/users/1/seen", headers=HEADERS)["headers"]
    assert seen == {"host": "localhost:8000", "x-request-id": "req-42"}


def test_a_query_choice_given_as_an_iterator_is_read_once_and_carried() -> None:
    """As headers: the check read the iterator, and the middleware, built
    after it, found it empty and carried no query parameter."""
    broker = InMemoryBroker()
    app, _ = make_app(broker, carry={"query": iter(["page"])})
    carry = taskiq_fastapi.request_context.carried(app, broker)
    assert carry is not None
    assert carry.query_names == ["page"]
    assert get(app, "/users/1/seen?page=2&q=x")["query"] == {"page": "2"}


@pytest.mark.parametrize("max_bytes", [0, -1])
def test_max_bytes_below_one_is_one_clear_error(max_bytes: int) -> None:
    """max_bytes=0 was taken, and then every kick a request made raised."""
    app, broker = FastAPI(), InMemoryBroker()
    app.add_middleware(
        taskiq_fastapi.CarryRequestContext, broker=broker, max_bytes=max_bytes
    )
    with pytest.raises(taskiq_fastapi.AppStartupError) as raised:
        taskiq_fastapi.request_context.carried(app, broker)
    assert str(raised.value) == (
        "The app's CarryRequestContext is invalid: CarryRequestContext "
        f"max_bytes must be 1 or more, not {max_bytes}."
    )


@pytest.mark.parametrize("broker", [None, "my_project.broker:broker"])
def test_a_broker_that_is_not_one_is_refused_naming_it(broker: Any) -> None:
    """It failed as the app started with "cannot create weak reference to
    'NoneType' object", naming neither the middleware nor the value."""
    app = FastAPI()
    app.add_middleware(taskiq_fastapi.CarryRequestContext, broker=broker)
    with pytest.raises(TypeError) as raised, TestClient(app):
        pass
    assert str(raised.value) == (
        f"CarryRequestContext broker must be a taskiq broker, not {broker!r}."
    )


def test_a_task_kicked_in_a_mounted_app_builds_the_links_its_route_builds() -> None:
    """The mount's root path was carried as the app's: in the task, base_url
    was http://localhost:8000/v1/ and url_for gave /v1/v1/items/9."""
    broker = InMemoryBroker()

    def links(request: Request) -> dict[str, str]:
        return {
            "url": request.url.path,
            "base_url": request.base_url.path,
            "mounted": request.url_for("item", item_id=9).path,
            "top": request.url_for("top").path,
        }

    @broker.task
    async def task(seen: Annotated[dict[str, str], Depends(links)]) -> Any:
        return seen

    app = FastAPI(lifespan=taskiq_fastapi.broker_lifespan(broker))
    app.add_middleware(taskiq_fastapi.CarryRequestContext, broker=broker)
    sub = FastAPI()

    @app.get("/top")
    async def top() -> None: ...

    @sub.get("/items/{item_id}")
    async def item(
        item_id: int, seen: Annotated[dict[str, str], Depends(links)]
    ) -> Any:
        result = await (await task.kiq()).wait_result(timeout=5)
        return {"route": seen, "task": result.return_value}

    app.mount("/v1", sub)
    got = get(app, "/v1/items/5")
    assert got["route"] == {
        "url": "/v1/items/5", "base_url": "/", "mounted": "/v1/items/9", "top": "/top",
    }  # fmt: skip
    assert got["task"] == got["route"]
