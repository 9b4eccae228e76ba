"""`taskiq-fastapi check`, and the worker that refuses tasks it cannot serve (issue 7)."""

from __future__ import annotations

import ast
import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from taskiq.kicker import AsyncKicker
from workers import COMMAND, TASKIQ, TESTS_DIR, WorkerRun

from taskiq_fastapi_cli.commands import cli

BROKER = ["workerapp.broker:broker"]
APP = ["--app", "workerapp.app:app"]
PROBLEM = (
    "Task 'workerapp.bad_tasks:audit': parameter 'authorization' of "
    "current_user() is a Header parameter, which only an HTTP request has (the "
    "app can carry it from the request that kicked the task: CarryRequestContext)."
)


@pytest.fixture(autouse=True)
def _worker_env(monkeypatch: pytest.MonkeyPatch, redis_url: str) -> Iterator[None]:
    """Each check imports a fresh broker with only the task modules it names."""
    monkeypatch.chdir(TESTS_DIR)
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("TASKIQ_TEST_QUEUE", "check")
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.startswith("workerapp."):
            del sys.modules[name]


def check(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(["check", *argv], prog_name="taskiq-fastapi")
    out, err = capsys.readouterr()
    return code, out, err


def test_check_prints_every_task_with_its_tree_and_passes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = check(capsys, *BROKER, "workerapp.tasks", *APP)
    assert (code, err) == (0, "")
    receipt = out[out.index("workerapp.tasks:receipt\n") :].splitlines()[:6]
    assert receipt == [
        "workerapp.tasks:receipt",
        "  n: [message argument]",
        "  session: get_session()  [FastAPI Depends]",
        "    engine: get_engine()  [FastAPI Depends]",
        "      settings: get_settings()  [FastAPI Depends]",
        "      request: Request  [per-task Request, state from the app's lifespan]",
    ]
    assert "  db: database()  [TaskiqDepends]" in out
    # Every task the module declares, as its source says.
    source = ast.parse((Path(__file__).parent / "workerapp" / "tasks.py").read_text())
    declared = {
        f"workerapp.tasks:{node.name}"
        for node in source.body
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and any(ast.unparse(d) == "broker.task" for d in node.decorator_list)
    }
    listed = {line for line in out.splitlines() if line.startswith("workerapp.")}
    assert listed == declared
    assert out.endswith(f"{len(declared)} tasks checked, no problems.\n")


def test_check_fails_naming_the_task_the_function_and_the_parameter(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = check(
        capsys, *BROKER, "workerapp.tasks", "workerapp.bad_tasks", *APP
    )
    assert code == 1
    assert (
        "    authorization: Header parameter  "
        "[only in an HTTP request, and the app carries none: PROBLEM]" in out
    )
    assert out.endswith(f"1 problem:\n- {PROBLEM}\n")


def test_check_json_for_machines(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = check(capsys, *BROKER, "workerapp.bad_tasks", *APP, "--json")
    report = json.loads(out)
    assert code == 1
    assert report["problems"] == [PROBLEM]
    assert report["carrying"] is False
    (task,) = report["tasks"]
    assert task["name"] == "workerapp.bad_tasks:audit"
    assert task["problems"] == [PROBLEM]
    assert task["dependencies"][1] == {
        "parameter": "user",
        "source": "fastapi",
        "target": "current_user()",
        "dependencies": [
            {
                "parameter": "authorization",
                # From the kicking request, which this app does not carry.
                "source": "carried",
                "target": "Header parameter",
                "dependencies": [],
            }
        ],
    }


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (
            [*BROKER, "workerapp.nope", *APP],
            "Error: Cannot load task module 'workerapp.nope': "
            'Could not import module "workerapp.nope".\n',
        ),
        (
            ["workerapp.broker:nope", *APP],
            "Error: Cannot load broker 'workerapp.broker:nope': "
            'Attribute "nope" not found in module "workerapp.broker".\n',
        ),
        (
            BROKER,
            "Error: No app to serve: pass --app MODULE:ATTR (or set "
            "TASKIQ_FASTAPI_APP), or call taskiq_fastapi.init(broker, "
            '"module:app") in the broker module.\n',
        ),
    ],
)
def test_check_input_errors_are_one_line(
    capsys: pytest.CaptureFixture[str], argv: list[str], error: str
) -> None:
    code, out, err = check(capsys, *argv)
    assert code in (1, 2)
    assert (out, err) == ("", error)


def test_taskiq_fastapi_check_through_taskiqs_own_command() -> None:
    result = subprocess.run(
        [TASKIQ, "fastapi", "check", *BROKER, "workerapp.bad_tasks", *APP],
        cwd=TESTS_DIR,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1
    assert PROBLEM in result.stdout


def test_worker_refuses_to_start_with_a_task_it_cannot_serve(run: WorkerRun) -> None:
    worker = run.start(
        *["worker", *BROKER, "workerapp.tasks", "workerapp.bad_tasks"], *APP
    )
    assert worker.wait(timeout=60) == 3
    output = run.output(worker)
    assert f"Error: {PROBLEM}\n" in output
    assert "Traceback" not in output
    assert run.count("startup") == {}  # no lifespan started, no task ran


NOT_CARRIED = (
    "Task 'workerapp.bad_tasks:audit': header 'authorization' of current_user() "
    "is not carried: CarryRequestContext(headers=['X-Request-ID']) does not name "
    "the 'authorization' header (name it in headers=[...] to carry it)."
)


def test_check_names_a_header_the_app_carries_but_not_this_one(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = check(
        capsys, *BROKER, "workerapp.bad_tasks", "--app", "workerapp.carried:app"
    )
    assert code == 1
    assert (
        "    authorization: Header parameter  "
        "[only in an HTTP request, and the app does not carry it: PROBLEM]" in out
    )
    # What it does carry is not a problem.
    assert (
        "    x_request_id: Header parameter  [from the request that kicked the task]"
        in out
    )
    assert out.endswith(f"1 problem:\n- {NOT_CARRIED}\n")


@pytest.mark.parametrize(
    ("app", "problem"),
    [("workerapp.app:app", PROBLEM), ("workerapp.carried:app", NOT_CARRIED)],
)
def test_worker_finds_dependency_problems_before_any_worker_process(
    run: WorkerRun, app: str, problem: str
) -> None:
    """An app that is a module attribute: checked in the main process."""
    worker = run.start("worker", *BROKER, "workerapp.bad_tasks", "--app", app)
    assert worker.wait(timeout=60) == 3
    # One line and nothing else: no worker process started, no lifespan ran.
    assert run.output(worker).splitlines() == [f"Error: {problem}"]
    assert run.count("startup") == {}


def test_an_in_memory_broker_that_brings_its_own_listen_is_served(
    run: WorkerRun,
) -> None:
    """Only a `listen` that cannot work is refused, not the class: this
    InMemoryBroker subclass fetches from Redis, and its task runs."""
    worker = run.start(
        "worker", "workerapp.fed_inmemory:broker", "workerapp.fed_inmemory",
        "--app", "workerapp.app:app", "--workers", "1",
    )  # fmt: skip
    run.wait_for("startup", 1, timeout=60)
    kicker: AsyncKicker[Any, Any] = AsyncKicker(
        "workerapp.fed_inmemory:note", run.sender, {}
    )

    async def kick() -> None:
        await run.sender.startup()
        await kicker.kiq(7)
        await run.sender.shutdown()

    asyncio.run(kick())
    run.wait_for("fed 7", 1, timeout=30)
    assert run.stop(worker) == 0, run.output(worker)
    assert "Cannot serve" not in run.output(worker)


def test_check_names_a_class_dependency_by_its_class(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = check(
        capsys, *BROKER, "workerapp.shorthand", "--app", "workerapp.carried:app"
    )
    assert code == 0
    assert "  pager: Pager()  [FastAPI Depends]" in out
    assert "    page: Query parameter  [from the request that kicked the task]" in out


BAD_CARRY = (
    "The app's CarryRequestContext is invalid: CarryRequestContext headers must "
    "be a list of names, not the string 'x-request-id'."
)


def test_an_invalid_carry_setting_is_one_line_for_check_and_worker(
    run: WorkerRun, capsys: pytest.CaptureFixture[str]
) -> None:
    app = ["--app", "workerapp.badcarry:app"]
    code, out, err = check(capsys, *BROKER, "workerapp.tasks", *app)
    assert (code, out, err) == (1, "", f"Error: {BAD_CARRY}\n")
    worker = run.start("worker", *BROKER, "workerapp.tasks", *app)
    assert worker.wait(timeout=60) == 3
    assert run.output(worker).splitlines() == [f"Error: {BAD_CARRY}"]


COUNTED_PROJECT = """\
from fastapi import FastAPI
from taskiq_redis import ListQueueBroker

import taskiq_fastapi

broker = ListQueueBroker("redis://localhost:1")  # check connects to nothing
app = FastAPI()
taskiq_fastapi.init(broker, app)
"""


@pytest.mark.parametrize(
    ("tasks", "last_line"),
    [
        (0, "No tasks found: name the task modules after the broker."),
        (1, "1 task checked, no problems."),
        (2, "2 tasks checked, no problems."),
    ],
)
def test_check_counts_read_naturally(
    tmp_path: Path, tasks: int, last_line: str
) -> None:
    body = "".join(
        f"\n\n@broker.task\nasync def task_{n}() -> None: ...\n" for n in range(tasks)
    )
    (tmp_path / "counted.py").write_text(COUNTED_PROJECT + body)
    done = subprocess.run(
        [COMMAND, "check", "counted:broker", "--app-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.splitlines()[-1] == last_line
