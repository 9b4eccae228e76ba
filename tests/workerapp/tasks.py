import asyncio
import contextlib
import gc
import os
from pathlib import Path

from fastapi import Request
from taskiq import TaskiqDepends

from workerapp import app
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
async def event_loop() -> str:
    """The module of the event loop this task runs on: asyncio or uvloop."""
    return type(asyncio.get_running_loop()).__module__.partition(".")[0]


@broker.task
async def collector() -> dict[str, object]:
    """How this worker process collects garbage."""
    return {
        "pid": os.getpid(),
        "enabled": gc.isenabled(),
        "frozen": gc.get_freeze_count(),
        "threshold": gc.get_threshold()[0],
        "thresholds": list(gc.get_threshold()),
        "helper_collections": app.helper_collections,
    }


@broker.task
async def slow(n: int, seconds: float, request: Request = TaskiqDepends()) -> int:
    record(f"task {n} started")
    await asyncio.sleep(seconds)
    record(f"task {n} done")
    return n


@broker.task
async def slow_first_time(n: int) -> int:
    """Takes an hour the first time it runs, no time when it runs again."""
    again = f"task {n} started" in Path(os.environ["EVENTS_FILE"]).read_text()
    record(f"task {n} started")
    if not again:
        await asyncio.sleep(3600)
    record(f"task {n} done")
    return n


@broker.task
async def mark(n: int) -> int:
    record(f"ran {n}")
    return n


_in_flight = 0
_all_started: asyncio.Event | None = None


@broker.task
async def isolated(
    n: int, together: int, request: Request = TaskiqDepends()
) -> list[object]:
    """Owns request.state until `together` tasks are in flight (or 10 s pass)."""
    global _in_flight, _all_started
    if _all_started is None:
        _all_started = asyncio.Event()
    _in_flight += 1
    if _in_flight >= together:
        _all_started.set()
    before = getattr(request.state, "owner", None)
    request.state.owner = n
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(_all_started.wait(), 10)
    peak = _in_flight
    await asyncio.sleep(0)  # every other task sees the same peak
    _in_flight -= 1
    return [before, request.state.owner, peak]


@broker.task
async def receipt(n: int, session: Session) -> dict[str, object]:
    """The route's chain, as the route declares it."""
    return {"n": n, "session": session, "pid": os.getpid()}


@broker.task
async def held(n: int) -> int:
    """Runs until the test creates its release file (`<EVENTS_FILE>.release-n`)."""
    release = Path(f"{os.environ['EVENTS_FILE']}.release-{n}")
    record(f"task {n} started")
    while not release.exists():
        await asyncio.sleep(0.05)
    record(f"task {n} done")
    return n
