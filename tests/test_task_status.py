"""Tasks from the API, in-process: InMemoryBroker and TestClient (issue 22)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from pydantic import BaseModel, TypeAdapter
from taskiq import Context, InMemoryBroker, SimpleRetryMiddleware, TaskiqDepends
from workerapp.statusapp import build

import taskiq_fastapi

ALICE = {"X-User": "alice"}
REPORT = {
    "title": "Q4",
    "pages": 2,
    "made_at": "2026-12-02T00:00:00Z",
}


@pytest.fixture
def client() -> Iterator[TestClient]:
    app, _ = build(InMemoryBroker())
    with TestClient(app) as client:
        yield client


def accepting(
    broker: InMemoryBroker, task: Any, **options: Any
) -> tuple[FastAPI, taskiq_fastapi.TaskStatus]:
    """An app showing `task` with TaskStatus, whose POST /kick kicks it (202)."""
    status = taskiq_fastapi.TaskStatus(broker, [task], **options)
    app = FastAPI(lifespan=taskiq_fastapi.broker_lifespan(broker))
    app.include_router(status.router())

    @app.post("/kick", status_code=202)
    async def kick(request: Request) -> Any:
        return status.accepted(await task.kiq(), request)

    return app, status


def wait_for(client: TestClient, url: str, state: str, **fields: Any) -> dict[str, Any]:
    """Poll the status URL until it shows `state` (and `fields`), as a client would."""
    deadline = time.monotonic() + 10
    while True:
        status = client.get(url, headers=ALICE).json()
        if status.get("state") == state and all(
            status.get(k) == v for k, v in fields.items()
        ):
            return status
        assert time.monotonic() < deadline, status
        time.sleep(0.01)


def events(lines: Iterator[str]) -> list[dict[str, Any]]:
    """The `status` events of a server-sent event stream."""
    found = []
    kind = None
    for line in lines:
        if line.startswith("event: "):
            kind = line[len("event: ") :]
        elif line.startswith("data: "):
            assert kind == "status", line
            found.append(json.loads(line[len("data: ") :]))
    return found


def test_202_location_and_the_states_by_polling(
    client: TestClient, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    response = client.post(
        "/reports", params={"title": "Q4", "gate": str(gate)}, headers=ALICE
    )
    assert response.status_code == 202
    body = response.json()
    url = response.headers["location"]
    assert url == f"http://testserver/tasks/{body['task_id']}"
    assert body == {"task_id": body["task_id"], "status_url": url}

    started = wait_for(client, url, "started", progress={"done": 1, "of": 2})
    assert started["task"] == "workerapp.statusapp:make_report"
    assert started["result"] is None
    assert started["finished_at"] is None
    assert started["queued_at"] <= started["started_at"]
    gate.touch()
    done = wait_for(client, url, "succeeded")
    assert done["result"] == REPORT
    assert done["started_at"] <= done["finished_at"]
    assert done["error"] is None
    # Read again: still there (reading never consumes).
    assert client.get(url, headers=ALICE).json() == done


def test_progress_from_taskiqs_own_progress_tracker_is_shown(
    client: TestClient, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    url = client.post("/tracked", params={"gate": str(gate)}, headers=ALICE).headers[
        "location"
    ]
    wait_for(client, url, "started", progress={"done": 1, "of": 2})
    gate.touch()
    assert wait_for(client, url, "succeeded")["result"] == 2


def test_the_event_stream_sends_each_change_until_the_end(
    client: TestClient, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    response = client.post(
        "/reports", params={"title": "Q4", "gate": str(gate)}, headers=ALICE
    )
    url = response.headers["location"]
    wait_for(client, url, "started", progress={"done": 1, "of": 2})
    # TestClient hands the body over once the response ends: read it in a
    # thread while this one lets the task finish.
    got: list[dict[str, Any]] = []

    def read() -> None:
        with client.stream("GET", url + "/events", headers=ALICE) as stream:
            assert stream.status_code == 200
            assert stream.headers["content-type"].startswith("text/event-stream")
            got.extend(events(stream.iter_lines()))

    reader = threading.Thread(target=read)
    reader.start()
    time.sleep(0.3)
    gate.touch()
    reader.join(timeout=10)
    assert [e["state"] for e in got] == ["started", "succeeded"]  # current first
    assert got[0]["progress"] == {"done": 1, "of": 2}
    assert got[-1]["result"] == REPORT


def test_a_finished_task_streams_its_final_state_and_ends(client: TestClient) -> None:
    url = client.post("/lists", params={"count": 2}, headers=ALICE).headers["location"]
    wait_for(client, url, "succeeded")
    with client.stream("GET", url + "/events", headers=ALICE) as stream:
        got = events(stream.iter_lines())
    assert [e["state"] for e in got] == ["succeeded"]


def test_a_list_of_models_comes_back_as_that(client: TestClient) -> None:
    url = client.post("/lists", params={"count": 2}, headers=ALICE).headers["location"]
    done = wait_for(client, url, "succeeded")
    assert done["result"] == [
        {"title": "r0", "pages": 0, "made_at": "2026-12-01T00:00:00Z"},
        {"title": "r1", "pages": 1, "made_at": "2026-12-01T00:00:00Z"},
    ]


def test_openapi_shows_each_tasks_result_model(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    get = schema["paths"]["/tasks/{task_id}"]["get"]
    ok = get["responses"]["200"]["content"]["application/json"]["schema"]
    refs = sorted(o["$ref"] for o in ok["oneOf"])
    assert refs == [
        "#/components/schemas/FailStatus",
        "#/components/schemas/ListReportsStatus",
        "#/components/schemas/MakeReportStatus",
        "#/components/schemas/TrackedStatus",
    ]
    assert ok["discriminator"]["propertyName"] == "task"
    models = schema["components"]["schemas"]
    make = models["MakeReportStatus"]["properties"]
    assert make["task"]["const"] == "workerapp.statusapp:make_report"
    assert {"$ref": "#/components/schemas/Report"} in make["result"]["anyOf"]
    listed = models["ListReportsStatus"]["properties"]["result"]["anyOf"]
    assert {"type": "array", "items": {"$ref": "#/components/schemas/Report"}} in listed
    assert set(models["Report"]["properties"]) == {"title", "pages", "made_at"}
    assert "404" in get["responses"]
    post = schema["paths"]["/reports"]["post"]["responses"]
    assert post["202"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/TaskAccepted"
    }
    events = schema["paths"]["/tasks/{task_id}/events"]["get"]["responses"]["200"]
    assert "text/event-stream" in events["content"]


def test_a_failure_shows_the_exception_type_and_not_its_message(
    client: TestClient,
) -> None:
    response = client.post("/failures", params={"message": "card 4242"}, headers=ALICE)
    done = wait_for(client, response.headers["location"], "failed")
    assert done["error"] == {"type": "ValueError", "message": None}
    assert done["result"] is None
    assert "4242" not in json.dumps(done)


def test_the_message_is_shown_when_the_app_opts_in() -> None:
    app, _ = build(InMemoryBroker(), error_messages=True)
    with TestClient(app) as client:
        response = client.post(
            "/failures", params={"message": "no paper"}, headers=ALICE
        )
        done = wait_for(client, response.headers["location"], "failed")
    assert done["error"] == {"type": "ValueError", "message": "no paper"}


def test_unknown_ids_and_unlisted_tasks_are_404(client: TestClient) -> None:
    for path in ("/tasks/0123abc", "/tasks/0123abc/events"):
        response = client.get(path, headers=ALICE)
        assert response.status_code == 404
        assert response.json() == {"detail": "Task not found"}
    task_id = client.post("/unlisted", headers=ALICE).json()["task_id"]
    time.sleep(0.1)  # it has run
    assert client.get(f"/tasks/{task_id}", headers=ALICE).status_code == 404
    assert client.get(f"/tasks/{task_id}/events", headers=ALICE).status_code == 404


def test_the_apps_auth_dependency_and_per_task_check_apply(client: TestClient) -> None:
    url = client.post("/lists", params={"count": 1}, headers=ALICE).headers["location"]
    wait_for(client, url, "succeeded")
    for path in (url, url + "/events"):
        assert client.get(path).status_code == 401  # the app's auth dependency
        # Knowing the id is not enough: bob did not kick it.
        response = client.get(path, headers={"X-User": "bob"})
        assert response.status_code == 404
        assert response.json() == {"detail": "Task not found"}
        assert client.get(path, headers=ALICE).status_code == 200


def test_records_are_not_shown_after_keep_for(tmp_path: Path) -> None:
    import datetime as dt

    app, status = build(InMemoryBroker())
    with TestClient(app) as client:
        url = client.post("/lists", params={"count": 1}, headers=ALICE).headers[
            "location"
        ]
        wait_for(client, url, "succeeded")
        status.keep_for = dt.timedelta(0)
        assert client.get(url, headers=ALICE).status_code == 404


def test_a_broker_without_a_result_backend_is_one_clear_error() -> None:
    broker = InMemoryBroker()

    @broker.task
    async def job() -> None: ...

    from taskiq_redis import ListQueueBroker

    plain = ListQueueBroker("redis://127.0.0.1:1")
    other = plain.register_task(job.original_func, "job")
    with pytest.raises(taskiq_fastapi.TaskStatusError) as raised:
        taskiq_fastapi.TaskStatus(plain, [other])
    assert str(raised.value) == (
        "TaskStatus needs a result backend that stores progress; the broker's "
        "is DummyResultBackend: give the broker one with .with_result_backend(...) "
        "(taskiq-redis' RedisAsyncResultBackend, for instance)."
    )
    assert plain.middlewares == []


def test_nothing_is_recorded_for_a_broker_without_task_status() -> None:
    broker = InMemoryBroker()
    app = FastAPI(lifespan=taskiq_fastapi.broker_lifespan(broker))

    @broker.task
    async def job() -> int:
        return 1

    with TestClient(app):
        pass
    assert broker.middlewares == []


@pytest.mark.anyio
@pytest.mark.parametrize(("ex_time", "ttl"), [(600, 600), (None, 3600)])
async def test_redis_records_expire_with_the_results_or_after_keep_for(
    redis_url: str, ex_time: int | None, ttl: int
) -> None:
    """Pins taskiq-redis' backend attributes RedisRecords reads (redis_pool,
    prefix_str, result_ex_time): a record's key gets the results' expiry, or
    keep_for where the backend sets none."""
    import datetime as dt

    from redis.asyncio import Redis
    from taskiq_redis import ListQueueBroker, RedisAsyncResultBackend

    broker = ListQueueBroker(redis_url, queue_name="status-expiry").with_result_backend(
        RedisAsyncResultBackend(redis_url, result_ex_time=ex_time, prefix_str="pfx")
    )

    @broker.task
    async def job() -> int:
        return 1

    taskiq_fastapi.TaskStatus(broker, [job], keep_for=dt.timedelta(hours=1))
    await broker.startup()
    try:
        task = await job.kiq()
        async with Redis.from_url(redis_url) as client:
            keys = [k async for k in client.scan_iter(f"pfx:{task.task_id}*")]
            assert [k.decode() for k in keys] == [
                f"pfx:{task.task_id}.taskiq_fastapi_status"
            ]
            assert ttl - 5 <= await client.ttl(keys[0]) <= ttl
            await client.delete(*keys, "status-expiry")
    finally:
        await broker.shutdown()


@pytest.mark.anyio
async def test_nats_records_live_in_a_key_value_bucket_whose_ttl_is_keep_for(
    nats_url: str,
) -> None:
    """Pins taskiq-nats' backend attributes NatsKeyValues reads (nats_jetstream,
    bucket_name): the bucket is made next to the results' with keep_for as ttl."""
    import datetime as dt
    import uuid

    from taskiq_nats import NATSObjectStoreResultBackend

    bucket = f"status-{uuid.uuid4().hex}"
    backend: NATSObjectStoreResultBackend[Any] = NATSObjectStoreResultBackend(
        nats_url, bucket_name=bucket
    )
    broker = InMemoryBroker().with_result_backend(backend)

    @broker.task
    async def job() -> int:
        return 1

    status = taskiq_fastapi.TaskStatus(broker, [job], keep_for=dt.timedelta(minutes=5))
    await backend.startup()  # alone: InMemoryBroker 0.11 does not start it
    try:
        record = taskiq_fastapi.TaskRecord(
            task_id="t1", task_name=job.task_name, state="queued",
            queued_at=dt.datetime.now(dt.timezone.utc), labels={"owner": "ann"},
        )  # fmt: skip
        await status.store.write(record)
        assert await status.store.read("t1") == record
        kv = await backend.nats_jetstream.key_value(f"{bucket}-taskiq-fastapi")
        assert (await kv.status()).ttl == 300
    finally:
        await backend.shutdown()


