"""Cancelling tasks from the API, in-process: InMemoryBroker and TestClient (issue 23)."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

import pytest
from conftest import as_worker
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient
from taskiq import InMemoryBroker, TaskiqDepends, TaskiqMessage, TaskiqMiddleware
from taskiq.middlewares import SimpleRetryMiddleware, SmartRetryMiddleware
from taskiq_dependencies import ParamInfo
from workerapp.cancelapp import build

import taskiq_fastapi
from taskiq_fastapi.dependencies import plans

ALICE = {"X-User": "alice"}


class App:
    def __init__(self) -> None:
        self.events: list[str] = []
        self.broker = InMemoryBroker()
        app, self.status = build(self.broker, self.events.append)
        self.client = TestClient(app)

    def kick(self, path: str, **params: Any) -> str:
        response = self.client.post(path, params=params, headers=ALICE)
        assert response.status_code == 202
        return str(response.json()["task_id"])

    def wait_for(self, task_id: str, state: str, within: float = 10) -> dict[str, Any]:
        deadline = time.monotonic() + within
        while True:
            status = self.client.get(f"/tasks/{task_id}", headers=ALICE).json()
            if status["state"] == state:
                return status  # type: ignore[no-any-return]
            assert time.monotonic() < deadline, status
            time.sleep(0.01)

    def wait_for_event(self, event: str) -> None:
        deadline = time.monotonic() + 10
        while event not in self.events:
            assert time.monotonic() < deadline, self.events
            time.sleep(0.01)


@pytest.fixture
def app() -> Iterator[App]:
    made = App()
    with made.client:
        yield made


def test_a_running_task_is_cancelled_and_its_dependency_cleans_up(
    app: App, caplog: pytest.LogCaptureFixture
) -> None:
    task_id = app.kick("/jobs", n=1, seconds=30)
    app.wait_for_event("job 1 started")
    asked = time.monotonic()
    response = app.client.delete(f"/tasks/{task_id}", headers=ALICE)
    assert response.status_code == 202
    assert response.headers["location"] == f"http://testserver/tasks/{task_id}"
    assert response.json()["state"] in {"queued", "started"}  # as it stands
    done = app.wait_for(task_id, "cancelled", within=2)
    assert time.monotonic() - asked < 2
    assert done["error"] is None
    assert done["result"] is None
    assert done["started_at"] is not None
    assert done["started_at"] <= done["finished_at"]
    assert app.events == [
        "job 1 started",
        f"{task_id} dependency saw the cancellation",
        f"{task_id} dependency released",
    ]
    # taskiq's traceback for it is one line; the dependency passing the
    # cancellation on is no teardown failure.
    (logged,) = [r for r in caplog.records if task_id in r.getMessage()]
    assert (logged.levelname, logged.getMessage()) == (
        "INFO",
        f"Task {task_id} was cancelled.",
    )
    assert logged.exc_info is None
    # Finished: a second cancel is a conflict.
    again = app.client.delete(f"/tasks/{task_id}", headers=ALICE)
    assert again.status_code == 409
    assert again.json() == {"detail": f"Task {task_id} has already finished: cancelled"}


def test_a_cancelled_task_delivered_again_is_not_run(app: App) -> None:
    """At-least-once brokers deliver a message again: a cancelled one is skipped."""
    task_id = app.kick("/jobs", n=2, seconds=30)
    app.wait_for_event("job 2 started")
    app.client.delete(f"/tasks/{task_id}", headers=ALICE)
    app.wait_for(task_id, "cancelled")
    job = app.broker.find_task("workerapp.cancelapp:job")
    assert job is not None
    again = job.kicker().with_task_id(task_id).with_labels(owner="alice")
    app.client.portal.call(again.kiq, 2, 30)  # type: ignore[union-attr]
    time.sleep(0.2)
    assert app.events.count("job 2 started") == 1
    # Nor was its dependency set up again.
    assert app.events.count(f"{task_id} dependency released") == 1
    shown = app.wait_for(task_id, "cancelled")
    assert shown["started_at"] is None  # the last run never began


def test_finished_unknown_and_other_users_tasks(app: App) -> None:
    task_id = app.kick("/jobs", n=3, seconds=0)
    app.wait_for(task_id, "succeeded")
    response = app.client.delete(f"/tasks/{task_id}", headers=ALICE)
    assert response.status_code == 409
    assert response.json() == {
        "detail": f"Task {task_id} has already finished: succeeded"
    }
    running = app.kick("/jobs", n=4, seconds=30)
    app.wait_for_event("job 4 started")
    assert app.client.delete("/tasks/nope", headers=ALICE).status_code == 404
    assert app.client.delete(f"/tasks/{running}").status_code == 401
    bob = app.client.delete(f"/tasks/{running}", headers={"X-User": "bob"})
    assert bob.status_code == 404
    assert bob.json() == {"detail": "Task not found"}
    assert app.wait_for(running, "started")["state"] == "started"  # not cancelled
    app.client.delete(f"/tasks/{running}", headers=ALICE)
    app.wait_for(running, "cancelled")


def test_a_task_that_catches_the_cancellation_is_reported_running(
    app: App, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    # It runs until released: a task of a set time (1.5 s) had ended before
    # the 1 s warning when the cancel came 0.5 s after its start.
    release = tmp_path / "release"
    task_id = app.kick("/stubborn", release=str(release))
    app.wait_for(task_id, "started")
    assert app.client.delete(f"/tasks/{task_id}", headers=ALICE).status_code == 202
    app.wait_for_event("stubborn ignored a cancellation")
    warning = (
        f"Task {task_id} is still running 1 s after it was cancelled: it caught or "
        "shielded itself from the cancellation, or blocks its event loop; its "
        "state stays started."
    )
    deadline = time.monotonic() + 10
    while warning not in caplog.text:
        assert time.monotonic() < deadline, caplog.text
        time.sleep(0.01)
    assert app.client.get(f"/tasks/{task_id}", headers=ALICE).json()["state"] == (
        "started"
    )
    release.touch()
    done = app.wait_for(task_id, "succeeded")
    assert done["result"] == "done anyway"
    assert caplog.text.count(warning) == 1


def test_a_running_sync_task_cannot_be_cancelled(app: App, tmp_path: Path) -> None:
    # Released once refused: one of a set time (0.5 s) had finished, and was
    # refused as such, when the cancel came 0.5 s after its start.
    release = tmp_path / "release"
    task_id = app.kick("/threads", seconds=60, release=str(release))
    app.wait_for(task_id, "started")
    response = app.client.delete(f"/tasks/{task_id}", headers=ALICE)
    assert response.status_code == 409
    assert response.json() == {
        "detail": f"Task {task_id} is running: 'workerapp.cancelapp:in_a_thread' "
        "is a sync function, which runs in a thread that cannot be stopped"
    }
    release.touch()
    assert app.wait_for(task_id, "succeeded")["result"] == "done"


@pytest.mark.anyio
async def test_the_python_call_and_its_errors() -> None:
    async with started() as (_broker, status, job, events):
        task = await job.kiq(5, 30)
        while "job 5 started" not in events:
            await asyncio.sleep(0.01)
        record = await status.cancel(task.task_id)
        assert record.state in {"queued", "started"}
        result = await task.wait_result(timeout=2)
        assert result.is_err
        assert isinstance(result.error, taskiq_fastapi.TaskCancelledError)
        assert (await status.kicked(task.task_id)).state == "cancelled"
        with pytest.raises(taskiq_fastapi.TaskNotCancellableError) as raised:
            await status.cancel(task.task_id)
        assert raised.value.state == "cancelled"
        with pytest.raises(taskiq_fastapi.TaskNotFoundError):
            await status.cancel("nope")


@pytest.mark.anyio
async def test_a_task_cancelled_otherwise_is_not_marked_cancelled() -> None:
    """A worker's own stop (its second signal) cancels tasks too: not a request."""
    async with started() as (broker, status, job, events):
        task = await job.kiq(6, 30)
        while "job 6 started" not in events:
            await asyncio.sleep(0.01)
        for running in list(broker._running_tasks):
            running.cancel()
        result = await task.wait_result(timeout=2)
        assert type(result.error) is asyncio.CancelledError
        assert (await status.kicked(task.task_id)).state == "failed"


