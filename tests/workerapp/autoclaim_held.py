"""A broker module whose workers can be held inside taskiq-redis' autoclaim step.

While the file named by TASKIQ_TEST_HOLD_AUTOCLAIM exists, a worker about to
send its XAUTOCLAIM records "in autoclaim" and waits there: with taskiq-redis
1.1 it holds the stream's autoclaim lock (taken just before, with no expiry)
until the file is gone. The restart tests stop the server meanwhile.
"""

import asyncio
import os
from typing import Any

from redis.asyncio import Redis

from workerapp.app import record
from workerapp.broker import broker

__all__ = ["broker"]

_xautoclaim = Redis.xautoclaim


async def _held_xautoclaim(self: Redis, *args: Any, **kwargs: Any) -> Any:
    flag = os.environ["TASKIQ_TEST_HOLD_AUTOCLAIM"]
    if os.path.exists(flag):
        record("in autoclaim")
        while os.path.exists(flag):
            await asyncio.sleep(0.01)
    return await _xautoclaim(self, *args, **kwargs)  # type: ignore[misc]


Redis.xautoclaim = _held_xautoclaim  # type: ignore[assignment,method-assign]
