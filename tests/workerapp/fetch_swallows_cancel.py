"""A broker module whose fetches each swallow the first cancellation they get.

As redis-py's did, before Python 3.12, when a cancellation landed just as
its read finished: the fetch goes on waiting for the next message. Every
fetch here loses that race once, so whichever fetch is waiting when the
worker stops ignores the receiver's cancellation.
"""

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from workerapp.app import record
from workerapp.broker import broker

__all__ = ["broker"]

_listen = broker.listen


async def _first_cancel_swallowed(source: AsyncIterator[Any]) -> Any:
    fetching = asyncio.ensure_future(anext(source))
    swallowed = False
    while True:
        try:
            return await asyncio.shield(fetching)
        except asyncio.CancelledError:
            if swallowed:
                fetching.cancel()
                await asyncio.wait({fetching})
                raise
            swallowed = True
            record("fetch swallowed a cancellation")


async def _listen_swallowing() -> AsyncGenerator[Any, None]:
    source = _listen()
    try:
        while True:
            yield await _first_cancel_swallowed(source)
    finally:
        await source.aclose()  # type: ignore[attr-defined]


broker.listen = _listen_swallowing  # type: ignore[method-assign]
