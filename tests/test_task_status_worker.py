"""Tasks from the API: a real uvicorn, the real worker, a real Redis (issue 22).

And the same on NATS JetStream with taskiq-nats' object store. The app's
result backend deletes a result once read (keep_results=False).
"""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path
from typing import Any

import httpx2
import pytest
from workers import WorkerRun, get_json

ALICE = {"X-User": "alice"}
STATUS_APP = [
    "workerapp.statusapp:broker",
    "workerapp.statusapp",
    "--app",
    "workerapp.statusapp:app",
]
REPORT = {"title": "Q4", "pages": 2, "made_at": "2026-12-02T00:00:00Z"}


@pytest.fixture(params=["run", "nats_run"], ids=["redis", "nats"])
def api(request: pytest.FixtureRequest) -> str:
    """uvicorn serving the status app, and one worker command, both started."""
    run: WorkerRun = request.getfixturevalue(request.param)
    _, port = run.serve("workerapp.statusapp:app")
    run.start("worker", *STATUS_APP)
    base = f"http://127.0.0.1:{port}"
    get_json(base + "/openapi.json", timeout=30)  # uvicorn is up
    return base


def poll(client: httpx2.Client, url: str, state: str, **fields: Any) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while True:
        status = client.get(url, headers=ALICE).json()
        if status.get("state") == state and all(
            status.get(k) == v for k, v in fields.items()
        ):
            return status
        assert time.monotonic() < deadline, status
        time.sleep(0.02)


def test_polling_and_the_event_stream_see_each_state_from_the_worker(
    api: str, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    with httpx2.Client(base_url=api, timeout=30) as client:
        kicked = client.post(
            "/reports", params={"title": "Q4", "gate": str(gate)}, headers=ALICE
        )
        assert kicked.status_code == 202
        url = kicked.headers["location"]
        assert url == f"{api}/tasks/{kicked.json()['task_id']}"
        assert kicked.json()["status_url"] == url
        first = client.get(url, headers=ALICE).json()
        assert first["state"] in {"queued", "started"}
        assert first["task"] == "workerapp.statusapp:make_report"

        seen = []
        with client.stream("GET", url + "/events", headers=ALICE) as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            for line in stream.iter_lines():
                if not line.startswith("data: "):
                    continue
                event = json.loads(line[len("data: ") :])
                seen.append(event)
                if event["progress"] == {"done": 1, "of": 2} and not gate.exists():
                    assert event["state"] == "started"  # it reported progress
                    # Polled while it runs: started, with its progress.
                    running = poll(
                        client, url, "started", progress={"done": 1, "of": 2}
                    )
                    assert running["result"] is None
                    gate.touch()
        states = [e["state"] for e in seen]
        assert states[-1] == "succeeded"
        assert set(states) <= {"queued", "started", "succeeded"}
        assert states.index("started") < states.index("succeeded")
        assert seen[-1]["result"] == REPORT
        assert seen[-1]["progress"] == {"done": 1, "of": 2}
        # The worker labels its times as seconds since the epoch, the API
        # its kick as ISO text: shown alike, and in order.
        times = [seen[-1][f"{k}_at"] for k in ("queued", "started", "finished")]
        assert all(t.endswith("Z") for t in times), times
        instants = [dt.datetime.fromisoformat(t.replace("Z", "+00:00")) for t in times]
        assert instants == sorted(instants), times
        # Read twice, with keep_results=False: the status never takes the result...
        assert client.get(url, headers=ALICE).json() == seen[-1]
        assert client.get(url, headers=ALICE).json() == seen[-1]
        # ...which is still there for taskiq's own API, which then deletes it.
        task_id = kicked.json()["task_id"]
        assert client.get(f"/results/{task_id}").json()["return_value"]["title"] == "Q4"
        assert client.get(url, headers=ALICE).json() == seen[-1]


def test_typed_results_schema_404s_and_access(api: str) -> None:
    with httpx2.Client(base_url=api, timeout=30) as client:
        url = client.post("/lists", params={"count": 2}, headers=ALICE).headers[
            "location"
        ]
        done = poll(client, url, "succeeded")
        assert done["result"] == [
            {"title": "r0", "pages": 0, "made_at": "2026-12-01T00:00:00Z"},
            {"title": "r1", "pages": 1, "made_at": "2026-12-01T00:00:00Z"},
        ]
        schema = client.get("/openapi.json").json()["components"]["schemas"]
        result = schema["ListReportsStatus"]["properties"]["result"]["anyOf"]
        assert {
            "type": "array",
            "items": {"$ref": "#/components/schemas/Report"},
        } in result

        failed = client.post(
            "/failures", params={"message": "card 4242"}, headers=ALICE
        )
        assert poll(client, failed.headers["location"], "failed")["error"] == {
            "type": "ValueError", "message": None,
        }  # fmt: skip

        assert client.get(url).status_code == 401
        assert client.get(url, headers={"X-User": "bob"}).status_code == 404
        assert client.get(url + "/events", headers={"X-User": "bob"}).status_code == 404
        assert client.get("/tasks/nope", headers=ALICE).status_code == 404
        unlisted = client.post("/unlisted", headers=ALICE).json()["task_id"]
        time.sleep(0.3)
        assert client.get(f"/tasks/{unlisted}", headers=ALICE).status_code == 404


@pytest.mark.anyio
async def test_a_redis_user_that_may_not_run_scripts_still_kicks_and_records(
    redis_url: str,
) -> None:
    """A Redis ACL without scripting (some managed plans): the list broker's
    kick-with-record script is refused, so the kick and the record go apart."""
    from fastapi import FastAPI
    from redis.asyncio import Redis
    from taskiq_redis import ListQueueBroker, RedisAsyncResultBackend

    import taskiq_fastapi

    admin = Redis.from_url(redis_url)
    await admin.execute_command(
        "ACL", "SETUSER", "noscripts", "on", ">s3cret", "~*", "&*", "+@all",
        "-@scripting",
    )  # fmt: skip
    port = redis_url.rsplit(":", 1)[1].split("/")[0]
    url = f"redis://noscripts:s3cret@127.0.0.1:{port}/0"
    broker = ListQueueBroker(url, queue_name="noscripts").with_result_backend(
        RedisAsyncResultBackend(url)
    )

    @broker.task
    async def noop() -> None:
        return None

    status = taskiq_fastapi.TaskStatus(broker, [noop])
    try:
        async with taskiq_fastapi.broker_lifespan(broker)(FastAPI()):
            kicked = await noop.kiq()
            assert await admin.llen("noscripts") == 1  # the kick was sent, once
            record = await status.store.read(kicked.task_id)
    finally:
        await admin.delete("noscripts")
        await admin.aclose()
    assert record is not None
    assert record.state == "queued"