@pytest.mark.parametrize("task_id", ["a b", "a*b", "a>b", ".a", "é"])
def test_on_nats_an_id_no_key_can_be_is_404_as_any_unknown_one(
    nats_url: str, task_id: str
) -> None:
    """A JetStream key-value bucket refuses such keys (nats-py's InvalidKeyError):
    no record can be there, so a client that sends one is told what any
    unknown id is told, not 500, on every route."""
    import uuid

    from taskiq_nats import NATSObjectStoreResultBackend

    backend: NATSObjectStoreResultBackend[Any] = NATSObjectStoreResultBackend(
        nats_url, bucket_name=f"status-{uuid.uuid4().hex}"
    )
    broker = InMemoryBroker().with_result_backend(backend)

    @broker.task
    async def job() -> int:
        return 1

    app, _ = accepting(broker, job, cancellable=True)
    with TestClient(app) as client:
        started_here = not hasattr(backend, "nats_jetstream")
        if started_here:  # InMemoryBroker 0.11 does not start it
            client.portal.call(backend.startup)
        path = f"/tasks/{task_id}"
        for method, url in [("GET", path), ("GET", path + "/events"), ("DELETE", path)]:
            response = client.request(method, url)
            assert response.status_code == 404, (method, url)
            assert response.json() == {"detail": "Task not found"}
        if started_here:
            client.portal.call(backend.shutdown)


