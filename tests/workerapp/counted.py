"""Tasks for the metrics tests: they succeed, fail, retry, or hold a worker."""

import asyncio
import logging
import os
import warnings
from collections.abc import AsyncIterator
from pathlib import Path

from taskiq import SimpleRetryMiddleware, TaskiqDepends

from workerapp.app import record
from workerapp.broker import broker

# Kicked with the label retry_on_error=True, a failing task runs twice.
broker.add_middlewares(SimpleRetryMiddleware(default_retry_count=2))


@broker.task
async def fine(n: int) -> int:
    return n


@broker.task
async def broken(n: int) -> int:
    raise ValueError(f"task {n} fails")


@broker.task
async def warned(n: int) -> int:
    warnings.warn(f"task {n} warns", UserWarning, stacklevel=1)
    return n


@broker.task
async def misformatted(n: int) -> int:
    """Logs as a library with a bug might: arguments that do not fit."""
    logging.getLogger("some.library").info("%d items of task %s", "many", n)
    return n


@broker.task
async def held(n: int) -> int:
    """Runs until the file RELEASE_FILE exists."""
    record(f"held {n}")
    while not Path(os.environ["RELEASE_FILE"]).exists():
        await asyncio.sleep(0.05)
    return n


async def _teardown_fails() -> AsyncIterator[int]:
    yield 1
    raise RuntimeError("its dependency's teardown fails")


@broker.task
async def torn_down(n: int, one: int = TaskiqDepends(_teardown_fails)) -> int:
    """Returns, then its dependency's teardown raises: taskiq's receiver ends
    the run there, without calling the middlewares' post_execute."""
    return n + one