def test_cancelling_is_off_unless_asked() -> None:
    broker = InMemoryBroker()

    @broker.task
    async def job() -> int:
        return 1

    status = taskiq_fastapi.TaskStatus(broker, [job])
    app = FastAPI()
    app.include_router(status.router())
    with TestClient(app) as client:
        assert client.delete("/tasks/abc").status_code == 405
    assert [type(m).__name__ for m in broker.middlewares] == ["Recorder"]
    assert not hasattr(job.original_func, "__wrapped__")
    with pytest.raises(taskiq_fastapi.TaskStatusError) as raised:
        asyncio.run(status.cancel("abc"))
    assert str(raised.value) == (
        "TaskStatus 'task_status' was made without cancellable=True."
    )


def test_cancellable_needs_records_every_worker_can_follow() -> None:
    from taskiq.brokers.inmemory_broker import InmemoryResultBackend
    from taskiq_redis import ListQueueBroker

    broker = ListQueueBroker("redis://127.0.0.1:1").with_result_backend(
        InmemoryResultBackend()
    )

    @broker.task
    async def job() -> int:
        return 1

    with pytest.raises(taskiq_fastapi.TaskStatusError) as raised:
        taskiq_fastapi.TaskStatus(broker, [job], cancellable=True)
    assert str(raised.value) == (
        "TaskStatus(cancellable=True) needs its records on Redis (taskiq-redis' "
        "RedisAsyncResultBackend) or NATS (taskiq-nats' "
        "NATSObjectStoreResultBackend), where every worker can follow cancel "
        "requests; the broker's result backend is InmemoryResultBackend."
    )


