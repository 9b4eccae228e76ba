"""The supervisor never deadlocks on signals (issue 8)."""

from __future__ import annotations

import logging
import os
import signal
import time

import pytest
from taskiq.cli.worker.process_manager import ReloadOneAction, ShutdownAction
from workers import APP, BROKER, WorkerRun

from taskiq_fastapi_cli.supervisor import ActionQueue, HeldRestart, signal_handler


@pytest.mark.timeout(10)
def test_the_handler_runs_while_the_interrupted_code_holds_every_lock() -> None:
    # What taskiq's handler took (logging's lock, a multiprocessing queue's)
    # held by this very thread, as the interrupted main loop would hold it: a
    # handler that took one of them would never return.
    actions = ActionQueue()
    handler = signal_handler(actions, ShutdownAction())
    with logging._lock:  # type: ignore[attr-defined]
        for _ in range(25):
            handler(signal.SIGTERM, None)
    assert not actions.empty()
    assert isinstance(actions.get(), ShutdownAction)


def test_restarts_are_started_with_the_stop_signals_held() -> None:
    actions = ActionQueue()
    actions.put(ReloadOneAction(worker_num=0, is_reload_all=True))
    signal_handler(actions, ShutdownAction())(signal.SIGINT, None)
    restart = actions.get()
    assert isinstance(restart, HeldRestart)
    assert (restart.worker_num, restart.is_reload_all) == (0, True)
    assert isinstance(actions.get(), ShutdownAction)
    assert actions.empty()


def wait_exit(process: object, timeout: float) -> int | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code = process.poll()  # type: ignore[attr-defined]
        if code is not None:
            return int(code)
        time.sleep(0.02)
    return None


@pytest.mark.parametrize(
    "how",
    ["SIGTERM group", "SIGINT group", "SIGTERM group twice", "burst"] * 3,
)
def test_every_stop_ends_with_exit_0_within_20_s(run: WorkerRun, how: str) -> None:
    before = len(run.count("startup"))
    worker = run.start("worker", *BROKER, *APP, "--workers", "2")
    run.wait_for("startup", processes=before + 2)
    run.stopped.append(worker)
    if how == "burst":
        for n in range(50):  # a runtime that resends the signal
            os.kill(worker.pid, signal.SIGTERM)
            time.sleep(0.002 if n % 2 else 0)
    else:
        sig = signal.SIGINT if how.startswith("SIGINT") else signal.SIGTERM
        os.killpg(worker.pid, sig)
        if how.endswith("twice"):
            time.sleep(0.01)
            os.killpg(worker.pid, sig)
    assert wait_exit(worker, 20) == 0, run.output(worker)
