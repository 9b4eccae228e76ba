from typing import Any

from taskiq import AsyncBroker, AsyncResultBackend, InMemoryBroker
from taskiq_redis import ListQueueBroker, RedisAsyncResultBackend

import taskiq_fastapi
from tplproj import settings

result_backend: AsyncResultBackend[Any] = RedisAsyncResultBackend(
    redis_url=settings.redis_url,
)
broker: AsyncBroker = ListQueueBroker(
    settings.redis_url, queue_name=settings.queue
).with_result_backend(result_backend)

if settings.environment.lower() == "pytest":
    broker = InMemoryBroker()

taskiq_fastapi.init(broker, "tplproj.web.application:get_app")
