"""End to end on the real server with real `taskiq-fastapi worker` processes (issue 4).

The spawn start method and a failing app startup are covered in
test_cli_worker.py (test_spawn_start_method, test_startup_failure_...).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from workers import WorkerRun

pytestmark = pytest.mark.anyio

APP = ["--app", "workerapp.app:app"]
BROKER = ["workerapp.broker:broker", "workerapp.tasks"]


async def kiq_all(run: WorkerRun, task: str, args: list[tuple[Any, ...]]) -> list[Any]:
    return [await run.kiq(task, *a) for a in args]


async def test_two_commands_2000_tasks_each_run_exactly_once(run: WorkerRun) -> None:
    first = run.start("worker", *BROKER, *APP, "--workers", "2")
    second = run.start("worker", *BROKER, *APP, "--workers", "2")
    run.wait_for("startup", processes=4)
    await run.sender.startup()
    try:
        tasks = await kiq_all(run, "mark", [(n,) for n in range(2000)])
        results = await asyncio.gather(*(t.wait_result(timeout=120) for t in tasks))
    finally:
        await run.sender.shutdown()
    assert [r.return_value for r in results] == list(range(2000))
    assert run.stop(first) == 0
    assert run.stop(second) == 0
    ran = Counter(event for _, event in run.events() if event.startswith("ran "))
    assert ran == Counter({f"ran {n}": 1 for n in range(2000)})
    startups, shutdowns = run.count("startup"), run.count("shutdown")
    assert len(startups) == 4
    assert startups == shutdowns == Counter(dict.fromkeys(startups, 1))
    # Both commands shared the work.
    workers_that_ran = {pid for pid, event in run.events() if event.startswith("ran ")}
    assert len(workers_that_ran) >= 2


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
        tasks = await kiq_all(run, "slow", [(n, 2.0) for n in range(50)])
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
    run = stream_run
    worker = run.start(
        "worker", *BROKER, *APP, "--workers", "1", "--ack-type", "when_executed"
    )
    run.wait_for("startup", processes=1)
    await run.sender.startup()
    try:
        task = await run.kiq("slow", 7, 3.0)
        run.wait_for("task 7 started", processes=1)
        (victim,) = run.count("startup")
        os.kill(victim, signal.SIGKILL)
        run.wait_for("startup", processes=2)  # the replacement, with its lifespan
        await asyncio.sleep(1.5)  # past the broker's idle_timeout for reclaiming
        await run.kiq("mark", -1)  # the stream broker reclaims on its next fetch
        result = await task.wait_result(timeout=60)
    finally:
        await run.sender.shutdown()
    assert result.return_value == 7
    replacement = next(pid for pid in run.count("startup") if pid != victim)
    assert (replacement, "task 7 done") in run.events()
    assert (victim, "task 7 done") not in run.events()
    assert (victim, "shutdown") not in run.events()  # killed: no shutdown code ran
    assert run.stop(worker) == 0
    assert run.count("shutdown") == Counter({replacement: 1})


async def test_500_concurrent_tasks_in_one_process_never_share_state(
    run: WorkerRun,
) -> None:
    worker = run.start(
        "worker", *BROKER, *APP, "--workers", "1", "--max-async-tasks", "500"
    )
    run.wait_for("startup", processes=1)
    await run.sender.startup()
    try:
        tasks = await kiq_all(run, "isolated", [(n,) for n in range(500)])
        results = await asyncio.gather(*(t.wait_result(timeout=60) for t in tasks))
    finally:
        await run.sender.shutdown()
    assert [r.return_value[:2] for r in results] == [[None, n] for n in range(500)]
    # They really were in flight together.
    assert max(r.return_value[2] for r in results) >= 250
    assert run.stop(worker) == 0


async def test_unreachable_broker_is_a_clear_error_not_a_hang(
    tmp_path: Path,
) -> None:
    # Nothing listens on port 1 of the loopback.
    run = WorkerRun("redis://127.0.0.1:1/0", tmp_path, streams=True)
    started = time.monotonic()
    worker = run.start(
        "worker", *BROKER, *APP, "--workers", "2", "--broker-retry-timeout", "0"
    )
    try:
        code = worker.wait(timeout=30)
    finally:
        run.kill_all()
    output = run.output(worker)
    assert code == 3, output
    line = (
        "Error: Broker 'workerapp.broker:broker' unreachable for 0 s "
        "(--broker-retry-timeout 0): ConnectionError: "
    )
    assert output.count(line) == 1, output
    assert "Traceback" not in output
    assert time.monotonic() - started < 20
