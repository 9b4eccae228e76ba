"""Graceful shutdown of a worker process, whatever state its fetch is in.

Two upstream behaviours kept a worker from stopping on SIGTERM:

- taskiq installs its signal handlers with `signal.signal`, which does not
  wake an event loop asleep in `select()` with no timer due: a worker idle on
  a blocking fetch ignored the signal until a message arrived. The same
  handlers are re-registered with `loop.add_signal_handler`, which wakes it.
- On shutdown taskiq cancels the broker's pending fetch and waits for it.
  A cancellation that lands as redis-py 8's read timeout expires is
  swallowed, and taskiq-redis's idle stream fetch loop then never returns
  (plain `taskiq worker` hangs there: it only wakes up on that timeout).
  Waking on the signal makes that race rare; for the rest, a fetch still
  running after a grace period is cancelled again, until it ends.

Both cost nothing per task: the fetch is only remembered, not wrapped in a
task of its own.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

from taskiq import AsyncBroker, TaskiqEvents, TaskiqState

logger = logging.getLogger("taskiq_fastapi")

FETCH_GRACE_SECONDS = 2.0
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class ShutdownGuard:
    """Installed on the broker of every worker process."""

    def __init__(
        self, broker: AsyncBroker, on_signal: Callable[[], None] = lambda: None
    ) -> None:
        self.fetching: asyncio.Task[Any] | None = None
        self.watchdog: asyncio.Task[None] | None = None
        self.installed = False
        self.notify = on_signal
        listen: Callable[[], AsyncIterator[Any]] = broker.listen

        async def remembered_listen() -> AsyncGenerator[Any, None]:
            source = listen()
            try:
                while True:
                    self.fetching = asyncio.current_task()
                    try:
                        message = await anext(source)
                    except StopAsyncIteration:
                        return
                    finally:
                        self.fetching = None
                    yield message
            finally:
                await source.aclose()  # type: ignore[attr-defined]

        broker.listen = remembered_listen  # type: ignore[method-assign]
        broker.add_event_handler(TaskiqEvents.WORKER_STARTUP, self.on_startup)

    def on_startup(self, _state: TaskiqState) -> None:
        """Deliver taskiq's own signal handlers through the event loop.

        Once: a startup retried after a broker outage runs this again, when
        `signal.getsignal` would return the event loop's own handler.
        """
        if self.installed:
            return
        self.installed = True
        loop = asyncio.get_running_loop()
        for signum in SIGNALS:
            handler = signal.getsignal(signum)
            if callable(handler):
                loop.add_signal_handler(signum, self.on_signal, handler, signum)

    def on_signal(self, handler: Callable[[int, Any], Any], signum: int) -> None:
        """Run taskiq's handler, then watch that the pending fetch ends."""
        if self.watchdog is None:
            self.watchdog = asyncio.get_running_loop().create_task(self.unstick())
        self.notify()
        handler(signum, None)

    async def unstick(self) -> None:
        """Cancel a fetch that outlives the grace period again, until it ends."""
        await asyncio.sleep(FETCH_GRACE_SECONDS)
        while self.fetching is not None and not self.fetching.done():
            logger.warning("The broker's fetch ignored cancellation; cancelling again.")
            self.fetching.cancel()
            await asyncio.sleep(FETCH_GRACE_SECONDS / 4)
