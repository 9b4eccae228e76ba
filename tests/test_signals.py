"""Stop signals, counted by the main process, in every state of a worker (issue 18).

One Ctrl-C reaching the whole process group is one signal. The first stops
gracefully; the second stops now (in-flight tasks cancelled, lifespans still
shut down, exit 4); taskiq's --hardkill-count (3) kills every process (exit 4).
Whatever the state and however many signals, nothing is left running.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import suppress
from importlib.metadata import version
from pathlib import Path

import pytest
from taskiq.kicker import AsyncKicker
from workers import COMMAND, WorkerRun

from taskiq_fastapi.tracing import _release

pytestmark = pytest.mark.anyio

SHUTDOWN_TIMEOUT = 2
# The second signal's deadline (--shutdown-timeout + 3 s) and generous slack.
EXIT_WITHIN = 30
EXIT_UNCLEAN = 4
STATES = ["starting", "idle", "awaiting task", "blocking task", "reload restart"]


def session_processes(session: int) -> list[str]:
    """Command lines of the live processes of a session (the command's group)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[3]) == session:
            found.append(cmdline.replace(b"\0", b" ").decode(errors="replace"))
    return found


def assert_nothing_left(session: int) -> None:
    deadline = time.monotonic() + 10  # the fork server exits once it sees EOF
    while (left := session_processes(session)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert left == []


def expected_codes(state: str, signals: int) -> set[int]:
    if signals == 1:
        return {0}  # graceful: every task finishes, every lifespan shuts down
    if state in ("awaiting task", "blocking task"):
        return {EXIT_UNCLEAN}  # cancelled, or killed past the deadline
    # Nothing in flight: a clean stop, unless the last signal killed it first.
    return {0} if signals == 2 and state == "idle" else {0, EXIT_UNCLEAN}


@pytest.mark.parametrize("signals", [1, 2, 3])
@pytest.mark.parametrize("state", STATES)
async def test_stop_signals_leave_no_process_behind(
    run: WorkerRun, tmp_path: Path, state: str, signals: int
) -> None:
    await stop_in_state(run, tmp_path, state, signals)


@pytest.mark.parametrize("signals", [1, 2, 3])
@pytest.mark.parametrize("state", ["idle", "awaiting task"])
async def test_the_same_under_forkserver(
    run: WorkerRun, tmp_path: Path, state: str, signals: int
) -> None:
    # Python 3.14's default on Linux; its workers are the fork server's children.
    await stop_in_state(run, tmp_path, state, signals, "--start-method", "forkserver")


async def stop_in_state(
    run: WorkerRun, tmp_path: Path, state: str, signals: int, *options: str
) -> None:
    run.env["SLOW_STARTUP"] = "3" if state == "starting" else "0"
    # One signal waits for the task: short then; long when it must be cut.
    seconds = 3.0 if signals == 1 else 3600.0
    extra = ["--shutdown-timeout", str(SHUTDOWN_TIMEOUT), *options]
    if state == "reload restart":
        watched = tmp_path / "watched"
        watched.mkdir()
        extra += ["--reload", "--reload-dir", str(watched)]
    worker = run.start(
        "worker", "workerapp.broker:broker", "workerapp.tasks", "workerapp.slow",
        "--app", "workerapp.slow:app", "--workers", "1", *extra,
    )  # fmt: skip
    run.stopped.append(worker)
    if state == "starting":
        run.wait_for("starting", processes=1)  # in the lifespan's 3 s startup
        assert run.count("startup") == {}
    else:
        run.wait_for("startup", processes=1)
    if state == "reload restart":
        (watched / "changed.py").write_text("x = 1\n")
        time.sleep(0.5)  # the manager restarts within a second
    await run.sender.startup()
    try:
        if state == "awaiting task":
            await run.kiq("slow", 0, seconds)
            run.wait_for("task 0 started", processes=1)
        elif state == "blocking task":
            await AsyncKicker("workerapp.slow:block_loop", run.sender, {}).kiq(seconds)
            run.wait_for("blocking", processes=1)
    finally:
        await run.sender.shutdown()
    started = time.monotonic()
    for n in range(signals):
        if n:
            time.sleep(0.5)
        os.killpg(worker.pid, signal.SIGINT)  # Ctrl-C: the whole group
    code = worker.wait(timeout=EXIT_WITHIN)
    output = run.output(worker)
    assert code in expected_codes(state, signals), output
    assert "Traceback" not in output
    assert_nothing_left(worker.pid)
    if signals == 1 or state in ("idle", "awaiting task"):
        # Each lifespan that started shut down, the cut task's included.
        assert run.count("shutdown") == run.count("startup"), run.events()
    if signals > 1 and state in ("awaiting task", "blocking task"):
        assert time.monotonic() - started < SHUTDOWN_TIMEOUT + 3 + 10, output


# The console script's own entry point, with the import of the worker command
# (FastAPI, taskiq: most of a second) held for 30 s, so that a signal surely
# lands in it. Only the standard library is imported before the command's.
SLOW_COMMAND_IMPORT = """
import importlib.abc, os, sys, time

class HoldTheWorkerCommand(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "taskiq_fastapi_cli.commands.worker":
            with open(os.environ["EVENTS_FILE"], "a") as events:
                events.write(f"{os.getpid()} importing the command\\n")
            time.sleep(30)
        return None

sys.meta_path.insert(0, HoldTheWorkerCommand())
from taskiq_fastapi_cli.commands.cli import run
run()
"""


@pytest.mark.parametrize("stops", [1, 2])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("importing", ["the project", "the command itself"])
def test_a_stop_while_the_main_process_imports_exits_0(
    run: WorkerRun, sig: signal.Signals, importing: str, stops: int
) -> None:
    # A Ctrl-C exited 1 ("Aborted!"), or 130 with a traceback while the
    # command imported FastAPI and taskiq; a SIGTERM killed it (-15). A
    # second one (a double Ctrl-C) during the few tenths of a second the
    # exit takes killed it too (-2, -15).
    if importing == "the project":  # a task module that takes 30 s
        project = ["workerapp.slow_import", "--app", "workerapp.slow:app"]
        command, event = (COMMAND,), "importing"
    else:
        project = ["workerapp.tasks", "--app", "workerapp.app:app"]
        command = (sys.executable, "-c", SLOW_COMMAND_IMPORT)
        event = "importing the command"
    worker = run.start(
        "worker", "workerapp.broker:broker", *project, "--workers", "1",
        command=command,
    )  # fmt: skip
    run.stopped.append(worker)
    run.wait_for(event, processes=1)
    started = time.monotonic()
    os.killpg(worker.pid, sig)
    if stops == 2:
        time.sleep(0.05)
        os.killpg(worker.pid, sig)
    assert worker.wait(timeout=EXIT_WITHIN) == 0, run.output(worker)
    assert time.monotonic() - started < 10  # not after the 30 s import
    assert run.output(worker) == ""
    assert_nothing_left(worker.pid)


# The console script's own entry point, with each forked worker process held
# for 2 s before it takes the stop signals that arrived while it started (a
# spawned worker imports the command afresh: test_signals' reload rows).
HELD_WORKER_START = """
import os, time
from taskiq_fastapi_cli.runtime import runner

release = runner.release_stop_signals

def held():
    with open(os.environ["EVENTS_FILE"], "a") as events:
        events.write(f"{os.getpid()} worker starting\\n")
    time.sleep(2)
    release()

runner.release_stop_signals = held
from taskiq_fastapi_cli.commands.cli import run
run()
"""


def test_two_stops_waiting_as_a_forked_worker_starts_stop_it_once_and_quietly(
    run: WorkerRun,
) -> None:
    # Two Ctrl-C: the group's SIGINT and the supervisor's SIGTERM wait in the
    # starting worker. Forked, each raised: the second in the middle of the
    # quiet exit, with a traceback, and the command exited 4.
    worker = run.start(
        "worker", "workerapp.broker:broker", "workerapp.tasks",
        "--app", "workerapp.app:app", "--workers", "1",
        "--start-method", "fork",  # the held start reaches forked workers only
        command=(sys.executable, "-c", HELD_WORKER_START),
    )  # fmt: skip
    run.stopped.append(worker)
    run.wait_for("worker starting", processes=1)
    os.killpg(worker.pid, signal.SIGINT)
    time.sleep(0.5)  # the supervisor has taken the first: this is a second
    os.killpg(worker.pid, signal.SIGINT)
    # No task was in flight and no lifespan had started: a clean stop.
    assert run.exit_status(worker, timeout=EXIT_WITHIN) == 0, run.output(worker)
    assert "Traceback" not in run.output(worker)
    assert run.count("startup") == {}
    assert_nothing_left(worker.pid)


@pytest.mark.parametrize(
    "options", [["--start-method", "spawn"], ["--reload", "--reload-dir", "{tmp}"]]
)
def test_a_sigterm_to_the_group_while_a_spawned_worker_imports_exits_0(
    run: WorkerRun, tmp_path: Path, options: list[str]
) -> None:
    # systemd (KillMode=control-group) signals every process: the spawned
    # worker, still importing, had Python's default SIGTERM and was killed,
    # and the command exited 4 with nothing in flight.
    worker = run.start(
        "worker", "workerapp.broker:broker", "workerapp.tasks",
        "--app", "workerapp.app:app", "--workers", "1",
        *(option.format(tmp=tmp_path) for option in options),
    )  # fmt: skip
    run.stopped.append(worker)
    deadline = time.monotonic() + 30
    while "Started process worker-0" not in run.output(worker):
        assert time.monotonic() < deadline, run.output(worker)
        time.sleep(0.01)
    os.killpg(worker.pid, signal.SIGTERM)  # the worker imports for a second
    assert worker.wait(timeout=EXIT_WITHIN) == 0, run.output(worker)
    assert "Traceback" not in run.output(worker)
    assert_nothing_left(worker.pid)


async def test_a_task_cut_by_a_second_signal_is_redelivered_not_saved(
    stream_run: WorkerRun,
) -> None:
    run = stream_run
    ack = ["--ack-type", "when_executed"]
    app = ["workerapp.broker:broker", "workerapp.tasks", "--app", "workerapp.app:app"]
    first = run.start("worker", *app, "--workers", "1", *ack)
    run.wait_for("startup", processes=1)
    await run.sender.startup()
    try:
        task = await run.kiq("slow_first_time", 7)
        run.wait_for("task 7 started", processes=1)
        run.stopped.append(first)
        os.killpg(first.pid, signal.SIGINT)
        time.sleep(0.5)
        os.killpg(first.pid, signal.SIGINT)
        assert first.wait(timeout=EXIT_WITHIN) == EXIT_UNCLEAN, run.output(first)
        # Said in one line, without taskiq's traceback of the cancellation.
        assert "1 task(s) cancelled" in run.output(first)
        assert "Traceback" not in run.output(first)
        (pid,) = run.count("startup")
        assert run.count("shutdown") == {pid: 1}  # the lifespan still shut down
        assert not await task.is_ready()  # no result for the cut task
        second = run.start("worker", *app, "--workers", "1", *ack)
        run.wait_for("startup", processes=2)
        await asyncio.sleep(1.5)  # past the stream broker's idle_timeout
        await run.kiq("mark", -1)  # it reclaims on its next fetch
        result = await task.wait_result(timeout=60)
    finally:
        await run.sender.shutdown()
    assert result.return_value == 7
    assert run.count("task 7 done") != {pid: 1}  # ran again, elsewhere
    assert run.stop(second) == 0


async def test_a_fetch_that_ignores_its_cancellation_does_not_hold_the_stop(
    run: WorkerRun,
) -> None:
    """The fetch waiting when the stop comes swallows the receiver's
    cancellation (as redis-py's could before Python 3.12) and goes on
    waiting. taskiq 0.13 cancels that fetch and waits for it, so the guard
    cancels it again, and the stop is clean. taskiq runs each fetch in a
    task of its own; the guard had kept the first fetch's task, long done,
    and the stop waited for ever. (taskiq 0.11 leaves the fetch running, so
    nothing waits for it.)"""
    worker = run.start(
        "worker", "workerapp.fetch_swallows_cancel:broker", "workerapp.tasks",
        "--app", "workerapp.app:app", "--workers", "1",
    )  # fmt: skip
    run.wait_for("startup", processes=1)
    for n in range(3):  # a fetch for each, after the first fetch is done
        await run.kiq("mark", n)
        run.wait_for(f"ran {n}", processes=1)
    run.stopped.append(worker)
    worker.send_signal(signal.SIGTERM)
    code = await asyncio.to_thread(run.exit_status, worker, EXIT_WITHIN)
    output = run.output(worker)
    assert code == 0, output
    assert set(run.count("shutdown").values()) == {1}, output
    assert "never retrieved" not in output  # taskiq 0.11's abandoned fetch
    assert "Traceback" not in output
    if _release(version("taskiq")) >= (0, 13):
        assert "fetch swallowed a cancellation" in [e for _, e in run.events()]
        again = "The broker's fetch ignored cancellation; cancelling again."
        assert again in output


async def test_a_task_still_running_past_wait_tasks_timeout_is_no_clean_stop(
    run: WorkerRun,
) -> None:
    """taskiq stops waiting for tasks at --wait-tasks-timeout and shuts down
    with them unfinished: the command exited 0, which says every in-flight
    task finished."""
    worker = run.start(
        "worker", "workerapp.broker:broker", "workerapp.tasks",
        "--app", "workerapp.app:app", "--workers", "1",
        "--wait-tasks-timeout", "1",
    )  # fmt: skip
    run.wait_for("startup", processes=1)
    await run.kiq("slow", 5, 3600)
    run.wait_for("task 5 started", processes=1)
    run.stopped.append(worker)
    worker.send_signal(signal.SIGTERM)
    code = await asyncio.to_thread(run.exit_status, worker, EXIT_WITHIN)
    output = run.output(worker)
    assert code == EXIT_UNCLEAN, output
    said = "1 task(s) still running past --wait-tasks-timeout: stopped unfinished"
    assert said in output
    assert set(run.count("shutdown").values()) == {1}, output
    assert "task 5 done" not in [e for _, e in run.events()]
    assert "Traceback" not in output


async def stop_during_a_sync_task(
    run: WorkerRun, said: str, *options: str
) -> subprocess.Popen[bytes]:
    """One worker process running `workerapp.sync_held` (held until the test
    releases it), sent a SIGTERM while it runs; returned once it logs `said`."""
    worker = run.start(
        "worker", "workerapp.broker:broker", "workerapp.sync_held",
        "--app", "workerapp.app:app", "--workers", "1", *options,
    )  # fmt: skip
    run.wait_for("startup", processes=1)
    await AsyncKicker("workerapp.sync_held:sync_held", run.sender, {}).kiq(1)
    run.wait_for("sync task 1 started", processes=1)
    run.stopped.append(worker)
    worker.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + EXIT_WITHIN
    while said not in run.output(worker):
        assert time.monotonic() < deadline, run.output(worker)
        await asyncio.sleep(0.05)
    return worker


async def test_a_sync_task_still_running_past_wait_tasks_timeout_is_no_clean_stop(
    run: WorkerRun,
) -> None:
    """A sync task's thread holds taskiq's executor past --wait-tasks-timeout,
    and its task then saved its result during the broker's shutdown, which
    closed the result backend under it ("Connection closed by server"):
    counted once the shutdown was over, it was none, and the command exited
    0."""
    worker = await stop_during_a_sync_task(
        run, "No more tasks to wait for", "--wait-tasks-timeout", "1"
    )
    Path(f"{run.events_file}.release-1").touch()  # taskiq gave up on it
    code = await asyncio.to_thread(run.exit_status, worker, EXIT_WITHIN)
    output = run.output(worker)
    assert code == EXIT_UNCLEAN, output
    # Whether the task ends before the broker's shutdown does depends on
    # when the loop next runs it; either way it is said, once.
    said = re.findall(
        r"1 task\(s\) still running past --wait-tasks-timeout: "
        r"(finished later|stopped unfinished)",
        output,
    )
    assert len(said) == 1, output
    assert set(run.count("shutdown").values()) == {1}, output


@pytest.mark.parametrize(
    ("said", "options"),
    [
        ("Waiting for 1 running tasks", []),
        ("No more tasks to wait for", ["--wait-tasks-timeout", "1"]),
    ],
    ids=["waiting", "past-wait-tasks-timeout"],
)
async def test_a_second_signal_during_a_sync_task_still_shuts_the_lifespan_down(
    run: WorkerRun, said: str, options: list[str]
) -> None:
    """taskiq waits for its executor's threads before it shuts the broker
    down, with its event loop stopped: a sync task's thread, which nothing
    stops, held the app's lifespan shutdown back through a second signal
    (which, past --wait-tasks-timeout, reached nobody), until the supervisor
    killed the process with the lifespan never shut down. Now the lifespan
    shuts down at once; the process, its thread still running, is killed as
    the README says (exit 4)."""
    worker = await stop_during_a_sync_task(
        run, said, "--shutdown-timeout", "2", *options
    )
    worker.send_signal(signal.SIGTERM)
    run.wait_for("shutdown", processes=1, timeout=2)  # before the kill
    code = await asyncio.to_thread(run.exit_status, worker, EXIT_WITHIN)
    output = run.output(worker)
    assert code == EXIT_UNCLEAN, output
    assert "Stopping now: 1 task(s) cancelled" in output
    assert "sync task 1 done" not in [e for _, e in run.events()]
    assert "Traceback" not in output


async def test_a_second_signal_during_a_process_pool_task_leaves_no_process(
    run: WorkerRun,
) -> None:
    """--use-process-pool: the pool's process running the task held the
    worker process at exit (the pool's manager thread waits for it) until
    the supervisor killed it; the pool's processes then ran on, orphaned,
    after the command exited. They are killed at the stop now, and the
    worker process exits on its own."""
    if _release(version("taskiq")) < (0, 12):
        # taskiq 0.11 cannot send a sync task to a process pool (it pickles
        # a contextvars.Context): the task fails, and the stop is clean.
        worker = run.start(
            "worker", "workerapp.broker:broker", "workerapp.sync_held",
            "--app", "workerapp.app:app", "--workers", "1", "--use-process-pool",
        )  # fmt: skip
        run.wait_for("startup", processes=1)
        kicker = AsyncKicker("workerapp.sync_held:sync_held", run.sender, {})
        result = await (await kicker.kiq(1)).wait_result(timeout=EXIT_WITHIN)
        assert result.is_err, result
        assert "pickle" in str(result.error), result
        run.stopped.append(worker)
        worker.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(run.exit_status, worker, EXIT_WITHIN) == 0
        assert_nothing_left(worker.pid)
        return
    worker = await stop_during_a_sync_task(
        run, "Waiting for 1 running tasks", "--shutdown-timeout", "2",
        "--use-process-pool",
    )  # fmt: skip
    worker.send_signal(signal.SIGTERM)
    code = await asyncio.to_thread(run.exit_status, worker, EXIT_WITHIN)
    output = run.output(worker)
    try:
        assert_nothing_left(worker.pid)
    finally:
        Path(f"{run.events_file}.release-1").touch()  # an orphan ends
    assert code == EXIT_UNCLEAN, output
    assert "Stopping now: 1 task(s) cancelled" in output
    assert set(run.count("shutdown").values()) == {1}, output
    assert "killing it" not in output
    assert "Traceback" not in output


async def test_a_task_that_finishes_during_the_shutdown_is_not_said_unfinished(
    run: WorkerRun,
) -> None:
    """A task past --wait-tasks-timeout that ends while the app's lifespan
    shuts down: the stop is unclean (it ran on as the app shut down), but it
    finished and its result was saved; it was said stopped, with no result."""
    worker = run.start(
        "worker", "workerapp.broker:broker", "workerapp.tasks",
        "--app", "workerapp.held_shutdown:app", "--workers", "1",
        "--wait-tasks-timeout", "1", "--shutdown-timeout", "60",
    )  # fmt: skip
    run.wait_for("startup", processes=1)
    task = await run.kiq("held", 1)
    run.wait_for("task 1 started", processes=1)
    run.stopped.append(worker)
    worker.send_signal(signal.SIGTERM)
    run.wait_for("shutting down", processes=1)  # taskiq gave up on the task
    Path(f"{run.events_file}.release-1").touch()
    run.wait_for("task 1 done", processes=1)
    result = await task.wait_result(timeout=EXIT_WITHIN)
    Path(f"{run.events_file}.release-shutdown").touch()
    code = await asyncio.to_thread(run.exit_status, worker, EXIT_WITHIN)
    output = run.output(worker)
    assert result.return_value == 1, output
    assert code == EXIT_UNCLEAN, output
    assert "stopped unfinished" not in output
    said = (
        "1 task(s) still running past --wait-tasks-timeout: finished later, "
        "before this process exited."
    )
    assert said in output


async def test_a_restart_at_max_tasks_per_child_leaves_the_stop_clean(
    run: WorkerRun,
) -> None:
    """A process that reached --max-tasks-per-child waits --wait-tasks-timeout
    for its tasks too, and taskiq restarts it: it exited 4, which made the
    command's status 4 when a stop came before taskiq's next look at its
    processes (once a second) replaced it, and 0 after."""
    worker = run.start(
        "worker", "workerapp.broker:broker", "workerapp.tasks",
        "--app", "workerapp.app:app", "--workers", "1",
        "--max-tasks-per-child", "1", "--wait-tasks-timeout", "1",
    )  # fmt: skip
    run.wait_for("startup", processes=1)
    await run.kiq("slow", 1, 3600)
    said = "1 task(s) still running past --wait-tasks-timeout: stopped unfinished"
    deadline = time.monotonic() + EXIT_WITHIN
    while said not in run.output(worker):
        assert time.monotonic() < deadline, run.output(worker)
        await asyncio.sleep(0.05)
    run.stopped.append(worker)
    worker.send_signal(signal.SIGTERM)  # before taskiq replaced that process
    code = await asyncio.to_thread(run.exit_status, worker, EXIT_WITHIN)
    assert code == 0, run.output(worker)


def log_messages(output: str) -> list[str]:
    """The messages of the log lines, without their time and logger."""
    return [line.rsplit("] ", 1)[-1] for line in output.splitlines()]


def index_of(messages: list[str], start: str) -> int:
    found = [n for n, message in enumerate(messages) if message.startswith(start)]
    assert found, f"no {start!r} in {messages}"
    return found[0]


async def test_the_stop_is_logged_in_the_order_it_happens(run: WorkerRun) -> None:
    worker = run.start(
        "worker", "workerapp.broker:broker", "workerapp.tasks",
        "--app", "workerapp.app:app", "--workers", "1",
    )  # fmt: skip
    run.wait_for("startup", processes=1)
    await run.kiq("slow", 0, 2)
    run.wait_for("task 0 started", processes=1)
    assert run.stop(worker) == 0
    messages = log_messages(run.output(worker))
    # The worker is asked to stop, finishes its task, then it has stopped.
    asked = index_of(messages, "Stopping worker-0")
    waiting = index_of(messages, "Waiting for 1 running task")
    stopped = index_of(messages, "worker-0 (pid")
    assert asked < waiting < stopped, messages
    assert messages[stopped].endswith("stopped.")
    assert "Starting 1 worker process." in messages
    assert not any(message.startswith("Stopped process") for message in messages)


async def test_reload_says_once_how_many_processes_it_starts(
    run: WorkerRun, tmp_path: Path
) -> None:
    worker = run.start(
        "worker", "workerapp.broker:broker", "workerapp.tasks",
        "--app", "workerapp.app:app", "--workers", "2",
        "--reload", "--reload-dir", str(tmp_path),
    )  # fmt: skip
    run.wait_for("startup", processes=1)
    assert run.stop(worker) == 0
    messages = log_messages(run.output(worker))
    assert "Starting 2 worker processes." not in messages
    assert not any("set to 1" in message for message in messages), messages
    assert (
        "--reload: starting 1 worker process, so that each restart imports the "
        "changed code." in messages
    ), messages


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_to_the_group_while_a_forked_worker_starts_exits_0(
    run: WorkerRun, sig: signal.Signals
) -> None:
    # The group's signal and the supervisor's SIGINT both wait in the forked
    # worker, whose inherited handler raised twice: the second in the middle
    # of its quiet exit, a traceback and exit 1, so the command exited 4.
    worker = run.start(
        "worker", "workerapp.broker:broker", "workerapp.tasks", "workerapp.slow_fork",
        "--app", "workerapp.app:app", "--workers", "1",
    )  # fmt: skip
    run.stopped.append(worker)
    run.wait_for("forked", processes=1)
    os.killpg(worker.pid, sig)
    assert worker.wait(timeout=EXIT_WITHIN) == 0, run.output(worker)
    assert "Traceback" not in run.output(worker)
    assert_nothing_left(worker.pid)


# The console script's entry point, with a SIGTERM sent to itself right after
# taskiq's process manager installs its own handler, before ours replace it:
# where a stop arriving as the manager takes over lands.
STOP_AS_THE_MANAGER_TAKES_OVER = """
import os, signal, sys

install = signal.signal
sent = []

def install_then_stop(signum, handler):
    previous = install(signum, handler)
    module = getattr(handler, "__module__", "") or ""
    if signum == signal.SIGTERM and module.startswith("taskiq.") and not sent:
        sent.append(True)
        os.kill(os.getpid(), signal.SIGTERM)
    return previous

signal.signal = install_then_stop
from taskiq_fastapi_cli.commands.cli import run
run()
"""


def test_a_stop_as_the_manager_takes_over_is_not_lost(run: WorkerRun) -> None:
    # taskiq's handler put it on taskiq's queue, which ours replace: the
    # command went on serving, deaf to the stop it had been sent.
    worker = run.start(
        "worker", "workerapp.broker:broker", "workerapp.tasks",
        "--app", "workerapp.app:app", "--workers", "1",
        command=(sys.executable, "-c", STOP_AS_THE_MANAGER_TAKES_OVER),
    )  # fmt: skip
    run.stopped.append(worker)
    assert worker.wait(timeout=EXIT_WITHIN) == 0, run.output(worker)
    assert "Traceback" not in run.output(worker)
    assert_nothing_left(worker.pid)


def _wait_until_gone(pids: set[int], timeout: float) -> set[int]:
    """The pids of `pids` still running (not zombies) after up to `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        alive = set()
        for pid in pids:
            with suppress(OSError):
                if (
                    Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
                    != "Z"
                ):
                    alive.add(pid)
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


@pytest.mark.parametrize(
    ("family", "start_method"),
    [
        ("run", "fork"),
        ("run", "forkserver"),
        ("run", "spawn"),
        ("stream_run", "fork"),
        ("nats_run", "fork"),
    ],
)
async def test_workers_stop_gracefully_once_the_main_process_is_killed(
    request: pytest.FixtureRequest, family: str, start_method: str
) -> None:
    """The main process killed outright (SIGKILL, the OOM killer) runs no
    handler: its workers ran on, fetching tasks, with nobody to stop them.
    Each now stops as at a first signal: its running task finishes, its
    lifespan shuts down, it fetches nothing more (the README's delivery
    table: nothing lost, on each broker)."""
    run: WorkerRun = request.getfixturevalue(family)
    run.env["SLOW_STARTUP"] = "0"
    worker = run.start(
        "worker", "workerapp.broker:broker", "workerapp.tasks",
        "--app", "workerapp.slow:app", "--workers", "2",
        "--start-method", start_method,
    )  # fmt: skip
    run.stopped.append(worker)
    run.wait_for("startup", processes=2)
    await run.sender.startup()
    try:
        await run.kiq("slow", 0, 2.0)
        run.wait_for("task 0 started", processes=1)
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait()
        await asyncio.to_thread(run.wait_for, "shutdown", 2, EXIT_WITHIN)
        await run.kiq("slow", 1, 0.0)  # after the stop: no worker takes it
        assert_nothing_left(worker.pid)
    finally:
        await run.sender.shutdown()
    output = run.output(worker)
    assert output.count(f"The main process (pid {worker.pid}) is gone") == 2, output
    assert "Traceback" not in output
    assert run.count("task 0 done"), run.events()
    assert not run.count("task 1 started"), run.events()
    assert run.count("shutdown") == run.count("startup"), run.events()


async def test_under_fork_no_worker_waits_for_a_younger_one_once_the_main_process_is_killed(
    run: WorkerRun,
) -> None:
    """Under fork each worker inherits the main process's end of its older
    siblings' sentinel pipes: a worker learned that the main process was
    gone only once every younger worker had exited, and fetched and ran
    tasks meanwhile (here for the 8 s the younger one's task took). Each
    now stops at once, whatever its siblings still run."""
    run.env["SLOW_STARTUP"] = "0"
    worker = run.start(
        "worker", "workerapp.broker:broker", "workerapp.tasks",
        "--app", "workerapp.slow:app", "--workers", "2", "--start-method", "fork",
    )  # fmt: skip
    run.stopped.append(worker)
    run.wait_for("startup", processes=2)
    await run.sender.startup()
    try:
        # A long task in each worker: kicked until both have one.
        busy: set[int] = set()
        for n in range(10):
            await run.kiq("slow", n, 8.0)
            run.wait_for(f"task {n} started", processes=1)
            busy |= set(run.count(f"task {n} started"))
            if len(busy) == 2:
                break
        assert len(busy) == 2, run.events()
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait()
        gone = f"The main process (pid {worker.pid}) is gone"
        deadline = time.monotonic() + 4
        while run.output(worker).count(gone) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert run.output(worker).count(gone) == 2, run.output(worker)
        # taskiq 0.11 looks at its finish event every 0.3 s: said once seen.
        stopped = "Stopping prefetching messages"
        while run.output(worker).count(stopped) < 2:
            await asyncio.sleep(0.05)
        await run.kiq("mark", 99)  # after both stopped fetching: left queued
        await asyncio.to_thread(run.wait_for, "shutdown", 2, EXIT_WITHIN)
        assert_nothing_left(worker.pid)
    finally:
        await run.sender.shutdown()
    started = [e for _, e in run.events() if e.endswith(" started")]
    done = [e for _, e in run.events() if e.endswith(" done")]
    assert len(done) == len(started), run.events()
    assert not run.count("ran 99"), run.events()


async def test_once_the_main_process_is_killed_a_signal_to_a_worker_stops_it_now(
    run: WorkerRun,
) -> None:
    """Signals are counted by the main process: once it was killed outright,
    nothing counted them, and a worker draining a long task ignored every
    further SIGTERM (the task ran its 20 s; only SIGKILL stopped it sooner).
    The main process's death was the first: the next signal stops now."""
    run.env["SLOW_STARTUP"] = "0"
    worker = run.start(
        "worker", "workerapp.broker:broker", "workerapp.tasks",
        "--app", "workerapp.slow:app", "--workers", "1",
    )  # fmt: skip
    run.stopped.append(worker)
    run.wait_for("startup", processes=1)
    (worker_process,) = run.count("startup")
    await run.sender.startup()
    try:
        await run.kiq("slow", 0, 20.0)
        run.wait_for("task 0 started", processes=1)
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait()
        while "is gone" not in run.output(worker):
            await asyncio.sleep(0.05)
        os.kill(worker_process, signal.SIGTERM)
        await asyncio.to_thread(run.wait_for, "shutdown", 1, 10)
        assert_nothing_left(worker.pid)
    finally:
        await run.sender.shutdown()
    assert not run.count("task 0 done"), run.events()
    output = run.output(worker)
    assert "Stopping now: 1 task(s) cancelled" in output, output
    assert "Traceback" not in output


def _children(pid: int) -> set[int]:
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with suppress(OSError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.add(int(stat.parent.name))
    return found


async def test_a_worker_killed_outright_takes_its_process_pool_with_it(
    run: WorkerRun,
) -> None:
    """--use-process-pool: a worker process killed outright left the pool's
    processes running (one of them its sync task) after the command exited."""
    worker = run.start(
        "worker", "workerapp.broker:broker", "workerapp.sync_held",
        "--app", "workerapp.app:app", "--workers", "1", "--use-process-pool",
    )  # fmt: skip
    run.stopped.append(worker)
    run.wait_for("startup", processes=1)
    (worker_process,) = run.count("startup")
    task = await AsyncKicker("workerapp.sync_held:sync_held", run.sender, {}).kiq(1)
    if _release(version("taskiq")) < (0, 12):
        # taskiq 0.11 cannot send a sync task to a process pool (it pickles a
        # contextvars.Context): the task fails, the pool's processes wait.
        assert (await task.wait_result(timeout=EXIT_WITHIN)).is_err
    else:
        run.wait_for("sync task 1 started", processes=1)
    pool = _children(worker_process)
    assert pool, "the pool has no process"
    try:
        os.kill(worker_process, signal.SIGKILL)
        assert _wait_until_gone(pool, 10) == set()
        run.wait_for("startup", processes=2)  # taskiq started another worker
        worker.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(run.exit_status, worker, EXIT_WITHIN) == 0
        assert_nothing_left(worker.pid)
    finally:
        Path(f"{run.events_file}.release-1").touch()  # an orphan ends
    assert "sync task 1 done" not in [e for _, e in run.events()]
