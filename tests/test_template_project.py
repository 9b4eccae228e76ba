"""A 0.5 project from a popular template upgrades by a version number (issue 9)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from taskiq.kicker import AsyncKicker
from workers import TESTS_DIR, WorkerRun

pytestmark = pytest.mark.anyio


def test_the_projects_own_tests_pass() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TPLPROJ_ENVIRONMENT"}
    result = subprocess.run(
        [
            sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
            "-c", os.devnull, "--rootdir", "tplproj", "--confcutdir", "tplproj",
            "tplproj/tests",
        ],
        cwd=TESTS_DIR, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout


async def test_its_worker_command_needs_no_app_and_each_worker_calls_the_factory_once(
    run: WorkerRun,
) -> None:
    worker = run.start(
        "worker", "tplproj.tkq:broker", "tplproj.tasks", "--workers", "2"
    )
    run.wait_for("startup", processes=2)
    kicker: AsyncKicker[..., object] = AsyncKicker(
        "tplproj.tasks:greet", run.sender, {}
    )
    await run.sender.startup()
    try:
        result = await (await kicker.kiq("ada")).wait_result(timeout=30)
    finally:
        await run.sender.shutdown()
    assert not result.is_err, result.error
    assert result.return_value["text"] == "hello, ada"  # type: ignore[index]
    workers = run.count("startup")
    assert result.return_value["pid"] in workers  # type: ignore[index]
    # The supervisor (the command's own process) never calls the factory;
    # each worker process calls it exactly once.
    assert run.count("factory called") == workers
    assert set(workers.values()) == {1}
    assert worker.pid not in workers
    assert run.stop(worker) == 0
