"""The same task twice: with a FastAPI Request and with taskiq's own Context."""

import asyncio
import time

from fastapi import Request
from taskiq import Context, TaskiqDepends

from benchmarks.workerbench.broker import broker


@broker.task
async def stamp() -> float:
    """A checkpoint of a drain, on the worker's clock."""
    return time.time()


@broker.task
async def with_request(request: Request = TaskiqDepends()) -> None:
    assert request.state.db


@broker.task
async def with_context(context: Context = TaskiqDepends()) -> None:
    assert context.message


@broker.task
async def pause(seconds: float) -> None:
    """In flight while a stop is timed: it wakes an idle worker's event loop."""
    await asyncio.sleep(seconds)
