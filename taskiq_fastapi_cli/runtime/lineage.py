"""Processes that do not outlive the process that started them.

A process killed outright (SIGKILL, the kernel's OOM killer) runs no handler,
so it cannot stop its children: a main process killed so left its worker
processes fetching and running tasks, with nobody to restart or stop them
(gunicorn's workers stop when their arbiter is gone; taskiq's do not); a
worker killed so left the processes of its `--use-process-pool` executor
running the task it had handed them, after the command exited.

Every process multiprocessing starts (fork, spawn, forkserver) holds its
parent's sentinel (`multiprocessing.parent_process()`), a pipe that reads
end-of-file once the parent is gone. A worker process watches it in its
event loop, for free until it fires, and stops as at a first stop signal:
its running tasks finish and its lifespan shuts down. A pool process, which
runs sync code and has no loop, watches it from a thread and is killed.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing.connection import wait


def _parent_sentinel() -> int | None:
    """The fd that reads end-of-file once this process's parent is gone.

    None in a process multiprocessing did not start, and on Windows, where
    it is a handle, not something an event loop can watch.
    """
    parent = multiprocessing.parent_process()
    if parent is None or sys.platform == "win32":
        return None
    return parent.sentinel


def watch_parent(on_gone: Callable[[int], None]) -> None:
    """In a worker's running loop: `on_gone(its pid)` once the parent is gone."""
    sentinel = _parent_sentinel()
    if sentinel is None:
        return
    parent = multiprocessing.parent_process()
    pid = parent.pid if parent is not None and parent.pid is not None else 0
    loop = asyncio.get_running_loop()

    def gone() -> None:
        loop.remove_reader(sentinel)
        on_gone(pid)

    # Already gone (killed while this process started): fires at once.
    loop.add_reader(sentinel, gone)


def _exit_with_parent() -> None:
    """A pool process's initializer: killed once the worker that made it is gone.

    Killed, not stopped: its worker, which would take its result, is gone,
    and the message it runs was not acknowledged by a worker that saved no
    result (`when_saved`, `when_executed`).
    """
    sentinel = _parent_sentinel()
    if sentinel is None:
        return

    def kill_when_gone() -> None:
        wait([sentinel])
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(
        target=kill_when_gone, name="taskiq-fastapi-parent-watch", daemon=True
    ).start()


def process_pool(max_workers: int | None = None) -> ProcessPoolExecutor:
    """The `--use-process-pool` executor, its processes tied to the worker.

    Given to taskiq's run module in place of `ProcessPoolExecutor`, which it
    calls with `max_workers` only (runner.py).
    """
    return ProcessPoolExecutor(max_workers=max_workers, initializer=_exit_with_parent)
