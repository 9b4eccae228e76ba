"""An InMemoryBroker subclass that brings its own `listen` and `kick`, through
the suite's Redis queue: a worker can serve it, so the command must not refuse it."""

import os
from collections.abc import AsyncGenerator
from typing import Any

from taskiq import InMemoryBroker
from taskiq.message import BrokerMessage

from workerapp.app import record
from workerapp.brokers import make_broker


class FedFromRedis(InMemoryBroker):
    def __init__(self) -> None:
        super().__init__()
        self.inner = make_broker(
            os.environ["REDIS_URL"], os.environ["TASKIQ_TEST_QUEUE"]
        )

    async def startup(self) -> None:
        await super().startup()
        await self.inner.startup()

    async def shutdown(self) -> None:
        await self.inner.shutdown()
        await super().shutdown()

    async def kick(self, message: BrokerMessage) -> None:
        await self.inner.kick(message)

    def listen(self) -> AsyncGenerator[Any, None]:
        return self.inner.listen()


broker = FedFromRedis()


@broker.task
async def note(n: int) -> None:
    record(f"fed {n}")
