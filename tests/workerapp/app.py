"""The app the subprocess tests' workers run; it logs lifespan events per process."""

import gc
import multiprocessing
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from multiprocessing.connection import Connection
from typing import Any

import anyio
from fastapi import FastAPI

# A project's own garbage collection settings, made as it is imported:
# thresholds given outright ("0" stops automatic collection, as gc documents),
# or the oldest generation's changed from the thresholds it reads.
if os.environ.get("APP_GC_THRESHOLD"):
    gc.set_threshold(*map(int, os.environ["APP_GC_THRESHOLD"].split(",")))
if os.environ.get("APP_GC_OLDEST"):
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, int(os.environ["APP_GC_OLDEST"]))
if os.environ.get("APP_GC_DISABLE"):
    gc.disable()


def collections_made(report: Connection) -> None:
    """How many automatic collections a process makes over some cyclic garbage."""
    phases: list[str] = []
    gc.callbacks.append(lambda phase, _info: phases.append(phase))
    for _ in range(20_000):
        cycle: list[object] = []
        cycle.append(cycle)
    report.send(phases.count("start"))


# A process the project forks as it is imported (a multiprocessing Manager's
# server, a metrics pusher) runs as long as the command: it must collect.
helper_collections = None
if os.environ.get("APP_GC_HELPER"):
    fork = multiprocessing.get_context("fork")
    receive, send = fork.Pipe(duplex=False)
    helper = fork.Process(target=collections_made, args=(send,))
    helper.start()
    helper_collections = receive.recv()
    helper.join()


def record(event: str) -> None:
    """Append `<pid> <event>` to EVENTS_FILE (one write, so lines never mix)."""
    line = f"{os.getpid()} {event}\n".encode()
    fd = os.open(os.environ["EVENTS_FILE"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
    async with anyio.create_task_group() as group:
        group.start_soon(anyio.sleep_forever)
        record("startup")
        yield {"db": f"db-of-{os.getpid()}"}
        record("shutdown")
        group.cancel_scope.cancel()


def create_app() -> FastAPI:
    application = FastAPI(lifespan=lifespan)

    @application.get("/items/{item_id}", name="item")
    async def item(item_id: int) -> int:
        return item_id

    from workerapp.dependencies import Session, Settings, get_settings

    @application.get("/receipt/{n}")
    async def receipt(n: int, session: Session) -> dict[str, object]:
        return {"n": n, "session": session, "pid": os.getpid()}

    # One override, seen by the route above and by the task of the same chain.
    application.dependency_overrides[get_settings] = lambda: Settings("overridden")
    return application


app = create_app()


@asynccontextmanager
async def broken_lifespan(app: FastAPI) -> AsyncIterator[None]:
    record("startup attempt")
    raise RuntimeError("cannot reach the database")
    yield


failing_app = FastAPI(lifespan=broken_lifespan)
