"""Memory of a 4-process worker: `taskiq-fastapi worker` against the 0.5 way.

The 0.5 way is plain `taskiq worker` with `init` in the broker module: each
worker process imports the broker, the app and FastAPI for itself. Ours
imports them once in the main process, before the fork, and the workers
share those pages. Measured as the total PSS (proportional set size: each
shared page counted once, split among the processes sharing it) of the main
process and its workers, from `/proc/PID/smaps_rollup`, which needs no root,
once all workers have started and again after 2,000 tasks.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from unittest import mock

from taskiq.kicker import AsyncKicker

from benchmarks.worker import BIN, ROOT, TASKS
from benchmarks.workerbench.brokers import make_broker
from tools.processes import children, free_port

WORKERS = 4
TASK_COUNT = 2_000
ROUNDS = 2


def _pss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    raise RuntimeError(f"no Pss in /proc/{pid}/smaps_rollup")


def tree_pss_mib(pid: int) -> float:
    """PSS of `pid` and its descendants, in MiB."""
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        total += _pss_kib(current)
        todo += children(current)
    return total / 1024


async def _run_tasks(url: str, queue: str, task: str, count: int) -> None:
    sender = make_broker(url, queue)
    await sender.startup()
    try:
        body = AsyncKicker(f"{TASKS}:{task}", sender, {})
        sent = [await body.kiq() for _ in range(count)]
        for task_sent in sent:
            await task_sent.wait_result(timeout=120, check_interval=0.05)
    finally:
        await sender.shutdown()


def measure(url: str, command: list[str], task: str) -> tuple[float, float]:
    """(MiB after startup, MiB after TASK_COUNT tasks) for one command."""
    queue = f"bench-{uuid.uuid4().hex}"
    env = {**os.environ, "BENCH_REDIS_URL": url, "BENCH_QUEUE": queue}
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while len(children(process.pid)) < WORKERS:
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError(f"{command[0]} did not start {WORKERS} workers")
            time.sleep(0.1)
        # Every worker has served a task: startup is over in all of them.
        asyncio.run(_run_tasks(url, queue, task, WORKERS * 10))
        time.sleep(1)
        started = tree_pss_mib(process.pid)
        asyncio.run(_run_tasks(url, queue, task, TASK_COUNT))
        time.sleep(1)
        return started, tree_pss_mib(process.pid)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def compare(url: str, *extra: str) -> dict[str, tuple[float, float]]:
    """Best of ROUNDS (started, after tasks) MiB: ours (with `extra`), theirs."""
    ours = [str(BIN / "taskiq-fastapi"), "worker"]
    ours += ["benchmarks.workerbench.broker:broker", TASKS]
    ours += ["--app", "benchmarks.workerbench.app:app", *extra]
    theirs = [str(BIN / "taskiq"), "worker"]
    theirs += ["benchmarks.workerbench.broker_with_init:broker", TASKS]
    common = ["--workers", str(WORKERS), "--no-configure-logging"]
    results: dict[str, list[tuple[float, float]]] = {"ours": [], "theirs": []}
    for _ in range(ROUNDS):
        results["ours"].append(measure(url, [*ours, *common], "with_request"))
        results["theirs"].append(measure(url, [*theirs, *common], "with_request"))
    return {
        name: (min(r[0] for r in rounds), min(r[1] for r in rounds))
        for name, rounds in results.items()
    }


def run(url: str) -> list[tuple[str, float, str, float]]:
    """Return (what, measured ratio, comparison, target) rows."""
    best = compare(url)
    print(f"Memory, total PSS of the command's {WORKERS + 1} processes (MiB):")
    print(f"  {'':<44} {'started':>8} {'+2,000 tasks':>13}")
    for name, label in (
        ("ours", "taskiq-fastapi worker"),
        ("theirs", "taskiq worker, init in the broker module"),
    ):
        started, after = best[name]
        print(f"  {label:<44} {started:8.1f} {after:13.1f}")
    return [
        (
            "4 procs PSS after startup: ours / taskiq + init",
            best["ours"][0] / best["theirs"][0],
            "<=",
            0.85,
        ),
        (
            "4 procs PSS after 2,000 tasks: ours / taskiq + init",
            best["ours"][1] / best["theirs"][1],
            "<=",
            0.85,
        ),
    ]


def with_metrics(url: str) -> list[tuple[str, float, str, float]]:
    """The same with --metrics: its files, and prometheus_client imported.

    The commands are killed, so their metrics directories are left behind:
    in a temporary TMPDIR, removed here.
    """
    extra = ("--health-port", str(free_port()), "--metrics")
    with (
        tempfile.TemporaryDirectory() as temp,
        mock.patch.dict(os.environ, TMPDIR=temp),
    ):
        best = compare(url, *extra)
    print(f"Memory with --metrics, total PSS of {WORKERS + 1} processes (MiB):")
    print(f"  ours {best['ours'][0]:.1f} started, {best['ours'][1]:.1f} after tasks")
    return [
        (
            "4 procs PSS after 2,000 tasks: ours --metrics / taskiq + init",
            best["ours"][1] / best["theirs"][1],
            "<=",
            0.85,
        )
    ]
