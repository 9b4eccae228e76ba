import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from tplproj.tkq import broker


def record(event: str) -> None:
    """Log an event per process for the tests that run this project's workers."""
    path = os.environ.get("EVENTS_FILE")
    if path:
        with open(path, "a") as events:
            events.write(f"{os.getpid()} {event}\n")


@asynccontextmanager
async def lifespan_setup(app: FastAPI) -> AsyncIterator[None]:
    app.state.greeting = "hello"
    if not broker.is_worker_process:
        await broker.startup()
    record("startup")
    yield
    if not broker.is_worker_process:
        await broker.shutdown()
    record("shutdown")


def get_app() -> FastAPI:
    # Template factories configure logging, Sentry and the like here.
    record("factory called")
    app = FastAPI(lifespan=lifespan_setup)

    @app.get("/health", name="health")
    async def health() -> str:
        return "ok"

    return app
