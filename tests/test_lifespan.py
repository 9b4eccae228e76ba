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


async def test_shutdown_failure_is_logged_and_other_handlers_still_run(
    broker: InMemoryBroker, caplog: pytest.LogCaptureFixture
) -> None:
    from collections.abc import AsyncIterator
    from contextlib import asynccontextmanager

    from taskiq import TaskiqEvents, TaskiqState

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        raise RuntimeError("could not flush")

    after: list[str] = []
    taskiq_fastapi.init(broker, FastAPI(title="Flaky", lifespan=lifespan))

    @broker.on_event(TaskiqEvents.WORKER_SHUTDOWN)
    async def later_handler(_: TaskiqState) -> None:
        after.append("ran")

    async with as_worker(broker):
        pass
    assert after == ["ran"]
    assert [r.getMessage() for r in caplog.records if r.name == "taskiq_fastapi"] == [
        "App FastAPI app 'Flaky' failed to shut down: RuntimeError: could not flush"
    ]


async def test_app_that_reports_failure_without_raising(broker: InMemoryBroker) -> None:
    from starlette.types import Receive, Scope, Send

    async def refusing_app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "lifespan.startup.failed", "message": "no licence"})

    class Wrapped(FastAPI):
        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            await refusing_app(scope, receive, send)

    taskiq_fastapi.init(broker, Wrapped(title="Refusing"))
    broker.is_worker_process = True
    with pytest.raises(taskiq_fastapi.AppStartupError) as caught:
        await broker.startup()
    assert str(caught.value) == (
        "App FastAPI app 'Refusing' failed to start: no licence"
    )
