"""Fetch no message a worker process will not run.

Upstream issue worked around here: before taskiq 0.12.5 the receiver asks
the broker for the next message as soon as it has one, before checking
`--max-tasks-per-child`. When a process reached the limit, the message that
fetch took off the broker (a Redis list pops it) was dropped with the
process: one task lost at every restart when tasks were queued. Later taskiq
checks first, and then never asks past the limit.

So with `--max-tasks-per-child N` the broker's `listen` hands out N messages
and then waits, without fetching, until the receiver cancels it as it stops.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

from taskiq import AsyncBroker


def fetch_at_most(broker: AsyncBroker, limit: int | None) -> None:
    """Make `broker.listen` stop fetching after `limit` messages (None: no limit)."""
    if not limit:
        return
    listen: Callable[[], AsyncIterator[Any]] = broker.listen

    async def listen_up_to_limit() -> AsyncGenerator[Any, None]:
        source = listen()
        try:
            for _ in range(limit):
                try:
                    message = await anext(source)
                except StopAsyncIteration:
                    return
                yield message
            await asyncio.get_running_loop().create_future()  # until cancelled
        finally:
            await source.aclose()  # type: ignore[attr-defined]

    broker.listen = listen_up_to_limit  # type: ignore[method-assign]
