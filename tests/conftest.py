from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings
from sampleapp import apps
from taskiq import InMemoryBroker
from workers import WorkerRun

from tools.nats_server import nats_url as running_nats
from tools.processes import children
from tools.redis_server import redis_url as running_redis
from tools.without_uvloop import hide_uvloop

# A project with its own test suite; test_template_project.py runs it apart.
collect_ignore = ["tplproj"]

# The event loop the worker commands and uvicorn servers the suite starts run
# on: asyncio's (the default), or uvloop's, which they take wherever it is
# installed, as with FastAPI's "standard" extra. `make test-matrix` runs the
# end-to-end tests on uvloop, `make test` and `make test-oldest` on asyncio.
# Subprocesses only: this process's own tests import uvloop where they need it.
TEST_LOOP = os.environ.setdefault("TASKIQ_FASTAPI_TEST_LOOP", "asyncio")


def pytest_configure(config: pytest.Config) -> None:
    # Here rather than as the module is imported: pytest says a UsageError
    # raised here in one line, not as an ImportError of this file.
    if TEST_LOOP not in ("asyncio", "uvloop"):
        raise pytest.UsageError(
            f"TASKIQ_FASTAPI_TEST_LOOP={TEST_LOOP!r}: asyncio or uvloop"
        )
    if TEST_LOOP == "asyncio":
        hide_uvloop()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def _clear_app_events() -> Iterator[None]:
    apps.events.clear()
    yield
    apps.events.clear()


@pytest.fixture
def broker() -> InMemoryBroker:
    return InMemoryBroker(max_async_tasks=1000, max_stored_results=1000)


@asynccontextmanager
async def as_worker(broker: InMemoryBroker) -> AsyncIterator[InMemoryBroker]:
    """Drive the broker as taskiq's worker does: startup and shutdown run in
    two different asyncio tasks."""
    broker.is_worker_process = True
    await asyncio.create_task(broker.startup())
    try:
        yield broker
    finally:
        await broker.wait_all()
        await asyncio.create_task(broker.shutdown())


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A real Redis server for the whole session (REDIS_URL's, if set)."""
    with running_redis() as url:
        yield url


@pytest.fixture
def run(redis_url: str, tmp_path: Path) -> Iterator[WorkerRun]:
    """Worker commands on a list broker; whatever is left running is killed."""
    worker_run = WorkerRun(redis_url, tmp_path)
    yield worker_run
    worker_run.kill_all()


@pytest.fixture
def stream_run(redis_url: str, tmp_path: Path) -> Iterator[WorkerRun]:
    """The same on a stream broker, which acknowledges and redelivers."""
    worker_run = WorkerRun(redis_url, tmp_path, streams=True)
    yield worker_run
    worker_run.kill_all()


@pytest.fixture(scope="session")
def nats_url() -> Iterator[str]:
    """A real NATS server with JetStream for the session (NATS_URL's, if set)."""
    with running_nats() as url:
        yield url


@pytest.fixture
def nats_run(redis_url: str, nats_url: str, tmp_path: Path) -> Iterator[WorkerRun]:
    """Worker commands on NATS JetStream; whatever is left running is killed."""
    worker_run = WorkerRun(redis_url, tmp_path, nats_url=nats_url)
    yield worker_run
    worker_run.kill_all()


# multiprocessing's helper of this test process itself: started by the first
# semaphore made once an in-process test of the command set the start method
# to spawn (`--reload`) or forkserver, and ended with this process. A worker
# command that outlived its test shows as itself.
_RESOURCE_TRACKER = b"from multiprocessing.resource_tracker import main"


def _still_running(pid: int) -> list[str]:
    """Command lines of the processes `pid` started that have not exited."""
    found = []
    for child in children(pid, keep=lambda state: state != "Z"):
        try:
            command = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue  # exited meanwhile
        if _RESOURCE_TRACKER in command:
            continue
        found.append(command.replace(b"\0", b" ").decode(errors="replace"))
    return found


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Every server and worker a test started is stopped, also after a failure.

    Under pytest-xdist each worker process looks at its own children and
    hands what it found to the main process, which fails the run.
    """
    left = _still_running(os.getpid())
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # an xdist worker
        workeroutput["still_running"] = left
        return
    left += _left_by_xdist_workers
    if left:
        print("\nStill running after the tests:\n  " + "\n  ".join(left))
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


_left_by_xdist_workers: list[str] = []


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    """pytest-xdist: a worker process finished; keep what it left running.

    A worker that crashed sent nothing (no `workeroutput`): xdist reports
    the crash and replaces it, which an AttributeError here would stop.
    """
    output = getattr(node, "workeroutput", {})
    _left_by_xdist_workers.extend(output.get("still_running", []))


# Generated examples: a fixed set in CI and by default, more on demand
# (HYPOTHESIS_PROFILE=deep); nothing is written to a .hypothesis directory.
settings.register_profile(
    "ci", max_examples=25, derandomize=True, deadline=None, database=None
)
settings.register_profile("deep", max_examples=400, deadline=None, database=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# End-to-end tests (the real command in subprocesses, servers stopped and
# started): the matrix runs them on the newest Python only, as `make test`
# (3.11) and `make test-oldest` (3.10, the floors) run everything.
_E2E_FIXTURES = frozenset({"run", "stream_run", "nats_run"})
_E2E_MODULES = frozenset(
    {
        "test_deadlines", "test_demo", "test_list_fetch", "test_metrics", "test_nats",
        "test_outage_backoff", "test_outage_edges", "test_outages", "test_reliability",
        "test_reload", "test_restart_empty", "test_signals",
        "test_task_cancel_worker", "test_template_project", "test_tracing_worker",
    }
)  # fmt: skip


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        module = item.module.__name__ if isinstance(item, pytest.Function) else ""
        fixtures = set(getattr(item, "fixturenames", ()))
        if fixtures & _E2E_FIXTURES or module.rpartition(".")[2] in _E2E_MODULES:
            item.add_marker(pytest.mark.e2e)
