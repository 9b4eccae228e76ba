"""Serving an app in process to many concurrent clients, for the isolation tests.

Requests go through the app's whole ASGI stack (its middleware included) with
httpx's ASGI transport; the lifespan runs as a server runs it, and each
request gets a shallow copy of the lifespan state, as uvicorn gives it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx2
from fastapi import FastAPI
from starlette.types import Receive, Scope, Send


@asynccontextmanager
async def serving(app: FastAPI) -> AsyncIterator[httpx2.AsyncClient]:
    """A client for `app`, with its lifespan running around it."""
    async with app.router.lifespan_context(app) as state:
        lifespan_state: dict[str, Any] = dict(state or {})

        async def with_state(scope: Scope, receive: Receive, send: Send) -> None:
            scope["state"] = lifespan_state.copy()
            await app(scope, receive, send)

        transport = httpx2.ASGITransport(app=with_state, raise_app_exceptions=False)
        async with httpx2.AsyncClient(
            transport=transport, base_url="http://testserver", timeout=30
        ) as client:
            yield client
