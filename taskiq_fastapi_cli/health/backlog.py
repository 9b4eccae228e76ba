"""How many messages wait in the broker, per queue: the backlog metric.

Reliance on taskiq-redis, taskiq-nats, redis-py and nats-py internals for
metrics is all here, pinned by tests/test_metrics.py against real servers:
the broker's `connection_pool` and `queue_name` (taskiq-redis), its `js`,
`stream_config`, `stream_name`, `durable` and `consumer_config`
(taskiq-nats' pull-based JetStream broker).

- Redis list (`ListQueueBroker`): LLEN. Messages a worker has fetched
  (prefetched, or running) are off the list, so not in the backlog.
- Redis stream (`RedisStreamBroker`): per stream, the consumer group's
  `lag` (entries not yet delivered to any consumer) plus `pending` (delivered
  and not yet acknowledged: prefetched and running messages among them), from
  XINFO GROUPS. `lag` needs Redis 7; an older server has no stream backlog.
- NATS JetStream (`PullBasedJetStreamBroker`): the durable consumer's
  `num_pending`, messages not yet delivered to it.

Other brokers have no backlog metric. One request per sample.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from taskiq import AsyncBroker

logger = logging.getLogger("taskiq_fastapi")

Reader = Callable[[], Awaitable[dict[str, int]]]


def backlog_reader(broker: AsyncBroker) -> Reader | None:
    """What samples `broker`'s backlog, if we know how; None otherwise."""
    kind = type(broker).__mro__
    names = {cls.__name__ for cls in kind}
    if "ListQueueBroker" in names:
        return _redis_list(broker)
    if "RedisStreamBroker" in names:
        return _redis_streams(broker)
    if "PullBasedJetStreamBroker" in names:
        return _jetstream(broker)
    return None


def _redis_list(broker: Any) -> Reader:
    from redis.asyncio import Redis

    async def read() -> dict[str, int]:
        async with Redis(connection_pool=broker.connection_pool) as redis:
            return {broker.queue_name: int(await redis.llen(broker.queue_name))}

    return read


def _redis_streams(broker: Any) -> Reader:
    from redis.asyncio import Redis

    streams = [broker.queue_name, *broker.additional_streams]
    group = broker.consumer_group_name
    said: set[str] = set()

    async def read() -> dict[str, int]:
        found = {}
        async with Redis(connection_pool=broker.connection_pool) as redis:
            for stream in streams:
                for info in await redis.xinfo_groups(stream):
                    name = info["name"]
                    if (name.decode() if isinstance(name, bytes) else name) != group:
                        continue
                    lag = info.get("lag")
                    if lag is None:
                        # Redis before 7 has no `lag`; after some deletions
                        # Redis 7 cannot tell it either.
                        if stream not in said:
                            said.add(stream)
                            logger.info(
                                "Stream %r: no backlog metric (its Redis server "
                                "does not report the group's lag; Redis 7+ does).",
                                stream,
                            )
                        continue
                    found[stream] = int(lag) + int(info["pending"])
        return found

    return read


def _jetstream(broker: Any) -> Reader:
    async def read() -> dict[str, int]:
        js = getattr(broker, "js", None)
        if js is None:  # not connected yet
            return {}
        stream = broker.stream_config.name or broker.stream_name
        config = broker.consumer_config
        durable = (config.durable_name if config else None) or broker.durable
        info = await js.consumer_info(stream, durable)
        return {stream: int(info.num_pending or 0)}

    return read
