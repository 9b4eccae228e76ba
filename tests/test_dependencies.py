"""FastAPI dependencies in tasks, as FastAPI resolves them for a route (issue 7)."""

import asyncio
import dataclasses
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Annotated, Any

import pytest
from conftest import as_worker
from fastapi import (
    BackgroundTasks,
    Body,
    Cookie,
    Depends,
    FastAPI,
    File,
    Form,
    Header,
    Path,
    Query,
    Request,
    Response,
    WebSocket,
    params,
)
from fastapi.security import OAuth2PasswordBearer, SecurityScopes
from fastapi.testclient import TestClient
from sampleapp import apps
from starlette.requests import HTTPConnection
from taskiq import AsyncTaskiqDecoratedTask, Context, InMemoryBroker, TaskiqDepends

import taskiq_fastapi
from taskiq_fastapi import DependencyError

pytestmark = pytest.mark.anyio


async def result_of(task: AsyncTaskiqDecoratedTask[Any, Any], *args: Any) -> Any:
    result = await (await task.kiq(*args)).wait_result(timeout=5)
    if result.is_err:
        raise result.error
    return result.return_value


async def test_route_style_chains_mixed_with_taskiq_depends_at_any_depth(
    broker: InMemoryBroker,
) -> None:
    taskiq_fastapi.init(broker, apps.build_app())
    calls: list[str] = []

    def get_settings() -> str:
        calls.append("settings")
        return "settings"

    def get_engine(request: Request, settings: str = Depends(get_settings)) -> str:
        calls.append("engine")
        return f"engine({settings}, {request.state.db}, {request.app.state.pool})"

    async def get_session(
        engine: Annotated[str, Depends(get_engine)],
    ) -> AsyncIterator[str]:
        yield f"session({engine})"

    Session = Annotated[str, Depends(get_session)]  # noqa: N806

    def service(session: Session, ctx: Context = TaskiqDepends()) -> str:
        return f"service({session}, {ctx.message.task_name.rpartition(':')[2]})"

    @broker.task
    async def report(
        user_id: int,
        session: Session,
        service: str = TaskiqDepends(service),
        settings: str = Depends(get_settings),
    ) -> list[object]:
        return [user_id, session, service, settings]

    async with as_worker(broker):
        assert await result_of(report, 7) == [
            7,
            "session(engine(settings, db-from-lifespan-state, pool-from-app-state))",
            "service(session(engine(settings, db-from-lifespan-state, "
            "pool-from-app-state)), report)",
            "settings",
        ]
        # FastAPI's per-request cache, per task: each function ran once.
        assert calls == ["settings", "engine"]
        await result_of(report, 8)
        assert calls == ["settings", "engine"] * 2


async def test_bare_request_and_http_connection_parameters_get_the_tasks_request(
    broker: InMemoryBroker,
) -> None:
    taskiq_fastapi.init(broker, apps.build_app())

    def from_dependency(request: Request) -> Request:
        return request

    @broker.task
    async def make_receipt(
        order_id: int,
        request: Request,
        connection: HTTPConnection,
        seen: Request = Depends(from_dependency),
    ) -> list[object]:
        return [
            order_id,
            request is connection is seen,
            str(request.url_for("item", item_id=order_id)),
        ]

    async with as_worker(broker):
        # Before: make_receipt__taskiq_original() missing 1 required
        # positional argument: 'request'.
        assert await result_of(make_receipt, 3) == [
            3,
            True,
            "http://localhost:8000/items/3",
        ]


async def test_sync_dependencies_run_in_a_worker_thread_as_in_a_route(
    broker: InMemoryBroker,
) -> None:
    app = apps.build_app()
    taskiq_fastapi.init(broker, app)

    def thread_name() -> str:
        return threading.current_thread().name

    @app.get("/thread")
    def route(name: str = Depends(thread_name)) -> str:
        return name

    @broker.task
    async def task(name: str = Depends(thread_name)) -> str:
        return name

    with TestClient(app) as client:
        in_route = client.get("/thread").json()
    async with as_worker(broker):
        in_task = await result_of(task)
    loop_thread = threading.current_thread().name
    assert in_task != loop_thread
    assert in_route.startswith("AnyIO worker thread")
    assert in_task.startswith("AnyIO worker thread")


