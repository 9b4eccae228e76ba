"""End to end on the real server with real `taskiq-fastapi worker` processes (issue 4).

The spawn start method and a failing app startup are covered in
test_cli_worker.py (test_spawn_start_method, test_startup_failure_...).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest
from delivery import (
    each_task_runs_once_across_two_commands,
    killed_mid_task_is_redelivered_to_a_fresh_process,
    unreachable_broker_is_exit_3,
)
from redis.asyncio import Redis
from workers import APP, BROKER, WorkerRun

pytestmark = pytest.mark.anyio


async def test_two_commands_2000_tasks_each_run_exactly_once(run: WorkerRun) -> None:
    await each_task_runs_once_across_two_commands(run, tasks=2000)


def last_index(events: list[tuple[int, str]], pid: int, prefix: str) -> int:
    return max(
        i for i, (p, e) in enumerate(events) if p == pid and e.startswith(prefix)
    )


async def test_sigterm_with_50_slow_tasks_in_flight_loses_none(
    stream_run: WorkerRun,
) -> None:
    run = stream_run
    ack = ["--ack-type", "when_executed"]
    first = run.start("worker", *BROKER, *APP, "--workers", "2", *ack)
    run.wait_for("startup", processes=2)
    await run.sender.startup()
    try:
        tasks = await run.kiq_all("slow", [(n, 2.0) for n in range(50)])
        deadline = time.monotonic() + 30
        while (
            sum(
                e.startswith("task ") and e.endswith(" started")
                for _, e in run.events()
            )
            < 50
        ):
            assert time.monotonic() < deadline, run.events()
            await asyncio.sleep(0.05)
        assert run.stop(first, signal.SIGTERM) == 0
        # A later worker picks up anything that was not acknowledged.
        second = run.start("worker", *BROKER, *APP, "--workers", "1", *ack)
        run.wait_for("startup", processes=3)
        await run.kiq("mark", -1)  # the stream broker reclaims on its next fetch
        results = await asyncio.gather(*(t.wait_result(timeout=60) for t in tasks))
    finally:
        await run.sender.shutdown()
    assert [r.return_value for r in results] == list(range(50))
    assert run.stop(second) == 0
    events = run.events()
    done = {e for _, e in events if e.endswith(" done")}
    assert done == {f"task {n} done" for n in range(50)}
    for pid in run.count("startup"):
        shutdown = last_index(events, pid, "shutdown")
        if any(p == pid and e.startswith("task ") for p, e in events):
            assert shutdown > last_index(events, pid, "task "), (pid, events)
    assert set(run.count("shutdown").values()) == {1}


async def killed_in_its_fetch(
    pid: int, redis_url: str, besides: frozenset[str]
) -> None:
    """SIGKILL a stream worker while its fetch waits in XREADGROUP.

    taskiq-redis 1.1's stream broker claims idle messages under a lock that
    never expires unless given `unacknowledged_lock_timeout`, taken after
    each fetch, including each idle one (every 2 s): a process killed while
    it holds it stops every reclaim of that stream (the README says so), and
    the test waited 60 s for a redelivery that never came. It was killed
    0.5 s after its task started, a moment a busy machine can stretch past.
    Now it is stopped first (SIGSTOP), and killed only if its fetch is then
    blocked in XREADGROUP, where it holds no lock and sends nothing; else
    it goes on, and is stopped again a moment later. It is the only process
    fetching: a connection not among `besides` (those made before it
    started) blocked in XREADGROUP is its fetch's.
    """
    async with Redis.from_url(redis_url) as redis:
        for _ in range(600):
            os.kill(pid, signal.SIGSTOP)
            await stopped(pid)
            clients = await redis.client_list()
            if any(
                c["cmd"] == "xreadgroup"
                and "b" in c["flags"]
                and c["id"] not in besides
                for c in clients
            ):
                os.kill(pid, signal.SIGKILL)
                return
            os.kill(pid, signal.SIGCONT)
            await asyncio.sleep(0.05)
    raise AssertionError(f"never stopped in its fetch: {clients}")


async def stopped(pid: int) -> None:
    """Wait until SIGSTOP has stopped `pid` (it is delivered asynchronously)."""
    stat = Path(f"/proc/{pid}/stat")
    while stat.read_text().rpartition(")")[2].split()[0] != "T":
        await asyncio.sleep(0.005)


async def test_kill_9_mid_task_is_redelivered_to_a_fresh_process(
    stream_run: WorkerRun,
) -> None:
    async def reclaim() -> None:
        await asyncio.sleep(1.5)  # past the broker's idle_timeout for reclaiming
        await stream_run.kiq("mark", -1)  # the stream broker reclaims on its next fetch

    redis_url = stream_run.env["REDIS_URL"]
    async with Redis.from_url(redis_url) as redis:
        before = frozenset(c["id"] for c in await redis.client_list())

    async def kill(pid: int) -> None:
        await killed_in_its_fetch(pid, redis_url, before)

    await killed_mid_task_is_redelivered_to_a_fresh_process(stream_run, reclaim, kill)


async def test_500_concurrent_tasks_in_one_process_never_share_state(
    run: WorkerRun,
) -> None:
    worker = run.start(
        "worker", *BROKER, *APP, "--workers", "1", "--max-async-tasks", "500"
    )
    run.wait_for("startup", processes=1)
    await run.sender.startup()
    try:
        tasks = await run.kiq_all("isolated", [(n, 500) for n in range(500)])
        results = await asyncio.gather(*(t.wait_result(timeout=60) for t in tasks))
    finally:
        await run.sender.shutdown()
    assert [r.return_value[:2] for r in results] == [[None, n] for n in range(500)]
    # They really were in flight together: each waited until all 500 had started.
    assert max(r.return_value[2] for r in results) == 500
    assert run.stop(worker) == 0


def test_unreachable_broker_is_a_clear_error_not_a_hang(tmp_path: Path) -> None:
    # Nothing listens on port 1 of the loopback.
    run = WorkerRun("redis://127.0.0.1:1/0", tmp_path, streams=True)
    unreachable_broker_is_exit_3(
        run, retry_timeout=0, cause="ConnectionError: ", within=20
    )
