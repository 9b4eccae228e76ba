"""A list broker's fetch cut off by its socket timeout lost the message it popped.

taskiq-redis' `ListQueueBroker` at redis-py's defaults (a 5 s socket
timeout): a server that stops answering for longer (frozen with SIGSTOP, as
an overloaded or paused host) timed the BRPOP out, redis-py closed its
connection, and once the server answered again it ran that BRPOP, popping a
message for a connection that was gone: one task per worker process never
ran, with no log line (2 of 4000 in each run, two processes).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis
from workers import APP, BROKER, WorkerRun

from tools.redis_server import RedisServer, running_server

pytestmark = pytest.mark.anyio

TASKS = 2000


@pytest.fixture
def server() -> Iterator[RedisServer]:
    with running_server(persistent=True) as redis:
        yield redis


async def test_a_server_frozen_mid_fetch_longer_than_the_socket_timeout_loses_no_task(
    server: RedisServer, tmp_path: Path
) -> None:
    run = WorkerRun(server.url, tmp_path)
    run.env["TASKIQ_TEST_REDIS_DEFAULTS"] = "1"  # redis-py's 5 s socket timeout
    try:
        await run.sender.startup()
        try:
            for n in range(TASKS):
                await run.kiq("slow", n, 1.0)
        finally:
            await run.sender.shutdown()
        # Every task slot free: each process fetches back to back, so a BRPOP
        # is on its way whenever the server freezes.
        worker = run.start(
            "worker", *BROKER, *APP, "--workers", "2",
            "--max-async-tasks", str(TASKS), "--broker-retry-timeout", "60",
        )  # fmt: skip
        run.wait_for("startup", processes=2)
        await asyncio.sleep(0.2)
        assert server.process is not None
        os.kill(server.process.pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(7)  # past the 5 s socket timeout
        finally:
            os.kill(server.process.pid, signal.SIGCONT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            async with Redis.from_url(server.url) as redis:
                left = await redis.llen(run.queue)
            started = Counter(
                event for _, event in run.events() if event.endswith(" started")
            )
            if not left and len(started) == TASKS:
                break
            await asyncio.sleep(0.5)
        assert run.stop(worker, timeout=60) == 0
    finally:
        run.kill_all()
    output = run.output(worker)
    assert left == 0, output
    missing = [n for n in range(TASKS) if f"task {n} started" not in started]
    assert missing == [], output
    assert max(started.values()) == 1, output
    assert "Traceback" not in output


async def test_a_fetch_cancelled_as_it_connects_ends_as_the_stop_cancels_it(
    redis_url: str,
) -> None:
    """The fetch has no socket timeout to end it: cancelled, it must end.

    On Python 3.11 redis-py's `get_connection` swallows a cancellation that
    lands while it connects (0 to 12 of 30 fetches cancelled 1 ms in, here):
    such a fetch goes on to its BRPOP, which a cancellation then ends. The
    stop cancels a fetch again every 0.5 s after 2 s until it ends
    (`shutdown.py`, `unstick`); so does this test.
    """
    from taskiq_redis import ListQueueBroker

    from taskiq_fastapi._brokers import fetch_without_client_timeout

    broker = ListQueueBroker(redis_url, queue_name=f"test-{time.monotonic_ns()}")
    fetch_without_client_timeout(broker, 60)
    await broker.startup()
    try:
        for _ in range(30):
            fetch = asyncio.ensure_future(anext(broker.listen()))
            await asyncio.sleep(0.001)
            done: set[Any] = set()
            for _ in range(10):
                fetch.cancel()
                done, _ = await asyncio.wait({fetch}, timeout=0.5)
                if done:
                    break
            assert done, "the fetch went on, cancelled again and again"
            assert fetch.cancelled()
    finally:
        await broker.shutdown()
