"""FastAPI dependencies in a real `taskiq-fastapi worker` on a real Redis (issue 7)."""

from __future__ import annotations

from importlib.metadata import version
from typing import Any

import pytest
from taskiq.kicker import AsyncKicker
from workers import TASKIQ, WorkerRun, get_json

from taskiq_fastapi.tracing import _release

# taskiq 0.11 cannot send a sync task to a process pool (it pickles a
# contextvars.Context): every sync task fails there, with or without this.
POOL = pytest.mark.skipif(
    _release(version("taskiq")) < (0, 12), reason="taskiq 0.11's process pool"
)

pytestmark = pytest.mark.anyio


async def test_route_chain_runs_unmodified_in_a_task_with_the_apps_override(
    run: WorkerRun,
) -> None:
    api, port = run.serve("workerapp.app:app")
    worker = run.start(
        "worker", "workerapp.broker:broker", "workerapp.tasks",
        "--app", "workerapp.app:app",
    )  # fmt: skip
    run.wait_for("startup", processes=2)
    route = get_json(f"http://127.0.0.1:{port}/receipt/7")
    await run.sender.startup()
    try:
        result = await (await run.kiq("receipt", 7)).wait_result(timeout=30)
    finally:
        await run.sender.shutdown()
    assert not result.is_err, result.error
    task = result.return_value
    # The same chain, the same override, each process's own lifespan state.
    assert route == {
        "n": 7,
        "session": f"session(engine(overridden, db-of-{api.pid}))",
        "pid": api.pid,
    }
    assert task["session"] == f"session(engine(overridden, db-of-{task['pid']}))"
    assert task["pid"] in run.count("startup")
    assert task["pid"] != api.pid
    # The async-generator session was closed after the task, in the worker.
    assert run.count("session closed")[task["pid"]] == 1
    assert run.count("session opened")[task["pid"]] == 1
    assert run.stop(worker) == 0
    run.stop(api)  # uvicorn ends by re-raising the signal: -15


async def test_plain_taskiq_worker_with_init_in_the_broker_module_too(
    run: WorkerRun,
) -> None:
    """The 0.5 setup: `init` in the broker module, started by `taskiq worker`."""
    worker = run.start(
        "worker", "workerapp.broker_with_init:broker", "workerapp.tasks",
        command=(TASKIQ,),
    )  # fmt: skip
    run.wait_for("startup", processes=2)
    await run.sender.startup()
    try:
        result = await (await run.kiq("receipt", 1)).wait_result(timeout=30)
    finally:
        await run.sender.shutdown()
    assert not result.is_err, result.error
    pid = result.return_value["pid"]
    assert result.return_value["session"] == (
        f"session(engine(overridden, db-of-{pid}))"
    )
    # Still serving after the task; how plain taskiq stops differs between
    # taskiq versions (idle, 0.13 ignores SIGTERM and 0.11 stops), so the fixture
    # kills it.
    assert worker.poll() is None


@POOL
async def test_a_sync_task_with_fastapi_dependencies_runs_in_the_process_pool(
    run: WorkerRun,
) -> None:
    """taskiq's --use-process-pool pickles the function of a sync task: the
    stand-in of one with FastAPI dependencies was a closure, and every such
    task failed with a PicklingError."""
    worker = run.start(
        "worker", "workerapp.broker:broker", "workerapp.sync_deps",
        "--app", "workerapp.app:app", "--workers", "1", "--use-process-pool",
    )  # fmt: skip
    run.wait_for("startup", processes=1)
    await run.sender.startup()
    try:
        kicker: AsyncKicker[Any, Any] = AsyncKicker(
            "workerapp.sync_deps:sync_receipt", run.sender, {}
        )
        result = await (await kicker.kiq(7)).wait_result(timeout=30)
    finally:
        await run.sender.shutdown()
    assert not result.is_err, result.error
    got = result.return_value
    worker_pid = got["solved_in"]
    assert worker_pid in run.count("startup")
    assert got["pid"] != worker_pid  # run in a process of the pool
    assert got["n"] == 7
    assert got["session"] == f"session(engine(overridden, db-of-{worker_pid}))"
    assert run.stop(worker) == 0