@pytest.mark.anyio
async def test_on_redis_a_request_is_read_by_the_watch_and_the_outcome_recorded(
    redis_url: str,
) -> None:
    """Requests through the Redis stream (pins the RedisAsyncResultBackend
    attributes RedisCancels reads: the records' client, prefix and expiry);
    with keep_results=False the cancelled outcome is a record of its own."""
    import uuid

    from redis.asyncio import Redis
    from taskiq_redis import RedisAsyncResultBackend

    prefix = f"cancel-{uuid.uuid4().hex}"
    backend: RedisAsyncResultBackend[Any] = RedisAsyncResultBackend(
        redis_url, keep_results=False, result_ex_time=60, prefix_str=prefix
    )
    async with started(InMemoryBroker().with_result_backend(backend)) as (
        _broker,
        status,
        job,
        events,
    ):
        task = await job.kiq(7, 30)
        while "job 7 started" not in events:
            await asyncio.sleep(0.01)
        await status.cancel(task.task_id)
        for _ in range(200):
            if (await status.kicked(task.task_id)).state == "cancelled":
                break
            await asyncio.sleep(0.01)
        record = await status.store.read(task.task_id)
        assert record is not None
        assert record.state == "cancelled"
        async with Redis.from_url(redis_url) as client:
            stream = f"{prefix}:taskiq_fastapi:cancels"
            assert 55 <= await client.ttl(stream) <= 60
            (entry,) = await client.xrange(stream)
            assert entry[1] == {b"task_id": task.task_id.encode()}
            await client.delete(stream)


def test_requests_are_kept_as_long_as_the_records() -> None:
    """A request older than the records' expiry is not honoured (the task's
    record is gone: nothing shows it), and is forgotten as newer ones come."""
    from taskiq_fastapi.task_status.cancel import Canceller

    canceller = Canceller(None, keep=60)
    now = time.time()
    canceller.request("old", now - 61)
    canceller.request("kept", now - 59)
    assert list(canceller.cancelled) == ["kept"]
    canceller.cancelled["kept"] = now - 1  # its time has come
    canceller.request("new", now)
    assert list(canceller.cancelled) == ["new"]


@asynccontextmanager
async def started(
    broker: InMemoryBroker | None = None,
) -> AsyncIterator[tuple[InMemoryBroker, Any, Any, list[str]]]:
    """The cancel app's broker started, its TaskStatus, its `job`, and the
    events its tasks and dependencies record."""
    events: list[str] = []
    broker = broker or InMemoryBroker()
    _, status = build(broker, events.append)
    job = broker.find_task("workerapp.cancelapp:job")
    assert job is not None
    await broker.startup()
    try:
        yield broker, status, job, events
    finally:
        await broker.shutdown()


