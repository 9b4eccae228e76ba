"""Our wrappers of a broker's messages and fetch keep what the broker gave (issue 18)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

import pytest
from pydantic import ConfigDict
from taskiq import AckableMessage, InMemoryBroker, TaskiqMessage
from taskiq.acks import AcknowledgeType
from taskiq.receiver import Receiver
from taskiq.utils import maybe_awaitable

from taskiq_fastapi_cli.health.report import Slots, WorkerHealth
from taskiq_fastapi_cli.runtime.outages import BrokerOutages
from taskiq_fastapi_cli.runtime.shutdown import ShutdownGuard

pytestmark = pytest.mark.anyio


class TaggedMessage(AckableMessage):
    """A broker's own message type, with a field of its own."""

    delivery_tag: int


def serving(broker: InMemoryBroker, messages: list[Any]) -> list[str]:
    """Make `broker.listen` hand out `messages`; returns the closing log."""
    closed: list[str] = []

    async def listen() -> AsyncGenerator[Any, None]:
        try:
            for message in messages:
                yield message
            await asyncio.sleep(3600)
        finally:
            closed.append("closed")

    broker.listen = listen  # type: ignore[method-assign]
    return closed


async def first_message(broker: InMemoryBroker) -> Any:
    fetch = broker.listen()
    try:
        return await anext(fetch)
    finally:
        await fetch.aclose()  # type: ignore[attr-defined]


async def test_a_sync_ack_works_and_the_message_keeps_its_type_and_fields() -> None:
    broker = InMemoryBroker()
    acked: list[int] = []
    serving(
        broker, [TaggedMessage(data=b"x", ack=lambda: acked.append(7), delivery_tag=7)]
    )
    BrokerOutages(broker, "b:b", 5, give_up=lambda message: None)
    message = await first_message(broker)
    assert isinstance(message, TaggedMessage)
    assert message.delivery_tag == 7
    await maybe_awaitable(message.ack())  # as taskiq's AckController calls it
    assert acked == [7]


async def test_with_ack_on_receipt_a_task_acked_by_a_sync_ack_runs() -> None:
    broker = InMemoryBroker()
    ran: list[int] = []

    @broker.task
    async def remember(n: int) -> None:
        ran.append(n)

    kicked = TaskiqMessage(
        task_id="t1", task_name=remember.task_name, labels={}, args=[5], kwargs={}
    )
    data = broker.formatter.dumps(kicked).message
    acked: list[str] = []
    serving(broker, [AckableMessage(data=data, ack=lambda: acked.append("ack"))])
    BrokerOutages(broker, "b:b", 5, give_up=lambda message: None)
    message = await first_message(broker)
    receiver = Receiver(broker, ack_type=AcknowledgeType.WHEN_RECEIVED)
    await receiver.callback(message, raise_err=True)
    assert (acked, ran) == (["ack"], [5])


async def test_the_health_wrapper_closes_the_fetch_it_wraps() -> None:
    broker = InMemoryBroker()
    closed = serving(broker, [b"one"])
    WorkerHealth(Slots(1), 0).install(broker)
    assert await first_message(broker) == b"one"
    assert closed == ["closed"]


class FrozenTaggedMessage(AckableMessage):
    """A broker's own message type that pydantic keeps immutable."""

    model_config = ConfigDict(frozen=True)

    delivery_tag: int


async def test_a_frozen_message_of_a_broker_is_handed_on_acked_once() -> None:
    """A broker may freeze its own message type: the wrapper must not assign."""
    broker = InMemoryBroker()
    acked: list[int] = []
    serving(
        broker,
        [FrozenTaggedMessage(data=b"x", ack=lambda: acked.append(3), delivery_tag=3)],
    )
    BrokerOutages(broker, "b:b", 5, give_up=lambda message: None)
    guard = ShutdownGuard(broker)
    handed: list[Any] = []

    async def callback(message: Any, raise_err: bool) -> None:
        handed.append(message)
        await maybe_awaitable(message.ack())

    # The outage layer's wrapper, then the stop guard's around it.
    await guard.run(callback, await first_message(broker), False)
    assert isinstance(handed[0], FrozenTaggedMessage)
    assert handed[0].delivery_tag == 3
    assert acked == [3]
