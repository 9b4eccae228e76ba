"""The real `taskiq-fastapi worker` command against a real Redis (issue 3)."""

from __future__ import annotations

import asyncio
import gc
import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from workers import APP, TASKIQ, WorkerRun

pytestmark = pytest.mark.anyio

# Python 3.14 makes forkserver the default on Linux; 3.11-3.13 stand in for it.
START_METHODS = ["fork", "spawn", "forkserver"]


async def gather_results(run: WorkerRun, count: int) -> list[dict[str, object]]:
    await run.sender.startup()
    try:
        tasks = [await run.kiq("whoami", n) for n in range(count)]
        results = await asyncio.gather(*(t.wait_result(timeout=30) for t in tasks))
    finally:
        await run.sender.shutdown()
    assert [r.error for r in results if r.is_err] == []
    return [r.return_value for r in results]


def assert_each_process_ran_its_lifespan_once(run: WorkerRun, processes: int) -> None:
    startups, shutdowns = run.count("startup"), run.count("shutdown")
    assert len(startups) == processes
    assert set(startups.values()) == {1}
    assert shutdowns == startups


@pytest.mark.parametrize("start_method", ["fork", "forkserver"])
async def test_several_worker_processes_serve_the_app(
    run: WorkerRun, start_method: str
) -> None:
    worker = run.start(
        "worker", "workerapp.broker:broker", "workerapp.tasks", *APP,
        "--workers", "2", "--start-method", start_method,
    )  # fmt: skip
    run.wait_for("startup", processes=2)
    results = await gather_results(run, 40)
    assert [r["n"] for r in results] == list(range(40))
    for r in results:
        # Each task saw its own process's lifespan state and a working url_for.
        assert r["db"] == f"db-of-{r['pid']}"
        assert r["link"] == f"http://localhost:8000/items/{r['n']}"
    assert {r["pid"] for r in results} <= set(run.count("startup"))
    assert run.stop(worker) == 0
    assert_each_process_ran_its_lifespan_once(run, 2)


@pytest.mark.parametrize("start_method", START_METHODS)
async def test_workers_collect_garbage_and_forked_ones_share_frozen_imports(
    run: WorkerRun, start_method: str
) -> None:
    """The main process pauses garbage collection while it imports the
    project, and freezes what it imported before the workers fork. Every
    worker collects garbage, the first ones and one restarted later (forked
    from the main process as it runs: collection is on there too)."""
    worker = run.start(
        "worker", "workerapp.broker:broker", "workerapp.tasks", *APP,
        "--workers", "1", "--start-method", start_method,
    )  # fmt: skip
    run.wait_for("startup", processes=1)
    await run.sender.startup()
    try:
        seen = []
        for restarted in (False, True):
            if restarted:
                os.kill(seen[0]["pid"], signal.SIGKILL)
                run.wait_for("startup", processes=2)
            result = await (await run.kiq("collector")).wait_result(timeout=30)
            seen.append(result.return_value)
    finally:
        await run.sender.shutdown()
    assert seen[0]["pid"] != seen[1]["pid"]
    assert [each["enabled"] for each in seen] == [True, True]
    for each in seen:
        if start_method == "fork":  # FastAPI, taskiq, redis, the app...
            assert each["frozen"] > 50_000
        else:  # the worker imported them itself
            assert each["frozen"] == 0
    assert run.stop(worker) == 0
    assert {each["threshold"] for each in seen} == {gc.get_threshold()[0]}


DEFAULT_THRESHOLDS = list(gc.get_threshold())  # the workers' Python's