@pytest.mark.parametrize(
    "task_id", ["order 42", "order#42", "order?42", "订单", "tenant-1/order/42"]
)
def test_the_status_url_of_a_task_id_urls_reserve_characters_of_leads_to_it(
    task_id: str,
) -> None:
    """taskiq lets a kick choose its task id (`with_task_id`): the 202's
    Location and status_url, and DELETE's Location, are URLs, so the id is
    percent-encoded there; unencoded, `#` and `?` cut the path short, and a
    character Latin-1 has not failed the response (500). A `/` (a tenant's
    prefix) is decoded by the server before routing: `{task_id}` matched no
    route, 404. (Not `%` here: TestClient decodes a path twice; under
    uvicorn `100%` is followed too.)"""
    broker = InMemoryBroker()

    @broker.task
    async def job() -> int:
        return 1

    status = taskiq_fastapi.TaskStatus(broker, [job], cancellable=True)
    app = FastAPI(lifespan=taskiq_fastapi.broker_lifespan(broker))
    app.include_router(status.router())

    @app.post("/kick", status_code=202)
    async def kick(request: Request) -> Any:
        return status.accepted(await job.kicker().with_task_id(task_id).kiq(), request)

    with TestClient(app) as client:
        response = client.post("/kick")
        assert response.status_code == 202
        url = response.headers["location"]
        assert url == f"http://testserver/tasks/{quote(task_id, safe='')}"
        assert response.json() == {"task_id": task_id, "status_url": url}
        assert wait_for(client, url, "succeeded")["task_id"] == task_id
        with client.stream("GET", url + "/events") as events:
            assert events.status_code == 200
            data = events.read().decode().partition("data: ")[2]
            assert json.loads(data)["task_id"] == task_id
        # Finished: DELETE answers 409, but reaches the task by that URL.
        assert client.delete(url).status_code == 409


