"""The API process side: start the broker with the app, in one line."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from typing import Any

from fastapi import FastAPI
from taskiq import AsyncBroker, InMemoryBroker

from taskiq_fastapi.integration import populate_dependency_context

Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[Mapping[str, Any] | None]]


def broker_lifespan(broker: AsyncBroker, lifespan: Lifespan | None = None) -> Lifespan:
    """Wrap the app's lifespan so the broker starts after it and stops before it.

    `FastAPI(lifespan=broker_lifespan(broker, lifespan))` replaces the
    `on_event` recipe. Tasks executed in this process (InMemoryBroker, tests)
    receive a Request carrying the app's live lifespan state. In a worker,
    where the integration runs this same lifespan, it only runs `lifespan`.
    """

    @asynccontextmanager
    async def run(app: FastAPI) -> AsyncIterator[Mapping[str, Any] | None]:
        inner = lifespan(app) if lifespan is not None else nullcontext()
        async with inner as state:
            if broker.is_worker_process:
                yield state
                return
            populate_dependency_context(broker, app, state)
            await broker.startup()
            try:
                yield state
            finally:
                if isinstance(broker, InMemoryBroker):
                    await broker.wait_all()  # let in-process tasks finish first
                await broker.shutdown()

    return run
