"""An app whose routes kick tasks and show them with TaskStatus (issue 22).

`build(broker)` makes it on any broker: the in-process tests pass an
InMemoryBroker; under uvicorn and the worker command (TASKIQ_TEST_QUEUE set)
it runs on Redis (or NATS JetStream, NATS_URL set) with a result backend
that deletes results once read.
"""

import asyncio
import datetime as dt
import os
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, HTTPException, Request
from pydantic import BaseModel
from taskiq import AsyncBroker, TaskiqDepends
from taskiq.depends.progress_tracker import ProgressTracker, TaskState

import taskiq_fastapi


class Report(BaseModel):
    title: str
    pages: int
    made_at: dt.datetime


def require_user(x_user: Annotated[str | None, Header()] = None) -> str:
    if not x_user:
        raise HTTPException(status_code=401, detail="Who are you?")
    return x_user


def build(
    broker: AsyncBroker, *, error_messages: bool = False
) -> tuple[FastAPI, taskiq_fastapi.TaskStatus]:
    @broker.task
    async def make_report(
        title: str, gate: str, progress: taskiq_fastapi.Progress = TaskiqDepends()
    ) -> Report:
        """Reports progress, then waits until the test creates the file `gate`."""
        await progress.set({"done": 1, "of": 2})
        while not Path(gate).exists():
            await asyncio.sleep(0.02)
        return Report(
            title=title,
            pages=2,
            made_at=dt.datetime(2026, 12, 2, tzinfo=dt.timezone.utc),
        )

    @broker.task
    async def tracked(
        gate: str, tracker: ProgressTracker[dict[str, int]] = TaskiqDepends()
    ) -> int:
        """The same with taskiq's own ProgressTracker, where the backend stores it."""
        await tracker.set_progress(TaskState.STARTED, {"done": 1, "of": 2})
        while not Path(gate).exists():
            await asyncio.sleep(0.02)
        return 2

    @broker.task
    async def list_reports(count: int) -> list[Report]:
        made = dt.datetime(2026, 12, 1, tzinfo=dt.timezone.utc)
        return [Report(title=f"r{n}", pages=n, made_at=made) for n in range(count)]

    @broker.task
    async def fail(message: str) -> None:
        raise ValueError(message)

    @broker.task
    async def unlisted() -> int:
        return 7

    status = taskiq_fastapi.TaskStatus(
        broker,
        [make_report, tracked, list_reports, fail],
        error_messages=error_messages,
        poll_interval=0.05,
    )

    def own_tasks_only(
        kicked: Annotated[taskiq_fastapi.TaskRecord, Depends(status.kicked)],
        user: Annotated[str, Depends(require_user)],
    ) -> None:
        """Only the user who kicked a task sees it; to others it does not exist."""
        if kicked.labels.get("owner") != user:
            raise HTTPException(status_code=404, detail="Task not found")

    app = FastAPI(lifespan=taskiq_fastapi.broker_lifespan(broker))
    app.include_router(
        status.router(
            dependencies=[Depends(require_user), Depends(own_tasks_only)],
            tags=["tasks"],
        )
    )
    User = Annotated[str, Depends(require_user)]  # noqa: N806
    accepted: dict[str, Any] = {
        "status_code": 202,
        "response_model": taskiq_fastapi.TaskAccepted,
    }

    @app.post("/reports", **accepted)
    async def start_report(request: Request, user: User, title: str, gate: str) -> Any:
        task = await make_report.kicker().with_labels(owner=user).kiq(title, gate)
        return status.accepted(task, request)

    @app.post("/lists", **accepted)
    async def start_list(request: Request, user: User, count: int) -> Any:
        task = await list_reports.kicker().with_labels(owner=user).kiq(count)
        return status.accepted(task, request)

    @app.post("/failures", **accepted)
    async def start_failure(request: Request, user: User, message: str) -> Any:
        task = await fail.kicker().with_labels(owner=user).kiq(message)
        return status.accepted(task, request)

    @app.post("/tracked", **accepted)
    async def start_tracked(request: Request, user: User, gate: str) -> Any:
        task = await tracked.kicker().with_labels(owner=user).kiq(gate)
        return status.accepted(task, request)

    @app.post("/unlisted")
    async def start_unlisted(user: User) -> dict[str, str]:
        task = await unlisted.kicker().with_labels(owner=user).kiq()
        return {"task_id": task.task_id}

    @app.get("/results/{task_id}")
    async def result_of(task_id: str) -> Any:
        """The task's result as taskiq's own API gives it (which may consume it)."""
        result = await broker.result_backend.get_result(task_id)
        return {"return_value": result.return_value}

    return app, status


if os.environ.get("NATS_URL"):  # the same, on NATS JetStream
    from taskiq_nats import NATSObjectStoreResultBackend

    from workerapp.brokers import make_nats_broker

    _url, _queue = os.environ["NATS_URL"], os.environ["TASKIQ_TEST_QUEUE"]
    broker = make_nats_broker(_url, _queue).with_result_backend(
        NATSObjectStoreResultBackend(_url, keep_results=False, bucket_name=_queue)
    )
    app, status = build(broker)
elif os.environ.get("TASKIQ_TEST_QUEUE"):  # under uvicorn and the worker command
    from taskiq_redis import ListQueueBroker, RedisAsyncResultBackend

    _url = os.environ["REDIS_URL"]
    broker = ListQueueBroker(
        _url, queue_name=os.environ["TASKIQ_TEST_QUEUE"], socket_timeout=None
    ).with_result_backend(
        RedisAsyncResultBackend(_url, keep_results=False, result_ex_time=600)
    )
    app, status = build(broker)