def test_a_task_id_ending_in_events_has_the_status_url_of_another_route() -> None:
    """As the README says: the server decodes `%2F` before routing, so the
    status URL of the id `x/events` is the events route of `x` (404 while
    there is no task `x`, that task's events once there is)."""
    broker = InMemoryBroker()

    @broker.task
    async def job() -> int:
        return 1

    status = taskiq_fastapi.TaskStatus(broker, [job])
    app = FastAPI(lifespan=taskiq_fastapi.broker_lifespan(broker))
    app.include_router(status.router())

    @app.post("/kick", status_code=202)
    async def kick(request: Request, task_id: str) -> Any:
        return status.accepted(await job.kicker().with_task_id(task_id).kiq(), request)

    with TestClient(app) as client:
        url = client.post("/kick", params={"task_id": "x/events"}).headers["location"]
        assert url == "http://testserver/tasks/x%2Fevents"
        assert client.get(url).status_code == 404
        client.post("/kick", params={"task_id": "x"})
        wait_for(client, "http://testserver/tasks/x", "succeeded")
        response = client.get(url)
        assert response.headers["content-type"].startswith("text/event-stream")
        assert events(iter(response.text.splitlines()))[-1]["task_id"] == "x"


def test_a_task_another_task_status_lists_is_404_here() -> None:
    broker = InMemoryBroker()

    @broker.task
    async def public() -> int:
        return 1

    @broker.task
    async def internal() -> int:
        return 2

    shown = taskiq_fastapi.TaskStatus(broker, [public])
    admin = taskiq_fastapi.TaskStatus(broker, [internal], name="admin_status")
    app = FastAPI(lifespan=taskiq_fastapi.broker_lifespan(broker))
    app.include_router(shown.router())
    app.include_router(admin.router(prefix="/admin/tasks"))

    @app.post("/internal")
    async def kick() -> dict[str, str]:
        return {"task_id": (await internal.kiq()).task_id}

    with TestClient(app) as client:
        task_id = client.post("/internal").json()["task_id"]
        wait_for(client, f"/admin/tasks/{task_id}", "succeeded")
        assert client.get(f"/tasks/{task_id}").status_code == 404
        assert client.get(f"/tasks/{task_id}/events").status_code == 404


@pytest.mark.anyio
async def test_a_kick_whose_record_cannot_be_written_is_sent_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The task is queued all the same: failing the kick would have it sent twice."""
    from taskiq_redis import RedisAsyncResultBackend

    dead: RedisAsyncResultBackend[Any] = RedisAsyncResultBackend("redis://127.0.0.1:1")
    broker = InMemoryBroker().with_result_backend(dead)
    ran: list[int] = []

    @broker.task
    async def job(n: int) -> None:
        ran.append(n)

    taskiq_fastapi.TaskStatus(broker, [job])
    task = await job.kiq(3)
    await broker.wait_all()
    assert ran == [3]
    assert (
        f"Task {task.task_id}: its queued state was not recorded: ConnectionError: "
        in caplog.text
    )


@pytest.mark.anyio
async def test_a_progress_that_cannot_be_written_is_logged_and_the_task_goes_on(
    nats_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """As a record that cannot be written: a report of how far a task got
    must not fail the task. Here the NATS server refuses a value over its
    max payload (1 MB), as a server that is down refuses every write."""
    import uuid

    from taskiq_nats import NATSObjectStoreResultBackend

    backend: NATSObjectStoreResultBackend[Any] = NATSObjectStoreResultBackend(
        nats_url, bucket_name=f"progress-{uuid.uuid4().hex}"
    )
    broker = InMemoryBroker().with_result_backend(backend)

    @broker.task
    async def job(progress: taskiq_fastapi.Progress = TaskiqDepends()) -> str:
        await progress.set({"log": "x" * 2_000_000})
        await progress.set({"done": 1})
        return "done"

    status = taskiq_fastapi.TaskStatus(broker, [job])
    await broker.startup()
    started_here = not hasattr(backend, "nats_jetstream")
    if started_here:  # InMemoryBroker 0.11 does not start it
        await backend.startup()
    try:
        task = await job.kiq()
        result = await task.wait_result(timeout=10)
        assert not result.is_err, result.error
        assert result.return_value == "done"
        assert (await status.kicked(task.task_id)).state == "succeeded"
        assert await status.store.progress(task.task_id) == {"done": 1}
    finally:
        if started_here:
            await backend.shutdown()
        await broker.shutdown()
    assert (
        f"Task {job.task_name!r} ({task.task_id}): its progress was not recorded: "
        "MaxPayloadError" in caplog.text
    )


def test_a_status_never_shows_progress_with_a_state_read_before_it() -> None:
    """The route reads the record, then the progress: a task that started and
    reported progress in between is shown started, as it is."""
    from taskiq_fastapi.task_status.records import TaskRecord

    app, status = build(InMemoryBroker())
    queued = TaskRecord(
        task_id="t1",
        task_name="workerapp.statusapp:make_report",
        state="queued",
        queued_at=dt.datetime.now(dt.timezone.utc),
        labels={"owner": "alice"},
    )
    started = queued.model_copy(
        update={"state": "started", "started_at": dt.datetime.now(dt.timezone.utc)}
    )
    read_progress = status.store.progress

    async def reported_meanwhile(task_id: str) -> Any:
        # What a worker does between the route's two reads.
        await status.store.write(started)
        await status.store.set_progress(task_id, {"done": 1, "of": 2})
        return await read_progress(task_id)

    with TestClient(app) as client:
        client.portal.call(status.store.write, queued)
        status.store.progress = reported_meanwhile
        shown = client.get("/tasks/t1", headers=ALICE).json()
    assert shown["progress"] == {"done": 1, "of": 2}
    assert shown["state"] == "started"
    assert shown["started_at"] is not None


@pytest.mark.parametrize("keep_results", [True, False])
def test_a_retried_task_is_not_failed_while_its_retry_runs(
    redis_url: str, tmp_path: Path, keep_results: bool
) -> None:
    """With a backend that deletes results on read, the outcome is recorded:
    the failed run's (no result: a retry follows) must not be."""
    from taskiq import SimpleRetryMiddleware
    from taskiq_redis import RedisAsyncResultBackend

    backend: RedisAsyncResultBackend[Any] = RedisAsyncResultBackend(
        redis_url, keep_results=keep_results, result_ex_time=60
    )
    broker = (
        InMemoryBroker()
        .with_result_backend(backend)
        .with_middlewares(SimpleRetryMiddleware())
    )
    gate = tmp_path / "gate"
    runs: list[int] = []

    @broker.task(retry_on_error=True, max_retries=3)
    async def flaky() -> int:
        runs.append(1)
        if len(runs) < 2:
            raise ValueError("first run")
        while not gate.exists():
            await asyncio.sleep(0.02)
        return len(runs)

    app, _status = accepting(broker, flaky)

    with TestClient(app) as client:
        url = client.post("/kick").headers["location"]
        running = wait_for(client, url, "started")  # the retry, after 50 ms
        assert len(runs) == 2
        assert running["error"] is None
        gate.touch()
        done = wait_for(client, url, "succeeded")
    assert done["result"] == 2
    assert done["queued_at"] <= done["started_at"] <= done["finished_at"]


