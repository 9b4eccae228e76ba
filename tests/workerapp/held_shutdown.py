"""An app whose lifespan shutdown waits until the test releases it."""

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI

from workerapp.app import record


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    record("startup")
    yield
    record("shutting down")
    release = Path(f"{os.environ['EVENTS_FILE']}.release-shutdown")
    while not release.exists():
        await asyncio.sleep(0.05)
    record("shutdown")


app = FastAPI(lifespan=lifespan)
