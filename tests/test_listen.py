"""The worker's fetch wrapper: shutdown cannot be held up by a stuck fetch."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator
from typing import Any

import pytest

from taskiq_fastapi_cli import listen as listen_module

pytestmark = pytest.mark.anyio


class StubBroker:
    def __init__(self, listen: Any) -> None:
        self.listen = listen


released = asyncio.Event()
stuck: list[asyncio.Task[Any]] = []


async def ignores_cancellation() -> AsyncGenerator[bytes, None]:
    """Like the stream broker whose cancelled read is swallowed by redis-py."""
    task = asyncio.current_task()
    assert task is not None
    stuck.append(task)
    while True:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            if released.is_set():  # only so that the test can clean up
                raise
    yield b""  # pragma: no cover


async def delivers_while_stopping() -> AsyncGenerator[bytes, None]:
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.sleep(3600)
    yield b"fetched as the worker stopped"


async def cancel_pending_fetch(broker: StubBroker) -> tuple[str, object]:
    fetch = asyncio.ensure_future(anext(broker.listen()))
    await asyncio.sleep(0.05)
    fetch.cancel()
    await asyncio.wait({fetch}, timeout=3)
    if not fetch.done():
        return "hung", None
    if fetch.cancelled():
        return "cancelled", None
    return "returned", fetch.result()


async def test_a_fetch_that_ignores_cancellation_is_left_behind(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(listen_module, "FETCH_GRACE_SECONDS", 0.2)
    unwrapped = StubBroker(ignores_cancellation)
    assert await cancel_pending_fetch(unwrapped) == ("hung", None)  # the problem
    wrapped = StubBroker(ignores_cancellation)
    listen_module.make_fetch_interruptible(wrapped)  # type: ignore[arg-type]
    assert await cancel_pending_fetch(wrapped) == ("cancelled", None)
    released.set()
    for task in stuck:
        task.cancel()  # the stub fetches left behind, so the loop can close
    await asyncio.wait(stuck)


async def test_a_message_fetched_while_stopping_is_handed_over() -> None:
    broker = StubBroker(delivers_while_stopping)
    listen_module.make_fetch_interruptible(broker)  # type: ignore[arg-type]
    assert await cancel_pending_fetch(broker) == (
        "returned",
        b"fetched as the worker stopped",
    )


async def test_messages_pass_through_in_order() -> None:
    async def three() -> AsyncGenerator[int, None]:
        for n in range(3):
            yield n

    broker = StubBroker(three)
    listen_module.make_fetch_interruptible(broker)  # type: ignore[arg-type]
    assert [m async for m in broker.listen()] == [0, 1, 2]