async def _until(condition: Any, within: float = 5) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)


@pytest.mark.anyio
@pytest.mark.parametrize("retry", [SimpleRetryMiddleware, SmartRetryMiddleware])
async def test_a_cancelled_task_is_not_retried(
    retry: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A cancel request is no failure for taskiq's retry middlewares to retry."""
    caplog.set_level(logging.INFO)
    broker = InMemoryBroker().with_middlewares(retry(default_retry_count=5))
    runs: list[str] = []

    @broker.task(retry_on_error=True)
    async def retried() -> int:
        runs.append("began")
        await asyncio.sleep(30)
        return 1

    status = taskiq_fastapi.TaskStatus(broker, [retried], cancellable=True)
    await broker.startup()
    try:
        task = await retried.kiq()
        await _until(lambda: runs)
        await status.cancel(task.task_id)
        result = await task.wait_result(timeout=2)
        assert isinstance(result.error, taskiq_fastapi.TaskCancelledError)
        record = await status.kicked(task.task_id)
        assert record.state == "cancelled"
        assert record.started_at is not None  # the run that was stopped
        await asyncio.sleep(0.2)
        assert runs == ["began"]
        assert not [r for r in caplog.records if "invocation failed" in r.message]
    finally:
        await broker.shutdown()


@pytest.mark.anyio
@pytest.mark.parametrize("backend", ["in-memory", "redis, keep_results=False"])
async def test_a_task_waiting_in_its_dependency_setup_is_cancelled(
    backend: str, request: pytest.FixtureRequest
) -> None:
    """With keep_results=False the outcome is a record the worker writes
    (post_execute, whose order among middlewares differs by taskiq version)."""
    events: list[str] = []
    broker = InMemoryBroker()
    if backend != "in-memory":
        import uuid

        from taskiq_redis import RedisAsyncResultBackend

        broker = broker.with_result_backend(
            RedisAsyncResultBackend(
                request.getfixturevalue("redis_url"),
                keep_results=False,
                prefix_str=f"cancel-{uuid.uuid4().hex}",
            )
        )

    async def slow_connection() -> AsyncIterator[str]:
        events.append("setup began")
        try:
            await asyncio.sleep(30)  # e.g. waiting for a pooled connection
        except asyncio.CancelledError:
            events.append("setup saw a CancelledError")
            raise
        yield "connection"

    @broker.task
    async def needs_connection(conn: str = TaskiqDepends(slow_connection)) -> int:
        events.append("function began")
        return 1

    status = taskiq_fastapi.TaskStatus(
        broker, [needs_connection], cancellable=True, started_after=0
    )
    await broker.startup()
    try:
        task = await needs_connection.kiq()
        await _until(lambda: "setup began" in events)
        asked = time.monotonic()
        await status.cancel(task.task_id)
        await _until(lambda: "setup saw a CancelledError" in events, 2)
        assert time.monotonic() - asked < 2
        await _until(lambda: not broker._running_tasks)
        record = await status.kicked(task.task_id)
        assert (record.state, record.started_at is not None) == ("cancelled", True)
        assert events == ["setup began", "setup saw a CancelledError"]
    finally:
        await broker.shutdown()


@pytest.mark.anyio
async def test_every_run_of_a_task_delivered_again_while_it_runs_is_cancelled() -> None:
    """A broker may deliver a message again while it runs (a stream's reclaim)."""
    async with started() as (_broker, status, job, events):
        task = await job.kiq(7, 30)
        await job.kicker().with_task_id(task.task_id).kiq(7, 30)
        await _until(lambda: events.count("job 7 started") == 2)
        await status.cancel(task.task_id)
        await _until(
            lambda: events.count(f"{task.task_id} dependency released") == 2, 2
        )
        assert events.count(f"{task.task_id} dependency saw the cancellation") == 2
        assert "job 7 finished" not in events


@pytest.mark.anyio
async def test_a_cancelled_result_is_an_error_a_route_can_handle() -> None:
    """`raise_for_error()` in `except Exception`, as taskiq documents it."""
    async with started() as (_broker, status, job, events):
        task = await job.kiq(8, 30)
        await _until(lambda: "job 8 started" in events)
        await status.cancel(task.task_id)
        result = await task.wait_result(timeout=2)
        try:
            result.raise_for_error()
        except Exception as exc:
            handled = exc
        assert isinstance(handled, taskiq_fastapi.TaskCancelledError)
        assert isinstance(handled, taskiq_fastapi.TaskiqFastAPIError)
        assert str(handled) == f"Task {task.task_id} was cancelled."


@pytest.mark.anyio
async def test_on_nats_a_task_id_with_dots_is_cancelled(nats_url: str) -> None:
    """A request is a key of the records' bucket, watched with `>`: any id."""
    import uuid

    from taskiq_nats import NATSObjectStoreResultBackend

    backend: NATSObjectStoreResultBackend[Any] = NATSObjectStoreResultBackend(
        servers=[nats_url], bucket_name=f"cancel-{uuid.uuid4().hex}"
    )
    events: list[str] = []
    broker = InMemoryBroker().with_result_backend(backend)
    _, status = build(broker, events.append)
    job = broker.find_task("workerapp.cancelapp:job")
    assert job is not None
    await broker.startup()
    if not hasattr(backend, "nats_jetstream"):  # InMemoryBroker 0.11 did not
        await backend.startup()
    try:
        task = await job.kicker().with_task_id("order.42.a").kiq(9, 30)
        await _until(lambda: "job 9 started" in events)
        await status.cancel(task.task_id)
        await _until(lambda: "order.42.a dependency released" in events, 2)
        assert (await status.kicked(task.task_id)).state == "cancelled"
    finally:
        await broker.shutdown()


async def _redis_app(
    url: str, events: list[str], **backend_options: Any
) -> tuple[InMemoryBroker, taskiq_fastapi.TaskStatus, Any]:
    import uuid

    from taskiq_redis import RedisAsyncResultBackend

    backend: RedisAsyncResultBackend[Any] = RedisAsyncResultBackend(
        url, prefix_str=f"cancel-{uuid.uuid4().hex}", **backend_options
    )
    broker = InMemoryBroker().with_result_backend(backend)
    _, status = build(broker, events.append)
    job = broker.find_task("workerapp.cancelapp:job")
    assert job is not None
    await broker.startup()
    return broker, status, job


@pytest.mark.anyio
async def test_on_redis_the_watch_holds_no_connection_of_the_backends_pool(
    redis_url: str,
) -> None:
    """With max_connection_pool_size=1, results are saved while the watch blocks."""
    events: list[str] = []
    broker, _, job = await _redis_app(redis_url, events, max_connection_pool_size=1)
    try:
        await (await job.kiq(0, 0)).wait_result(timeout=5)  # the watch starts
        started = time.monotonic()
        for n in range(1, 6):
            await (await job.kiq(n, 0)).wait_result(timeout=5)
        # Each waited for the watch's 1 s blocking read to end, before.
        assert time.monotonic() - started < 2.5
    finally:
        await broker.shutdown()


@pytest.mark.anyio
async def test_on_redis_a_short_socket_timeout_is_no_outage_of_the_watch(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    events: list[str] = []
    broker, status, job = await _redis_app(redis_url, events, socket_timeout=0.3)
    try:
        task = await job.kiq(1, 30)
        await _until(lambda: "job 1 started" in events)
        await asyncio.sleep(1.5)  # more than one blocking read of the watch
        await status.cancel(task.task_id)
        result = await task.wait_result(timeout=3)
        assert isinstance(result.error, taskiq_fastapi.TaskCancelledError)
        assert not [r for r in caplog.records if r.name == "taskiq_fastapi"]
    finally:
        await broker.shutdown()


@pytest.mark.anyio
async def test_on_redis_a_user_who_may_not_read_streams_still_runs_tasks(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """One ERROR naming what was refused; the tasks are not kept waiting."""
    import uuid
    from urllib.parse import urlsplit

    from redis.asyncio import Redis

    user = f"nostream-{uuid.uuid4().hex[:8]}"
    async with Redis.from_url(redis_url) as admin:
        await admin.execute_command(
            "ACL", "SETUSER", user, "on", ">pw", "~*", "&*", "+@all", "-@stream"
        )
    where = urlsplit(redis_url)
    url = where._replace(netloc=f"{user}:pw@{where.hostname}:{where.port}").geturl()
    events: list[str] = []
    broker, _, job = await _redis_app(url, events)
    try:
        result = await (await job.kiq(1, 0)).wait_result(timeout=5)
        assert result.return_value == 1
        await (await job.kiq(2, 0)).wait_result(timeout=5)
        (logged,) = [r for r in caplog.records if r.name == "taskiq_fastapi"]
        assert logged.levelname == "ERROR"
        assert "Cancel requests cannot be read: NoPermissionError" in logged.message
        assert "xread" in logged.message
    finally:
        await broker.shutdown()
        async with Redis.from_url(redis_url) as admin:
            await admin.execute_command("ACL", "DELUSER", user)


class Hold(TaskiqMiddleware):
    """Holds every task the worker fetched until released, before it begins.

    The broker's first middleware: the task's record says `queued` meanwhile,
    as for a task still in the queue that a worker fetches later.
    """

    def __init__(self) -> None:
        super().__init__()
        self.released = asyncio.Event()

    async def pre_execute(self, message: TaskiqMessage) -> TaskiqMessage:
        await self.released.wait()
        return message


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["async", "async, FastAPI ones only", "sync"])
@pytest.mark.parametrize("order", ["TaskStatus, then init", "init, then TaskStatus"])
async def test_a_queued_task_cancelled_sets_up_none_of_its_dependencies(
    order: str, kind: str
) -> None:
    """Neither its taskiq dependencies nor its FastAPI ones (which `init`
    solves inside the task's call, for an async task whose own parameters
    they are), however the app orders TaskStatus and init; sync tasks too.
    An async task whose only dependencies FastAPI solves in its call has no
    gate: its wrapper's check comes first."""
    events: list[str] = []
    hold = Hold()
    broker = InMemoryBroker().with_middlewares(hold)

    def connection() -> Iterator[str]:
        events.append("taskiq dependency set up")
        yield "conn"
        events.append("taskiq dependency closed")

    async def session() -> AsyncIterator[str]:
        events.append("FastAPI dependency set up")
        yield "session"
        events.append("FastAPI dependency closed")

    if kind == "async":

        @broker.task
        async def job(
            n: int, s: str = Depends(session), c: str = TaskiqDepends(connection)
        ) -> str:
            events.append(f"job {n} ran")
            return f"{n} {s} {c}"

    elif kind == "async, FastAPI ones only":

        @broker.task
        async def job(n: int, s: str = Depends(session), c: str = "conn") -> str:
            events.append(f"job {n} ran")
            return f"{n} {s} {c}"

    else:

        @broker.task
        def job(
            n: int, s: str = Depends(session), c: str = TaskiqDepends(connection)
        ) -> str:
            events.append(f"job {n} ran")
            return f"{n} {s} {c}"

    def make_status() -> taskiq_fastapi.TaskStatus:
        return taskiq_fastapi.TaskStatus(broker, [job], cancellable=True)

    if order == "TaskStatus, then init":
        status = make_status()
        taskiq_fastapi.init(broker, FastAPI())
    else:
        taskiq_fastapi.init(broker, FastAPI())
        status = make_status()
    # `taskiq-fastapi check` shows the task's own tree: no gate in it.
    (plan,) = plans(broker)
    taskiq_too = kind != "async, FastAPI ones only"
    assert [(n.parameter, n.source) for n in plan.tree] == [
        ("n", "message"),
        ("s", "fastapi"),
        ("c", "taskiq" if taskiq_too else "message"),
    ]
    assert plan.problems == []
    async with as_worker(broker):
        cancelled = await job.kiq(1)
        other = await job.kiq("2")
        record = await status.cancel(cancelled.task_id)
        assert record.state == "queued"
        hold.released.set()
        result = await cancelled.wait_result(timeout=5)
        assert isinstance(result.error, taskiq_fastapi.TaskCancelledError)
        assert str(result.error) == (
            f"Task {cancelled.task_id} was cancelled before it began."
        )
        shown = await status.kicked(cancelled.task_id)
        assert (shown.state, shown.started_at) == ("cancelled", None)
        # The other one runs as ever: its argument parsed, its dependencies set.
        assert (await other.wait_result(timeout=5)).return_value == "2 session conn"
    assert sorted(events) == [
        "FastAPI dependency closed",
        "FastAPI dependency set up",
        "job 2 ran",
        *(["taskiq dependency closed", "taskiq dependency set up"] * taskiq_too),
    ]


class _Section(str):
    """Metadata a dependency reads from its own Annotated declaration."""


class _Config:
    def __init__(self, info: ParamInfo = TaskiqDepends()) -> None:
        annotation = info.definition.annotation if info.definition else None
        self.sections = [
            m
            for m in getattr(annotation, "__metadata__", ())
            if isinstance(m, _Section)
        ]
        self.annotation = annotation


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_a_gated_tasks_dependencies_see_their_parameters_as_declared(
    kind: str,
) -> None:
    # The gate names each hint-only dependency; what a dependency reads of
    # its parameter through ParamInfo (annotation, Annotated metadata) is what
    # the same task shows without the gate.
    def body(
        n: int,
        meta: Annotated[_Config, TaskiqDepends(), _Section("db")],
        plain: _Config = TaskiqDepends(use_cache=False),
    ) -> tuple[list[str], str]:
        return meta.sections, repr(plain.annotation)

    async def job(
        n: int,
        meta: Annotated[_Config, TaskiqDepends(), _Section("db")],
        plain: _Config = TaskiqDepends(use_cache=False),
    ) -> tuple[list[str], str]:
        return body(n, meta, plain)

    seen = []
    for cancellable in (False, True):
        broker = InMemoryBroker()
        task = broker.task(job if kind == "async" else body)
        if cancellable:
            taskiq_fastapi.TaskStatus(broker, [task], cancellable=True)
        async with as_worker(broker):
            result = await (await task.kiq(1)).wait_result(timeout=5)
        assert not result.is_err, result.error
        seen.append(result.return_value)
    assert seen[0][0] == ["db"]
    assert seen[1] == seen[0]


@pytest.mark.anyio
async def test_a_sync_task_in_its_thread_is_refused_whatever_started_after() -> None:
    # Recorded `started` as it goes to its thread, not `started_after` later:
    # a cancel meanwhile would be accepted, and never honoured.
    broker = InMemoryBroker()
    running, release = threading.Event(), threading.Event()

    @broker.task
    def report() -> str:
        running.set()
        release.wait(10)
        return "done"

    status = taskiq_fastapi.TaskStatus(
        broker, [report], cancellable=True, started_after=30
    )
    async with as_worker(broker):
        kicked = await report.kiq()
        await asyncio.to_thread(running.wait, 10)
        try:
            with pytest.raises(taskiq_fastapi.TaskNotCancellableError, match="sync"):
                await status.cancel(kicked.task_id)
        finally:
            release.set()
        result = await kicked.wait_result(timeout=5)
    assert result.return_value == "done"
    assert (await status.kicked(kicked.task_id)).state == "succeeded"


@pytest.mark.anyio
async def test_a_not_cancellable_error_keeps_its_type_in_a_saved_result(
    redis_url: str,
) -> None:
    """A task that cancels another (`await status.cancel(...)`) and lets
    TaskNotCancellableError out: taskiq-redis saves the result, and taskiq
    makes the error again from its args. With only its message there, it
    came back a bare `Exception`, its `state` lost, and the task's status
    said `{"type": "Exception"}`."""
    from uuid import uuid4

    from taskiq import TaskiqResult
    from taskiq_redis import RedisAsyncResultBackend

    error = taskiq_fastapi.TaskNotCancellableError(
        "Task x has already finished: succeeded", "succeeded"
    )
    backend = RedisAsyncResultBackend(redis_url, result_ex_time=60)
    await backend.startup()
    task_id = uuid4().hex
    try:
        await backend.set_result(
            task_id,
            TaskiqResult(
                is_err=True, log=None, return_value=None, execution_time=0.0,
                error=error,
            ),
        )  # fmt: skip
        got = (await backend.get_result(task_id)).error
    finally:
        await backend.shutdown()
    assert type(got) is taskiq_fastapi.TaskNotCancellableError
    assert got.state == "succeeded"
    assert str(got) == "Task x has already finished: succeeded"
