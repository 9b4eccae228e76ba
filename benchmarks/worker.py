"""Real worker processes on a real Redis: taskiq-fastapi against plain taskiq.

A shared 2-core machine makes back-to-back runs differ by +-10%, more than
the effect measured, so variants run side by side instead: each gets its own
queue, filled first with tasks interleaved with timestamp markers, and both
worker commands start together, pinned to the same core (Redis and this
process get the other), so the scheduler shares it evenly between them.
Throughput is compared over the window in which both were draining; startup
is launch to first marker. Each ratio is the median of several paired rounds.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

from taskiq.kicker import AsyncKicker

from benchmarks.workerbench.brokers import make_broker
from taskiq_fastapi import TaskStatus
from tools.processes import free_port

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TASKS = "benchmarks.workerbench.tasks"
ROUNDS = 5
CHECKPOINTS = 20


@dataclass
class Variant:
    command: list[str]
    task: str
    record: bool = False  # kicked through TaskStatus, which records its states


@dataclass
class Drain:
    """When each checkpoint ran, as (time, tasks done before it)."""

    launched: float
    checkpoints: list[tuple[float, int]]

    @property
    def startup(self) -> float:
        return self.checkpoints[0][0] - self.launched

    def done_at(self, moment: float) -> float:
        """Tasks done by `moment`, interpolated between checkpoints."""
        points = self.checkpoints
        for (t0, n0), (t1, n1) in itertools.pairwise(points):
            if t0 <= moment <= t1:
                return n0 + (n1 - n0) * (moment - t0) / max(t1 - t0, 1e-9)
        return float(points[-1][1] if moment > points[-1][0] else 0)


async def _fill(
    url: str, queue: str, task: str, count: int, record: bool = False
) -> tuple[Any, list[Any]]:
    sender = make_broker(url, queue)
    if record:  # as the API process does: its TaskStatus lists the task
        listed = sender.register_task(lambda: None, f"{TASKS}:{task}")
        TaskStatus(sender, [listed])
    await sender.startup()
    stamp = AsyncKicker(f"{TASKS}:stamp", sender, {})
    body = AsyncKicker(f"{TASKS}:{task}", sender, {})
    markers = [await stamp.kiq()]
    for _ in range(CHECKPOINTS):
        for _ in range(count // CHECKPOINTS):
            await body.kiq()
        markers.append(await stamp.kiq())
    return sender, markers


async def _checkpoints(sender: Any, markers: list[Any], count: int) -> list[Any]:
    # Coarse polling: the times come from the workers' clocks, and the
    # benchmark should take as little CPU as possible from what it measures.
    await markers[-1].wait_result(timeout=600, check_interval=0.25)
    results = [await m.wait_result(timeout=60) for m in markers]
    await sender.shutdown()
    step = count // CHECKPOINTS
    return [(r.return_value, i * step) for i, r in enumerate(results)]


def _pin_to_worker_core() -> None:
    """Run in the child before exec: its worker processes inherit the core."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) > 1:
        os.sched_setaffinity(0, {cores[-1]})


def run_together(url: str, variants: list[Variant], count: int) -> list[Drain]:
    """Fill one queue per variant, start all commands at once, time them."""
    loop = asyncio.new_event_loop()
    processes: list[subprocess.Popen[bytes]] = []
    try:
        filled = []
        for variant in variants:
            queue = f"bench-{uuid.uuid4().hex}"
            sender, markers = loop.run_until_complete(
                _fill(url, queue, variant.task, count, variant.record)
            )
            filled.append((queue, sender, markers))
        launched = time.time()
        for variant, (queue, _, _) in zip(variants, filled, strict=True):
            env = {**os.environ, "BENCH_REDIS_URL": url, "BENCH_QUEUE": queue}
            processes.append(
                subprocess.Popen(
                    variant.command,
                    cwd=ROOT,
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                    preexec_fn=_pin_to_worker_core,
                )
            )
        return [
            Drain(launched, loop.run_until_complete(_checkpoints(s, m, count)))
            for _, s, m in filled
        ]
    finally:
        for process in processes:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        loop.close()


