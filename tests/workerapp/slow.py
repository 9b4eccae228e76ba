"""An app whose lifespan takes a while to start, and tasks for health probes."""

import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from fastapi import FastAPI

from workerapp.app import record
from workerapp.broker import broker


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
    record("starting")
    await anyio.sleep(float(os.environ.get("SLOW_STARTUP", "2")))
    record("startup")
    yield {}
    record("shutdown")


app = FastAPI(lifespan=lifespan)


@broker.task
async def block_loop(seconds: float) -> int:
    """Holds the event loop itself, as a CPU-bound or blocking call would."""
    record("blocking")
    time.sleep(seconds)
    return os.getpid()
