"""Broker outages at awkward moments, through the real command and real servers.

Found in a second review of `runtime/outages.py`; each test failed before
its fix.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from workers import APP, BROKER, WorkerRun, error_line

from tools.nats_server import NatsServer, running_server

pytestmark = pytest.mark.anyio


@pytest.fixture
def own_server() -> Iterator[NatsServer]:
    with running_server() as nats:
        yield nats


@pytest.mark.parametrize("then", ["back", "never", "second"])
async def test_a_stop_while_nats_results_wait_shuts_down_without_a_traceback(
    own_server: NatsServer, redis_url: str, tmp_path: Path, then: str
) -> None:
    """SIGTERM while the NATS server was gone and results waited to be saved:
    the exit status was right (3 at the deadline, 4 after a second signal),
    but the broker's shutdown then logged a traceback: taskiq-nats' result
    backend closes a client of its own, which raised ConnectionResetError,
    and only an outage of the broker (whose fetch had ended with the stop,
    no outage) let that pass."""
    run = WorkerRun(redis_url, tmp_path, nats_url=own_server.url)
    try:
        worker = run.start(
            "worker", *BROKER, *APP, "--workers", "1", "--max-async-tasks", "10",
            "--broker-retry-timeout", "8",
        )  # fmt: skip
        run.wait_for("startup", processes=1)
        await run.sender.startup()
        try:
            sent = [await run.kiq("slow", n, 1.0) for n in range(10)]
        finally:
            await run.sender.shutdown()
        run.wait_for("task 9 started", processes=1)
        own_server.stop()
        await asyncio.sleep(2)  # the tasks have finished; their results wait
        worker.send_signal(signal.SIGTERM)
        await asyncio.sleep(2)
        assert worker.poll() is None, run.output(worker)  # still saving
        if then == "back":
            own_server.start()
        elif then == "second":
            worker.send_signal(signal.SIGTERM)
        status = await asyncio.to_thread(run.exit_status, worker, 40)
    finally:
        run.kill_all()
    output = run.output(worker)
    assert status == {"back": 0, "never": 3, "second": 4}[then], output
    assert "Traceback" not in output
    if then == "never":
        assert error_line(output).startswith(
            "Error: Result backend of broker 'workerapp.broker:broker' unreachable "
        )
    if then == "back":
        await run.sender.startup()
        try:
            done = [await t.wait_result(timeout=10) for t in sent]
        finally:
            await run.sender.shutdown()
        assert [r.return_value for r in done] == list(range(10))
    # Each process ran its lifespan's shutdown once: not again.
    assert run.count("shutdown") == run.count("startup")
