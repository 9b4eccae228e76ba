import asyncio
import os

from fastapi import Request
from taskiq import TaskiqDepends

from workerapp.app import record
from workerapp.broker import broker
from workerapp.dependencies import Session


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


@broker.task
async def mark(n: int) -> int:
    record(f"ran {n}")
    return n


_in_flight = 0


@broker.task
async def isolated(n: int, request: Request = TaskiqDepends()) -> list[object]:
    """Owns request.state for a while, with hundreds of others in flight."""
    global _in_flight
    _in_flight += 1
    before = getattr(request.state, "owner", None)
    request.state.owner = n
    await asyncio.sleep(0.5)
    peak = _in_flight
    _in_flight -= 1
    return [before, request.state.owner, peak]


@broker.task
async def receipt(n: int, session: Session) -> dict[str, object]:
    """The route's chain, as the route declares it."""
    return {"n": n, "session": session, "pid": os.getpid()}