@pytest.mark.anyio
@pytest.mark.parametrize("db", [0, 1])
async def test_a_list_brokers_kick_carries_its_record_in_the_same_command(
    redis_url: str, db: int
) -> None:
    """Pins taskiq-redis' ListQueueBroker.kick that the kick replaces: LPUSH of
    the message to its queue_name label, else the broker's queue. The results
    on another database: the broker's own kick, and the record written apart."""
    from redis.asyncio import Redis
    from taskiq_redis import ListQueueBroker, RedisAsyncResultBackend

    broker = ListQueueBroker(redis_url, queue_name="status-kick").with_result_backend(
        RedisAsyncResultBackend(f"{redis_url}/{db}", result_ex_time=60)
    )

    @broker.task
    async def job() -> int:
        return 1

    status = taskiq_fastapi.TaskStatus(broker, [job])
    assert (broker.kick.__name__ == "kick_with_record") == (db == 0)
    await broker.startup()
    try:
        first = await job.kiq()
        second = await job.kicker().with_labels(queue_name="status-other").kiq()
        async with Redis.from_url(redis_url) as client:
            assert await client.llen("status-kick") == 1
            assert await client.llen("status-other") == 1
            await client.delete("status-kick", "status-other")
        for task in (first, second):
            record = await status.store.read(task.task_id)
            assert record is not None
            assert record.state == "queued"
    finally:
        await broker.shutdown()


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("maxlen", "approximate"), [(None, True), (5, False), (5, True)]
)
async def test_a_stream_brokers_kick_carries_its_record_in_the_same_command(
    redis_url: str, maxlen: int | None, approximate: bool
) -> None:
    """Pins taskiq-redis' RedisStreamBroker.kick that the kick replaces: XADD
    of {data: message} to its queue_name label, else the broker's stream,
    trimmed to maxlen exactly or approximately. The same kicks through
    taskiq-redis' own kick leave the stream alike, and its listen reads ours."""
    from redis.asyncio import Redis
    from taskiq_redis import RedisAsyncResultBackend, RedisStreamBroker

    kicks = 150
    brokers = []
    for name in ("stream-own", "stream-kick"):
        broker = RedisStreamBroker(
            redis_url, queue_name=name, maxlen=maxlen, approximate=approximate
        ).with_result_backend(RedisAsyncResultBackend(redis_url, result_ex_time=60))

        @broker.task
        async def job() -> int:
            return 1

        brokers.append((broker, job))
    (own, own_job), (broker, job) = brokers
    status = taskiq_fastapi.TaskStatus(broker, [job])
    assert broker.kick.__name__ == "kick_with_record"
    assert own.kick.__name__ == "kick"
    client = Redis.from_url(redis_url)
    try:
        for each in (own, broker):
            await each.startup()
        for _ in range(kicks):
            await own_job.kiq()
            last = await job.kiq()
        other = await job.kicker().with_labels(queue_name="stream-other").kiq()
        for stream in ("stream-own", "stream-kick"):
            length = await client.xlen(stream)
            if maxlen is None:
                assert length == kicks
            elif approximate:  # whole nodes are trimmed: more are kept
                assert maxlen < length < kicks
            else:
                assert length == maxlen
            [(_, fields)] = await client.xrevrange(stream, count=1)
            assert list(fields) == [b"data"]
        assert await client.xlen("stream-other") == 1
        assert broker.formatter.loads(fields[b"data"]).task_id == last.task_id
        [(_, oldest)] = await client.xrange("stream-kick", count=1)
        fetched = await anext(broker.listen())  # the oldest the stream kept
        assert fetched.data == oldest[b"data"]
        for task in (last, other):
            record = await status.store.read(task.task_id)
            assert record is not None
            assert record.state == "queued"
    finally:
        await client.delete("stream-own", "stream-kick", "stream-other")
        await client.aclose()
        for each in (own, broker):
            await each.shutdown()


