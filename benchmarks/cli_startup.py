"""Wall time of `taskiq-fastapi --help` / `--version` against `taskiq --help`."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent
RUNS = 7


def wall_time(*command: str) -> float:
    """Best of RUNS runs: the least disturbed by the rest of the machine."""
    best = float("inf")
    for _ in range(RUNS):
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        best = min(best, time.perf_counter() - start)
    return best


def run() -> list[tuple[str, float, str, float]]:
    taskiq = wall_time(str(BIN / "taskiq"), "--help")
    ours_help = wall_time(str(BIN / "taskiq-fastapi"), "--help")
    ours_version = wall_time(str(BIN / "taskiq-fastapi"), "--version")
    print(f"CLI start, best of {RUNS}:")
    print(f"  taskiq --help                {taskiq * 1000:7.0f} ms")
    print(f"  taskiq-fastapi --help        {ours_help * 1000:7.0f} ms")
    print(f"  taskiq-fastapi --version     {ours_version * 1000:7.0f} ms")
    return [
        ("taskiq-fastapi --help / taskiq --help", ours_help / taskiq, "<=", 0.5),
        ("taskiq-fastapi --version / taskiq --help", ours_version / taskiq, "<=", 0.5),
    ]
