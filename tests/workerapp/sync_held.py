"""A sync task, in taskiq's executor thread, held until the test releases it."""

import os
import time
from pathlib import Path

from workerapp.app import record
from workerapp.broker import broker


@broker.task
def sync_held(n: int) -> int:
    """Runs until the test creates its release file (`<EVENTS_FILE>.release-n`)."""
    release = Path(f"{os.environ['EVENTS_FILE']}.release-{n}")
    record(f"sync task {n} started")
    while not release.exists():
        time.sleep(0.05)
    record(f"sync task {n} done")
    return n
