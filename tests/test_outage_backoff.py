"""Result saves that failed together are saved as soon as the backend is back.

The broker and the result backend each had one backoff, counted in
attempts of all their operations: 50 result saves failing during a 3 s
outage of the results' server took it to 30 s delays. Once the server was
back ("is back" logged), the saves still slept out their delays; a SIGTERM
then gave them up: 2 of 50 results saved, exit 0. Now each operation backs
off on its own attempts, all go on once one gets through, and a stop
signal does not drop them.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis
from workers import APP, BROKER, WorkerRun

from tools.redis_server import RedisServer, running_server

pytestmark = pytest.mark.anyio

TASKS = 50


@pytest.fixture
def results_server() -> Iterator[RedisServer]:
    with running_server(persistent=True) as redis:
        yield redis


async def running_tasks(
    run: WorkerRun, results: RedisServer, tasks: int, seconds: float
) -> tuple[Any, list[Any]]:
    """One worker process, results on `results`, `tasks` slow tasks all started."""
    run.env["TASKIQ_TEST_RESULTS_URL"] = results.url
    worker = run.start(
        "worker", *BROKER, *APP, "--workers", "1",
        "--max-async-tasks", str(tasks), "--broker-retry-timeout", "60",
    )  # fmt: skip
    run.wait_for("startup", processes=1)
    await run.sender.startup()
    try:
        sent = [await run.kiq("slow", n, seconds) for n in range(tasks)]
    finally:
        await run.sender.shutdown()
    run.wait_for(f"task {tasks - 1} started", processes=1)
    return worker, sent


async def saved_results(results: RedisServer, sent: list[Any]) -> int:
    """How many of the `sent` tasks have their result saved on `results`."""
    async with Redis.from_url(results.url) as redis:
        return sum([await redis.exists(task.task_id) for task in sent])


async def test_saves_that_failed_together_are_saved_once_the_backend_is_back(
    redis_url: str, results_server: RedisServer, tmp_path: Path
) -> None:
    run = WorkerRun(redis_url, tmp_path)
    try:
        worker, sent = await running_tasks(run, results_server, TASKS, 1.0)
        results_server.stop()  # the tasks finish during the outage
        await asyncio.sleep(3)
        results_server.start()
        await asyncio.sleep(5)  # back for 5 s: every save has had its chance
        code = run.stop(worker, timeout=60)
        saved = await saved_results(results_server, sent)
    finally:
        run.kill_all()
    output = run.output(worker)
    assert "is back after" in output, output
    assert (saved, code) == (TASKS, 0), output


async def test_a_stop_during_a_backend_outage_saves_the_results_once_it_is_back(
    redis_url: str, results_server: RedisServer, tmp_path: Path
) -> None:
    """SIGTERM while the results' server was down: the saves were dropped (4
    "Can't set result" lines) and the command exited 0 in 0.6 s, though the
    exit table says 0 means every in-flight task finished."""
    run = WorkerRun(redis_url, tmp_path)
    try:
        worker, sent = await running_tasks(run, results_server, 4, 1.0)
        results_server.stop()  # the tasks finish during the outage
        await asyncio.sleep(2)
        worker.send_signal(signal.SIGTERM)
        await asyncio.sleep(2)
        assert worker.poll() is None, run.output(worker)  # still saving
        results_server.start()
        code = run.exit_status(worker, timeout=60)
        saved = await saved_results(results_server, sent)
    finally:
        run.kill_all()
    output = run.output(worker)
    assert (saved, code) == (4, 0), output
    assert "Traceback" not in output
    assert run.count("shutdown") == run.count("startup")


async def test_a_second_signal_during_a_backend_outage_stops_now_with_exit_4(
    redis_url: str, results_server: RedisServer, tmp_path: Path
) -> None:
    run = WorkerRun(redis_url, tmp_path)
    try:
        worker, _ = await running_tasks(run, results_server, 1, 0.5)
        results_server.stop()
        await asyncio.sleep(2)
        worker.send_signal(signal.SIGTERM)
        await asyncio.sleep(1)
        worker.send_signal(signal.SIGTERM)
        code = run.exit_status(worker, timeout=30)
    finally:
        run.kill_all()
    output = run.output(worker)
    assert code == 4, output
    assert "Traceback" not in output
    assert run.count("shutdown") == run.count("startup")