@pytest.mark.parametrize(
    ("setting", "value", "expected"),
    [
        ("APP_GC_THRESHOLD", "1234", [1234, *DEFAULT_THRESHOLDS[1:]]),
        # Automatic collection off, as gc's docs say and Instagram did.
        ("APP_GC_THRESHOLD", "0", [0, *DEFAULT_THRESHOLDS[1:]]),
        ("APP_GC_THRESHOLD", "0,50,60", [0, 50, 60]),
        # Read while the main process imports it: the thresholds it would
        # read under `taskiq worker`, not the pause's.
        ("APP_GC_OLDEST", "77", [*DEFAULT_THRESHOLDS[:2], 77]),
        ("APP_GC_DISABLE", "1", DEFAULT_THRESHOLDS),
    ],
)
async def test_the_projects_own_garbage_collection_setting_holds(
    run: WorkerRun, setting: str, value: str, expected: list[int]
) -> None:
    """As under `taskiq worker`: the app module sets it as it is imported.

    The main process pauses collection while it imports the project; the
    project's own thresholds, whatever they are, must outlast the pause.
    """
    run.env[setting] = value
    collected = await one_worker_collects(run)
    assert collected["thresholds"] == expected
    assert collected["enabled"] is (setting != "APP_GC_DISABLE")


async def test_a_process_the_project_forks_as_it_is_imported_collects(
    run: WorkerRun,
) -> None:
    """The pause of collection while the main process imports the project
    ends in a process the project forks meanwhile: it may run as long as the
    command (a multiprocessing Manager's server), making garbage."""
    run.env["APP_GC_HELPER"] = "1"
    assert (await one_worker_collects(run))["helper_collections"] > 0


async def one_worker_collects(run: WorkerRun) -> dict[str, Any]:
    """How the worker process of a one-process command collects garbage."""
    return await one_worker_answers(run, "collector")  # type: ignore[no-any-return]


async def one_worker_answers(run: WorkerRun, task: str) -> Any:
    """What `task` returns, run by a one-process command that then stops cleanly."""
    worker = run.start(
        "worker", "workerapp.broker:broker", "workerapp.tasks", *APP,
        "--workers", "1",
    )  # fmt: skip
    run.wait_for("startup", processes=1)
    await run.sender.startup()
    try:
        result = await (await run.kiq(task)).wait_result(timeout=30)
    finally:
        await run.sender.shutdown()
    assert run.stop(worker) == 0
    return result.return_value


async def test_a_worker_runs_on_the_event_loop_the_suite_chose(run: WorkerRun) -> None:
    """taskiq's worker runs on uvloop wherever it is installed; the suite
    installs it and hides it where TASKIQ_FASTAPI_TEST_LOOP says asyncio
    (conftest.py). A switch that did not reach the commands would leave
    one of the two loops untested."""
    loop = await one_worker_answers(run, "event_loop")
    assert loop == os.environ["TASKIQ_FASTAPI_TEST_LOOP"]


async def test_spawn_start_method(run: WorkerRun) -> None:
    worker = run.start(
        "worker", "workerapp.broker:broker", "workerapp.tasks", *APP,
        "--workers", "2", "--start-method", "spawn",
    )  # fmt: skip
    run.wait_for("startup", processes=2)
    results = await gather_results(run, 10)
    assert all(r["db"] == f"db-of-{r['pid']}" for r in results)
    assert run.stop(worker, signal.SIGINT) == 0
    assert_each_process_ran_its_lifespan_once(run, 2)


async def test_factory_app_and_broker_factory(run: WorkerRun) -> None:
    worker = run.start(
        "worker", "workerapp.broker:broker_factory", "workerapp.tasks",
        "--app", "workerapp.app:create_app", "--factory", "--workers", "1",
        "--base-url", "https://api.example.com/v2",
    )  # fmt: skip
    run.wait_for("startup", processes=1)
    results = await gather_results(run, 3)
    assert results[2]["link"] == "https://api.example.com/v2/items/2"
    assert run.stop(worker) == 0
    assert "--factory" not in run.output(worker)  # no uvicorn-style warning
    assert_each_process_ran_its_lifespan_once(run, 1)