async def test_classes_and_generators_close_after_the_task_even_when_it_raises(
    broker: InMemoryBroker,
) -> None:
    taskiq_fastapi.init(broker, apps.build_app())
    log: list[str] = []

    class Repository:
        def __init__(self, request: Request) -> None:
            self.db = request.state.db

    def sync_resource() -> Iterator[str]:
        log.append("sync open")
        try:
            yield "sync"
        except ValueError as exc:
            log.append(f"sync saw {exc}")
            raise
        finally:
            log.append("sync closed")

    async def async_resource() -> AsyncIterator[str]:
        log.append("async open")
        try:
            yield "async"
        except ValueError as exc:
            log.append(f"async saw {exc}")
            raise
        finally:
            log.append("async closed")

    @broker.task
    async def work(
        fail: bool,
        repo: Repository = Depends(),
        first: str = Depends(sync_resource),
        second: str = Depends(async_resource),
    ) -> str:
        log.append("task ran")
        if fail:
            raise ValueError("boom")
        return f"{repo.db} {first} {second}"

    async with as_worker(broker):
        assert await result_of(work, False) == "db-from-lifespan-state sync async"
        assert log == [
            "sync open", "async open", "task ran", "async closed", "sync closed",
        ]  # fmt: skip
        log.clear()
        result = await (await work.kiq(True)).wait_result(timeout=5)
    assert isinstance(result.error, ValueError)
    assert str(result.error) == "boom"
    assert log == [
        "sync open", "async open", "task ran",
        "async saw boom", "async closed", "sync saw boom", "sync closed",
    ]  # fmt: skip


async def test_use_cache_false_calls_again_and_scopes_close_in_fastapis_order(
    broker: InMemoryBroker,
) -> None:
    taskiq_fastapi.init(broker, apps.build_app())
    log: list[str] = []

    def counter() -> int:
        log.append("counted")
        return len(log)

    async def function_scoped() -> AsyncIterator[str]:
        yield "f"
        log.append("function scope closed")

    async def request_scoped() -> AsyncIterator[str]:
        yield "r"
        log.append("request scope closed")

    @broker.task
    async def task(
        a: int = Depends(counter),
        b: int = Depends(counter, use_cache=False),
        r: str = Depends(request_scoped, scope="request"),
        f: str = Depends(function_scoped, scope="function"),
    ) -> list[object]:
        return [a, b, r, f]

    async with as_worker(broker):
        assert await result_of(task) == [1, 2, "r", "f"]
    assert log == [
        "counted", "counted", "function scope closed", "request scope closed",
    ]  # fmt: skip


# `max_concurrency` is newer than FastAPI 0.162.5, the oldest we support.
HAS_MAX_CONCURRENCY = "max_concurrency" in {
    f.name for f in dataclasses.fields(params.Depends)
}


@pytest.mark.skipif(
    not HAS_MAX_CONCURRENCY, reason="this FastAPI has no Depends(max_concurrency=)"
)
@pytest.mark.parametrize(("limit", "peak"), [(1, 1), (None, 4)])
async def test_max_concurrency_limits_tasks_as_it_limits_requests(
    broker: InMemoryBroker, limit: int | None, peak: int
) -> None:
    taskiq_fastapi.init(broker, apps.build_app())
    inside = [0, 0]

    async def connection() -> AsyncIterator[None]:
        inside[0] += 1
        inside[1] = max(inside)
        await asyncio.sleep(0.05)
        yield
        inside[0] -= 1

    @broker.task
    async def task(_: None = Depends(connection, max_concurrency=limit)) -> None:
        await asyncio.sleep(0.05)

    async with as_worker(broker):
        await asyncio.gather(*(result_of(task) for _ in range(4)))
    assert inside == [0, peak]


