"""An API that carries request context to its tasks (issue 11).

Served by a real uvicorn and a real worker in tests/test_request_context.py.
"""

import asyncio
import os
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Query, Request
from taskiq import TaskiqDepends

import taskiq_fastapi
from workerapp.app import lifespan
from workerapp.broker import broker


def listing(
    page: Annotated[int, Query()] = 1,
    x_request_id: Annotated[str | None, Header()] = None,
) -> dict[str, Any]:
    return {"page": page, "request_id": x_request_id}


@broker.task
async def report(
    shown: Annotated[dict[str, Any], Depends(listing)], request: Request
) -> dict[str, Any]:
    return {
        **shown,
        "url": str(request.url),
        "path_params": request.path_params,
        "headers": sorted(request.headers),
        "pid": os.getpid(),
    }


@broker.task
async def relay() -> Any:
    """Kicks `report` from inside the worker: it passes its context on."""
    task = await report.kiq()
    return (await task.wait_result(timeout=30)).return_value


async def request_id(request: Request) -> str | None:
    await asyncio.sleep(0.01)
    return request.headers.get("x-request-id")


def header_id(x_request_id: Annotated[str | None, Header()] = None) -> str | None:
    return x_request_id


async def through_fastapi(seen: str | None = Depends(header_id)) -> str | None:
    await asyncio.sleep(0.01)
    return seen


@broker.task
async def whose(
    request: Request,
    uncached: str | None = TaskiqDepends(request_id, use_cache=False),
    header: str | None = TaskiqDepends(through_fastapi, use_cache=False),
) -> dict[str, Any]:
    """Whose request each way of reading it saw (issue 17's reproducer)."""
    await asyncio.sleep(0.01)
    return {
        "own": request.headers.get("x-request-id"),
        "uncached": uncached,
        "header": header,
    }


_outliving: set[asyncio.Task[None]] = set()
_seen_later: list[Any] = []


@broker.task
async def outlived() -> None:
    """Starts code that outlives the task: once it is over, that kicks `report`."""

    async def after_the_task() -> None:
        await asyncio.sleep(0.3)  # `outlived` returned meanwhile
        task = await report.kiq()
        _seen_later.append((await task.wait_result(timeout=30)).return_value)

    _outliving.add(asyncio.create_task(after_the_task()))


@broker.task
async def seen_later() -> Any:
    """What the `report` kicked by `outlived`'s code saw (same process)."""
    while not _seen_later:
        await asyncio.sleep(0.02)
    return _seen_later.pop()


app = FastAPI(lifespan=taskiq_fastapi.broker_lifespan(broker, lifespan))
app.add_middleware(
    taskiq_fastapi.CarryRequestContext,
    broker=broker,
    headers=["X-Request-ID"],
    pass_on=True,
)


@app.get("/shops/{shop_id}/{name}")
async def kick(shop_id: int, name: str) -> dict[str, Any]:
    tasks = {"report": report, "relay": relay, "whose": whose}
    tasks.update({"outlived": outlived, "seen_later": seen_later})
    task = await tasks[name].kiq()
    result = await task.wait_result(timeout=30)
    return {"task": result.return_value, "error": str(result.error or "")}
