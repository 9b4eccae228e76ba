"""The API process: one line starts the broker with the app (issue 2, item 7)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from conftest import as_worker
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from taskiq import InMemoryBroker, TaskiqDepends, TaskiqEvents, TaskiqState

import taskiq_fastapi


def make_app(broker: InMemoryBroker, log: list[str]) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        log.append("app up")
        yield {"db": f"live-db-{len(log)}"}
        log.append("app down")

    @broker.on_event(TaskiqEvents.CLIENT_STARTUP)
    async def started(_: TaskiqState) -> None:
        log.append("broker up")

    @broker.on_event(TaskiqEvents.CLIENT_SHUTDOWN)
    async def stopped(_: TaskiqState) -> None:
        log.append("broker down")

    @broker.task
    async def lookup(request: Request = TaskiqDepends()) -> str:
        return f"{request.state.db} {request.url_for('kick')}"

    app = FastAPI(lifespan=taskiq_fastapi.broker_lifespan(broker, lifespan))

    @app.post("/kick", name="kick")
    async def kick() -> str:
        task = await lookup.kiq()
        return str((await task.wait_result(timeout=5)).return_value)

    return app


def test_test_client_runs_broker_and_injects_live_state() -> None:
    broker = InMemoryBroker()
    log: list[str] = []
    app = make_app(broker, log)
    taskiq_fastapi.init(broker, app)
    with TestClient(app) as client:
        response = client.post("/kick")
        assert log == ["app up", "broker up"]
    assert response.json() == "live-db-1 http://localhost:8000/kick"
    assert log == ["app up", "broker up", "broker down", "app down"]


def test_works_without_init_and_with_no_inner_lifespan() -> None:
    broker = InMemoryBroker()

    @broker.task
    async def app_title(request: Request = TaskiqDepends()) -> str:
        return str(request.app.title)

    app = FastAPI(title="Bare", lifespan=taskiq_fastapi.broker_lifespan(broker))

    @app.get("/")
    async def index() -> str:
        task = await app_title.kiq()
        return str((await task.wait_result(timeout=5)).return_value)

    with TestClient(app) as client:
        assert client.get("/").json() == "Bare"


@pytest.mark.anyio
async def test_in_a_worker_it_only_runs_the_inner_lifespan() -> None:
    broker = InMemoryBroker()
    log: list[str] = []
    app = make_app(broker, log)
    taskiq_fastapi.init(broker, app)
    async with as_worker(broker):
        # The worker started the broker itself; the app did not start it again.
        assert log == ["broker up", "app up"]
    # InMemoryBroker fires client and worker shutdown events in either order.
    assert sorted(log[2:]) == ["app down", "broker down"]


@pytest.mark.anyio
async def test_broker_and_app_modules_that_import_each_other() -> None:
    from sampleapp.circular_broker import broker

    assert isinstance(broker, InMemoryBroker)
    async with as_worker(broker):
        from sampleapp.circular_app import app

        assert broker.state.fastapi_app is app


@pytest.mark.anyio
async def test_manual_populate_dependency_context_as_in_0_5() -> None:
    broker = InMemoryBroker()
    app = FastAPI()

    @broker.task
    async def read(request: Request = TaskiqDepends()) -> list[object]:
        return [request.app is app, request.state.token]

    taskiq_fastapi.init(broker, "sampleapp.apps:app")
    taskiq_fastapi.populate_dependency_context(broker, app, {"token": "abc"})
    await broker.startup()
    result = await (await read.kiq()).wait_result(timeout=5)
    await broker.shutdown()
    assert result.return_value == [True, "abc"]