async def test_one_override_is_seen_by_routes_and_tasks(
    broker: InMemoryBroker,
) -> None:
    def get_settings() -> str:
        return "real settings"

    def get_name() -> str:
        return "real name"

    @broker.task
    async def task(
        settings: str = Depends(get_settings), name: str = Depends(get_name)
    ) -> list[str]:
        return [settings, name]

    app = FastAPI(lifespan=taskiq_fastapi.broker_lifespan(broker))

    @app.get("/both")
    async def both(settings: str = Depends(get_settings)) -> dict[str, Any]:
        return {"route": settings, "task": await result_of(task)}

    app.dependency_overrides[get_settings] = lambda: "test settings"
    broker.dependency_overrides[get_name] = lambda: "test name"
    with TestClient(app) as client:
        assert client.get("/both").json() == {
            "route": "test settings",
            "task": ["test settings", "test name"],
        }


async def test_a_sync_task_gets_fastapi_dependencies_too(
    broker: InMemoryBroker,
) -> None:
    taskiq_fastapi.init(broker, apps.build_app())

    def db(request: Request) -> str:
        return str(request.state.db)

    @broker.task
    def task(n: int, value: str = Depends(db)) -> str:
        return f"{n} {value}"

    async with as_worker(broker):
        assert await result_of(task, 1) == "1 db-from-lifespan-state"


async def test_tasks_without_fastapi_dependencies_are_left_as_taskiq_has_them(
    broker: InMemoryBroker,
) -> None:
    taskiq_fastapi.init(broker, apps.build_app())

    def db(request: Request = TaskiqDepends()) -> str:
        return str(request.state.db)

    async def plain(n: int) -> int:
        return n

    async def old_style(db: str = TaskiqDepends(db)) -> str:
        return db

    async def new_style(db: str = Depends(db)) -> str:
        return db

    functions = (plain, old_style, new_style)
    tasks = [broker.task(fn) for fn in functions]
    # 0.5-style tasks keep their own function: nothing added per task.
    kept = [t.original_func is fn for t, fn in zip(tasks, functions, strict=True)]
    assert kept == [True, True, False]
    async with as_worker(broker):
        assert [await result_of(tasks[0], 5), await result_of(tasks[1])] == [
            5, "db-from-lifespan-state",
        ]  # fmt: skip
        assert await result_of(tasks[2]) == "db-from-lifespan-state"


def oauth2() -> OAuth2PasswordBearer:
    return OAuth2PasswordBearer(tokenUrl="token")


def needs(kind: str) -> Any:
    """A dependency function whose parameter `value` needs an HTTP request."""
    markers: dict[str, Any] = {
        "Query": Query(), "Path": Path(), "Header": Header(), "Cookie": Cookie(),
        "Body": Body(), "Form": Form(), "File": File(),
    }  # fmt: skip
    if kind in markers:

        def dependency(value: str = markers[kind]) -> str:
            return value

    elif kind == "implicit query":

        def dependency(value: int = 0) -> str:  # type: ignore[misc]
            return str(value)

    elif kind == "OAuth2PasswordBearer":

        def dependency(value: str = Depends(oauth2())) -> str:  # type: ignore[misc]
            return value

    elif kind == "Security":

        def dependency(value: SecurityScopes) -> str:  # type: ignore[misc]
            return str(value)

    else:
        types = {
            "BackgroundTasks": BackgroundTasks,
            "Response": Response,
            "WebSocket": WebSocket,
        }

        def dependency(value: types[kind]) -> str:  # type: ignore[misc,valid-type]
            return str(value)

    return dependency


KINDS = [
    "Query", "Path", "Header", "Cookie", "Body", "Form", "File", "implicit query",
    "OAuth2PasswordBearer", "Security", "BackgroundTasks", "Response", "WebSocket",
]  # fmt: skip


@pytest.mark.parametrize("kind", KINDS)
async def test_request_only_parameters_stop_the_worker_before_any_task(
    broker: InMemoryBroker, kind: str
) -> None:
    taskiq_fastapi.init(broker, apps.build_app())
    dependency = needs(kind)

    def middle(inner: str = Depends(dependency)) -> str:
        return inner

    @broker.task
    async def notify(user_id: int, value: str = Depends(middle)) -> str:
        return value

    with pytest.raises(DependencyError) as raised:
        async with as_worker(broker):
            pytest.fail("the worker started")
    message = str(raised.value)
    assert message.startswith(f"Task {notify.task_name!r}: parameter ")
    assert "parameter 'value' of dependency()" in message
    if kind == "OAuth2PasswordBearer":
        assert "is the security scheme OAuth2PasswordBearer" in message
    else:
        assert "only an HTTP request has" in message
    assert apps.events == []  # the app never started


