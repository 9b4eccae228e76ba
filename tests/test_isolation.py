"""Every task sees its own request, however many run at once (issue 17)."""

# No `from __future__ import annotations`: FastAPI reads the annotations of
# the functions defined inside the tests.
import asyncio
from typing import Any

import pytest
from fastapi import Depends, FastAPI, Header, Request
from isolation import serving
from starlette.requests import HTTPConnection
from taskiq import Context, InMemoryBroker, TaskiqDepends

import taskiq_fastapi

pytestmark = pytest.mark.anyio

N = 60


async def test_sixty_concurrent_tasks_each_see_their_own_request() -> None:
    """The reproducer of the issue: 59 of 60 saw the last task's request."""
    broker = InMemoryBroker(max_async_tasks=1000, max_stored_results=1000)
    started = 0
    all_started = asyncio.Event()

    async def everyone_started() -> None:
        nonlocal started
        started += 1
        if started == N:
            all_started.set()
        await all_started.wait()

    async def request_id(request: Request) -> tuple[str, int]:
        await asyncio.sleep(0)
        return request.headers["x-request-id"], id(request)

    def header_id(x_request_id: str = Header()) -> str:
        return x_request_id

    def connection_of(connection: HTTPConnection) -> int:
        return id(connection)

    async def through_fastapi(
        header: str = Depends(header_id),
        request: Request = TaskiqDepends(),
        connection: int = Depends(connection_of),
    ) -> tuple[str, int, int]:
        return header, id(request), connection

    def context_of(context: Context = TaskiqDepends()) -> str:
        return context.message.task_id

    @broker.task
    async def seen(
        request: Request,
        context: Context = TaskiqDepends(),
        _: None = TaskiqDepends(everyone_started),
        uncached: tuple[str, int] = TaskiqDepends(request_id, use_cache=False),
        fastapi: tuple[str, int, int] = TaskiqDepends(through_fastapi, use_cache=False),
        uncached_context: str = TaskiqDepends(context_of, use_cache=False),
    ) -> dict[str, Any]:
        return {
            "own": request.headers["x-request-id"],
            "uncached": uncached[0],
            "header": fastapi[0],
            "same request": {uncached[1], fastapi[1], fastapi[2]} == {id(request)},
            "context": uncached_context == context.message.task_id,
        }

    app = FastAPI(lifespan=taskiq_fastapi.broker_lifespan(broker))
    app.add_middleware(
        taskiq_fastapi.CarryRequestContext, broker=broker, headers=["x-request-id"]
    )

    @app.get("/kick")
    async def kick() -> Any:
        task = await seen.kiq()
        result = await task.wait_result(timeout=10)
        if result.is_err:
            raise result.error
        return result.return_value

    async with serving(app) as client:
        responses = await asyncio.gather(
            *(client.get("/kick", headers={"X-Request-ID": f"r{i}"}) for i in range(N))
        )
    results = [response.json() for response in responses]
    expected = [
        {
            "own": f"r{i}",
            "uncached": f"r{i}",
            "header": f"r{i}",
            "same request": True,
            "context": True,
        }
        for i in range(N)
    ]
    assert results == expected


def carrying_app(broker: InMemoryBroker) -> FastAPI:
    app = FastAPI(lifespan=taskiq_fastapi.broker_lifespan(broker))
    app.add_middleware(
        taskiq_fastapi.CarryRequestContext, broker=broker, headers=["x-request-id"]
    )
    return app


async def test_a_task_adding_to_the_dependency_context_keeps_its_own_request() -> None:
    """taskiq's `broker.add_dependency_context` in a task, while others run."""
    broker = InMemoryBroker(max_async_tasks=100, max_stored_results=100)
    arrived = 0
    all_arrived = asyncio.Event()

    class Resource: ...

    async def register_lazily() -> None:
        nonlocal arrived
        arrived += 1
        if arrived == 20:
            all_arrived.set()
        await all_arrived.wait()  # every task has announced its Context
        broker.add_dependency_context({Resource: Resource()})

    def later(request: Request, context: Context = TaskiqDepends()) -> Any:
        return request.headers["x-request-id"], context.message.task_id

    @broker.task
    async def job(
        request: Request,
        context: Context = TaskiqDepends(),
        _: None = TaskiqDepends(register_lazily),
        seen: Any = TaskiqDepends(later, use_cache=False),
    ) -> Any:
        own = (request.headers["x-request-id"], context.message.task_id)
        return list(seen) == list(own)

    app = carrying_app(broker)

    @app.get("/kick")
    async def kick() -> Any:
        return (await (await job.kiq()).wait_result(timeout=10)).return_value

    async with serving(app) as client:
        responses = await asyncio.gather(
            *(client.get("/kick", headers={"X-Request-ID": f"r{i}"}) for i in range(20))
        )
    assert [response.json() for response in responses] == [True] * 20


async def test_tasks_run_in_place_leave_the_kicking_requests_context() -> None:
    """`InMemoryBroker(await_inplace=True)`: each kick of the request carries it."""
    broker = InMemoryBroker(await_inplace=True)

    @broker.task
    async def seen(request: Request) -> Any:
        return request.headers.get("x-request-id")

    app = carrying_app(broker)

    @app.get("/kick")
    async def kick() -> Any:
        first = await (await seen.kiq()).wait_result()
        second = await (await seen.kiq()).wait_result()
        return [first.return_value, second.return_value]

    async with serving(app) as client:
        response = await client.get("/kick", headers={"X-Request-ID": "abc"})
    assert response.json() == ["abc", "abc"]
