"""An app with a broker for internal tasks and one for public tasks, each
given its own CarryRequestContext: only the internal one carries
Authorization. The public one's middleware is the outermost (added last), so
it comes first in the app's middleware list."""

import os
from typing import Annotated

from fastapi import Depends, FastAPI, Header

import taskiq_fastapi
from workerapp.app import lifespan
from workerapp.broker import broker as internal
from workerapp.brokers import make_broker

public = make_broker(
    os.environ["REDIS_URL"], os.environ["TASKIQ_TEST_QUEUE"] + "-public"
)


def caller(authorization: Annotated[str, Header()]) -> str:
    return authorization


@internal.task
async def audit(who: Annotated[str, Depends(caller)]) -> str:
    return who


app = FastAPI(lifespan=lifespan)
app.add_middleware(
    taskiq_fastapi.CarryRequestContext, broker=internal, headers=["authorization"]
)
app.add_middleware(
    taskiq_fastapi.CarryRequestContext, broker=public, headers=["x-request-id"]
)
