"""Worker startup runs the app's lifespan as uvicorn does (issue 2, item 2)."""

from __future__ import annotations

import asyncio

import pytest
from conftest import as_worker
from fastapi import FastAPI, Request
from sampleapp import apps
from taskiq import InMemoryBroker, TaskiqDepends

import taskiq_fastapi

pytestmark = pytest.mark.anyio


async def test_task_group_lifespan_starts_and_stops_in_one_task(
    broker: InMemoryBroker,
) -> None:
    taskiq_fastapi.init(broker, "sampleapp.apps:app")
    async with as_worker(broker):
        assert apps.events == ["middleware saw lifespan", "startup"]
    # The shutdown code ran: the task group was exited in the task that entered it.
    assert apps.events == ["middleware saw lifespan", "startup", "shutdown"]


async def test_shutdown_runs_once_after_in_flight_tasks(broker: InMemoryBroker) -> None:
    taskiq_fastapi.init(broker, apps.app)

    @broker.task
    async def slow(request: Request = TaskiqDepends()) -> str:
        await asyncio.sleep(0.05)
        apps.events.append("task done")
        return str(request.state.db)

    async with as_worker(broker):
        task = await slow.kiq()
    result = await task.wait_result(timeout=5)
    assert result.return_value == "db-from-lifespan-state"
    assert apps.events[-2:] == ["task done", "shutdown"]
    # A second shutdown (taskiq may call it again) does not run the app's again.
    await broker.shutdown()
    assert apps.events.count("shutdown") == 1


async def test_on_event_handlers_of_the_seed_recipe_run(broker: InMemoryBroker) -> None:
    app = FastAPI()
    calls: list[str] = []

    async def app_startup() -> None:
        if not broker.is_worker_process:
            await broker.startup()  # pragma: no cover - API side only
        calls.append("startup")

    async def app_shutdown() -> None:
        calls.append("shutdown")

    with pytest.warns(DeprecationWarning, match="on_event is deprecated"):
        app.on_event("startup")(app_startup)
    with pytest.warns(DeprecationWarning, match="on_event is deprecated"):
        app.on_event("shutdown")(app_shutdown)

    taskiq_fastapi.init(broker, app)
    async with as_worker(broker):
        assert calls == ["startup"]
    assert calls == ["startup", "shutdown"]


async def test_state_reaches_app_state_and_lifespan_state(
    broker: InMemoryBroker,
) -> None:
    taskiq_fastapi.init(broker, "sampleapp.apps:app")

    @broker.task
    async def read(request: Request = TaskiqDepends()) -> list[str]:
        return [request.app.state.pool, request.state.db]

    async with as_worker(broker):
        assert broker.state.fastapi_app is apps.app
        task = await read.kiq()
        result = await task.wait_result(timeout=5)
    assert result.return_value == ["pool-from-app-state", "db-from-lifespan-state"]
    assert result.is_err is False
