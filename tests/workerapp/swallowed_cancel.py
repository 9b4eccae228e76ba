"""A broker module whose result saves swallow the first cancellation they get.

Before Python 3.12, `asyncio.wait_for` answers a cancellation that lands just
as the future it waits on finishes with that future's outcome, and redis-py
and nats-py wait so: a save cancelled at that instant goes on as if nothing
happened. A test cannot time that race; here every save loses it, once. The
results are on TASKIQ_TEST_RESULTS_URL with no socket timeout, as a client
that waits for ever on a server that never answers.
"""

import asyncio
import os
from typing import Any

from taskiq import TaskiqResult
from taskiq_redis import RedisAsyncResultBackend

from workerapp.app import record
from workerapp.broker import broker

__all__ = ["broker"]


class FirstCancelSwallowed(RedisAsyncResultBackend[Any]):
    """Each save goes on waiting after its first cancellation; not its second."""

    async def set_result(self, task_id: str, result: TaskiqResult[Any]) -> None:
        saving = asyncio.ensure_future(super().set_result(task_id, result))
        swallowed = False
        while True:
            try:
                return await asyncio.shield(saving)
            except asyncio.CancelledError:
                if swallowed:
                    saving.cancel()
                    raise
                swallowed = True
                record("save swallowed a cancellation")


broker.with_result_backend(
    FirstCancelSwallowed(os.environ["TASKIQ_TEST_RESULTS_URL"], socket_timeout=None)
)
