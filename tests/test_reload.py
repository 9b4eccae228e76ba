"""`--reload` reacts to source changes only, as uvicorn's does (issue 10)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from taskiq.kicker import AsyncKicker
from workerapp.brokers import make_broker
from workers import APP, BROKER, WorkerRun

from taskiq_fastapi_cli.runtime.reload import ReloadFilter, watch


@pytest.mark.parametrize(
    ("includes", "excludes", "path", "reloads"),
    [
        ([], [], "app/tasks.py", True),
        ([], [], "app.db", False),
        ([], [], "logs/worker.log", False),
        ([], [], "app/.tasks.py", False),  # hidden, as an editor's temp file
        ([], [], "app/tasks.py.swp", False),
        (["*.toml"], [], "settings.toml", True),
        (["*.toml"], [], "app/tasks.py", True),  # *.py stays
        ([], ["*.py"], "app/tasks.py", False),  # the default itself dropped
        ([], ["*_test.py"], "app/tasks_test.py", False),
        ([".*"], [], "app/.env.py", True),  # the default exclude dropped
    ],
)
def test_patterns_follow_uvicorn(
    includes: list[str], excludes: list[str], path: str, reloads: bool
) -> None:
    assert ReloadFilter(includes, excludes)(Path("/project") / path) is reloads


def test_an_excluded_directory_excludes_everything_under_it(tmp_path: Path) -> None:
    (tmp_path / "migrations").mkdir()
    accept = ReloadFilter([], [str(tmp_path / "migrations")])
    assert not accept(tmp_path / "migrations" / "versions" / "001_init.py")
    assert accept(tmp_path / "models.py")


def test_the_default_directory_watches_the_project_s_packages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--reload` from the project directory, taskiq's default '.': a change in
    a package's module restarts the workers (watchdog 7.1 watched no
    subdirectory of a relative root)."""
    from watchdog.observers import Observer

    (tmp_path / "shop").mkdir()
    (tmp_path / "shop" / "tasks.py").write_text("x = 1\n")
    monkeypatch.chdir(tmp_path)
    reloads: list[object] = []
    observer = Observer()
    watch(observer, [], ReloadFilter([], []), reloads.append, use_gitignore=False)
    observer.start()
    try:
        time.sleep(0.3)
        (tmp_path / "shop" / "tasks.py").write_text("x = 2\n")
        deadline = time.monotonic() + 10
        while not reloads and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        observer.stop()
        observer.join()
    assert len(reloads) == 1


def wait_for_output(
    run: WorkerRun, worker: subprocess.Popen[bytes], text: str, timeout: float = 30
) -> None:
    deadline = time.monotonic() + timeout
    while text not in run.output(worker):
        assert time.monotonic() < deadline, run.output(worker)
        time.sleep(0.02)


def start_reloading(
    run: WorkerRun, watched: Path, *options: str
) -> subprocess.Popen[bytes]:
    # The watched directory is outside the working directory: taskiq's own
    # .gitignore lookup never returned for one.
    worker = run.start(
        "worker", *BROKER, *APP, "--reload", "--reload-dir", str(watched), *options
    )
    run.wait_for("startup", processes=1)
    return worker


def test_data_and_log_files_do_not_restart_a_py_edit_restarts_once(
    run: WorkerRun, tmp_path: Path
) -> None:
    watched = tmp_path / "project"
    watched.mkdir()
    (watched / "tasks.py").write_text("x = 1\n")
    worker = start_reloading(run, watched)
    # What an app writes in its project directory while it runs.
    for n in range(20):
        with (watched / "app.db").open("ab") as db:
            db.write(b"page" * 1024)
        (watched / "worker.log").write_text(f"line {n}\n" * n)
        time.sleep(0.1)
    time.sleep(2)  # the manager looks at its queue every second
    assert run.count("startup").total() == 1
    assert "restarting" not in run.output(worker)

    # An editor's save: write a temporary file, then rename it over the module.
    (watched / ".tasks.py.tmp").write_text("x = 2\n")
    os.replace(watched / ".tasks.py.tmp", watched / "tasks.py")
    run.wait_for("startup", processes=2)
    time.sleep(3)
    assert run.count("startup").total() == 2
    output = run.output(worker)
    assert (
        output.count(f"Change in '{watched / 'tasks.py'}': restarting the workers.")
        == 1
    )
    assert run.stop(worker) == 0


def test_reload_include_adds_a_pattern(run: WorkerRun, tmp_path: Path) -> None:
    watched = tmp_path / "project"
    watched.mkdir()
    worker = start_reloading(run, watched, "--reload-include", "*.toml")
    (watched / "settings.toml").write_text("debug = true\n")
    run.wait_for("startup", processes=2)
    assert run.stop(worker) == 0


