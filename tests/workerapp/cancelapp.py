"""An app whose tasks can be cancelled from the API (issue 23).

`build(broker, record)` makes it on any broker: the in-process tests pass an
InMemoryBroker and a list's append; under uvicorn and the worker command
(TASKIQ_TEST_QUEUE set) it runs on Redis, or NATS JetStream with NATS_URL
set, and records events in EVENTS_FILE as `<pid> <event>` lines.
"""

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, HTTPException, Request
from taskiq import AsyncBroker, Context, TaskiqDepends

import taskiq_fastapi


def require_user(x_user: Annotated[str | None, Header()] = None) -> str:
    if not x_user:
        raise HTTPException(status_code=401, detail="Who are you?")
    return x_user


def build(
    broker: AsyncBroker, record: Callable[[str], None], lifespan: Any = None
) -> tuple[FastAPI, taskiq_fastapi.TaskStatus]:
    async def held(context: Context = TaskiqDepends()) -> AsyncIterator[str]:
        """A generator dependency: says whether it saw a cancellation."""
        task_id = context.message.task_id
        try:
            yield "held"
        except asyncio.CancelledError:
            record(f"{task_id} dependency saw the cancellation")
            raise
        finally:
            record(f"{task_id} dependency released")

    @broker.task
    async def job(n: int, seconds: float, resource: str = TaskiqDepends(held)) -> int:
        record(f"job {n} started")
        await asyncio.sleep(seconds)
        record(f"job {n} finished")
        return n

    @broker.task
    async def stubborn(release: str) -> str:
        """Catches the cancellation and goes on: it must not show as cancelled.

        Runs until the file `release` exists, not for a set time: the test
        looks at it 1 s after the cancellation, however late that came.
        """
        while not os.path.exists(release):
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                record("stubborn ignored a cancellation")
        return "done anyway"

    @broker.task
    def in_a_thread(seconds: float, release: str | None = None) -> str:
        """Sleeps `seconds`, or less once the file `release` exists: a test
        cancelling it while it runs releases it when done, however slow."""
        end = time.monotonic() + seconds
        while time.monotonic() < end and not (release and os.path.exists(release)):
            time.sleep(0.01)
        return "done"

    status = taskiq_fastapi.TaskStatus(
        broker, [job, stubborn, in_a_thread], cancellable=True, poll_interval=0.05
    )

    def own_tasks_only(
        kicked: Annotated[taskiq_fastapi.TaskRecord, Depends(status.kicked)],
        user: Annotated[str, Depends(require_user)],
    ) -> None:
        if kicked.labels.get("owner") != user:
            raise HTTPException(status_code=404, detail="Task not found")

    app = FastAPI(lifespan=taskiq_fastapi.broker_lifespan(broker, lifespan))
    app.include_router(
        status.router(dependencies=[Depends(require_user), Depends(own_tasks_only)])
    )
    User = Annotated[str, Depends(require_user)]  # noqa: N806

    @app.post("/jobs", status_code=202)
    async def start_job(request: Request, user: User, n: int, seconds: float) -> Any:
        task = await job.kicker().with_labels(owner=user).kiq(n, seconds)
        return status.accepted(task, request)

    @app.post("/stubborn", status_code=202)
    async def start_stubborn(request: Request, user: User, release: str) -> Any:
        task = await stubborn.kicker().with_labels(owner=user).kiq(release)
        return status.accepted(task, request)

    @app.post("/threads", status_code=202)
    async def start_thread(
        request: Request, user: User, seconds: float, release: str | None = None
    ) -> Any:
        task = await in_a_thread.kicker().with_labels(owner=user).kiq(seconds, release)
        return status.accepted(task, request)

    return app, status


if os.environ.get("TASKIQ_TEST_QUEUE"):  # under uvicorn and the worker command
    from workerapp.app import lifespan as recorded_lifespan
    from workerapp.app import record as record_event

    _queue = os.environ["TASKIQ_TEST_QUEUE"]
    if os.environ.get("NATS_URL"):
        from workerapp.brokers import make_nats_broker

        broker = make_nats_broker(os.environ["NATS_URL"], _queue)
    else:
        from taskiq_redis import ListQueueBroker, RedisAsyncResultBackend

        _url = os.environ["REDIS_URL"]
        broker = ListQueueBroker(
            _url, queue_name=_queue, socket_timeout=None
        ).with_result_backend(RedisAsyncResultBackend(_url, result_ex_time=600))
    app, status = build(broker, record_event, recorded_lifespan)
