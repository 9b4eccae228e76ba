"""Request context carried from a real uvicorn to a real worker on Redis (issue 11)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import urllib.request
from typing import Any

import httpx2
import pytest
import redis
from taskiq.kicker import AsyncKicker
from workers import COMMAND, TASKIQ, TESTS_DIR, WorkerRun, get_json

from taskiq_fastapi.request_context import LABEL, PASS_ON_LABEL

pytestmark = pytest.mark.anyio

CARRIED = [
    "workerapp.broker:broker",
    "workerapp.carried",
    "--app",
    "workerapp.carried:app",
]


def get(url: str, headers: dict[str, str]) -> Any:
    get_json(url.split("/shops")[0] + "/openapi.json", timeout=30)  # uvicorn is up
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def test_a_route_kicks_a_task_whose_header_and_query_dependencies_see_the_request(
    run: WorkerRun,
) -> None:
    api, port = run.serve("workerapp.carried:app")
    worker = run.start("worker", *CARRIED)
    run.wait_for("startup", processes=2)
    headers = {"X-Request-ID": "req-1234", "X-Internal-Secret": "do-not-send"}
    got = get(f"http://127.0.0.1:{port}/shops/5/report?page=3", headers)
    assert got["error"] == ""
    task = got["task"]
    assert task["pid"] != api.pid  # run by the worker, not in the API process
    assert task["page"] == 3
    assert task["request_id"] == "req-1234"
    assert task["url"] == "http://localhost:8000/shops/5/report?page=3"
    assert task["path_params"] == {"shop_id": "5", "name": "report"}
    assert task["headers"] == ["host", "x-request-id"]  # not the one not named

    # Passed on: a task kicked by a task in the worker carries the same.
    relayed = get(f"http://127.0.0.1:{port}/shops/5/relay?page=4", headers)
    assert relayed["error"] == ""
    assert relayed["task"]["page"] == 4
    assert relayed["task"]["request_id"] == "req-1234"
    assert relayed["task"]["url"] == "http://localhost:8000/shops/5/relay?page=4"
    assert run.stop(worker) == 0
    run.stop(api)


def test_code_a_task_started_that_outlives_it_passes_nothing_on(
    run: WorkerRun,
) -> None:
    """As code a request started that outlives the request: an asyncio task a
    task made, kicking after the task was over, passed the request on (with
    pass_on), for as long as it ran."""
    _api, port = run.serve("workerapp.carried:app")
    run.start("worker", *CARRIED, "--workers", "1")
    run.wait_for("startup", processes=2)
    headers = {"X-Request-ID": "req-1234"}
    assert get(f"http://127.0.0.1:{port}/shops/5/outlived", headers)["error"] == ""
    later = get(f"http://127.0.0.1:{port}/shops/6/seen_later", {})
    assert later["error"] == ""
    assert later["task"]["request_id"] is None
    assert later["task"]["url"] == "http://localhost:8000/"
    for process in run.processes:
        run.stop(process)


def test_check_reports_no_problem_when_the_app_carries(run: WorkerRun) -> None:
    result = subprocess.run(
        [COMMAND, "check", *CARRIED], cwd=TESTS_DIR, env=run.env,
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert (
        "    x_request_id: Header parameter  "
        "[from the request that kicked the task]" in result.stdout
    )


async def test_a_worker_that_does_not_know_the_label_ignores_it(run: WorkerRun) -> None:
    """A worker without this package's reading of it: plain taskiq."""
    worker = run.start(
        "worker", "workerapp.broker:broker", "workerapp.tasks", command=(TASKIQ,)
    )
    label = json.dumps({"v": 1, "method": "GET", "path": "/", "root_path": "",
                        "path_params": {}, "query_string": "", "headers": []})  # fmt: skip
    kicker: AsyncKicker[Any, Any] = AsyncKicker("workerapp.tasks:mark", run.sender, {})
    await run.sender.startup()
    try:
        task = await kicker.with_labels(**{LABEL: label}).kiq(5)
        result = await task.wait_result(timeout=30)
    finally:
        await run.sender.shutdown()
    assert not result.is_err, result.error
    assert result.return_value == 5
    run.kill_all()
    assert worker.returncode is not None


async def test_hundreds_of_concurrent_requests_each_task_sees_its_own(
    run: WorkerRun,
) -> None:
    """A real uvicorn and a real worker running many tasks at once per process."""
    api, port = run.serve("workerapp.carried:app")
    worker = run.start("worker", *CARRIED, "--max-async-tasks", "100")
    run.wait_for("startup", processes=2)
    base = f"http://127.0.0.1:{port}"
    get_json(base + "/openapi.json", timeout=30)  # uvicorn is up
    limits = httpx2.Limits(max_connections=300)
    async with httpx2.AsyncClient(base_url=base, timeout=60, limits=limits) as client:
        responses = await asyncio.gather(
            *(
                client.get("/shops/1/whose", headers={"X-Request-ID": f"req-{i}"})
                for i in range(300)
            )
        )
    results = [response.json() for response in responses]
    assert results == [
        {"task": {"own": f"req-{i}", "uncached": f"req-{i}", "header": f"req-{i}"},
         "error": ""}
        for i in range(300)
    ]  # fmt: skip
    assert run.stop(worker) == 0
    run.stop(api)