async def test_factory_without_flag_is_used_with_a_warning(run: WorkerRun) -> None:
    worker = run.start(
        "worker", "workerapp.broker:broker", "workerapp.tasks",
        "--app", "workerapp.app:create_app", "--workers", "1",
    )  # fmt: skip
    run.wait_for("startup", processes=1)
    assert run.stop(worker) == 0
    assert (
        "Warning: App factory detected at 'workerapp.app:create_app'. Using it, "
        "but please consider setting the --factory flag explicitly."
    ) in run.output(worker)


async def test_broker_module_that_calls_init_itself_gets_one_lifespan(
    run: WorkerRun,
) -> None:
    worker = run.start(
        "worker", "workerapp.broker_with_init:broker", "workerapp.tasks", *APP,
        "--workers", "2",
    )  # fmt: skip
    run.wait_for("startup", processes=2)
    await gather_results(run, 5)
    assert run.stop(worker) == 0
    assert_each_process_ran_its_lifespan_once(run, 2)


async def test_taskiq_fastapi_worker_through_taskiq_entry_point(run: WorkerRun) -> None:
    worker = run.start(
        "fastapi", "worker", "workerapp.broker:broker", "workerapp.tasks", *APP,
        "--workers", "1",
        command=[TASKIQ],
    )  # fmt: skip
    run.wait_for("startup", processes=1)
    results = await gather_results(run, 3)
    assert results[0]["db"] == f"db-of-{results[0]['pid']}"
    assert run.stop(worker) == 0
    assert_each_process_ran_its_lifespan_once(run, 1)


@pytest.mark.parametrize("start_method", START_METHODS)
async def test_startup_failure_exits_3_quickly_printing_the_cause_once(
    run: WorkerRun, start_method: str
) -> None:
    started = time.monotonic()
    worker = run.start(
        "worker", "workerapp.broker:broker", "workerapp.tasks",
        "--app", "workerapp.app:failing_app", "--workers", "2",
        "--start-method", start_method,
    )  # fmt: skip
    assert worker.wait(timeout=30) == 3
    elapsed = time.monotonic() - started
    output = run.output(worker)
    cause = (
        "Error: App 'workerapp.app:failing_app' failed to start: "
        "RuntimeError: cannot reach the database"
    )
    assert output.count(cause) == 1, output
    assert "Traceback" not in output
    # Not restarted in a loop: two processes, at most one attempt each (a
    # restarted process has a new pid, so counting per pid could not see it).
    assert 1 <= sum(run.count("startup attempt").values()) <= 2, run.events()
    assert elapsed < 20


@pytest.mark.parametrize("start_method", START_METHODS)
async def test_graceful_shutdown_finishes_in_flight_tasks(
    run: WorkerRun, start_method: str
) -> None:
    worker = run.start(
        "worker", "workerapp.broker:broker", "workerapp.tasks", *APP,
        "--workers", "1", "--start-method", start_method,
    )  # fmt: skip
    run.wait_for("startup", processes=1)
    await run.sender.startup()
    try:
        tasks = [await run.kiq("slow", n, 1.0) for n in range(5)]
        run.wait_for("task 4 started", processes=1)
        assert run.stop(worker, signal.SIGINT) == 0
        results = await asyncio.gather(*(t.wait_result(timeout=10) for t in tasks))
    finally:
        await run.sender.shutdown()
    assert [r.return_value for r in results] == list(range(5))
    events = [event for _, event in run.events()]
    assert events.index("shutdown") > max(
        events.index(f"task {n} done") for n in range(5)
    )
    assert_each_process_ran_its_lifespan_once(run, 1)


async def test_processes_restarted_after_max_tasks_per_child_serve_the_app(
    run: WorkerRun,
) -> None:
    worker = run.start(
        "worker", "workerapp.broker:broker", "workerapp.tasks", *APP,
        "--workers", "1", "--max-tasks-per-child", "3", "--max-async-tasks", "1",
    )  # fmt: skip
    run.wait_for("startup", processes=1)
    # All queued at once: before taskiq 0.12.5 each process reaching the limit
    # popped one more message and dropped it (fetch_limit.py); none is lost.
    results = await gather_results(run, 9)
    assert all(r["db"] == f"db-of-{r['pid']}" for r in results)
    assert len({r["pid"] for r in results}) >= 3  # restarted, and init applied again
    assert run.stop(worker) == 0
    startups = run.count("startup")
    assert set(startups.values()) == {1}
    assert {r["pid"] for r in results} <= set(startups)


