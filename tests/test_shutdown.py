"""The worker's shutdown guard, in process (the real command is in test_cli_worker)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncGenerator
from typing import Any

import pytest
from taskiq import InMemoryBroker

from taskiq_fastapi_cli import shutdown
from taskiq_fastapi_cli.shutdown import ShutdownGuard

pytestmark = pytest.mark.anyio


async def swallows_first_cancellation() -> AsyncGenerator[bytes, None]:
    """Like the stream-broker fetch whose cancellation redis-py swallowed."""
    with contextlib.suppress(asyncio.CancelledError):  # swallowed
        await asyncio.sleep(3600)
    # ... and the fetch loop goes on.
    await asyncio.sleep(3600)
    yield b"never"


async def test_a_fetch_that_swallowed_its_cancellation_is_cancelled_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(shutdown, "FETCH_GRACE_SECONDS", 0.2)
    broker = InMemoryBroker()
    broker.listen = swallows_first_cancellation  # type: ignore[method-assign]
    guard = ShutdownGuard(broker)
    fetch = asyncio.ensure_future(anext(broker.listen()))
    await asyncio.sleep(0.05)
    fetch.cancel()  # what taskiq's receiver does on shutdown
    await asyncio.sleep(0.3)
    assert not fetch.done()  # without the guard, the worker waits for ever
    seen: list[int] = []
    guard.on_signal(lambda signum, _frame: seen.append(signum), signal.SIGTERM)
    await asyncio.wait({fetch}, timeout=5)
    assert fetch.cancelled()
    assert seen == [signal.SIGTERM]  # taskiq's own handler still ran


async def test_messages_pass_through_and_the_fetch_is_forgotten() -> None:
    async def three() -> AsyncGenerator[int, None]:
        for n in range(3):
            yield n

    broker = InMemoryBroker()
    broker.listen = three  # type: ignore[method-assign]
    guard = ShutdownGuard(broker)
    assert [m async for m in broker.listen()] == [0, 1, 2]
    assert guard.fetching is None


async def test_signals_reach_taskiq_handlers_through_the_loop() -> None:
    received: list[Any] = []
    previous = signal.signal(signal.SIGHUP, lambda *args: received.append(args))
    loop = asyncio.get_running_loop()
    try:
        broker = InMemoryBroker()
        broker.is_worker_process = True
        ShutdownGuard(broker)
        await broker.startup()  # runs on_startup: handlers now go through the loop
        os.kill(os.getpid(), signal.SIGHUP)
        for _ in range(100):
            if received:
                break
            await asyncio.sleep(0.01)
        assert received == [(signal.SIGHUP, None)]
    finally:
        for signum in shutdown.SIGNALS:
            loop.remove_signal_handler(signum)
        signal.signal(signal.SIGHUP, previous)
