"""The README's testing recipe, run as a user would copy it (issue 10)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from importlib.metadata import metadata
from pathlib import Path

import pytest
from readme import README, section_files, write_project
from workers import COMMAND

SECTION = "### Tests and in-process brokers"
PYTEST = str(Path(sys.executable).with_name("pytest"))


def recipe_files() -> dict[str, str]:
    return section_files(SECTION)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return write_project(tmp_path, SECTION, "shop")


def test_the_recipe_has_the_files_of_a_project() -> None:
    assert sorted(recipe_files()) == [
        "pyproject.toml",
        "shop/app.py",
        "shop/broker.py",
        "shop/tasks.py",
        "tests/conftest.py",
        "tests/test_orders.py",
    ]


def test_the_recipes_tests_pass_without_the_deprecated_testclient_path(
    project: Path,
) -> None:
    """Run as a user runs them: `pytest`, not `python -m pytest` (which would
    put the current directory on sys.path by itself)."""
    result = subprocess.run(
        [PYTEST, "-p", "no:cacheprovider", "-rA"],
        cwd=project, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout
    # Starlette's deprecated TestClient path is not taken. (Starlette 0.40, the
    # floor, has warnings of its own about newer anyio and python-multipart.)
    assert "Using `httpx` with `starlette.testclient`" not in result.stdout


def test_the_recipes_project_runs_under_the_worker_on_redis(
    project: Path, redis_url: str
) -> None:
    """The same files, the Redis branch, the README's worker command."""
    kick = (
        "import asyncio\n"
        "from shop.tasks import make_receipt, broker\n"
        "async def main():\n"
        "    await broker.startup()\n"
        "    task = await make_receipt.kiq('apple', 4)\n"
        "    print((await task.wait_result(timeout=30)).return_value)\n"
        "    await broker.shutdown()\n"
        "asyncio.run(main())\n"
    )
    env = {**os.environ, "REDIS_URL": redis_url}
    env.pop("SHOP_BROKER", None)
    worker = subprocess.Popen(
        [COMMAND, "worker", "shop.broker:broker", "shop.tasks", "--app", "shop.app:app"],
        cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    try:
        result = subprocess.run(
            [sys.executable, "-c", kick],
            cwd=project, env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    finally:
        worker.terminate()
        output, _ = worker.communicate(timeout=30)
    assert result.stdout == "4 x apple = 12\n", result.stderr + output
    assert worker.returncode == 0, output


def test_the_install_lines_name_extras_the_package_provides() -> None:
    text = README.read_text()
    section = text[text.index("### Use it in your project") :]
    block = re.search(r"```sh\n(.*?)```", section, re.DOTALL)
    assert block is not None
    named = set()
    for line in block.group(1).splitlines():
        (extras,) = re.findall(r'pip install "taskiq-fastapi\[([a-z,]+)\]"', line)
        named |= set(extras.split(","))
    provided = set(metadata("taskiq-fastapi").get_all("Provides-Extra") or [])
    assert named == {"redis", "nats", "reload", "metrics", "otel"}
    assert named <= provided
