"""Tasks that report progress in a tight loop, cancelled on request.

On Python 3.11 a cancellation landing in a redis-py command can be swallowed
(it returns, the task's `cancelling()` raised, no CancelledError): landing in
`Progress.set`, the task ran on as if never cancelled.
"""

import asyncio
import os
import time

from taskiq import AsyncBroker, TaskiqDepends
from taskiq_redis import ListQueueBroker, RedisAsyncResultBackend

import taskiq_fastapi

NAME = "workerapp.progress_cancel:reporting"


def make(url: str, queue: str) -> tuple[AsyncBroker, taskiq_fastapi.TaskStatus]:
    broker = ListQueueBroker(
        url, queue_name=queue, socket_timeout=None
    ).with_result_backend(RedisAsyncResultBackend(url, result_ex_time=600))

    @broker.task(task_name=NAME)
    async def reporting(
        seconds: float, progress: taskiq_fastapi.Progress = TaskiqDepends()
    ) -> int:
        end = time.monotonic() + seconds
        step = 0
        while time.monotonic() < end:
            await asyncio.sleep(0.001)
            step += 1
            await progress.set(step)
        return step

    return broker, taskiq_fastapi.TaskStatus(broker, [reporting], cancellable=True)


if os.environ.get("TASKIQ_TEST_QUEUE"):  # under the worker command
    broker, status = make(os.environ["REDIS_URL"], os.environ["TASKIQ_TEST_QUEUE"])