async def test_a_label_the_worker_cannot_read_is_ignored_whole(run: WorkerRun) -> None:
    """Messages written by hand into the queue, their label corrupt: each task
    runs with the plain Request, as with no label. A label nested past the
    JSON parser's depth used to fail the task with a RecursionError traceback,
    and with --task-logs (which reads the request id from it) the message was
    dropped: no result, no line in the log. A label read only in part (path
    parameters not an object, a root path not text) failed tasks deep in
    FastAPI or Starlette, or gave them a Request of the wrong types.
    """
    worker = run.start("worker", *CARRIED, "--task-logs")
    run.wait_for("startup", processes=2)
    good = {"v": 1, "method": "GET", "path": "/shops/5/report", "root_path": "",
            "path_params": {"shop_id": "5"}, "query_string": "page=3",
            "headers": [["x-request-id", "req-1"]]}  # fmt: skip
    deep = "[" * 10_000 + "]" * 10_000
    labels = {
        "nested too deep": f'{{"headers": [["x-request-id", "req-1"]], "x": {deep}}}',
        "path parameters not an object": json.dumps({**good, "path_params": ["5"]}),
        "root path not text": json.dumps({**good, "root_path": 5}),
        "a header value not text": json.dumps({**good, "headers": [["x-a", 1]]}),
    }
    kicker: AsyncKicker[Any, Any] = AsyncKicker(
        "workerapp.carried:report", run.sender, {}
    )
    await run.sender.startup()
    try:
        tasks = {what: await kicker.with_labels(**{LABEL: label}).kiq()
                 for what, label in labels.items()}  # fmt: skip
        results = {what: await task.wait_result(timeout=30)
                   for what, task in tasks.items()}  # fmt: skip
    finally:
        await run.sender.shutdown()
    plain = {"page": 1, "request_id": None, "url": "http://localhost:8000/",
             "path_params": {}, "headers": ["host"]}  # fmt: skip
    for what, result in results.items():
        assert not result.is_err, (what, result.error)
        assert {k: v for k, v in result.return_value.items() if k != "pid"} == plain
    assert run.stop(worker) == 0
    assert "Traceback" not in run.output(worker)


async def test_what_a_task_carried_is_not_saved_with_its_result(
    run: WorkerRun, redis_url: str
) -> None:
    """taskiq saves a message's labels with its result: a header the app
    carries (an Authorization it names) stayed in the result backend, with no
    expiry at taskiq-redis' default, and came back with every wait_result. It
    travels in the message only."""
    worker = run.start("worker", *CARRIED, "workerapp.tasks")
    run.wait_for("startup", processes=2)
    label = json.dumps({"v": 1, "method": "GET", "path": "/", "root_path": "",
                        "path_params": {}, "query_string": "",
                        "headers": [["authorization", "Bearer s3cret"]]})  # fmt: skip
    kicker: AsyncKicker[Any, Any] = AsyncKicker("workerapp.tasks:mark", run.sender, {})
    await run.sender.startup()
    try:
        carrying = kicker.with_labels(**{LABEL: label, PASS_ON_LABEL: "1"})
        task = await carrying.with_labels(kept="yes").kiq(5)
        result = await task.wait_result(timeout=30)
    finally:
        await run.sender.shutdown()
    assert not result.is_err, result.error
    assert result.labels["kept"] == "yes"  # the kick's own labels stay
    assert LABEL not in result.labels
    assert PASS_ON_LABEL not in result.labels
    client = redis.Redis.from_url(redis_url)
    try:
        saved = [client.get(key) for key in client.scan_iter(f"*{task.task_id}*")]
    finally:
        client.close()
    assert saved
    assert not any(b"s3cret" in (value or b"") for value in saved)
    assert run.stop(worker) == 0


def test_check_and_worker_read_what_the_app_carries_to_their_broker(
    run: WorkerRun,
) -> None:
    """An app with a CarryRequestContext per broker: the check of the internal
    broker's tasks read the first one in the app's list, the public broker's,
    and refused a task whose header only the internal broker's carries."""
    project = ["workerapp.broker:broker", "workerapp.twobrokers"]
    app = ["--app", "workerapp.twobrokers:app"]
    result = subprocess.run(
        [COMMAND, "check", *project, *app], cwd=TESTS_DIR, env=run.env,
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    worker = run.start("worker", *project, *app)
    run.wait_for("startup", processes=2)
    assert run.stop(worker) == 0


def test_a_task_passes_its_request_on_to_its_own_broker_only(run: WorkerRun) -> None:
    """An app whose internal broker carries Authorization, and passes it on,
    and whose public broker's middleware names only X-Request-ID: a task of
    the internal broker that kicked a public task passed the Authorization
    header on to the public broker, where a kick from the request itself
    carries only what the public broker's middleware names."""
    module = "workerapp.passon_brokers"
    _api, port = run.serve(f"{module}:app")
    for broker in ("workerapp.broker:broker", f"{module}:public"):
        run.start("worker", broker, module, "--app", f"{module}:app", "--workers", "1")
    run.wait_for("startup", processes=3)
    headers = {"Authorization": "Bearer s3cret", "X-Request-ID": "req-7"}
    get_json(f"http://127.0.0.1:{port}/openapi.json", timeout=30)  # uvicorn is up
    request = urllib.request.Request(f"http://127.0.0.1:{port}/relay", headers=headers)
    with urllib.request.urlopen(request, timeout=60) as response:
        got = json.loads(response.read())
    public_only = {"host": "localhost:8000", "x-request-id": "req-7"}
    assert got["direct"] == public_only
    assert got["relayed"] == {
        f"{module}:internal_seen": {
            **public_only,
            "authorization": "Bearer s3cret",
        },
        f"{module}:public_seen": {"host": "localhost:8000"},
    }
    for process in run.processes:
        run.stop(process)
