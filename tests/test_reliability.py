"""End to end on the real server with real `taskiq-fastapi worker` processes (issue 4).

The spawn start method and a failing app startup are covered in
test_cli_worker.py (test_spawn_start_method, test_startup_failure_...).
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import pytest
from delivery import (
    each_task_runs_once_across_two_commands,
    killed_mid_task_is_redelivered_to_a_fresh_process,
    unreachable_broker_is_exit_3,
)
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


async def test_kill_9_mid_task_is_redelivered_to_a_fresh_process(
    stream_run: WorkerRun,
) -> None:
    async def reclaim() -> None:
        await asyncio.sleep(1.5)  # past the broker's idle_timeout for reclaiming
        await stream_run.kiq("mark", -1)  # the stream broker reclaims on its next fetch

    await killed_mid_task_is_redelivered_to_a_fresh_process(stream_run, reclaim)


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
