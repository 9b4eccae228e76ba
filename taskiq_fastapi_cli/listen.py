"""A broker fetch that shutdown can always interrupt.

On shutdown taskiq's receiver cancels the broker's pending fetch and waits
for it. With taskiq-redis's stream broker on redis-py 8 that cancellation is
sometimes swallowed inside redis-py's read timeout, and the idle fetch loop
never returns: the worker hangs after its last task and never runs the app's
lifespan shutdown (plain `taskiq worker` hangs the same way). This wrapper
runs each fetch as its own task, so a cancelled fetch is given a bounded
grace period to finish (a message it still delivers is handed over, as
taskiq expects) and is then left behind instead of hanging the worker.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

from taskiq import AsyncBroker

logger = logging.getLogger("taskiq_fastapi")

FETCH_GRACE_SECONDS = 2.0


def make_fetch_interruptible(broker: AsyncBroker) -> None:
    """Wrap `broker.listen` in the worker process."""
    listen: Callable[[], AsyncIterator[Any]] = broker.listen

    async def interruptible_listen() -> AsyncGenerator[Any, None]:
        source = listen()
        fetch: asyncio.Future[Any] | None = None
        try:
            while True:
                fetch = asyncio.ensure_future(anext(source))
                try:
                    message = await asyncio.shield(fetch)
                except asyncio.CancelledError:
                    fetch.cancel()
                    await asyncio.wait({fetch}, timeout=FETCH_GRACE_SECONDS)
                    if not fetch.done():
                        logger.warning(
                            "The broker's fetch ignored cancellation for %.0f s; "
                            "leaving it behind so the worker can shut down.",
                            FETCH_GRACE_SECONDS,
                        )
                        raise
                    if fetch.cancelled() or fetch.exception() is not None:
                        raise
                    message = fetch.result()  # fetched as we stopped: hand it over
                except StopAsyncIteration:
                    return
                yield message
        finally:
            if fetch is None or fetch.done():
                await source.aclose()  # type: ignore[attr-defined]

    broker.listen = interruptible_listen  # type: ignore[method-assign]