async def test_reload_restarts_a_worker_that_serves_the_app(
    run: WorkerRun, tmp_path: Path
) -> None:
    watched = tmp_path / "watched"
    watched.mkdir()
    worker = run.start(
        "worker", "workerapp.broker:broker", "workerapp.tasks", *APP,
        "--reload", "--reload-dir", str(watched),
    )  # fmt: skip
    run.wait_for("startup", processes=1)
    (watched / "changed.py").write_text("x = 1\n")
    run.wait_for("startup", processes=2)
    results = await gather_results(run, 3)
    first, second = list(run.count("startup"))
    assert {r["pid"] for r in results} == {second}
    assert results[0]["db"] == f"db-of-{second}"
    assert run.stop(worker) == 0
    assert run.count("shutdown") == {first: 1, second: 1}


@pytest.mark.parametrize(
    ("app", "error"),
    [
        (
            "sampleapp.apps:raising_factory",
            "Error: Cannot load app 'sampleapp.apps:raising_factory': the factory "
            "raised ValueError: missing setting\n",
        ),
        (
            "sampleapp.apps:wrong_factory",
            "Error: Cannot load app 'sampleapp.apps:wrong_factory': the factory "
            "returned dict, not a FastAPI app.\n",
        ),
    ],
)
def test_a_failing_factory_is_a_startup_failure(
    run: WorkerRun, app: str, error: str
) -> None:
    """Only worker processes call the factory: its failure is a startup failure."""
    worker = run.start(
        "worker", "workerapp.broker:broker", "workerapp.tasks",
        "--app", app, "--factory", "--workers", "2",
    )  # fmt: skip
    assert worker.wait(timeout=60) == 3
    output = run.output(worker)
    assert output.count(error) == 1, output
    assert "Traceback" not in output


def test_a_password_in_the_base_url_is_never_shown(run: WorkerRun) -> None:
    """A base URL with a user or password is refused (it would be every
    task's Host header), and the Error line masks it: a malformed one showed
    its password as given."""
    command = ["worker", "workerapp.broker:broker", "workerapp.tasks", *APP]
    outputs = []
    for url in (
        "https://svc:s3cret@api.example.com/v1",
        "https://svc:s3cret@api.example.com/v1?a=1",
    ):
        run.env["TASKIQ_FASTAPI_BASE_URL"] = url
        refused = run.start(*command)
        assert refused.wait(timeout=60) == 2, run.output(refused)
        outputs.append(run.output(refused))
    assert "https://***@api.example.com/v1" in outputs[0]
    assert "https://***@api.example.com/v1?a=1" in outputs[1]
    assert "s3cret" not in "".join(outputs)


async def test_each_worker_says_which_app_it_serves_and_when_it_stopped(
    run: WorkerRun,
) -> None:
    worker = run.start(
        "worker", "workerapp.broker:broker", "workerapp.tasks", *APP,
        "--workers", "2", "--base-url", "https://api.example.com/v1",
    )  # fmt: skip
    run.wait_for("startup", processes=2)
    assert run.stop(worker) == 0
    output = run.output(worker)
    ready = re.findall(
        r"\[worker-\d\] App 'workerapp.app:app' \('FastAPI'\): lifespan started in "
        r"\d+\.\d\d s; running its tasks, url_for builds links for "
        r"https://api\.example\.com/v1\.",
        output,
    )
    assert len(ready) == 2, output
    stopped = re.findall(
        r"\[worker-\d\] App 'workerapp.app:app': lifespan shut down in \d+\.\d\d s\.",
        output,
    )
    assert len(stopped) == 2, output