def throughput_ratio(ours: Drain, theirs: Drain) -> float:
    """Ours over theirs, tasks per second while both were draining."""
    start = max(ours.checkpoints[0][0], theirs.checkpoints[0][0])
    end = min(ours.checkpoints[-1][0], theirs.checkpoints[-1][0])
    ours_done = ours.done_at(end) - ours.done_at(start)
    theirs_done = theirs.done_at(end) - theirs.done_at(start)
    return ours_done / theirs_done


def paired(
    url: str, ours: Variant, theirs: Variant, count: int
) -> tuple[list[float], list[float], float]:
    """Per round: throughput ratio, startup ratio; and our mean rate."""
    run_together(url, [ours, theirs], count // 5)  # warm up, discarded
    rates, startups, ours_rate = [], [], []
    for round_ in range(ROUNDS):
        # Alternate who is launched first.
        order = [ours, theirs] if round_ % 2 == 0 else [theirs, ours]
        drains = run_together(url, order, count)
        mine, other = drains if order[0] is ours else drains[::-1]
        rates.append(throughput_ratio(mine, other))
        startups.append(mine.startup / other.startup)
        span = mine.checkpoints[-1][0] - mine.checkpoints[0][0]
        ours_rate.append(count / span)
    return rates, startups, statistics.mean(ours_rate)


def ours(*extra: str, app: str = "benchmarks.workerbench.app:app") -> Variant:
    command = [str(BIN / "taskiq-fastapi"), "worker"]
    command += ["benchmarks.workerbench.broker:broker", TASKS]
    command += ["--app", app, "--no-configure-logging"]
    return Variant([*command, *extra], "with_request")


def recording(url: str) -> list[tuple[str, float, str, float]]:
    """Throughput with the app's TaskStatus recording each task's states."""
    recorded = ours("--workers", "1", app="benchmarks.workerbench.status_app:app")
    recorded.record = True
    rate, _, _ = paired(url, recorded, ours("--workers", "1"), 3_000)
    print(f"Real workers on Redis, side by side, {ROUNDS} paired rounds:")
    _show("1 process, 3,000 tasks: recording states / without", rate)
    return [
        (
            "1 proc throughput: recording states / without",
            statistics.median(rate),
            ">=",
            0.95,
        )
    ]


def cancelling(url: str) -> list[tuple[str, float, str, float]]:
    """Throughput with cancellation on (TaskStatus(cancellable=True)), nothing
    cancelled, against the same app recording states without it."""
    app = "benchmarks.workerbench.{}_app:app"
    on = ours("--workers", "1", app=app.format("cancel"))
    off = ours("--workers", "1", app=app.format("status"))
    on.record = off.record = True
    rate, _, _ = paired(url, on, off, 3_000)
    print(f"Real workers on Redis, side by side, {ROUNDS} paired rounds:")
    _show("1 process, 3,000 tasks: cancellable / without", rate)
    return [
        (
            "1 proc throughput: cancellable / without",
            statistics.median(rate),
            ">=",
            0.97,
        )
    ]


def metrics(url: str) -> list[tuple[str, float, str, float]]:
    """Throughput with --metrics / without, both with the health port it needs.

    The commands are killed, so their metrics directories are left behind:
    in a temporary TMPDIR, removed here.
    """
    measured = ours("--workers", "1", "--health-port", str(free_port()), "--metrics")
    without = ours("--workers", "1", "--health-port", str(free_port()))
    with (
        tempfile.TemporaryDirectory() as temp,
        mock.patch.dict(os.environ, TMPDIR=temp),
    ):
        rate, _, _ = paired(url, measured, without, 5_000)
    print(f"Real workers on Redis, side by side, {ROUNDS} paired rounds:")
    _show("1 process, 5,000 tasks: --metrics / without", rate)
    return [
        (
            "1 proc throughput: --metrics / without",
            statistics.median(rate),
            ">=",
            0.97,
        )
    ]


def logging_on(*extra: str, broker: str = "benchmarks.workerbench.broker") -> Variant:
    """Ours, 1 process, with taskiq's logging on: each task logs its
    "Executing task" line (to /dev/null), as a production worker does."""
    command = [str(BIN / "taskiq-fastapi"), "worker", f"{broker}:broker", TASKS]
    command += ["--app", "benchmarks.workerbench.app:app", "--workers", "1"]
    return Variant([*command, *extra], "with_request")


def observability(url: str) -> list[tuple[str, float, str, float | None]]:
    """Issue 25: task-aware log records, JSON lines, and tracing, each / off."""
    logs_rate, _, _ = paired(url, logging_on("--task-logs"), logging_on(), 5_000)
    json_rate, _, _ = paired(url, logging_on("--log-json"), logging_on(), 5_000)
    traced = logging_on(broker="benchmarks.workerbench.broker_traced")
    traced_rate, _, _ = paired(url, traced, logging_on(), 5_000)
    print(f"Real workers on Redis, side by side, {ROUNDS} paired rounds:")
    _show("1 process, 5,000 tasks: --task-logs / without", logs_rate)
    _show("1 process, 5,000 tasks: --log-json / without", json_rate)
    _show("1 process, 5,000 tasks: trace_tasks + SDK / without", traced_rate)
    return [
        (
            "1 proc throughput: --task-logs / without",
            statistics.median(logs_rate),
            ">=",
            0.97,
        ),
        (
            "1 proc throughput: --log-json / without",
            statistics.median(json_rate),
            ">=",
            None,
        ),
        (
            "1 proc throughput: tracing on / off",
            statistics.median(traced_rate),
            ">=",
            None,
        ),
    ]


def plain(broker: str, task: str, *extra: str) -> Variant:
    command = [str(BIN / "taskiq"), "worker", broker, TASKS, "--no-configure-logging"]
    return Variant([*command, *extra], task)


def _show(name: str, values: list[float]) -> None:
    shown = " ".join(f"{v:.3f}" for v in values)
    print(f"  {name:<52} median {statistics.median(values):.3f}  ({shown})")


def run(url: str) -> list[tuple[str, float, str, float]]:
    native = "benchmarks.workerbench.broker:broker"
    with_init = "benchmarks.workerbench.broker_with_init:broker"
    one_rate, _, one_speed = paired(
        url,
        ours("--workers", "1"),
        plain(native, "with_context", "--workers", "1"),
        5_000,
    )
    _, one_start, _ = paired(
        url,
        ours("--workers", "1"),
        plain(with_init, "with_request", "--workers", "1"),
        1_000,
    )
    two_rate, _, two_speed = paired(
        url,
        ours("--workers", "2"),
        plain(native, "with_context", "--workers", "2"),
        10_000,
    )
    health_rate, _, _ = paired(
        url,
        ours("--workers", "1", "--health-port", str(free_port())),
        ours("--workers", "1"),
        5_000,
    )
    print(f"Real workers on Redis, side by side, {ROUNDS} paired rounds:")
    _show("1 process, 5,000 tasks: Request / Context throughput", one_rate)
    _show("1 process: start to first task, ours / taskiq + init", one_start)
    _show("2 processes, 10,000 tasks: Request / Context throughput", two_rate)
    _show("1 process, 5,000 tasks: --health-port / without", health_rate)
    print(
        f"  (sharing one core with the other command, ours ran "
        f"{one_speed:.0f} tasks/s with 1 process, {two_speed:.0f} with 2)"
    )
    return [
        (
            "1 proc drain time: ours Request / taskiq Context",
            1 / statistics.median(one_rate),
            "<=",
            1.05,
        ),
        (
            "start to first task: ours / taskiq + init",
            statistics.median(one_start),
            "<=",
            1.0,
        ),
        (
            "2 procs throughput: ours Request / taskiq Context",
            statistics.median(two_rate),
            ">=",
            0.97,
        ),
        (
            "1 proc throughput: --health-port / without",
            statistics.median(health_rate),
            ">=",
            0.98,
        ),
    ]