def test_ctrl_c_while_a_worker_restarts_prints_no_traceback(
    run: WorkerRun, tmp_path: Path
) -> None:
    watched = tmp_path / "project"
    watched.mkdir()
    worker = start_reloading(run, watched)
    (watched / "tasks.py").write_text("x = 1\n")
    # Between the replacement process's start and its first line of our
    # code it is importing, where a KeyboardInterrupt used to surface.
    wait_for_output(run, worker, "restarted with pid")
    time.sleep(0.1)
    os.killpg(worker.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    run.stopped.append(worker)
    assert worker.wait(timeout=30) == 0
    output = run.output(worker)
    assert "Traceback" not in output
    assert "KeyboardInterrupt" not in output


def test_a_stop_while_a_large_tree_is_being_watched_is_not_lost(
    run: WorkerRun, tmp_path: Path
) -> None:
    # Watching a tree (a monorepo, a node_modules) takes the main process
    # seconds; a signal then went to taskiq's own handler, whose queue nothing
    # reads, and the command served on until killed.
    watched = tmp_path / "project"
    for branch in range(200):
        for leaf in range(100):
            (watched / f"d{branch}" / f"e{leaf}").mkdir(parents=True)
    worker = run.start(
        "worker", *BROKER, *APP, "--reload", "--reload-dir", str(watched)
    )
    wait_for_output(run, worker, "--reload: starting 1 worker process")
    time.sleep(0.3)  # past taskiq's constructor, within the second of watching
    assert run.stop(worker, signal.SIGTERM, timeout=60) == 0, run.output(worker)


# A project of its own, so that the test can break and fix its files.
PROJECT_APP = """\
from fastapi import FastAPI
from workerapp.app import lifespan

app = FastAPI(lifespan=lifespan)
"""
PROJECT_TASKS = """\
from fastapi import Request
from workerapp.broker import broker


@broker.task
async def ping(request: Request) -> str:
    return "pong " + str(request.url_for("home"))
"""
PROJECT_APP_WITH_ROUTE = (
    PROJECT_APP
    + """
@app.get("/", name="home")
async def home() -> None: ...
"""
)
BROKEN = {
    # What a user saves by mistake, and the line that reports it.
    "app": ("rl_app.py", "app = FastAPI(\n", "rl_app.py"),
    "task module": ("rl_tasks.py", "def ping(:\n", "rl_tasks.py"),
    "dependency": (
        "rl_tasks.py",
        PROJECT_TASKS + "\n\nfrom fastapi import BackgroundTasks\n\n"
        "@broker.task\nasync def later(background: BackgroundTasks) -> None: ...\n",
        "later",
    ),
}


@pytest.mark.parametrize("mistake", list(BROKEN))
def test_a_mistake_saved_while_reloading_is_one_line_then_fixed_it_serves(
    run: WorkerRun, tmp_path: Path, mistake: str
) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "rl_app.py").write_text(PROJECT_APP_WITH_ROUTE)
    (project / "rl_tasks.py").write_text(PROJECT_TASKS)
    worker = run.start(
        "worker", "workerapp.broker:broker", "rl_tasks", "--app", "rl_app:app",
        "--app-dir", str(project), "--reload", "--reload-dir", str(project),
    )  # fmt: skip
    run.wait_for("startup", processes=1)
    assert asyncio.run(ping(run)) == "pong http://localhost:8000/"

    name, broken, where = BROKEN[mistake]
    good = (project / name).read_text()
    (project / name).write_text(broken)
    wait_for_output(run, worker, "Waiting for a change")
    time.sleep(3)  # the manager would have restarted a dead worker by now
    assert worker.poll() is None, run.output(worker)
    output = run.output(worker)
    assert "Traceback" not in output
    reported = [line for line in output.splitlines() if "Waiting for a change" in line]
    assert len(reported) == 1, output
    assert where in reported[0]
    assert reported[0].startswith("[")  # the log format of every other line

    (project / name).write_text(good)
    run.wait_for("startup", processes=2)
    assert asyncio.run(ping(run)) == "pong http://localhost:8000/"
    assert run.stop(worker) == 0


async def ping(run: WorkerRun) -> str:
    # A sender of its own: each asyncio.run is a new event loop.
    sender = make_broker(run.env["REDIS_URL"], run.queue)
    try:
        task = await AsyncKicker("rl_tasks:ping", sender, {}).kiq()
        result = await task.wait_result(timeout=30)
    finally:
        await sender.shutdown()
    return str(result.return_value)


def _state(pid: int) -> str | None:
    """A process's state letter, None once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return None


def start_with_a_broken_app(
    run: WorkerRun, tmp_path: Path
) -> tuple[Path, subprocess.Popen[bytes]]:
    """`--reload` on a project whose app module has a syntax error."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "rl_app.py").write_text("app = FastAPI(\n")
    (project / "rl_tasks.py").write_text(PROJECT_TASKS)
    worker = run.start(
        "worker", "workerapp.broker:broker", "rl_tasks", "--app", "rl_app:app",
        "--app-dir", str(project), "--reload", "--reload-dir", str(project),
    )  # fmt: skip
    return project, worker


def test_a_worker_waiting_for_a_change_stops_once_the_main_process_is_killed(
    run: WorkerRun, tmp_path: Path
) -> None:
    """A worker whose app failed to import waits for a change: in
    `signal.pause()`, it ran on, orphaned, once the main process was killed
    outright (no event loop, so no watch of the main process)."""
    _, worker = start_with_a_broken_app(run, tmp_path)
    run.stopped.append(worker)
    wait_for_output(run, worker, "Waiting for a change")
    (waiting,) = [
        int(pid)
        for pid in re.findall(
            r"Started process worker-0 with pid (\d+)", run.output(worker)
        )
    ]
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    deadline = time.monotonic() + 10
    while _state(waiting) not in (None, "Z") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _state(waiting) in (None, "Z"), run.output(worker)
    output = run.output(worker)
    assert f"The main process (pid {worker.pid}) is gone: stopping." in output
    assert "Traceback" not in output


def test_a_mistake_there_at_start_is_one_line_then_fixed_it_serves(
    run: WorkerRun, tmp_path: Path
) -> None:
    project, worker = start_with_a_broken_app(run, tmp_path)
    wait_for_output(run, worker, "Waiting for a change")
    output = run.output(worker)
    assert "Traceback" not in output
    assert "rl_app.py" in output
    assert worker.poll() is None, output

    (project / "rl_app.py").write_text(PROJECT_APP_WITH_ROUTE)
    run.wait_for("startup", processes=1)
    assert asyncio.run(ping(run)) == "pong http://localhost:8000/"
    assert run.stop(worker) == 0
