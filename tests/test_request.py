"""The injected Request: fresh per task, complete scope (issue 2, items 4 and 5)."""

from __future__ import annotations

import asyncio

import pytest
from conftest import as_worker
from fastapi import Request
from sampleapp import apps
from starlette.requests import HTTPConnection
from taskiq import InMemoryBroker, TaskiqDepends

import taskiq_fastapi

pytestmark = pytest.mark.anyio


async def test_request_and_connection_are_one_fresh_object_per_task(
    broker: InMemoryBroker,
) -> None:
    taskiq_fastapi.init(broker, apps.app)
    seen: list[tuple[Request, HTTPConnection]] = []

    @broker.task
    async def grab(
        request: Request = TaskiqDepends(),
        connection: HTTPConnection = TaskiqDepends(),
    ) -> None:
        seen.append((request, connection))

    async with as_worker(broker):
        for _ in range(2):
            await (await grab.kiq()).wait_result(timeout=5)
    (first_req, first_conn), (second_req, _) = seen
    assert isinstance(first_req, Request)
    assert first_conn is first_req  # as in FastAPI: one object per request
    assert second_req is not first_req
    assert first_req.app is apps.app


async def test_state_never_leaks_between_300_concurrent_tasks(
    broker: InMemoryBroker,
) -> None:
    taskiq_fastapi.init(broker, apps.app)

    def mark(request: Request = TaskiqDepends()) -> Request:
        return request

    @broker.task
    async def isolated(n: int, request: Request = TaskiqDepends(mark)) -> list[object]:
        before = getattr(request.state, "owner", None)
        request.state.owner = n
        await asyncio.sleep(0.01)  # let the other 299 tasks run in between
        request.state.counter[0] += 1  # the lifespan's objects are shared
        return [before, request.state.owner, request.state.db]

    async with as_worker(broker):
        tasks = await asyncio.gather(*(isolated.kiq(n) for n in range(300)))
        results = await asyncio.gather(*(t.wait_result(timeout=10) for t in tasks))
    assert [r.return_value for r in results] == [
        [None, n, "db-from-lifespan-state"] for n in range(300)
    ]
    assert results[0].is_err is False


async def test_url_for_with_a_base_url_that_has_a_path(broker: InMemoryBroker) -> None:
    taskiq_fastapi.init(broker, apps.app, base_url="https://api.example.com/v1")

    @broker.task
    async def link(request: Request = TaskiqDepends()) -> list[str]:
        return [
            str(request.url_for("item", item_id=1)),
            str(request.base_url),
            str(request.url),
            request.scope["root_path"],
        ]

    async with as_worker(broker):
        result = await (await link.kiq()).wait_result(timeout=5)
    assert result.return_value == [
        "https://api.example.com/v1/items/1",
        "https://api.example.com/v1/",
        "https://api.example.com/v1/",
        "/v1",
    ]


async def test_base_url_from_environment_then_default(
    broker: InMemoryBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    taskiq_fastapi.init(broker, apps.app)

    @broker.task
    async def link(request: Request = TaskiqDepends()) -> str:
        return str(request.url_for("item", item_id=7))

    monkeypatch.setenv("TASKIQ_FASTAPI_BASE_URL", "http://internal:9000/api/")
    async with as_worker(broker):
        from_env = await (await link.kiq()).wait_result(timeout=5)
    monkeypatch.delenv("TASKIQ_FASTAPI_BASE_URL")
    async with as_worker(broker):
        default = await (await link.kiq()).wait_result(timeout=5)
    assert from_env.return_value == "http://internal:9000/api/items/7"
    assert default.return_value == "http://localhost:8000/items/7"
    assert taskiq_fastapi.DEFAULT_BASE_URL == "http://localhost:8000"


async def test_ordinary_request_apis_work(broker: InMemoryBroker) -> None:
    taskiq_fastapi.init(broker, apps.app, base_url="https://api.example.com:8443")

    @broker.task
    async def describe(request: Request = TaskiqDepends()) -> dict[str, object]:
        return {
            "method": request.method,
            "host": request.headers["host"],
            "client": [request.client.host, request.client.port]
            if request.client
            else None,
            "query": dict(request.query_params),
            "cookies": request.cookies,
            "path_params": request.path_params,
            "url": str(request.url),
        }

    async with as_worker(broker):
        result = await (await describe.kiq()).wait_result(timeout=5)
    assert result.return_value == {
        "method": "GET",
        "host": "api.example.com:8443",
        "client": ["127.0.0.1", 0],
        "query": {},
        "cookies": {},
        "path_params": {},
        "url": "https://api.example.com:8443/",
    }


async def test_reading_a_body_raises_a_clear_error(broker: InMemoryBroker) -> None:
    taskiq_fastapi.init(broker, apps.app)

    @broker.task
    async def body(request: Request = TaskiqDepends()) -> bytes:
        return await request.body()

    async with as_worker(broker):
        result = await (await body.kiq()).wait_result(timeout=5)
    assert result.is_err
    assert str(result.error) == (
        "The Request injected into a taskiq task has no body: "
        "pass the data your task needs as task arguments."
    )


async def test_sync_dependency_and_generator_dependency(broker: InMemoryBroker) -> None:
    taskiq_fastapi.init(broker, apps.app)
    closed: list[str] = []

    def repo(request: Request = TaskiqDepends()):  # type: ignore[no-untyped-def]
        yield request.state.db
        closed.append("closed")

    @broker.task
    async def use(db: str = TaskiqDepends(repo)) -> str:
        return db

    async with as_worker(broker):
        result = await (await use.kiq()).wait_result(timeout=5)
    assert result.return_value == "db-from-lifespan-state"
    assert closed == ["closed"]
