"""From SIGTERM to the command's exit: `taskiq-fastapi worker` against `taskiq worker`.

Both run one worker process on a real Redis; while it runs a task of
PAUSE seconds, the main process gets SIGTERM, and the time until the command
has exited is taken. The task is there because taskiq's worker sets its stop
event from a plain signal handler, which does not wake an idle event loop:
`taskiq worker` would wait for the next message. taskiq's manager looks at its
signals once a second, so each run is delayed by up to a second by chance:
the commands alternate, and the row is the difference of the medians, in ms.
"""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import IO

from taskiq.kicker import AsyncKicker

from benchmarks.workerbench.brokers import make_broker
from tools.processes import free_port

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
BROKER = "benchmarks.workerbench.broker:broker"
TASKS = "benchmarks.workerbench.tasks"
RUNS = 3
READY = "Listening started."
PAUSE = 2.5  # past the manager's 1 s poll: the worker is signalled mid-task


async def _kick(url: str, queue: str) -> None:
    sender = make_broker(url, queue)
    await AsyncKicker(f"{TASKS}:pause", sender, {}).kiq(PAUSE)
    await sender.shutdown()


def signal_to_exit(url: str, command: list[str]) -> float:
    """Seconds from SIGTERM to the exit of a command whose worker listens."""
    queue = uuid.uuid4().hex
    env = {**os.environ, "BENCH_REDIS_URL": url, "BENCH_QUEUE": queue}
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            _wait_for(process, log, READY)
            asyncio.run(_kick(url, queue))
            _wait_for(process, log, "Executing task")
            signalled = time.perf_counter()
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)
            return time.perf_counter() - signalled
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()


def _wait_for(process: subprocess.Popen[bytes], log: IO[bytes], text: str) -> None:
    deadline = time.monotonic() + 60
    while True:
        log.seek(0)
        if text.encode() in log.read():
            return
        if process.poll() is not None or time.monotonic() > deadline:
            log.seek(0)
            raise RuntimeError(f"{process.args} did not log {text!r}:\n{log.read()!r}")
        time.sleep(0.01)


def run(url: str) -> list[tuple[str, float, str, float]]:
    ours_command = [str(BIN / "taskiq-fastapi"), "worker", BROKER, TASKS]
    ours_command += ["--app", "benchmarks.workerbench.app:app", "--workers", "1"]
    with_health = [*ours_command, "--health-port", str(free_port())]
    theirs_command = [str(BIN / "taskiq"), "worker", BROKER, TASKS, "--workers", "1"]
    commands = {
        "taskiq-fastapi worker": ours_command,
        "taskiq-fastapi worker --health-port": with_health,
        "taskiq worker": theirs_command,
    }
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(RUNS):
        for name, command in commands.items():
            times[name].append(signal_to_exit(url, command))
    ms = {name: statistics.median(runs) * 1000 for name, runs in times.items()}
    print(f"SIGTERM to exit, 1 worker running a {PAUSE:g} s task, median of {RUNS}:")
    for name, value in ms.items():
        print(f"  {name:<36} {value:7.0f} ms")
    theirs = ms["taskiq worker"]
    return [
        (
            "SIGTERM to exit: ours - taskiq worker (ms)",
            ms["taskiq-fastapi worker"] - theirs,
            "<=",
            300,
        ),
        (
            "the same with --health-port (ms)",
            ms["taskiq-fastapi worker --health-port"] - theirs,
            "<=",
            300,
        ),
    ]
