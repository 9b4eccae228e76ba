"""The worker's shutdown guard, in process (the real command is in test_cli_worker)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncGenerator
from typing import Any

import pytest
from taskiq import AckableMessage, InMemoryBroker
from taskiq.utils import maybe_awaitable

from taskiq_fastapi_cli.runtime import shutdown
from taskiq_fastapi_cli.runtime.shutdown import ShutdownGuard

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
    guard.on_signal()  # a stop signal, through the loop
    await asyncio.wait({fetch}, timeout=5)
    assert fetch.cancelled()


async def test_the_fetch_cancelled_again_is_the_one_waiting_now(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """taskiq runs each fetch in a task of its own: the one cancelled again
    is the fetch waiting at the stop, not the first one."""
    monkeypatch.setattr(shutdown, "FETCH_GRACE_SECONDS", 0.2)

    async def one_then_swallowing() -> AsyncGenerator[bytes, None]:
        yield b"first"
        async for message in swallows_first_cancellation():
            yield message

    broker = InMemoryBroker()
    broker.listen = one_then_swallowing  # type: ignore[method-assign]
    guard = ShutdownGuard(broker)
    source = broker.listen()
    assert await asyncio.create_task(anext(source)) == b"first"
    fetch = asyncio.create_task(anext(source))
    await asyncio.sleep(0.05)
    fetch.cancel()  # what taskiq's receiver does on shutdown
    await asyncio.sleep(0.3)
    assert not fetch.done()
    guard.on_signal()
    await asyncio.wait({fetch}, timeout=5)
    assert fetch.cancelled()


async def test_messages_pass_through_and_the_fetch_is_forgotten() -> None:
    async def three() -> AsyncGenerator[int, None]:
        for n in range(3):
            yield n

    broker = InMemoryBroker()
    broker.listen = three  # type: ignore[method-assign]
    guard = ShutdownGuard(broker)
    assert [m async for m in broker.listen()] == [0, 1, 2]
    assert guard.fetching is None


@pytest.mark.parametrize(
    "taskiq_installed", ["signal.signal", "loop.add_signal_handler"]
)
async def test_a_stop_signal_sets_the_receivers_finish_event(
    taskiq_installed: str,
) -> None:
    # However taskiq installed its own handler (signal.signal today; the
    # event loop's, as a fix of its idle-SIGTERM problem would), ours
    # replaces it and stops the receiver.
    loop = asyncio.get_running_loop()
    taskiq_saw: list[int] = []
    previous = signal.getsignal(signal.SIGHUP)
    if taskiq_installed == "signal.signal":
        signal.signal(signal.SIGHUP, lambda signum, _: taskiq_saw.append(signum))
    else:
        loop.add_signal_handler(signal.SIGHUP, taskiq_saw.append, signal.SIGHUP)
    try:
        guard = ShutdownGuard(InMemoryBroker())
        finish = asyncio.Event()
        guard.start(finish)  # as the receiver starts listening
        os.kill(os.getpid(), signal.SIGHUP)
        await asyncio.wait_for(finish.wait(), 5)
        assert guard.stopping
    finally:
        for signum in shutdown.SIGNALS:
            loop.remove_signal_handler(signum)
        signal.signal(signal.SIGHUP, previous)


async def test_stop_now_cancels_in_flight_tasks_without_result_or_ack() -> None:
    broker = InMemoryBroker()
    saved: list[str] = []

    async def set_result(task_id: str, result: Any) -> None:
        saved.append(task_id)

    broker.result_backend.set_result = set_result  # type: ignore[method-assign]
    stage = shutdown.StopStage()
    guard = ShutdownGuard(broker, stage)
    guard.finish = asyncio.Event()
    acked: list[str] = []
    started = asyncio.Event()

    async def callback(message: AckableMessage, _raise_err: bool) -> None:
        # What taskiq's receiver does: run the task, catching what it raises
        # (CancelledError included), then save the result and acknowledge.
        started.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(3600)
        await broker.result_backend.set_result("t1", None)
        await maybe_awaitable(message.ack())

    message = AckableMessage(data=b"x", ack=lambda: acked.append("sync ack"))
    running = asyncio.create_task(guard.run(callback, message, False))
    await started.wait()
    guard.on_signal()  # the first signal: graceful, nothing cancelled
    await asyncio.sleep(0.05)
    assert not running.done()
    stage.reach(shutdown.NOW)
    guard.on_signal()
    await asyncio.wait_for(running, 5)
    assert (saved, acked) == ([], [])
    assert not guard.clean


async def test_a_finished_task_saves_and_acks_even_with_a_sync_ack() -> None:
    broker = InMemoryBroker()
    guard = ShutdownGuard(broker)
    acked: list[str] = []

    async def callback(message: AckableMessage, _raise_err: bool) -> None:
        await maybe_awaitable(message.ack())

    message = AckableMessage(data=b"x", ack=lambda: acked.append("sync ack"))
    await asyncio.create_task(guard.run(callback, message, False))
    assert acked == ["sync ack"]


async def test_after_stop_now_a_prefetched_task_is_neither_run_nor_acked() -> None:
    stage = shutdown.StopStage()
    guard = ShutdownGuard(InMemoryBroker(), stage)
    stage.reach(shutdown.NOW)
    guard.on_signal()
    ran: list[str] = []

    async def callback(message: AckableMessage, _raise_err: bool) -> None:
        ran.append("ran")

    message = AckableMessage(data=b"x", ack=lambda: ran.append("acked"))
    await asyncio.create_task(guard.run(callback, message, False))
    assert ran == []
    assert not guard.clean


async def test_the_main_process_gone_during_a_stop_now_does_not_say_tasks_finish(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The main process killed outright after a second signal (supervisord
    without killasgroup: TERM, TERM, then KILL to the main process only):
    the worker, whose tasks were cancelled, said "running tasks finish
    first"."""
    stage = shutdown.StopStage()
    guard = ShutdownGuard(InMemoryBroker(), stage)
    guard.finish = asyncio.Event()
    guard.parent_gone(1)
    stage.reach(shutdown.GRACEFUL)
    guard.on_signal()
    guard.parent_gone(2)
    stage.reach(shutdown.NOW)
    guard.on_signal()
    guard.parent_gone(3)
    said = [r.getMessage() for r in caplog.records if "is gone" in r.message]
    assert said == [
        "The main process (pid 1) is gone: stopping; running tasks finish first.",
        "The main process (pid 2) is gone: stopping, as before; running tasks "
        "finish first.",
        "The main process (pid 3) is gone: stopping now, as before; running tasks "
        "were cancelled.",
    ]
    assert guard.now
