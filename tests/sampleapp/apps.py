"""FastAPI apps the tests load by import string, as users' workers do."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

# What the apps did, in order, for tests to assert on.
events: list[str] = []


class LifespanSpy:
    """Pure ASGI middleware: proves middleware takes part in the lifespan."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            events.append("middleware saw lifespan")
        await self.app(scope, receive, send)


@asynccontextmanager
async def task_group_lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
    # A task group held open for the whole lifespan: exiting it from another
    # asyncio task than the one that entered it raises.
    async with anyio.create_task_group() as group:
        ticker = anyio.Event()

        async def background() -> None:
            ticker.set()
            await anyio.sleep_forever()

        group.start_soon(background)
        await ticker.wait()
        app.state.pool = "pool-from-app-state"
        events.append("startup")
        yield {"db": "db-from-lifespan-state", "counter": [0]}
        events.append("shutdown")
        group.cancel_scope.cancel()


def build_app() -> FastAPI:
    application = FastAPI(lifespan=task_group_lifespan)
    application.add_middleware(LifespanSpy)

    @application.get("/items/{item_id}", name="item")
    async def item(item_id: int) -> dict[str, int]:
        return {"item_id": item_id}

    return application


app = build_app()


def create_app() -> FastAPI:
    events.append("factory called")
    return build_app()


@asynccontextmanager
async def broken_lifespan(app: FastAPI) -> AsyncIterator[None]:
    raise RuntimeError("database is down")
    yield  # pragma: no cover


failing_app = FastAPI(lifespan=broken_lifespan)

not_an_app = 42


def raising_factory() -> FastAPI:
    raise ValueError("missing setting")


def wrong_factory() -> dict[str, str]:
    return {"not": "an app"}


class Nested:
    app = app


async def plain_asgi_app(scope: Scope, receive: Receive, send: Send) -> None:
    """An ASGI app that is not FastAPI: not a factory either."""
