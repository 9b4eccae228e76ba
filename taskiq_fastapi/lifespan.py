"""Run an ASGI app's lifespan the way uvicorn does, in ONE asyncio task.

The app call lives in a single task from startup to shutdown, so task groups
and cancel scopes opened by the lifespan are exited in the task that entered
them, whichever tasks drive startup and shutdown.
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.types import ASGIApp, Message

# Starlette sends `*.failed` and raises right after; this bounds the wait for
# that exception (the real cause) from an app that sends it and keeps running.
_FAILURE_GRACE_SECONDS = 1.0


class LifespanFailedError(Exception):
    """The lifespan reported failure; the message is the cause."""


def _cause(task: asyncio.Task[None], reported: str | None) -> str:
    if task.done() and not task.cancelled() and task.exception() is not None:
        exc = task.exception()
        return f"{type(exc).__name__}: {exc}"
    if reported:
        return reported.strip().splitlines()[-1]
    return "the app's lifespan ended without reporting why"


class AppLifespan:
    """Startup and shutdown of one app through the ASGI lifespan protocol."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        # Filled by Starlette with what the lifespan yields, as under uvicorn.
        self.state: dict[str, Any] = {}
        self._task: asyncio.Task[None] | None = None

    async def startup(self) -> None:
        """Start the app; raise LifespanFailedError with the cause if it fails."""
        loop = asyncio.get_running_loop()
        self._inbox: asyncio.Queue[Message] = asyncio.Queue()
        self._startup: asyncio.Future[str | None] = loop.create_future()
        self._shutdown: asyncio.Future[str | None] = loop.create_future()
        self._task = asyncio.create_task(self._run(), name="fastapi-lifespan")
        self._inbox.put_nowait({"type": "lifespan.startup"})
        either: set[asyncio.Future[Any]] = {self._startup, self._task}
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        if self._startup.done() and self._startup.result() is None:
            return
        reported = self._startup.result() if self._startup.done() else None
        await self._finish()
        raise LifespanFailedError(_cause(self._task, reported))

    async def shutdown(self) -> None:
        """Stop the app and wait for its whole lifespan to end."""
        if self._task is None or self._task.done():
            return
        self._inbox.put_nowait({"type": "lifespan.shutdown"})
        try:
            await asyncio.wait({self._task})
        except asyncio.CancelledError:
            self._task.cancel()
            raise
        reported = self._shutdown.result() if self._shutdown.done() else None
        if reported is not None or (
            not self._task.cancelled() and self._task.exception() is not None
        ):
            raise LifespanFailedError(_cause(self._task, reported))

    async def _run(self) -> None:
        scope = {
            "type": "lifespan",
            "asgi": {"version": "3.0", "spec_version": "2.0"},
            "state": self.state,
        }
        await self.app(scope, self._receive, self._send)

    async def _receive(self) -> Message:
        return await self._inbox.get()

    async def _send(self, message: Message) -> None:
        kind = message["type"]
        future = (
            self._startup if kind.startswith("lifespan.startup") else self._shutdown
        )
        if not future.done():
            failed = kind.endswith(".failed")
            future.set_result((message.get("message") or "failed") if failed else None)

    async def _finish(self) -> None:
        assert self._task is not None
        await asyncio.wait({self._task}, timeout=_FAILURE_GRACE_SECONDS)
        if not self._task.done():
            self._task.cancel()
            await asyncio.wait({self._task})
