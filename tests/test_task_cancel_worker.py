"""Cancelling tasks: real uvicorn, two real worker commands, Redis and NATS (issue 23)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx2
import pytest
from prometheus_client.parser import text_string_to_metric_families
from taskiq.kicker import AsyncKicker
from workers import TASKIQ, WorkerRun, get_json

from taskiq_fastapi._brokers import peek_result
from tools.processes import free_port

ALICE = {"X-User": "alice"}
CANCEL_APP = [
    "workerapp.cancelapp:broker",
    "workerapp.cancelapp",
    "--app",
    "workerapp.cancelapp:app",
]


def wait_for(
    client: httpx2.Client, task_id: str, state: str, within: float = 30
) -> dict[str, Any]:
    deadline = time.monotonic() + within
    while True:
        status = client.get(f"/tasks/{task_id}", headers=ALICE).json()
        if status.get("state") == state:
            return status  # type: ignore[no-any-return]
        assert time.monotonic() < deadline, status
        time.sleep(0.02)


def up(client: httpx2.Client) -> None:
    """Wait until uvicorn answers."""
    deadline = time.monotonic() + 30
    while True:
        try:
            client.get("/openapi.json")
            return
        except httpx2.TransportError:
            assert time.monotonic() < deadline
            time.sleep(0.1)


async def redelivery_result(run: WorkerRun, task_id: str) -> Any:
    """The result the redelivered message left (its labels say so).

    Not `wait_result`: it would return the first run's result, and on
    taskiq-nats' object store a read racing the rewrite of that result can
    wait for ever; `peek_result` bounds each read.
    """
    deadline = time.monotonic() + 30
    while True:
        result = await peek_result(run.sender.result_backend, task_id)
        if result is not None and result.labels.get("again") == "1":
            return result
        assert time.monotonic() < deadline, result
        await asyncio.sleep(0.1)


@pytest.mark.anyio
@pytest.mark.parametrize("family", ["run", "nats_run"], ids=["redis", "nats"])
async def test_queued_and_running_tasks_are_cancelled_on_any_worker(
    request: pytest.FixtureRequest, family: str
) -> None:
    run: WorkerRun = request.getfixturevalue(family)
    _, port = run.serve("workerapp.cancelapp:app")
    with httpx2.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        up(client)
        # Cancelled while no worker runs: it never starts once they do.
        queued = client.post("/jobs", params={"n": 1, "seconds": 60}, headers=ALICE)
        queued_id = queued.json()["task_id"]
        asked = client.delete(f"/tasks/{queued_id}", headers=ALICE)
        assert asked.status_code == 202
        assert asked.json()["state"] == "queued"
        # A sync task too: its thread is never entered.
        thread = client.post("/threads", params={"seconds": 60}, headers=ALICE)
        thread_id = thread.json()["task_id"]
        assert client.delete(f"/tasks/{thread_id}", headers=ALICE).status_code == 202

        commands = [
            run.start("worker", *CANCEL_APP, "--workers", "2") for _ in range(2)
        ]
        run.wait_for("startup", processes=5)  # the lifespan: uvicorn's and 4 workers'
        running = client.post("/jobs", params={"n": 2, "seconds": 60}, headers=ALICE)
        running_id = running.json()["task_id"]
        cancelled = wait_for(client, queued_id, "cancelled")
        assert cancelled["started_at"] is None
        assert wait_for(client, thread_id, "cancelled")["started_at"] is None
        run.wait_for("job 2 started", processes=1)
        sent = time.monotonic()
        assert client.delete(f"/tasks/{running_id}", headers=ALICE).status_code == 202
        wait_for(client, running_id, "cancelled", within=2)
        assert time.monotonic() - sent < 2

        # Delivered again (at-least-once): the cancelled task is not run.
        await run.sender.startup()
        try:
            again = AsyncKicker("workerapp.cancelapp:job", run.sender, {"again": "1"})
            await again.with_task_id(running_id).kiq(2, 60)
            result = await redelivery_result(run, running_id)
        finally:
            await run.sender.shutdown()
        assert result.is_err

        assert client.delete(f"/tasks/{running_id}", headers=ALICE).status_code == 409
    for command in commands:
        assert run.stop(command) == 0, run.output(command)
    events = [event for _, event in run.events()]
    assert "job 1 started" not in events
    # Nor was its dependency set up.
    assert not [event for event in events if event.startswith(queued_id)]
    assert events.count("job 2 started") == 1
    assert "job 2 finished" not in events
    (ran_it,) = {pid for pid, event in run.events() if event == "job 2 started"}
    assert (ran_it, f"{running_id} dependency saw the cancellation") in run.events()
    assert (ran_it, f"{running_id} dependency released") in run.events()


def test_plain_taskiq_worker_honours_cancel_requests_too(run: WorkerRun) -> None:
    """The Canceller is a middleware the app's TaskStatus adds: taskiq's own
    worker, importing the module that makes it, cancels as ours does."""
    _, port = run.serve("workerapp.cancelapp:app")
    worker = run.start(*CANCEL_APP[:2], "--workers", "1", command=(TASKIQ, "worker"))
    with httpx2.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        up(client)
        task_id = client.post(
            "/jobs", params={"n": 3, "seconds": 60}, headers=ALICE
        ).json()["task_id"]
        run.wait_for("job 3 started", processes=1)
        assert client.delete(f"/tasks/{task_id}", headers=ALICE).status_code == 202
        wait_for(client, task_id, "cancelled", within=2)
    assert run.stop(worker) == 0, run.output(worker)
    assert "job 3 finished" not in [event for _, event in run.events()]


def test_metrics_count_a_cancelled_task_as_cancelled_not_failed(run: WorkerRun) -> None:
    """`--metrics`: a task cancelled on request, queued or running, is in
    `taskiq_tasks_cancelled_total`, not `taskiq_tasks_failed_total`, as its
    status says `cancelled`, not `failed` (the dashboard's failure ratio
    counted each cancel as a failure)."""
    _, port = run.serve("workerapp.cancelapp:app")
    health = free_port()
    with httpx2.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        up(client)
        queued = client.post("/jobs", params={"n": 4, "seconds": 60}, headers=ALICE)
        queued_id = queued.json()["task_id"]
        assert client.delete(f"/tasks/{queued_id}", headers=ALICE).status_code == 202
        worker = run.start(
            "worker", *CANCEL_APP, "--workers", "1",
            "--health-port", str(health), "--metrics",
        )  # fmt: skip
        wait_for(client, queued_id, "cancelled")
        running = client.post("/jobs", params={"n": 5, "seconds": 60}, headers=ALICE)
        running_id = running.json()["task_id"]
        run.wait_for("job 5 started", processes=1)
        assert client.delete(f"/tasks/{running_id}", headers=ALICE).status_code == 202
        wait_for(client, running_id, "cancelled", within=2)
        get_json(f"http://127.0.0.1:{health}/readyz")
        job = {"task_name": "workerapp.cancelapp:job"}
        want = {
            "taskiq_tasks_received_total": 2.0,
            "taskiq_tasks_cancelled_total": 2.0,
            "taskiq_tasks_failed_total": 0.0,
            "taskiq_tasks_succeeded_total": 0.0,
        }
        deadline = time.monotonic() + 10
        while True:  # each process writes its counts once a second
            with httpx2.Client(timeout=5) as scraper:
                text = scraper.get(f"http://127.0.0.1:{health}/metrics").text
            got = {
                sample.name: sample.value
                for family in text_string_to_metric_families(text)
                for sample in family.samples
                if sample.labels == job and sample.name in want
            }
            if got == want:
                break
            assert time.monotonic() < deadline, got
            time.sleep(0.1)
    assert run.stop(worker) == 0, run.output(worker)


@pytest.mark.anyio
async def test_a_cancel_landing_in_progress_set_is_not_lost(run: WorkerRun) -> None:
    """Tasks that report progress in a tight loop, each cancelled while it
    runs: every one ends `cancelled`. On Python 3.11 a cancellation that
    landed in Progress.set's Redis write was swallowed by the client (a few
    in a hundred here): the task ran to its end, `succeeded`."""
    from workerapp.progress_cancel import NAME, make

    broker, status = make(run.env["REDIS_URL"], run.queue)
    worker = run.start(
        "workerapp.progress_cancel:broker", "workerapp.progress_cancel",
        "--workers", "1", "--max-async-tasks", "250",
        command=(TASKIQ, "worker"),
    )  # fmt: skip
    await broker.startup()
    try:
        kicker = AsyncKicker(NAME, broker, {})
        ids = [(await kicker.kiq(20)).task_id for _ in range(200)]
        deadline = time.monotonic() + 30
        for task_id in ids:  # each running, and reporting
            while (await status.store.progress(task_id)) is None:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
        await asyncio.gather(*(status.cancel(task_id) for task_id in ids))
        deadline = time.monotonic() + 40  # a lost cancel: it runs its 20 s
        while True:
            states = [(await status.kicked(task_id)).state for task_id in ids]
            if all(state in ("cancelled", "succeeded", "failed") for state in states):
                break
            assert time.monotonic() < deadline, states
            await asyncio.sleep(0.1)
    finally:
        await broker.shutdown()
    assert run.stop(worker) == 0, run.output(worker)
    assert states == ["cancelled"] * len(ids), [s for s in states if s != "cancelled"]
