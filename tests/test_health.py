"""Health and readiness endpoints of the real command, on the real Redis (issue 12)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from taskiq.kicker import AsyncKicker
from workers import APP, COMMAND, TESTS_DIR, WorkerRun

from tools.processes import free_port
from tools.redis_server import running_server

pytestmark = pytest.mark.anyio

SLOW = ["workerapp.broker:broker", "workerapp.slow", "--app", "workerapp.slow:app"]


class Probe:
    def __init__(self, port: int) -> None:
        self.port = port

    def get(self, path: str) -> tuple[int | None, dict[str, Any]]:
        url = f"http://127.0.0.1:{self.port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())
        except OSError:
            return None, {}

    def until(
        self,
        path: str,
        test: Callable[[int | None, dict[str, Any]], bool],
        timeout: float = 30,
    ) -> tuple[int | None, dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            status, body = self.get(path)
            if test(status, body):
                return status, body
            assert time.monotonic() < deadline, (status, body)
            time.sleep(0.1)


def start(
    run: WorkerRun, *extra: str, app: list[str] = SLOW
) -> tuple[subprocess.Popen[bytes], Probe]:
    port = free_port()
    worker = run.start("worker", *app, "--health-port", str(port), *extra)
    return worker, Probe(port)


def health_command(port: int, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [COMMAND, "health", "--port", str(port), *args],
        capture_output=True, text=True, timeout=30, cwd=TESTS_DIR,
    )  # fmt: skip


def states(body: dict[str, Any]) -> list[str]:
    return [worker["state"] for worker in body["workers"]]


def test_ready_only_once_every_lifespan_has_started(run: WorkerRun) -> None:
    run.env["SLOW_STARTUP"] = "3"
    worker, probe = start(run, "--workers", "2")
    status, body = probe.until("/readyz", lambda s, b: s is not None)
    assert status == 503
    assert set(states(body)) <= {"starting"}
    assert body["problems"][0].startswith("worker-")
    # Starting, but live: the lifespan awaits, its event loop runs.
    live_status, _ = probe.get("/livez")
    assert live_status == 200
    assert health_command(probe.port, "--ready").returncode == 1
    assert health_command(probe.port).returncode == 0

    status, body = probe.until("/readyz", lambda s, b: s == 200)
    assert len(run.count("startup")) == 2  # both lifespans were up before 200
    assert states(body) == ["ready", "ready"]
    pids = {w["pid"] for w in body["workers"]}
    assert pids == set(run.count("startup"))
    result = health_command(probe.port, "--ready")
    assert (result.returncode, result.stdout) == (
        0,
        "Ready: 2 worker processes ready.\n",
    )
    assert run.stop(worker) == 0


def test_a_killed_worker_is_reported_until_its_replacement_is_ready(
    run: WorkerRun,
) -> None:
    run.env["SLOW_STARTUP"] = "1"
    worker, probe = start(run, "--workers", "2")
    _, body = probe.until("/readyz", lambda s, b: s == 200)
    victim = body["workers"][1]["pid"]
    os.kill(victim, signal.SIGKILL)
    _, body = probe.until("/readyz", lambda s, b: s == 503)
    assert body["workers"][1]["state"] in ("restarting", "starting")
    assert body["workers"][0]["state"] == "ready"
    assert "worker-1" in body["problems"][0]
    live, live_body = probe.get("/livez")
    assert live == 200  # down for less than a restart takes
    assert live_body["workers"][1]["state"] in ("restarting", "starting")

    _, body = probe.until("/readyz", lambda s, b: s == 200)
    assert body["workers"][1]["pid"] not in (victim, None)
    assert states(body) == ["ready", "ready"]
    assert run.stop(worker) == 0


async def test_a_task_blocking_its_loop_makes_livez_fail_naming_it(
    run: WorkerRun,
) -> None:
    run.env["SLOW_STARTUP"] = "0"
    worker, probe = start(run, "--workers", "1", "--stall-timeout", "1.5")
    probe.until("/readyz", lambda s, b: s == 200)
    kicker: AsyncKicker[Any, Any] = AsyncKicker(
        "workerapp.slow:block_loop", run.sender, {}
    )
    await run.sender.startup()
    try:
        task = await kicker.kiq(5)
        _, body = probe.until("/livez", lambda s, b: s == 503, timeout=15)
        pid = body["workers"][0]["pid"]
        assert body["problems"] == [
            f"worker-0 (pid {pid}) is stalled: its event loop has not run for "
            + body["problems"][0].split("has not run for ")[1]
        ]
        # Past the timeout, as shown too (rounded up, never to 1.5 itself).
        assert body["workers"][0]["loop_silent_seconds"] > 1.5
        said = body["problems"][0].split("has not run for ")[1]
        assert float(said.split(" s ")[0]) > 1.5, said
        ready, _ = probe.get("/readyz")
        assert ready == 503  # a stalled process takes no task either
        result = health_command(probe.port)
        assert result.returncode == 1
        assert result.stderr.startswith(f"Not live: worker-0 (pid {pid}) is stalled")
        assert (await task.wait_result(timeout=30)).return_value == pid
    finally:
        await run.sender.shutdown()
    _, body = probe.until("/livez", lambda s, b: s == 200, timeout=15)
    assert body["workers"][0]["tasks_finished"] == 1
    assert body["workers"][0]["last_task_finished"] is not None
    time.sleep(1.5)  # the stall log reads the rows every second
    assert run.stop(worker) == 0
    # In the log too, once each way, whether or not anything probed.
    output = run.output(worker)
    stalled = re.findall(
        rf"WARNING.*worker-0 \(pid {pid}\) is stalled: its event loop has not "
        r"run for \d+\.\d s \(--stall-timeout 1\.5\)\.",
        output,
    )
    assert len(stalled) == 1, output
    assert output.count(f"worker-0 (pid {pid}): its event loop runs again.") == 1


def test_a_stall_timeout_under_a_second_sees_no_stall_in_an_idle_worker(
    run: WorkerRun,
) -> None:
    """The loop wrote its heartbeat once a second whatever --stall-timeout
    said: under 0.5 an idle worker looked stalled half of each second, /livez
    failing and a stall logged with nothing blocking its loop."""
    run.env["SLOW_STARTUP"] = "0"
    worker, probe = start(run, "--workers", "1", "--stall-timeout", "0.5")
    probe.until("/readyz", lambda s, b: s == 200)
    seen = []
    watched_until = time.monotonic() + 3  # three of the former heartbeats
    while time.monotonic() < watched_until:
        status, body = probe.get("/livez")
        seen.append((status, body["workers"][0]["loop_silent_seconds"]))
        time.sleep(0.05)
    assert {status for status, _ in seen} == {200}, seen
    assert run.stop(worker) == 0
    assert "is stalled" not in run.output(worker)


async def test_sigterm_makes_readyz_fail_at_once_while_tasks_finish(
    run: WorkerRun,
) -> None:
    release = run.tmp_path / "release"
    run.env["RELEASE_FILE"] = str(release)
    counted = ["workerapp.broker:broker", "workerapp.counted"]
    worker, probe = start(run, app=[*counted, *APP])
    probe.until("/readyz", lambda s, b: s == 200)
    await run.sender.startup()
    try:
        # Held until released: it is still running whenever the probe looks.
        task = await AsyncKicker("workerapp.counted:held", run.sender, {}).kiq(1)
        run.wait_for("held 1", processes=1)
        worker.send_signal(signal.SIGTERM)
        status, body = probe.until("/readyz", lambda s, b: s != 200, timeout=2)
        assert status == 503
        assert body["problems"][0] == "shutting down: a stop signal arrived"
        release.touch()
        result = await task.wait_result(timeout=30)
    finally:
        await run.sender.shutdown()
    assert result.return_value == 1  # the in-flight task finished
    run.stopped.append(worker)
    assert worker.wait(timeout=30) == 0
    assert probe.get("/livez") == (None, {})  # the endpoint is gone with it


async def test_a_worker_done_stopping_is_stopped_not_down_while_another_drains(
    run: WorkerRun,
) -> None:
    """While the command stops, a worker process that has finished is not
    restarting: it was reported so, and after RESTART_GRACE_SECONDS /livez
    failed ("has been down") while the other one finished its task, so a
    liveness check could kill a graceful stop."""
    from taskiq_fastapi_cli.health.server import RESTART_GRACE_SECONDS

    release = run.tmp_path / "release"
    run.env["RELEASE_FILE"] = str(release)
    counted = ["workerapp.broker:broker", "workerapp.counted"]
    worker, probe = start(run, "--workers", "2", app=[*counted, *APP])
    _, body = probe.until("/readyz", lambda s, b: s == 200)
    await run.sender.startup()
    try:
        kicker = AsyncKicker("workerapp.counted:held", run.sender, {})
        task = await kicker.kiq(1)
        run.wait_for("held 1", processes=1)
        busy = run.count("held 1").most_common(1)[0][0]
        idle = next(w["worker"] for w in body["workers"] if w["pid"] != busy)
        worker.send_signal(signal.SIGTERM)

        def row(body: dict[str, Any]) -> dict[str, Any]:
            return next(w for w in body["workers"] if w["worker"] == idle)

        def done_stopping(_status: int | None, body: dict[str, Any]) -> bool:
            return row(body)["state"] not in ("ready", "stopping")

        probe.until("/livez", done_stopping)
        seen = []
        watched_until = time.monotonic() + RESTART_GRACE_SECONDS + 1
        while time.monotonic() < watched_until:
            status, body = probe.get("/livez")
            seen.append((status, row(body)["state"], body["problems"]))
            time.sleep(0.2)
        assert {(s, state) for s, state, _ in seen} == {(200, "stopped")}, seen
        release.touch()
        assert (await task.wait_result(timeout=30)).return_value == 1
    finally:
        await run.sender.shutdown()
    run.stopped.append(worker)
    assert worker.wait(timeout=30) == 0


async def test_a_worker_past_max_tasks_per_child_is_not_ready_until_replaced(
    run: WorkerRun,
) -> None:
    """Once a process took its last message under --max-tasks-per-child it
    fetches nothing more, and is being replaced: it was reported ready for
    as long as its last tasks ran."""
    release = run.tmp_path / "release"
    run.env["RELEASE_FILE"] = str(release)
    counted = ["workerapp.broker:broker", "workerapp.counted"]
    worker, probe = start(
        run, "--workers", "1", "--max-tasks-per-child", "1", app=[*counted, *APP]
    )
    _, body = probe.until("/readyz", lambda s, b: s == 200)
    first = body["workers"][0]["pid"]
    await run.sender.startup()
    try:
        kicker = AsyncKicker("workerapp.counted:held", run.sender, {})
        task = await kicker.kiq(1)
        run.wait_for("held 1", processes=1)
        status, body = probe.get("/readyz")
        assert (status, states(body)) == (503, ["stopping"]), body
        release.touch()
        assert (await task.wait_result(timeout=30)).return_value == 1
    finally:
        await run.sender.shutdown()
    _, body = probe.until("/readyz", lambda s, b: s == 200)
    assert body["workers"][0]["pid"] != first  # its replacement
    assert run.stop(worker) == 0


def test_a_lifespan_failing_at_startup_is_never_ready(run: WorkerRun) -> None:
    worker, probe = start(
        run, app=["workerapp.broker:broker", "--app", "workerapp.app:failing_app"]
    )
    seen = []
    while worker.poll() is None:
        status, _ = probe.get("/readyz")
        seen.append(status)
        time.sleep(0.05)
    assert worker.returncode == 3
    assert 200 not in seen
    assert 503 in seen


def test_the_health_command_when_nothing_listens() -> None:
    port = free_port()
    result = health_command(port)
    assert result.returncode == 1
    assert result.stderr == (
        f"Not live: cannot reach http://127.0.0.1:{port}/livez: "
        "[Errno 111] Connection refused.\n"
    )


def test_a_port_in_use_is_one_line_before_any_worker_starts(run: WorkerRun) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        worker = run.start("worker", *SLOW, "--health-port", str(port))
        assert worker.wait(timeout=30) == 1
    assert run.output(worker) == (
        f"Error: --health-port {port}: cannot listen on 127.0.0.1:{port}: "
        "Address already in use.\n"
    )
    assert run.events() == []


def test_an_invalid_host_is_a_usage_error(run: WorkerRun) -> None:
    worker = run.start(
        "worker", *SLOW, "--health-port", "9", "--health-host", "no-such-host.invalid"
    )
    assert worker.wait(timeout=30) == 2
    output = run.output(worker)
    assert output.startswith("Error: --health-host 'no-such-host.invalid': ")
    assert output.count("\n") == 1
    assert run.events() == []


def test_spawned_workers_report_too(run: WorkerRun) -> None:
    """Under spawn (as --reload uses) the rows travel in the pickled arguments."""
    run.env["SLOW_STARTUP"] = "0"
    worker, probe = start(run, "--workers", "2", "--start-method", "spawn")
    _, body = probe.until("/readyz", lambda s, b: s == 200)
    assert {w["pid"] for w in body["workers"]} == set(run.count("startup"))
    assert run.stop(worker) == 0


def test_the_health_command_reads_the_workers_environment(run: WorkerRun) -> None:
    run.env["SLOW_STARTUP"] = "0"
    worker, probe = start(run, "--workers", "1")
    probe.until("/readyz", lambda s, b: s == 200)
    env = {**run.env, "TASKIQ_FASTAPI_HEALTH_PORT": str(probe.port)}
    result = subprocess.run(
        [COMMAND, "health", "--host", "localhost", "--ready"],
        capture_output=True, text=True, timeout=30, env=env,
    )  # fmt: skip
    assert (result.returncode, result.stdout) == (
        0,
        "Ready: 1 worker process ready.\n",
    )
    assert run.stop(worker) == 0


async def test_readyz_is_503_while_the_broker_is_unreachable_and_200_after(
    tmp_path: Path,
) -> None:
    with running_server(persistent=True) as server:
        run = WorkerRun(server.url, tmp_path)
        try:
            worker, probe = start(run, "--workers", "1")
            probe.until("/readyz", lambda s, b: s == 200)
            server.stop()
            _, body = probe.until("/readyz", lambda s, b: s == 503, timeout=20)
            assert states(body) == ["broker unreachable"]
            server.start()
            probe.until("/readyz", lambda s, b: s == 200, timeout=20)
            assert run.stop(worker) == 0
        finally:
            run.kill_all()


def test_an_ipv6_host_is_served_and_probed(run: WorkerRun) -> None:
    """`::1` (or `::` on an IPv6 cluster) was refused as a host that does not
    resolve: the standard library's server is IPv4 only."""
    run.env["SLOW_STARTUP"] = "0"
    port = free_port()
    worker = run.start(
        "worker", *SLOW, "--workers", "1", "--health-port", str(port),
        "--health-host", "::1",
    )  # fmt: skip
    run.wait_for("startup", processes=1)
    result = health_command(port, "--host", "::1", "--ready")
    assert (result.returncode, result.stdout) == (
        0,
        "Ready: 1 worker process ready.\n",
    ), run.output(worker) + result.stderr
    assert run.stop(worker) == 0