def test_tasks_of_another_broker_or_none_are_one_clear_error() -> None:
    broker, other = InMemoryBroker(), InMemoryBroker()

    @other.task
    async def elsewhere() -> None: ...

    with pytest.raises(taskiq_fastapi.TaskStatusError) as raised:
        taskiq_fastapi.TaskStatus(broker, [elsewhere])
    assert str(raised.value) == (
        "Task 'test_task_status:elsewhere' is not a task of this broker."
    )
    with pytest.raises(taskiq_fastapi.TaskStatusError) as raised:
        taskiq_fastapi.TaskStatus(broker, [])
    assert str(raised.value) == "TaskStatus was given no tasks to show."
    assert broker.middlewares == []


def _failing_app(broker: InMemoryBroker) -> tuple[FastAPI, Any]:
    @broker.task
    async def charge() -> int:
        raise ValueError("card 4242-4242-4242-4242 declined")

    return FastAPI(lifespan=taskiq_fastapi.broker_lifespan(broker)), charge


def test_each_task_status_shows_messages_only_if_it_asked() -> None:
    """Two on one broker: the public one never shows what the admin one does."""
    broker = InMemoryBroker()
    app, charge = _failing_app(broker)
    public = taskiq_fastapi.TaskStatus(broker, [charge], name="public")
    admin = taskiq_fastapi.TaskStatus(
        broker, [charge], name="admin", error_messages=True
    )
    app.include_router(public.router(prefix="/tasks"))
    app.include_router(admin.router(prefix="/admin/tasks"))

    @app.post("/charge")
    async def kick() -> Any:
        return {"id": (await charge.kiq()).task_id}

    with TestClient(app) as client:
        task_id = client.post("/charge").json()["id"]
        seen_public = wait_for(client, f"/tasks/{task_id}", "failed")
        seen_admin = wait_for(client, f"/admin/tasks/{task_id}", "failed")
    assert seen_public["error"] == {"type": "ValueError", "message": None}
    assert seen_admin["error"] == {
        "type": "ValueError",
        "message": "card 4242-4242-4242-4242 declined",
    }


def test_a_second_task_status_on_a_broker_needs_its_own_name_and_the_same_keep_for() -> (
    None
):
    broker = InMemoryBroker()
    _, charge = _failing_app(broker)
    taskiq_fastapi.TaskStatus(broker, [charge])
    with pytest.raises(taskiq_fastapi.TaskStatusError, match="named 'task_status'"):
        taskiq_fastapi.TaskStatus(broker, [charge])
    with pytest.raises(taskiq_fastapi.TaskStatusError, match="same keep_for"):
        taskiq_fastapi.TaskStatus(
            broker, [charge], name="audit", keep_for=dt.timedelta(days=7)
        )


class Plain:
    """Not a type Pydantic can show."""


def test_a_return_annotation_that_cannot_be_shown_is_one_clear_error() -> None:
    broker = InMemoryBroker()

    @broker.task
    async def make() -> Plain:
        return Plain()

    with pytest.raises(taskiq_fastapi.TaskStatusError) as raised:
        taskiq_fastapi.TaskStatus(broker, [make])
    assert str(raised.value).startswith(
        f"Task {make.task_name!r}: its return annotation cannot be shown as a result:"
    )
    assert "\n" not in str(raised.value)


def test_a_result_that_does_not_match_its_annotation_shows_no_result(
    caplog: pytest.LogCaptureFixture,
) -> None:
    broker = InMemoryBroker()

    @broker.task
    async def count() -> int:
        return "not a number"  # type: ignore[return-value]

    status = taskiq_fastapi.TaskStatus(broker, [count])
    app = FastAPI(lifespan=taskiq_fastapi.broker_lifespan(broker))
    app.include_router(status.router())

    @app.post("/count")
    async def kick() -> Any:
        return {"id": (await count.kiq()).task_id}

    with TestClient(app) as client:
        task_id = client.post("/count").json()["id"]
        shown = wait_for(client, f"/tasks/{task_id}", "succeeded")
    assert shown["result"] is None
    assert "its result does not match its return annotation" in caplog.text


