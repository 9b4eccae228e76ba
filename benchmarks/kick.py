"""Cost of `.kiq()` inside a request: carrying the request context on / off.

And of a `.kiq()` whose broker `broker_lifespan` started (a pooled connection
is checked before each command, for a server that restarted) / one started
bare: the retries themselves only run once a connection fails.

Each kick is made inside its own ASGI request (a fresh scope, as a route
kicks once per request), with and without `CarryRequestContext`, through the
real Redis (what a user's `.kiq()` costs: making the message and sending it)
and through a broker that sends nowhere (making the message only: the upper
bound of the relative cost). Requests alternate between the two variants;
the best of several rounds is kept.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator
from typing import Any

from redis.asyncio import Redis
from taskiq import AsyncBroker
from taskiq.message import BrokerMessage
from taskiq_redis import ListQueueBroker, RedisAsyncResultBackend, RedisStreamBroker

from taskiq_fastapi import CarryRequestContext, TaskStatus
from taskiq_fastapi._brokers import guard_connections

KICKS = 5_000
ROUNDS = 7
STATUS_KICKS = 2_000
STATUS_ROUNDS = 3

# What a browser sends through a proxy, give or take.
SCOPE: dict[str, Any] = {
    "type": "http",
    "method": "GET",
    "path": "/shops/5/report",
    "root_path": "",
    "path_params": {"shop_id": 5},
    "query_string": b"page=2&sort=name",
    "headers": [
        (b"host", b"api.example.com"),
        (
            b"user-agent",
            b"Mozilla/5.0 (X11; Linux x86_64) Gecko/20100101 Firefox/133.0",
        ),
        (b"accept", b"application/json"),
        (b"accept-language", b"fr-FR,fr;q=0.9,en;q=0.8"),
        (b"accept-encoding", b"gzip, deflate, br"),
        (b"authorization", b"Bearer eyJhbGciOiJIUzI1NiJ9.e30.signature"),
        (b"cookie", b"session=abc; theme=dark"),
        (b"x-request-id", b"9f2c1d3e-5b6a-4c7d-8e9f-0a1b2c3d4e5f"),
        (b"traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        (b"x-forwarded-for", b"203.0.113.7"),
    ],
}


QUEUE = "bench-kick"


def redis_broker(url: str) -> AsyncBroker:
    return ListQueueBroker(url, queue_name=QUEUE)


async def empty_queue(url: str) -> None:
    """Nobody consumes the kicks: each run starts with an empty list (or stream)."""
    async with Redis.from_url(url) as client:
        await client.delete(QUEUE)


class NullBroker(AsyncBroker):
    """Sends nowhere: what is left is the cost of making the message."""

    async def kick(self, message: BrokerMessage) -> None:
        return None

    def listen(self) -> AsyncGenerator[bytes, None]:
        raise NotImplementedError


def _app(broker: AsyncBroker, carry: bool, timings: list[float]) -> Any:
    """An ASGI app whose every request kicks one task and times that kick."""

    @broker.task
    async def report(shop_id: int) -> None:
        return None

    async def endpoint(scope: Any, receive: Any, send: Any) -> None:
        start = time.perf_counter()
        await report.kiq(5)
        timings.append(time.perf_counter() - start)

    if not carry:
        return endpoint
    return CarryRequestContext(
        endpoint,
        broker=broker,
        headers=["x-request-id", "traceparent", "accept-language"],
    )


async def one_round(make: Any) -> tuple[float, float]:
    """Seconds per kick, off and on, requests alternating between the two.

    Alternating request by request, both see the same moment of a noisy
    machine (runs one after the other differed by 15% here).
    """
    brokers = [make(), make()]
    times: list[list[float]] = [[], []]
    apps = [_app(brokers[0], False, times[0]), _app(brokers[1], True, times[1])]
    for broker in brokers:
        await broker.startup()
    for _ in range(200):  # warm up
        for app in apps:
            await app(dict(SCOPE), None, None)
    for kept in times:
        kept.clear()
    for _ in range(KICKS):
        for app in apps:
            await app(dict(SCOPE), None, None)
    for broker in brokers:
        await broker.shutdown()
    return sum(times[0]) / KICKS, sum(times[1]) / KICKS


async def guarded_round(url: str) -> tuple[float, float]:
    """Seconds per kick on Redis, bare and guarded, kicks alternating."""
    brokers = [redis_broker(url), redis_broker(url)]
    guard_connections(brokers[1], retry_timeout=5)
    tasks = []
    for broker in brokers:

        @broker.task
        async def report(shop_id: int) -> None:
            return None

        tasks.append(report)
        await broker.startup()
    times: list[float] = [0.0, 0.0]
    for warm_up, count in ((True, 200), (False, KICKS)):
        for _ in range(count):
            for i, task in enumerate(tasks):
                start = time.perf_counter()
                await task.kiq(5)
                if not warm_up:
                    times[i] += time.perf_counter() - start
    for broker in brokers:
        await broker.shutdown()
    return times[0] / KICKS, times[1] / KICKS


async def measure(url: str) -> dict[tuple[str, str], float]:
    brokers = {"Redis": lambda: redis_broker(url), "no send": NullBroker}
    best = {
        (where, carry): float("inf") for where in brokers for carry in ("off", "on")
    }
    for _ in range(ROUNDS):
        for where, make in brokers.items():
            await empty_queue(url)
            off, on = await one_round(make)
            best[where, "off"] = min(best[where, "off"], off)
            best[where, "on"] = min(best[where, "on"], on)
        await empty_queue(url)
        bare, guarded = await guarded_round(url)
        best["bare", "guard"] = min(best.get(("bare", "guard"), bare), bare)
        best["guarded", "guard"] = min(best.get(("guarded", "guard"), guarded), guarded)
    await empty_queue(url)
    return best


def run(url: str) -> list[tuple[str, float, str, float]]:
    """Return (what, measured ratio, comparison, target) rows."""
    best = asyncio.run(measure(url))
    print(f".kiq() inside a request, best of {ROUNDS} rounds of {KICKS} requests:")
    for (where, carry), seconds in best.items():
        if carry == "guard":
            print(f"  Redis, {where:<8} {seconds * 1e6:8.1f} us/kick")
            continue
        print(f"  {where:<8} carrying {carry:<4} {seconds * 1e6:8.1f} us/kick")
    making = best["no send", "on"] / best["no send", "off"]
    print(f"  making the message only (no target): on / off {making:.3f}x")
    return [
        (
            ".kiq() in a request, Redis: carrying on / off",
            best["Redis", "on"] / best["Redis", "off"],
            "<=",
            1.10,
        ),
        (
            ".kiq() on Redis: broker_lifespan's guard / bare",
            best["guarded", "guard"] / best["bare", "guard"],
            "<=",
            1.03,
        ),
    ]


def _status_broker(url: str, record: bool, kind: type[Any]) -> tuple[AsyncBroker, Any]:
    """A Redis broker with a result backend; `record`: TaskStatus lists its task."""
    broker = kind(url, queue_name=QUEUE).with_result_backend(
        RedisAsyncResultBackend(url, result_ex_time=60)
    )

    @broker.task
    async def report(shop_id: int) -> None:
        return None

    if record:
        TaskStatus(broker, [report])
    return broker, report


async def recording(url: str, kind: type[Any]) -> tuple[float, float]:
    """Best seconds per kick without and with state recording, kicks alternating."""
    best = [float("inf"), float("inf")]
    for _ in range(STATUS_ROUNDS):
        await empty_queue(url)
        pairs = [_status_broker(url, False, kind), _status_broker(url, True, kind)]
        for broker, _ in pairs:
            await broker.startup()
        times: list[float] = [0.0, 0.0]
        for n in range(-200, STATUS_KICKS):  # the first 200: warm up
            for i, (_, task) in enumerate(pairs):
                start = time.perf_counter()
                await task.kiq(5)
                if n >= 0:
                    times[i] += time.perf_counter() - start
        for broker, _ in pairs:
            await broker.shutdown()
        best = [min(b, t / STATUS_KICKS) for b, t in zip(best, times, strict=True)]
    await empty_queue(url)
    async with Redis.from_url(url) as client:  # the records, before they expire
        keys = [key async for key in client.scan_iter("*taskiq_fastapi_status*")]
        if keys:
            await client.delete(*keys)
    return best[0], best[1]


def run_recording(url: str) -> list[tuple[str, float, str, float | None]]:
    """Both brokers send a kick's record with its message, in one script."""
    rows: list[tuple[str, float, str, float | None]] = []
    for kind, target in ((ListQueueBroker, 1.25), (RedisStreamBroker, 1.25)):
        off, on = asyncio.run(recording(url, kind))
        print(
            f".kiq() of a task TaskStatus lists, {kind.__name__}, best of "
            f"{STATUS_ROUNDS} rounds of {STATUS_KICKS}: without {off * 1e6:.1f} us, "
            f"with {on * 1e6:.1f} us"
        )
        what = f".kiq(), {kind.__name__}: recording / without"
        rows.append((what, on / off, "<=", target))
    return rows
