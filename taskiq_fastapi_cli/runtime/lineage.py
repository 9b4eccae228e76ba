"""Processes that do not outlive the process that started them.

A process killed outright (SIGKILL, the kernel's OOM killer) runs no handler,
so it cannot stop its children: a main process killed so left its worker
processes fetching and running tasks, with nobody to restart or stop them
(gunicorn's workers stop when their arbiter is gone; taskiq's do not); a
worker killed so left the processes of its `--use-process-pool` executor
running the task it had handed them, after the command exited.

Every process multiprocessing starts (fork, spawn, forkserver) holds its
parent's sentinel (`multiprocessing.parent_process()`), a pipe that reads
end-of-file once every copy of its write end is closed. Under fork that is
not once the parent is gone: each process forked later inherits the
parent's write ends of its older siblings' pipes (and so do the pool
processes and the children of its tasks), so a worker learned of the main
process's death only once every younger worker had exited, and fetched and
ran tasks meanwhile. Where the parent is this process's own (fork, spawn),
a pidfd of it is watched instead, which reads as the parent exits, whoever
holds what; under forkserver, whose fork server is the parent, the sentinel
(no process but the main one holds its write end there).

A worker process watches it in its event loop, for free until it fires, and
stops as at a first stop signal: its running tasks finish and its lifespan
shuts down. A pool process, which runs sync code and has no loop, watches
it from a thread and is killed.
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
    """An fd that reads as soon as this process's parent is gone.

    None in a process multiprocessing did not start, and on Windows, where
    it is a handle, not something an event loop can watch. -1 when the
    parent is gone already.
    """
    parent = multiprocessing.parent_process()
    if parent is None or sys.platform == "win32":
        return None
    if os.getppid() == parent.pid and hasattr(os, "pidfd_open"):  # fork, spawn
        try:
            pidfd = os.pidfd_open(parent.pid)
        except OSError:  # gone (checked below), or a kernel without pidfd
            pidfd = -1
        if os.getppid() == parent.pid and pidfd >= 0:
            return pidfd  # the parent's, not a process that reused its pid
        if pidfd >= 0:
            os.close(pidfd)
    if os.getppid() != parent.pid and multiprocessing.get_start_method() == "fork":
        # Reparented: the parent is gone; its sentinel may be held open by a
        # younger sibling.
        return -1
    return parent.sentinel


def watch_parent(on_gone: Callable[[int], None]) -> None:
    """In a worker's running loop: `on_gone(its pid)` once the parent is gone."""
    sentinel = _parent_sentinel()
    if sentinel is None:
        return
    parent = multiprocessing.parent_process()
    pid = _parent_pid()
    loop = asyncio.get_running_loop()
    if sentinel < 0:
        loop.call_soon(on_gone, pid)
        return

    def gone() -> None:
        loop.remove_reader(sentinel)
        if parent is not None and sentinel != parent.sentinel:
            os.close(sentinel)  # the pidfd opened for this watch
        on_gone(pid)

    # Already gone (killed while this process started): fires at once.
    loop.add_reader(sentinel, gone)


def wait_for_parent() -> int:
    """Block until this process's parent is gone, then return its pid.

    For a worker with no event loop to watch from (`--reload`'s wait for a
    change); forever where there is nothing to watch. A signal handler that
    raises ends the wait.
    """
    sentinel = _parent_sentinel()
    if sentinel is None:
        while True:
            signal.pause()
    if sentinel >= 0:
        wait([sentinel])
    return _parent_pid()


def _parent_pid() -> int:
    """The pid of the process that started this one (0 if unknown)."""
    parent = multiprocessing.parent_process()
    return parent.pid if parent is not None and parent.pid is not None else 0


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
        if sentinel >= 0:
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