class Ratio(BaseModel):
    value: float


def _strict_json(text: str) -> Any:
    """JSON as a browser's JSON.parse reads it: no NaN, Infinity or -Infinity."""

    def refuse(constant: str) -> Any:
        raise AssertionError(f"not JSON: {constant} in {text}")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("kind", ["infinite float", "nan in a model", "not UTF-8"])
def test_a_result_json_cannot_hold_is_shown_as_none_not_failing_every_read(
    kind: str,
) -> None:
    """InMemoryBroker, the README's broker for tests, keeps a return value as
    it is: an infinite or NaN float, or bytes that are not UTF-8, have no JSON.
    Such a result is the task's, not the client's: the status and its events
    answer, in JSON, with the result (or the float) shown as null, instead of
    a 500 on every read (or an event stream a browser cannot parse)."""
    broker = InMemoryBroker()

    @broker.task
    async def infinite() -> float:
        return float("inf")

    @broker.task
    async def ratio() -> Ratio:
        return Ratio(value=float("nan"))

    @broker.task
    async def raw() -> bytes:
        return b"\xff\xfe"

    task, shown_as = {
        "infinite float": (infinite, None),
        "nan in a model": (ratio, {"value": None}),  # as JSON has it: null
        "not UTF-8": (raw, None),
    }[kind]
    app, _ = accepting(broker, task)
    with TestClient(app) as client:
        url = client.post("/kick").headers["location"]
        wait_for(client, url, "succeeded")
        response = client.get(url)
        assert response.status_code == 200
        assert _strict_json(response.text)["result"] == shown_as
        with client.stream("GET", url + "/events") as stream:
            lines = [line for line in stream.iter_lines() if line.startswith("data: ")]
    assert [_strict_json(line[len("data: ") :])["result"] for line in lines] == [
        shown_as
    ]


def test_a_retried_task_keeps_its_queued_time_and_never_goes_back() -> None:
    """taskiq's retry kicks the task again under its id: not a new kick."""
    broker = InMemoryBroker().with_middlewares(
        SimpleRetryMiddleware(default_retry_count=3)
    )
    calls: list[int] = []

    @broker.task(retry_on_error=True)
    async def flaky() -> int:
        calls.append(1)
        await asyncio.sleep(0.1)
        if len(calls) == 1:
            raise RuntimeError("first try")
        return 42

    app, _status = accepting(broker, flaky)

    with TestClient(app) as client:
        url = client.post("/kick").headers["location"]
        first = client.get(url).json()
        states = [first["state"]]
        while states[-1] not in ("succeeded", "failed"):
            shown = client.get(url).json()
            assert shown["queued_at"] == first["queued_at"]
            if shown["state"] != states[-1]:
                states.append(shown["state"])
            time.sleep(0.01)
    assert states in (["queued", "started", "succeeded"], ["queued", "succeeded"])
    assert shown["result"] == 42


@pytest.mark.parametrize(
    ("started_after", "seen_while_running"), [(0, "started"), (None, "queued")]
)
def test_started_after_0_records_a_short_task_started_at_its_first_wait(
    started_after: float | None, seen_while_running: str
) -> None:
    """With started_after=0 a task that waits 10 ms is shown started while it
    runs; by default (50 ms) it is not, and it still keeps its start time."""
    broker = InMemoryBroker()
    seen: list[str] = []

    @broker.task
    async def compute(context: Context = TaskiqDepends()) -> None:
        await asyncio.sleep(0.01)  # waits once, briefly
        seen.append((await status.kicked(context.message.task_id)).state)

    options = {} if started_after is None else {"started_after": started_after}
    app, status = accepting(broker, compute, **options)

    with TestClient(app) as client:
        done = wait_for(client, client.post("/kick").headers["location"], "succeeded")
    assert seen == [seen_while_running]
    assert done["queued_at"] <= done["started_at"] <= done["finished_at"]


@pytest.mark.anyio
async def test_concurrent_tasks_are_shown_started_only_past_their_own_started_after() -> (
    None
):
    """Two listings with different started_after, kicks at staggered moments,
    some tasks ending before their started_after and some after, all running
    at once: each long one is shown started while it runs, no short one ever
    is (one timer serves every running task, moved as earlier ones come)."""
    broker = InMemoryBroker()
    seen: dict[str, str] = {}

    async def look(context: Context, seconds: float) -> None:
        await asyncio.sleep(seconds)
        task_id = context.message.task_id
        seen[task_id] = (
            await statuses[context.message.task_name].kicked(task_id)
        ).state

    @broker.task
    async def soon(seconds: float, context: Context = TaskiqDepends()) -> None:
        await look(context, seconds)

    @broker.task
    async def later(seconds: float, context: Context = TaskiqDepends()) -> None:
        await look(context, seconds)

    after = {soon.task_name: 0.1, later.task_name: 0.4}
    statuses = {
        task.task_name: taskiq_fastapi.TaskStatus(
            broker, [task], started_after=after[task.task_name], name=task.task_name
        )
        for task in (soon, later)
    }
    expected: dict[str, str] = {}
    async with taskiq_fastapi.broker_lifespan(broker)(FastAPI()):
        # A later due first, then sooner ones, long and short mixed.
        for i in range(24):
            task = (later, soon, soon)[i % 3]
            long = i % 4 in (0, 1)
            due = after[task.task_name]
            seconds = due + 0.25 if long else max(due - 0.08, 0.01)
            kicked = await task.kiq(seconds)
            expected[kicked.task_id] = "started" if long else "queued"
            await asyncio.sleep(0.03)
        await broker.wait_all()
    assert seen == expected


