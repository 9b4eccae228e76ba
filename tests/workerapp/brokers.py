"""Brokers on a real server: the workers' (broker.py) and the tests' senders."""

from typing import Any
from urllib.parse import parse_qsl

from nats.js.api import ConsumerConfig
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from taskiq import AsyncBroker
from taskiq_nats import NATSObjectStoreResultBackend, PullBasedJetStreamBroker
from taskiq_redis import (
    ListQueueBroker,
    RedisAsyncClusterResultBackend,
    RedisAsyncResultBackend,
    RedisAsyncSentinelResultBackend,
    RedisStreamBroker,
    RedisStreamClusterBroker,
    RedisStreamSentinelBroker,
)

# JetStream redelivers a message not acknowledged within this; short, so the
# kill -9 test need not wait the default 30 s.
NATS_ACK_WAIT_SECONDS = 2.0
NATS_FETCH_SECONDS = 5.0


def make_nats_broker(url: str, queue: str) -> AsyncBroker:
    """A JetStream stream and durable pull consumer of the test's own."""
    consumer = ConsumerConfig(durable_name=queue, ack_wait=NATS_ACK_WAIT_SECONDS)
    return PullBasedJetStreamBroker(
        url,
        subject=queue,
        stream_name=queue,
        durable=queue,
        consumer_config=consumer,
        # A fetch the server forgot in a restart is renewed within this.
        pull_consume_timeout=NATS_FETCH_SECONDS,
    ).with_result_backend(NATSObjectStoreResultBackend(url, bucket_name=queue))


def make_sentinel_broker(sentinel: str, queue: str) -> AsyncBroker:
    """A stream broker and its results behind Redis Sentinel.

    `sentinel` is `host:port[,host:port...]/master name[?option=value&...]`:
    the sentinels, asked in that order, and options for them
    (`sentinel_kwargs`: `socket_timeout`, `password`, and `retries=0` for no
    retries of redis-py's own); taskiq-redis' defaults otherwise.
    """
    where, _, query = sentinel.partition("?")
    addresses, _, master = where.partition("/")
    sentinels = [
        (host, int(port))
        for host, _, port in (
            address.rpartition(":") for address in addresses.split(",")
        )
    ]
    given: dict[str, Any] = dict(parse_qsl(query))
    if "socket_timeout" in given:
        given["socket_timeout"] = float(given["socket_timeout"])
    if given.pop("retries", None) == "0":
        given["retry"] = Retry(NoBackoff(), 0)
    options = {"sentinel_kwargs": given} if given else {}
    backend: RedisAsyncSentinelResultBackend[object] = RedisAsyncSentinelResultBackend(
        sentinels, master, **options
    )
    return RedisStreamSentinelBroker(
        sentinels, master, queue_name=queue, **options
    ).with_result_backend(backend)


def make_cluster_broker(url: str, queue: str) -> AsyncBroker:
    """A stream broker and its results on a Redis Cluster, at taskiq-redis' defaults."""
    backend: RedisAsyncClusterResultBackend[object] = RedisAsyncClusterResultBackend(
        url
    )
    return RedisStreamClusterBroker(url, queue_name=queue).with_result_backend(backend)


def make_broker(
    url: str,
    queue: str,
    streams: bool = False,
    defaults: bool = False,
    results_url: str | None = None,
    consumer_id: str = "$",
) -> AsyncBroker:
    """`consumer_id`: where a stream broker's startup makes a missing group."""
    backend: RedisAsyncResultBackend[object] = RedisAsyncResultBackend(
        results_url or url
    )
    if defaults:
        # As generated projects write it: redis-py's 5 s socket timeout.
        return ListQueueBroker(url, queue_name=queue).with_result_backend(backend)
    if streams:
        # Acknowledges after execution when the worker asks for it; a message
        # left unacknowledged by a dead worker is claimed again after 1 s.
        return RedisStreamBroker(
            url, queue_name=queue, idle_timeout=1000, consumer_id=consumer_id
        ).with_result_backend(backend)
    # BRPOP blocks until a message comes; redis-py 8's default 5 s socket
    # timeout would end it with an error taskiq-redis does not catch.
    return ListQueueBroker(
        url, queue_name=queue, socket_timeout=None
    ).with_result_backend(backend)
