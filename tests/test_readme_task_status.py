"""The README's TaskStatus example, run as a user would copy it (issue 22)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx2
import pytest
from readme import section_files, write_project
from workers import COMMAND, UVICORN, get_json

from tools.processes import free_port

PYTEST = str(Path(sys.executable).with_name("pytest"))
SECTION = "## Tasks from the API: 202 Accepted, status, progress, results"


def example_files() -> dict[str, str]:
    return section_files(SECTION)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return write_project(tmp_path, SECTION, "reports")


def test_the_example_has_the_files_of_a_project() -> None:
    assert sorted(example_files()) == [
        "pyproject.toml",
        "reports/app.py",
        "reports/broker.py",
        "reports/tasks.py",
        "tests/conftest.py",
        "tests/test_reports.py",
    ]


def test_the_examples_tests_pass(project: Path) -> None:
    result = subprocess.run(
        [PYTEST, "-p", "no:cacheprovider", "-rA", "tests"],
        cwd=project, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout


def test_the_example_under_uvicorn_and_the_worker_on_redis(
    project: Path, redis_url: str
) -> None:
    """The Redis branch, the README's worker command, a client following events."""
    env = {**os.environ, "REDIS_URL": redis_url}
    env.pop("REPORTS_BROKER", None)
    port = free_port()
    commands = [
        [COMMAND, "worker", "reports.broker:broker", "reports.tasks",
         "--app", "reports.app:app"],
        [UVICORN, "reports.app:app", "--port", str(port), "--log-level", "warning"],
    ]  # fmt: skip
    processes = [
        subprocess.Popen(c, cwd=project, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
        for c in commands
    ]  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        get_json(base + "/openapi.json", timeout=30)
        with httpx2.Client(base_url=base, timeout=30) as client:
            kicked = client.post(
                "/reports", params={"rows": 5}, headers={"X-User": "ann"}
            )
            assert kicked.status_code == 202
            url = kicked.headers["location"]
            assert url == f"{base}/tasks/{kicked.json()['task_id']}"
            with client.stream(
                "GET", url + "/events", headers={"X-User": "ann"}
            ) as stream:
                seen = [
                    json.loads(line[len("data: ") :])
                    for line in stream.iter_lines()
                    if line.startswith("data: ")
                ]
            schema = client.get("/openapi.json").json()["components"]["schemas"]
    finally:
        for process in processes:
            process.terminate()
        outputs = [process.communicate(timeout=30)[0] for process in processes]
    assert seen[-1]["state"] == "succeeded", outputs
    assert seen[-1]["result"] == {"user": "ann", "rows": 5}
    assert seen[-1]["progress"] == {"done": 5, "of": 5}
    assert [e["state"] for e in seen].count("succeeded") == 1
    assert schema["BuildReportStatus"]["properties"]["result"]["anyOf"][0] == {
        "$ref": "#/components/schemas/Report"
    }
    assert processes[0].returncode == 0, outputs[0]
