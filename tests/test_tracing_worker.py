"""A traced request's task, and its logs, in a real worker (issue 25).

A real uvicorn instrumented with OpenTelemetry's FastAPI instrumentor and a
real `taskiq-fastapi worker`, both writing their spans to one file through
batching processors (tests/workerapp/traced.py).
"""

from __future__ import annotations

import json
import subprocess
import urllib.request
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
from taskiq.kicker import AsyncKicker
from workers import COMMAND, TESTS_DIR, WorkerRun, get_json

from taskiq_fastapi.tracing import FIRST_TASKIQ, _release

TRACING = _release(version("taskiq")) >= FIRST_TASKIQ
TASK = "workerapp.traced:logged"
WORKER = ["worker", "workerapp.broker:broker", "workerapp.traced"]
WORKER += ["--app", "workerapp.traced:app", "--workers", "1"]
FORMAT = "%(task_id)s|%(task_name)s|%(request_id)s|%(name)s|%(message)s"
IN_TASK = {
    "workerapp.traced": ["in a dependency", "in the task"],
    "some.library": ["from a library"],
}


def kick(port: int, request_id: str) -> Any:
    get_json(f"http://127.0.0.1:{port}/openapi.json", timeout=30)  # uvicorn is up
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/traced", headers={"X-Request-ID": request_id}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def spans(path: Path) -> dict[str, dict[str, Any]]:
    """The spans of interest by kind: the request's, the kick's, the task's."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    wanted = {"SERVER": "GET /traced", "PRODUCER": f"send/{TASK}"}
    wanted["CONSUMER"] = f"execute/{TASK}"
    wanted["INTERNAL"] = "inside the task"
    found = {}
    for row in rows:
        if wanted.get(row["kind"]) == row["name"]:
            assert row["kind"] not in found, rows  # one of each
            found[row["kind"]] = row
    return found


def text_records(output: str) -> list[list[str]]:
    return [line.split("|", 4) for line in output.splitlines() if line.count("|") >= 4]


def json_records(output: str) -> list[list[str]]:
    records = [json.loads(line) for line in output.splitlines()]  # every line
    keys = ("task_id", "task_name", "request_id", "logger", "message")
    return [[r[k] if r[k] is not None else "-" for k in keys] for r in records]


@pytest.mark.parametrize(
    ("start_method", "log_options", "records"),
    [
        ("fork", ["--task-logs", "--log-format", FORMAT], text_records),
        ("forkserver", ["--log-json"], json_records),
    ],
)
def test_a_task_kicked_by_a_traced_request_continues_its_trace_and_logs_its_ids(
    run: WorkerRun, start_method: str, log_options: list[str], records: Any
) -> None:
    spans_file = run.tmp_path / "spans.jsonl"
    run.env["SPANS_FILE"] = str(spans_file)
    # Nothing leaves the worker's batch before its process exits: its spans
    # are there only if it flushes them (multiprocessing skips atexit hooks).
    run.env["OTEL_BSP_SCHEDULE_DELAY"] = "60000"
    run.env["TRACE_TASKS"] = "1"
    if not TRACING:  # taskiq 0.11: asking for tracing is one clear line
        refused = subprocess.run(
            [COMMAND, *WORKER], cwd=TESTS_DIR, env=run.env,
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert refused.returncode == 1
        assert refused.stderr.splitlines() == [
            "Error: Cannot load app 'workerapp.traced:app': importing it "
            "raised TracingUnavailableError: trace_tasks "
            f"needs taskiq 0.12 or newer, whose OpenTelemetry middleware it "
            f"adds; taskiq {version('taskiq')} is installed: "
            "pip install 'taskiq-fastapi[otel]'."
        ]
        del run.env["TRACE_TASKS"]  # the logs work on every taskiq
    api, port = run.serve("workerapp.traced:app")
    run.env["SPANS_BATCHED"] = "1"
    worker = run.start(*WORKER, "--start-method", start_method, *log_options)
    run.wait_for("startup", processes=2)
    got = kick(port, "req-25")
    assert got["pid"] != api.pid  # run by the worker
    assert run.stop(worker) == 0
    run.stop(api)

    # Every record made while the task ran carries its id, name and the
    # request id; a record outside any task carries none.
    logged = records(run.output(worker))
    ids = [got["task_id"], TASK, "req-25"]
    for logger, messages in IN_TASK.items():
        for message in messages:
            assert [*ids, logger, message] in logged, logged
    executing = f"Executing task {TASK} with ID: {got['task_id']}"
    assert [*ids, "taskiq.receiver.receiver", executing] in logged
    started = [r for r in logged if r[3] == "taskiq_fastapi" and "started" in r[4]]
    assert started
    assert started[0][:3] == ["-", "-", "-"]

    found = spans(spans_file)
    if not TRACING:
        assert found["INTERNAL"]["parent_id"] is None  # nothing to continue
        assert set(found) == {"SERVER", "INTERNAL"}  # nothing kicked
        return
    request, kicked, task = found["SERVER"], found["PRODUCER"], found["CONSUMER"]
    assert kicked["trace_id"] == request["trace_id"]
    assert kicked["parent_id"] == request["span_id"]
    assert kicked["pid"] == api.pid
    assert task["trace_id"] == request["trace_id"]
    assert task["parent_id"] == kicked["span_id"]
    assert task["pid"] == got["pid"]
    assert found["INTERNAL"]["parent_id"] == task["span_id"]  # the task's own


@pytest.mark.parametrize("start_method", ["fork", "spawn", "forkserver"])
def test_a_start_listen_an_instrumentor_replaced_runs_in_every_worker(
    run: WorkerRun, start_method: str
) -> None:
    """As under `taskiq worker`, whichever way the process started."""
    worker = run.start(
        "worker", "workerapp.listen_replaced:broker", "workerapp.tasks",
        "--app", "workerapp.app:app", "--workers", "1",
        "--start-method", start_method,
    )  # fmt: skip
    run.wait_for("startup", processes=1)
    assert run.stop(worker) == 0
    replaced = run.count("replaced start_listen")
    assert replaced == run.count("startup"), run.events()  # that worker, once


async def json_lines_of_task(run: WorkerRun, name: str) -> tuple[str, list[Any]]:
    """Run `workerapp.counted:<name>`(7) under --log-json: its id, every line."""
    worker = run.start(
        "worker", "workerapp.broker:broker", "workerapp.counted",
        "--app", "workerapp.app:app", "--workers", "1", "--log-json",
    )  # fmt: skip
    run.wait_for("startup", processes=1)
    await run.sender.startup()
    try:
        kicker: AsyncKicker[Any, Any] = AsyncKicker(
            f"workerapp.counted:{name}", run.sender, {}
        )
        task = await kicker.kiq(7)
        assert (await task.wait_result(timeout=30)).return_value == 7
    finally:
        await run.sender.shutdown()
    assert run.stop(worker) == 0
    lines = [json.loads(line) for line in run.output(worker).splitlines()]
    return task.task_id, lines


@pytest.mark.anyio
async def test_a_warning_a_task_raises_is_a_json_line_with_its_task(
    run: WorkerRun,
) -> None:
    """Python writes a warning to stderr as text lines of its own: under
    --log-json they broke the JSON stream a log pipeline reads."""
    task_id, records = await json_lines_of_task(run, "warned")
    warned = [r for r in records if "task 7 warns" in r["message"]]
    assert [(r["level"], r["task_id"]) for r in warned] == [("WARNING", task_id)], (
        records
    )


@pytest.mark.anyio
async def test_a_log_call_whose_arguments_do_not_fit_is_one_json_line(
    run: WorkerRun,
) -> None:
    """logging's "--- Logging error ---" report of a call whose arguments do
    not fit its format (a library's bug) was about 70 lines of plain text
    under --log-json."""
    task_id, records = await json_lines_of_task(run, "misformatted")
    logged = [r for r in records if r["logger"] == "some.library"]
    assert [(r["level"], r["task_id"], r["message"]) for r in logged] == [
        (
            "INFO",
            task_id,
            "%d items of task %s (its arguments ('many', 7) did not fit: "
            "TypeError: %d format: a real number is required, not str)",
        )
    ], records


@pytest.mark.skipif(not TRACING, reason="taskiq 0.11's process pool")
@pytest.mark.anyio
async def test_a_process_of_the_pool_does_not_log_as_the_task_it_was_forked_from(
    run: WorkerRun,
) -> None:
    """taskiq's --use-process-pool forks its processes from the task that first
    needs one: every line each of them logged afterwards, for any task, said
    that task's id."""
    worker = run.start(
        "worker", "workerapp.broker:broker", "workerapp.sync_deps",
        "--app", "workerapp.app:app", "--workers", "1", "--use-process-pool",
        "--max-process-pool-processes", "1", "--task-logs", "--log-format", FORMAT,
    )  # fmt: skip
    run.wait_for("startup", processes=1)
    await run.sender.startup()
    try:
        kicker: AsyncKicker[Any, Any] = AsyncKicker(
            "workerapp.sync_deps:sync_logged", run.sender, {}
        )
        pids = []
        for n in range(3):
            task = await kicker.kiq(n)
            pids.append((await task.wait_result(timeout=30)).return_value)
    finally:
        await run.sender.shutdown()
    assert run.stop(worker) == 0
    assert len(set(pids)) == 1  # one process of the pool ran them all
    lines = [
        r for r in text_records(run.output(worker)) if r[3] == "workerapp.sync_deps"
    ]
    assert lines == [
        ["-", "-", "-", "workerapp.sync_deps", f"pool line {n}"] for n in range(3)
    ]
