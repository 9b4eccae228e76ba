"""The supervisor never deadlocks on signals (issue 8)."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from types import SimpleNamespace

import pytest
from taskiq.cli.worker.process_manager import ReloadOneAction, ShutdownAction
from workers import APP, BROKER, WorkerRun

from taskiq_fastapi_cli.runtime.shutdown import GRACEFUL, KILL, NOW, StopStage
from taskiq_fastapi_cli.runtime.supervisor import (
    ActionQueue,
    HeldRestart,
    StopSignals,
    signal_handler,
)


def stop_signals(actions: ActionQueue) -> StopSignals:
    args = SimpleNamespace(stop_stage=StopStage(), hardkill_count=3, shutdown_timeout=5)
    return StopSignals(actions, args, list)  # type: ignore[arg-type]


@pytest.mark.parametrize("which", ["SIGINT/SIGTERM", "SIGHUP"])
def test_the_handler_takes_no_lock_the_interrupted_code_may_hold(which: str) -> None:
    # What taskiq's handler took: logging's locks (the module's and each
    # handler's), held here by another thread as the interrupted main loop
    # would hold them. Held by this thread they would prove nothing: both are
    # RLocks, which the thread holding them enters again. A handler that
    # took one would block until the join times out.
    actions = ActionQueue()
    if which == "SIGHUP":
        handler = signal_handler(actions, ShutdownAction())
    else:
        handler = stop_signals(actions)
    log_handler = logging.StreamHandler()
    logging.getLogger().addHandler(log_handler)
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with logging._lock, log_handler.lock:  # type: ignore[attr-defined]
            held.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait(5)
    try:
        signalled = threading.Thread(
            target=lambda: [handler(signal.SIGTERM, None) for _ in range(25)],
            daemon=True,
        )
        signalled.start()
        signalled.join(5)
        assert not signalled.is_alive(), "the handler waited for a lock"
    finally:
        release.set()
        holder.join()
        logging.getLogger().removeHandler(log_handler)
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
def test_every_stop_ends_within_20_s(run: WorkerRun, how: str) -> None:
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
    # Idle, so even a second signal stops cleanly; a burst of 50 is past
    # --hardkill-count: every worker killed, unless they had already exited.
    expected = {0, 4} if how == "burst" else {0}
    assert wait_exit(worker, 20) in expected, run.output(worker)


def test_signals_are_counted_graceful_then_now_then_kill() -> None:
    actions = ActionQueue()
    stop = stop_signals(actions)
    stop(signal.SIGINT, None)
    assert (stop.stage.value, stop.kill_at) == (GRACEFUL, None)
    assert isinstance(actions.get(), ShutdownAction)
    stop(signal.SIGINT, None)
    assert stop.stage.value == NOW
    assert stop.kill_at is not None  # past it, a worker still running is killed
    stop(signal.SIGTERM, None)
    assert stop.stage.value == KILL
    assert actions.empty()  # one shutdown, however many signals


def test_a_reported_failure_is_a_shutdown_ahead_of_any_restart() -> None:
    failed = False
    actions = ActionQueue(lambda: failed)
    actions.put(ReloadOneAction(worker_num=0, is_reload_all=False))
    failed = True
    assert isinstance(actions.get(), ShutdownAction)
    assert isinstance(actions.get(), HeldRestart)  # never read: the loop returned