@pytest.mark.parametrize("bad", [-1.0, float("nan"), "0.1", None, True])
def test_a_negative_started_after_is_one_clear_error(bad: Any) -> None:
    broker = InMemoryBroker()

    @broker.task
    async def compute() -> None:
        return None

    with pytest.raises(
        taskiq_fastapi.TaskStatusError,
        match=r"started_after=(-1\.0|nan|'0\.1'|None|True): expected seconds",
    ):
        taskiq_fastapi.TaskStatus(broker, [compute], started_after=bad)


@pytest.mark.parametrize(
    ("option", "bad"),
    [
        ("keep_for", dt.timedelta(0)),
        ("keep_for", dt.timedelta(seconds=-5)),
        ("keep_for", 3600),
        ("poll_interval", 0),
        ("poll_interval", -1.0),
        ("poll_interval", float("nan")),
        ("poll_interval", "0.25"),
        ("poll_interval", True),
        # Each stream sent its first status and then slept for ever: it
        # never ended, though its task did.
        ("poll_interval", float("inf")),
    ],
)
def test_a_keep_for_or_poll_interval_that_cannot_work_is_one_clear_error(
    option: str, bad: Any
) -> None:
    """Taken as they came, a keep_for of 0 or less hid every record at once
    (404 right after the kick), and a poll_interval of 0 or less had each
    event stream read the records without pause (not a number: each stream
    failed at its first wait)."""
    broker = InMemoryBroker()

    @broker.task
    async def compute() -> None:
        return None

    with pytest.raises(
        taskiq_fastapi.TaskStatusError, match=rf"^{option}=.*: expected "
    ):
        taskiq_fastapi.TaskStatus(broker, [compute], **{option: bad})
    assert broker.middlewares == []


def _redis_job_with_status(
    redis_url: str,
) -> tuple[Any, Any, taskiq_fastapi.TaskStatus]:
    """A ListQueueBroker on its own queue, its task `job` (returns 7), listed."""
    from uuid import uuid4

    from taskiq_redis import ListQueueBroker, RedisAsyncResultBackend

    broker = ListQueueBroker(redis_url, queue_name=uuid4().hex).with_result_backend(
        RedisAsyncResultBackend(redis_url, result_ex_time=60)
    )

    @broker.task
    async def job() -> int:
        return 7

    return broker, job, taskiq_fastapi.TaskStatus(broker, [job])


@pytest.mark.anyio
async def test_a_worker_without_task_status_shows_queued_then_its_outcome(
    redis_url: str,
) -> None:
    """As the README says: a worker that never makes the TaskStatus writes no
    record, only the task's result (set here as taskiq's receiver would): the
    status is `queued` until then, then the outcome, with no times."""
    from taskiq import TaskiqResult

    broker, job, status = _redis_job_with_status(redis_url)
    await broker.startup()
    try:
        task = await job.kiq()
        assert (await status.kicked(task.task_id)).state == "queued"
        await broker.result_backend.set_result(
            task.task_id,
            TaskiqResult(is_err=False, log=None, return_value=7, execution_time=0.1),
        )
        shown = json.loads(await status._status(await status.kicked(task.task_id)))
    finally:
        await broker.shutdown()
    assert shown["state"] == "succeeded"
    assert shown["result"] == 7
    assert (shown["started_at"], shown["finished_at"], shown["progress"]) == (
        None,
        None,
        None,
    )


@pytest.mark.anyio
async def test_a_result_saved_by_an_earlier_worker_shows_its_times(
    redis_url: str,
) -> None:
    """Earlier workers put the start and end times in the result's labels as
    ISO text; this one puts seconds since the epoch. In a rolling upgrade the
    API reads both: each shows the same instants."""
    from taskiq import TaskiqResult

    from taskiq_fastapi.task_status.records import FINISHED_LABEL, STARTED_LABEL

    broker, job, status = _redis_job_with_status(redis_url)
    began = dt.datetime(2026, 12, 5, 3, 0, 0, 250000, tzinfo=dt.timezone.utc)
    ended = began + dt.timedelta(seconds=1.5)
    shown = []
    await broker.startup()
    try:
        for labels in (
            {STARTED_LABEL: began.isoformat(), FINISHED_LABEL: ended.isoformat()},
            {STARTED_LABEL: began.timestamp(), FINISHED_LABEL: ended.timestamp()},
        ):
            task = await job.kiq()
            await broker.result_backend.set_result(
                task.task_id,
                TaskiqResult(
                    is_err=False, return_value=7, execution_time=1.5, labels=labels
                ),
            )
            record = json.loads(await status._status(await status.kicked(task.task_id)))
            shown.append((record["started_at"], record["finished_at"]))
    finally:
        await broker.shutdown()
    instants = TypeAdapter(list[tuple[dt.datetime, dt.datetime]])
    assert instants.validate_python(shown) == [(began, ended)] * 2, shown
