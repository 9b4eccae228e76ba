import asyncio
import os

from fastapi import Request
from taskiq import TaskiqDepends

from workerapp.app import record
from workerapp.broker import broker


def database(request: Request = TaskiqDepends()) -> str:
    return str(request.state.db)


@broker.task
async def whoami(
    n: int = 0,
    request: Request = TaskiqDepends(),
    db: str = TaskiqDepends(database),
) -> dict[str, object]:
    return {
        "n": n,
        "pid": os.getpid(),
        "db": db,
        "link": str(request.url_for("item", item_id=n)),
    }


@broker.task
async def slow(n: int, seconds: float, request: Request = TaskiqDepends()) -> int:
    record(f"task {n} started")
    await asyncio.sleep(seconds)
    record(f"task {n} done")
    return n
