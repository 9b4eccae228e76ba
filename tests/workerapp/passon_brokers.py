"""An app with two brokers, a CarryRequestContext each: the internal one
carries Authorization and passes it on, the public one carries only
X-Request-ID. A task of the internal broker kicks one of the public broker."""

import os
from typing import Any

from fastapi import FastAPI, Request

import taskiq_fastapi
from workerapp.app import lifespan
from workerapp.broker import broker as internal
from workerapp.brokers import make_broker

public = make_broker(
    os.environ["REDIS_URL"], os.environ["TASKIQ_TEST_QUEUE"] + "-passon-public"
)


@public.task
async def public_seen(request: Request) -> dict[str, Any]:
    return dict(request.headers)


@internal.task
async def internal_seen(request: Request) -> dict[str, Any]:
    return dict(request.headers)


@internal.task
async def relay() -> dict[str, Any]:
    """Kicks a task of each broker from inside the internal broker's worker."""
    seen = {}
    for task in (internal_seen, public_seen):
        kicked = await task.kiq()
        seen[task.task_name] = (await kicked.wait_result(timeout=30)).return_value
    return seen


app = FastAPI(
    lifespan=taskiq_fastapi.broker_lifespan(
        internal, taskiq_fastapi.broker_lifespan(public, lifespan)
    )
)
app.add_middleware(
    taskiq_fastapi.CarryRequestContext,
    broker=internal,
    headers=["authorization", "x-request-id"],
    pass_on=True,
)
app.add_middleware(
    taskiq_fastapi.CarryRequestContext, broker=public, headers=["x-request-id"]
)


@app.get("/relay")
async def route() -> Any:
    kicked = await relay.kiq()
    direct = await public_seen.kiq()
    return {
        "relayed": (await kicked.wait_result(timeout=30)).return_value,
        "direct": (await direct.wait_result(timeout=30)).return_value,
    }