@pytest.mark.parametrize("kind", ["Query", "Header", "BackgroundTasks", "WebSocket"])
async def test_request_only_parameters_of_the_task_itself_are_reported(
    broker: InMemoryBroker, kind: str
) -> None:
    taskiq_fastapi.init(broker, apps.build_app())
    broker.register_task(needs(kind), task_name="tasks:notify")

    with pytest.raises(DependencyError, match="parameter 'value' of "):
        async with as_worker(broker):
            pytest.fail("the worker started")


async def test_taskiq_depends_inside_a_fastapi_dependency_is_reported(
    broker: InMemoryBroker,
) -> None:
    taskiq_fastapi.init(broker, apps.build_app())

    def counter() -> int:
        return 1

    def inner(n: int = TaskiqDepends(counter)) -> int:
        return n

    @broker.task
    async def task(n: int = Depends(inner)) -> int:
        return n

    with pytest.raises(DependencyError, match="uses TaskiqDepends inside a FastAPI"):
        async with as_worker(broker):
            pytest.fail("the worker started")


async def test_fastapis_own_dependency_errors_are_reported_with_the_task(
    broker: InMemoryBroker,
) -> None:
    taskiq_fastapi.init(broker, apps.build_app())

    def function_scoped() -> Iterator[int]:
        yield 1

    async def request_scoped(
        n: int = Depends(function_scoped, scope="function"),
    ) -> AsyncIterator[int]:
        yield n

    @broker.task
    async def task(n: int = Depends(request_scoped)) -> int:
        return n

    with pytest.raises(DependencyError) as raised:
        async with as_worker(broker):
            pytest.fail("the worker started")
    assert str(raised.value).startswith(
        f"Task {task.task_name!r}: parameter 'n' of task() cannot be used by "
        'FastAPI: DependencyScopeError: The dependency "request_scoped" has a scope'
    )


async def test_dependencies_before_the_arguments_as_fastapi_code_declares_them(
    broker: InMemoryBroker,
) -> None:
    from sampleapp import styled_tasks

    taskiq_fastapi.init(broker, apps.build_app())
    send = styled_tasks.register(broker)
    async with as_worker(broker):
        # Positional message arguments go to the task's arguments, not to the
        # dependency declared first, and taskiq parses them by their hints.
        assert await result_of(send, 5) == ["db-from-lifespan-state", 5, "-"]
        assert await result_of(send, "7", "hi") == ["db-from-lifespan-state", 7, "hi"]
        result = await (await send.kiq(user_id=3)).wait_result(timeout=5)
        assert result.return_value == ["db-from-lifespan-state", 3, "-"]


@pytest.mark.parametrize("style", ["async task", "sync task", "under TaskiqDepends"])
async def test_a_dependency_failing_while_closing_is_logged_and_the_result_kept(
    broker: InMemoryBroker, style: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Each way a task's FastAPI dependencies are solved keeps the same rule."""
    taskiq_fastapi.init(broker, apps.build_app())

    async def connection() -> AsyncIterator[str]:
        yield "conn"
        raise RuntimeError("cannot close")

    def holder(conn: str = Depends(connection)) -> str:
        return conn

    if style == "async task":

        @broker.task
        async def work(conn: str = Depends(connection)) -> str:
            return conn

    elif style == "sync task":

        @broker.task
        def work(conn: str = Depends(connection)) -> str:
            return conn

    else:

        @broker.task
        async def work(conn: str = TaskiqDepends(holder)) -> str:
            return conn

    async with as_worker(broker):
        assert await result_of(work) == "conn"
    (record,) = [r for r in caplog.records if "failed while closing" in r.message]
    assert record.message == (
        f"Task {work.task_name!r}: a FastAPI dependency failed while closing"
    )
    assert str(record.exc_info[1]) == "cannot close"  # type: ignore[index]
