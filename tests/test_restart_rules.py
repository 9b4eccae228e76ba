"""What the API process retries across a broker restart, and what it never does.

With `broker_lifespan`, a kick that could not be sent (no connection to be
had) is tried again for up to `broker_retry_timeout` seconds; one whose
command may have reached the server is raised, never sent twice (issue 19).
Real Redis servers; a proxy in front of one cuts a connection right after a
command went through, which is how a server restart looks from the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
import threading
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Iterator
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import pytest
from fastapi import FastAPI
from redis.asyncio import Redis, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException
from taskiq import AsyncBroker, InMemoryBroker, TaskiqEvents, TaskiqMiddleware
from taskiq.exceptions import ResultIsReadyError, SendTaskError
from taskiq.kicker import AsyncKicker
from taskiq_redis import (
    ListQueueBroker,
    ListQueueClusterBroker,
    RedisAsyncResultBackend,
    RedisStreamBroker,
    RedisStreamClusterBroker,
    RedisStreamSentinelBroker,
)

import taskiq_fastapi
from taskiq_fastapi._brokers import (
    LostState,
    _poll_ready,
    _ready_to_read,
    _select_ready,
)
from taskiq_fastapi.connections import is_connection_error
from tools.processes import free_port, frozen
from tools.redis_server import (
    MASTER_NAME,
    RedisServer,
    running_cluster,
    running_cluster_of_two,
    running_sentinel,
    running_server,
)

pytestmark = pytest.mark.anyio

# Longer than redis-py's own attempts with a 1 s socket timeout.
STALL_SECONDS = 8


@pytest.fixture
def server() -> Iterator[RedisServer]:
    with running_server() as redis:
        yield redis


@asynccontextmanager
async def api(broker: AsyncBroker, retry_timeout: float) -> AsyncIterator[None]:
    """The broker as an app with `broker_lifespan` runs it."""
    lifespan = taskiq_fastapi.broker_lifespan(
        broker, broker_retry_timeout=retry_timeout
    )
    async with lifespan(FastAPI()):
        yield


async def kiq(broker: AsyncBroker, n: int) -> None:
    await AsyncKicker("workerapp.tasks:mark", broker, {}).kiq(n)


async def queued(url: str, queue: str) -> int:
    async with Redis.from_url(url) as redis:
        return int(await redis.llen(queue))


async def test_a_kick_waits_for_a_server_that_comes_back_within_the_bound(
    server: RedisServer,
) -> None:
    """Pins redis-py's `_reader` (the connection's asyncio stream), whose
    end-of-file flag tells a pooled connection the server closed."""
    broker = ListQueueBroker(server.url, queue_name="q")
    async with api(broker, retry_timeout=10):
        await kiq(broker, 1)
        server.stop()
        await asyncio.sleep(0.2)  # the pooled connection sees the server go
        kick = asyncio.ensure_future(kiq(broker, 2))
        await asyncio.sleep(1.5)
        assert not kick.done()  # waiting, not failed
        server.start()  # empty: only the kick made after the restart is there
        await asyncio.wait_for(kick, 10)
    assert await queued(server.url, "q") == 1


async def test_a_restart_while_the_event_loop_is_busy_fails_no_kick(
    server: RedisServer,
) -> None:
    """The server goes and comes back while the API's loop runs sync code:
    the loop never ran to see the pooled connection close (so the stream's
    end-of-file flag is not set); the socket is asked instead."""
    broker = ListQueueBroker(server.url, queue_name="q")
    async with api(broker, retry_timeout=10):
        await kiq(broker, 1)
        server.stop()
        server.start()  # empty, and the loop has not run meanwhile
        await kiq(broker, 2)
        await kiq(broker, 3)
    assert await queued(server.url, "q") == 2


async def test_a_server_gone_right_after_a_kick_while_the_route_runs_sync_code(
    server: RedisServer,
) -> None:
    """The connection was handed out a millisecond or two before (the pool
    hands the same one out again and again in a busy API), the server died
    meanwhile, and the loop has not run since: the socket is asked all the
    same, so the kick waits for the server instead of failing on a closed
    connection it never sent anything on."""
    broker = ListQueueBroker(server.url, queue_name="q")
    async with api(broker, retry_timeout=10):
        await kiq(broker, 0)
        await kiq(broker, 1)  # handed out again: recent
        assert server.process is not None
        server.process.kill()  # the route's sync code, meanwhile
        server.process.wait()
        server.process = None
        time.sleep(0.001)  # the server's close reached the socket
        restart = threading.Timer(0.3, server.start)
        restart.start()
        try:
            await kiq(broker, 2)
        finally:
            restart.join()
    assert await queued(server.url, "q") == 1


async def _kick_past_the_bound(
    broker: AsyncBroker, server: RedisServer
) -> tuple[BaseException | None, float]:
    """Kick once, stop the server, kick again with a 1 s bound: what the
    failed kick was caused by, and how long it took to fail."""
    async with api(broker, retry_timeout=1):
        await kiq(broker, 1)
        server.stop()
        await asyncio.sleep(0.2)
        started = time.monotonic()
        with pytest.raises(SendTaskError) as raised:
            await kiq(broker, 2)
        waited = time.monotonic() - started
        server.start()  # for the broker's shutdown
    assert isinstance(raised.value.__cause__, taskiq_fastapi.BrokerUnreachableError)
    return raised.value.__cause__, waited


async def test_past_the_bound_one_error_names_the_broker(server: RedisServer) -> None:
    broker = ListQueueBroker(server.url, queue_name="q")
    cause, waited = await _kick_past_the_bound(broker, server)
    assert str(cause).startswith(
        f"Broker ListQueueBroker at 127.0.0.1:{server.port} unreachable for 1 s: "
        "ConnectionError: "
    ), cause
    assert 1 <= waited < 5


async def test_a_result_backend_on_its_own_server_is_named_as_the_result_backend(
    server: RedisServer,
) -> None:
    """The results on a second server, down: the kick goes through, and the
    result wait's error names the result backend at its address. It named
    the broker ("Broker ListQueueBroker at <the results' address>"), so its
    reader looked for the fault at the broker's server."""
    with running_server() as results:
        backend: RedisAsyncResultBackend[object] = RedisAsyncResultBackend(results.url)
        broker = ListQueueBroker(server.url, queue_name="q").with_result_backend(
            backend
        )
        async with api(broker, retry_timeout=1):
            results.stop()
            task = await AsyncKicker("workerapp.tasks:mark", broker, {}).kiq(1)
            with pytest.raises(ResultIsReadyError) as raised:
                await task.wait_result(timeout=30)
            results.start()  # for the backend's shutdown
    cause = raised.value.__cause__
    assert isinstance(cause, taskiq_fastapi.BrokerUnreachableError), cause
    assert str(cause).startswith(
        f"Result backend of broker ListQueueBroker at 127.0.0.1:{results.port} "
        "unreachable for 1 s: ConnectionError: "
    ), cause
    assert await queued(server.url, "q") == 1


async def test_behind_sentinel_past_the_bound_one_error_names_the_master(
    server: RedisServer,
) -> None:
    """Pins taskiq-redis' sentinel broker asking its `sentinel` (redis-py's
    Sentinel) for a client of the master per command (`master_for`)."""
    with running_sentinel(server) as sentinel:
        sentinels = [("127.0.0.1", sentinel.port)]
        broker = RedisStreamSentinelBroker(sentinels, MASTER_NAME, queue_name="s")
        cause, waited = await _kick_past_the_bound(broker, server)
    # The last attempt was refused, or (redis-py 6) still waiting at the bound.
    assert re.match(
        f"Broker RedisStreamSentinelBroker at Sentinel master '{MASTER_NAME}' "
        "unreachable for 1 s: (ConnectionError: |TimeoutError: no connection "
        "within 1 s$)",
        str(cause),
    ), cause
    assert 1 <= waited < 5


async def test_behind_refusing_sentinels_what_the_app_prints_holds_no_password() -> (
    None
):
    """The API's startup fails past the bound; the traceback its server
    prints names each sentinel by address (redis-py's error names it by its
    client's repr, the password in it before redis-py 8)."""
    password = "sentinel-password-91c2"
    refused = [("127.0.0.1", free_port()), ("127.0.0.1", free_port())]
    # No retries of its own: each lookup fails at once, within the bound.
    options = {
        "password": password,
        "socket_timeout": 1,
        "retry": Retry(NoBackoff(), 0),
    }
    broker = RedisStreamSentinelBroker(
        refused, MASTER_NAME, queue_name="s", sentinel_kwargs=options
    )
    with pytest.raises(taskiq_fastapi.BrokerUnreachableError) as raised:
        async with api(broker, retry_timeout=1):
            pass
    printed = "".join(traceback.format_exception(raised.value))
    assert f"No master found for '{MASTER_NAME}' : 127.0.0.1:" in printed, printed
    assert password not in printed
    assert max(map(len, printed.splitlines())) < 500, printed


def sentinel_broker(
    *sentinels: RedisServer, timeout: float = 0.5
) -> RedisStreamSentinelBroker:
    """A stream broker asking these sentinels, in order, with this socket timeout."""
    return RedisStreamSentinelBroker(
        [("127.0.0.1", sentinel.port) for sentinel in sentinels],
        MASTER_NAME,
        queue_name="s",
        sentinel_kwargs={"socket_timeout": timeout},
    )


# Longer than the kicks' bound below: a lookup asking the frozen sentinel
# outlasts the kick that started it, however many times redis-py asks (8.2
# once, 8.0 and 8.1 with its retries).
FROZEN_SENTINEL_TIMEOUT = 3.0


async def test_behind_a_frozen_first_sentinel_kicks_fail_only_until_it_is_passed(
    server: RedisServer,
) -> None:
    """The first of two sentinels frozen, the master fine: a kick fails at its
    bound while the lookup of the master waits for the frozen sentinel, but
    the lookup goes on to the next one (redis-py then asks that one first):
    kicks go through again, each one once."""
    with running_sentinel(server) as first, running_sentinel(server) as second:
        broker = sentinel_broker(first, second, timeout=FROZEN_SENTINEL_TIMEOUT)
        outcomes: list[str] = []
        async with api(broker, retry_timeout=2):
            await kiq(broker, 0)  # the sentinels were asked before the freeze
            with frozen(first):
                deadline = time.monotonic() + 45
                while outcomes[-3:] != ["sent"] * 3:
                    assert time.monotonic() < deadline, outcomes
                    try:
                        await kiq(broker, 1)
                    except SendTaskError:
                        outcomes.append("failed")
                    else:
                        outcomes.append("sent")
        assert outcomes[0] == "failed", outcomes
        async with Redis.from_url(server.url) as redis:
            assert await redis.xlen("s") == 1 + outcomes.count("sent"), outcomes


async def test_a_lookup_still_waiting_for_a_frozen_sentinel_ends_with_the_lifespan(
    server: RedisServer,
) -> None:
    """The app shuts down while the shared lookup of the master still waits
    for a frozen sentinel: the lookup is cancelled with it, not left running
    in the loop (a loop closed without cancelling it logs "Task was
    destroyed but it is pending")."""
    with running_sentinel(server) as first, running_sentinel(server) as second:
        broker = sentinel_broker(first, second, timeout=FROZEN_SENTINEL_TIMEOUT)
        before = asyncio.all_tasks()
        with contextlib.ExitStack() as freezing:
            async with api(broker, retry_timeout=1):
                await kiq(broker, 0)
                freezing.enter_context(frozen(first))
                with pytest.raises(SendTaskError):
                    await kiq(broker, 1)
                waiting = {t for t in asyncio.all_tasks() - before if not t.done()}
                assert waiting  # the lookup the kick gave up on
            assert [t for t in waiting if not t.done()] == []


async def test_on_a_cluster_a_kick_whose_reply_timed_out_is_not_sent_twice() -> None:
    """redis-py's RedisCluster sends a failed command again itself once it
    has found its nodes (`initialize`), also one whose reply timed out after
    it went out. A node that stalls longer than those attempts: the kick
    fails, as in redis-py, and the stream holds it once (waiting for the
    nodes for broker_retry_timeout would have sent it again)."""
    with running_cluster() as node:
        broker = RedisStreamClusterBroker(node.url, queue_name="s", socket_timeout=1)
        async with api(broker, retry_timeout=30):
            await kiq(broker, 1)
            with socket.create_connection(("127.0.0.1", node.port)) as raw:
                raw.sendall(f"DEBUG SLEEP {STALL_SECONDS}\r\n".encode())
                await asyncio.sleep(0.3)  # asleep now
                started = time.monotonic()
                with pytest.raises(SendTaskError):
                    await kiq(broker, 2)
                assert time.monotonic() - started < STALL_SECONDS
                await asyncio.sleep(STALL_SECONDS)  # awake: it ran the second kick
            async with Redis.from_url(node.url) as redis:
                assert await redis.xlen("s") == 2


async def test_concurrent_kicks_while_a_cluster_node_is_down_each_fail_as_an_outage() -> (
    None
):
    """A kick renewing a node's closed connections awaits their close while
    the others fail on the node that is down: redis-py then drops it from
    the nodes it starts from (6) or moves it last (8.2), in the dicts that
    kick was going through (it failed with "RuntimeError: dictionary
    changed size / keys changed during iteration", no connection error).
    Each kick fails as one that could not reach the node; once it is back
    (empty), each goes through once."""
    with running_cluster_of_two() as nodes:
        broker = RedisStreamClusterBroker(nodes[0].url, queue_name="q")
        async with api(broker, retry_timeout=2):
            # A connection per kick to the node that has the stream.
            await asyncio.gather(*(kiq(broker, n) for n in range(20)))
            serving = broker.redis.get_node_from_key("q")
            (node,) = [node for node in nodes if node.port == int(serving.port)]
            node.stop()
            await asyncio.sleep(0.2)  # the loop has seen them closed
            failed = await asyncio.gather(
                *(kiq(broker, n) for n in range(100, 120)), return_exceptions=True
            )
            for error in failed:
                assert isinstance(error, SendTaskError), failed
                assert is_connection_error(error.__cause__), failed
            node.start()
            await asyncio.gather(*(kiq(broker, n) for n in range(200, 220)))
        async with Redis.from_url(node.url) as redis:
            assert await redis.xlen("q") == 20


async def test_concurrent_first_kicks_on_a_cluster_unreachable_at_startup() -> None:
    """The cluster came up after the app: its client finds the nodes at the
    first kicks, 20 at once. redis-py 8.1 asks a node about the command
    before it finds them, and one kick's search disconnected the others'
    connections ("'NoneType' object has no attribute 'writelines'"); each
    goes through. Again after `aclose`, which leaves the client as new (a
    race: one round failed about one kick in ten)."""
    with running_cluster_of_two() as nodes:
        for node in nodes:
            node.stop()
        broker = ListQueueClusterBroker(nodes[0].url, queue_name="q")
        async with api(broker, retry_timeout=2):
            for node in nodes:
                await asyncio.to_thread(node.start)
            for round_ in range(4):
                kicks = (kiq(broker, 100 * round_ + n) for n in range(20))
                await asyncio.gather(*kicks)
                await broker.redis.aclose()
        async with RedisCluster.from_url(nodes[0].url) as redis:
            assert await redis.llen("q") == 80


async def test_a_cluster_pipeline_that_failed_before_sending_is_emptied() -> None:
    """A pipeline on the broker's cluster client, run while the cluster is
    unreachable: it fails as redis-py's does, and is left empty as redis-py
    leaves it (its `execute` resets the pipeline whatever it raises). The
    nodes found before it, as a first command needs, raised before redis-py's
    `execute` ran: the pipeline kept its commands and sent them again with
    the next ones once the cluster was back."""
    with running_cluster_of_two() as nodes:
        for node in nodes:
            node.stop()
        broker = ListQueueClusterBroker(nodes[0].url, queue_name="q")
        async with api(broker, retry_timeout=2):
            pipe = broker.redis.pipeline()
            pipe.incr("sent-once")
            with pytest.raises(RedisClusterException) as failed:
                await pipe.execute()
            assert is_connection_error(failed.value), failed.value
            for node in nodes:
                await asyncio.to_thread(node.start)
            pipe.incr("after")
            assert await pipe.execute() == [1]
        async with RedisCluster.from_url(nodes[0].url) as redis:
            assert await redis.get("sent-once") is None


async def test_a_cluster_pool_at_its_max_rides_out_a_node_restart() -> None:
    """As many concurrent kicks as the pool's connections, all closed by a
    node's restart: each goes through, once (they failed with
    MaxConnectionsError while one kick had the closed ones out of the pool
    to renew them)."""
    with running_cluster() as node:
        broker = RedisStreamClusterBroker(
            node.url, queue_name="q", max_connection_pool_size=3
        )
        async with api(broker, retry_timeout=2):
            await asyncio.gather(*(kiq(broker, n) for n in range(3)))
            node.stop()
            node.start()
            await asyncio.gather(*(kiq(broker, n) for n in range(3, 6)))
        async with Redis.from_url(node.url) as redis:
            assert await redis.xlen("q") == 3


@pytest.mark.parametrize("socket_timeout", [None, 5.0])
async def test_a_server_that_accepts_and_never_answers_is_bounded_too(
    socket_timeout: float | None,
) -> None:
    """A listening socket that never replies: the bound holds, whatever
    redis-py's own socket timeout (none at all, or longer than the bound)."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(100)
        port = silent.getsockname()[1]
        broker = ListQueueBroker(
            f"redis://127.0.0.1:{port}", queue_name="q", socket_timeout=socket_timeout
        )
        started = time.monotonic()
        with pytest.raises(SendTaskError) as raised:
            async with api(broker, retry_timeout=1):
                await kiq(broker, 1)
        waited = time.monotonic() - started
    cause = raised.value.__cause__
    assert isinstance(cause, taskiq_fastapi.BrokerUnreachableError)
    assert str(cause).startswith(
        f"Broker ListQueueBroker at 127.0.0.1:{port} unreachable for 1 s: "
        "TimeoutError: "
    ), cause
    assert 1 <= waited < 4


async def test_a_kick_sent_to_a_server_that_stopped_answering_fails_at_the_bound(
    server: RedisServer,
) -> None:
    """A pooled connection, and its server frozen (SIGSTOP: the port accepts,
    nothing answers; a long `CLIENT PAUSE` the same). With no socket timeout
    (redis-py 6's default, or `socket_timeout=None` given), the kick waited
    for as long as the server stayed frozen: under uvicorn, every request
    hung for the whole freeze (20 s of 20 s), and uvicorn's shutdown waited
    for them, so the app's lifespan shutdown never ran. It fails at the
    bound now, as one whose reply did not come: it may have been received,
    and it is not sent again."""
    broker = ListQueueBroker(server.url, queue_name="q", socket_timeout=None)
    async with api(broker, retry_timeout=1):
        await kiq(broker, 1)  # a pooled connection, live
        with frozen(server):
            started = time.monotonic()
            with pytest.raises(SendTaskError) as raised:
                await asyncio.wait_for(kiq(broker, 2), 10)
            waited = time.monotonic() - started
    assert "Timeout" in type(raised.value.__cause__).__name__, raised.value.__cause__
    assert 1 <= waited < 3
    assert await queued(server.url, "q") <= 2  # never sent twice


class CuttingProxy:
    """Relays to Redis; once armed, closes the client's connection right after
    a command has gone through to the server, before its reply comes back."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.armed = False
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self.relay, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def relay(
        self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter
    ) -> None:
        self.connections += 1
        redis_in, redis_out = await asyncio.open_connection(
            "127.0.0.1", self.target_port
        )

        async def to_redis() -> None:
            while data := await client_in.read(65536):
                redis_out.write(data)
                await redis_out.drain()
                if self.armed and b"LPUSH" in data:
                    await asyncio.sleep(0.2)  # the server has it
                    client_out.transport.abort()
                    redis_out.close()
                    return

        async def to_client() -> None:
            while data := await redis_in.read(65536):
                if self.armed:
                    return
                client_out.write(data)
                await client_out.drain()

        tasks = [asyncio.ensure_future(to_redis()), asyncio.ensure_future(to_client())]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            task.cancel()
        client_out.close()
        redis_out.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await self.server.wait_closed()


async def test_a_kick_the_server_may_have_received_is_raised_not_sent_again(
    server: RedisServer,
) -> None:
    proxy = CuttingProxy(server.port)
    port = await proxy.start()
    broker = ListQueueBroker(f"redis://127.0.0.1:{port}/0", queue_name="q")
    try:
        async with api(broker, retry_timeout=10):
            await kiq(broker, 1)
            proxy.armed = True
            with pytest.raises(SendTaskError) as raised:
                await kiq(broker, 2)
            proxy.armed = False
    finally:
        await proxy.close()
    assert "Connection" in type(raised.value.__cause__).__name__
    assert await queued(server.url, "q") == 2  # the first, and the second once
    assert proxy.connections == 1  # no second connection to send it again


T = TypeVar("T")


async def within(step: Awaitable[T], name: str) -> T:
    """`step`, or a failure naming it after 10 s: one run in about 25 of the
    test below hung until pytest's timeout under load, saying nowhere where."""
    try:
        return await asyncio.wait_for(step, 10)
    except asyncio.TimeoutError:
        pytest.fail(f"{name} did not end within 10 s")


async def test_a_group_that_vanished_from_a_kept_stream_restarts_after_the_last_fetch(
    server: RedisServer,
) -> None:
    """The README's choice: nothing added since is skipped; nothing this worker
    already fetched is fetched again. Pins taskiq-redis's `_ack_generator`."""
    broker = RedisStreamBroker(server.url, queue_name="s", xread_block=100)
    sender = RedisStreamBroker(server.url, queue_name="s")
    broker.is_worker_process = True
    lost = LostState(broker, "'test:broker'")
    await broker.startup()
    await sender.startup()
    await lost.remember()
    try:
        for n in range(3):
            await kiq(sender, n)
        fetched = broker.listen()
        for _ in range(3):
            await (await within(anext(fetched), "a fetch")).ack()  # type: ignore[misc]
        async with Redis.from_url(server.url) as redis:
            await redis.xgroup_destroy("s", "taskiq")
        for n in range(3, 5):
            await kiq(sender, n)
        with pytest.raises(Exception, match="NOGROUP") as raised:
            await within(anext(fetched), "the fetch that meets NOGROUP")
        assert await within(lost.recover(raised.value), "the recovery")
        again = broker.listen()
        messages = [await within(anext(again), "a fetch after") for _ in range(2)]
        assert [b'"args": [3]' in m.data for m in messages] == [True, False]
        assert [b'"args": [4]' in m.data for m in messages] == [False, True]
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(anext(again), 1)  # none of the first three
    finally:
        await sender.shutdown()
        await broker.shutdown()


async def test_concurrent_kicks_that_meet_a_lost_stream_recreate_it_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """NATS restarted without its store: 50 kicks at once all meet "no stream".
    One recreates the stream, with one WARNING; each kick lands once. The
    same for a worker's result saves meeting the lost result bucket."""
    from nats.js.errors import NotFoundError
    from workerapp.brokers import make_nats_broker

    from tools.nats_server import running_server as running_nats

    caplog.set_level(logging.WARNING, logger="taskiq_fastapi")
    with running_nats() as server:
        broker: Any = make_nats_broker(server.url, "lost")
        async with api(broker, retry_timeout=10):
            server.stop()
            deadline = time.monotonic() + 20
            while broker.client.is_connected:  # until nats-py sees it gone
                assert time.monotonic() < deadline, "nats-py missed the stop"
                await asyncio.sleep(0.05)
            server.forget()
            server.start()  # empty, on the same port
            while not broker.client.is_connected:
                assert time.monotonic() < deadline, "nats-py did not reconnect"
                await asyncio.sleep(0.05)
            await asyncio.gather(*(kiq(broker, n) for n in range(50)))
            assert (await broker.js.stream_info("lost")).state.messages == 50
            lost = LostState(broker, "'test:broker'")
            saves = [lost.recover(NotFoundError()) for _ in range(20)]
            assert await asyncio.gather(*saves) == [True] * 20  # all try again
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [
        "Broker PullBasedJetStreamBroker: recreated JetStream stream 'lost', which "
        "the server no longer had (it restarted without its store).",
        "Broker 'test:broker': recreated result bucket 'lost', which the server no "
        "longer had (it restarted without its store).",
    ], warnings


async def test_concurrent_record_writes_that_meet_a_lost_bucket_say_it_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """TaskStatus' key-value bucket, lost in a restart without the store: 20
    writes at once recreate it, each lands, and one WARNING says so."""
    from workerapp.brokers import make_nats_broker

    from taskiq_fastapi._brokers import NatsKeyValues
    from tools.nats_server import running_server as running_nats

    caplog.set_level(logging.WARNING, logger="taskiq_fastapi")
    with running_nats() as server:
        broker: Any = make_nats_broker(server.url, "kv")
        async with api(broker, retry_timeout=10):
            records = NatsKeyValues(broker.result_backend, 60)
            await records.put("before", {"n": -1})
            server.stop()
            deadline = time.monotonic() + 20
            while broker.result_backend.nats_client.is_connected:
                assert time.monotonic() < deadline, "nats-py missed the stop"
                await asyncio.sleep(0.05)
            server.forget()
            server.start()  # empty, on the same port
            while not broker.result_backend.nats_client.is_connected:
                assert time.monotonic() < deadline, "nats-py did not reconnect"
                await asyncio.sleep(0.05)
            await asyncio.gather(*(records.put(f"k{n}", {"n": n}) for n in range(20)))
            assert [await records.get(f"k{n}") for n in range(20)] == [
                {"n": n} for n in range(20)
            ]
    warnings = [r.getMessage() for r in caplog.records if "key-value" in r.getMessage()]
    assert warnings == [
        "Recreated JetStream key-value bucket 'kv-taskiq-fastapi': the server lost it."
    ], warnings


async def test_the_apps_own_shutdown_runs_when_the_broker_cannot_reach_its_server(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The API stops while NATS is down, with a publish nats-py still holds.

    nats-py's close then raised ConnectionResetError out of broker_lifespan,
    into the app's lifespan at its yield: the app's own shutdown after it
    never ran. Now one WARNING names the broker, and the app shuts down.
    """
    from workerapp.brokers import make_nats_broker

    from tools.nats_server import running_server as running_nats

    shut_down = []

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        shut_down.append(app)  # no finally: as most apps write theirs

    caplog.set_level(logging.WARNING, logger="taskiq_fastapi")
    with running_nats() as server:
        broker: Any = make_nats_broker(server.url, "down")
        handled: list[str] = []
        broker.add_event_handler(
            TaskiqEvents.CLIENT_SHUTDOWN, lambda _state: handled.append("handler")
        )
        app = FastAPI()
        async with taskiq_fastapi.broker_lifespan(broker, lifespan)(app):
            server.stop()
            deadline = time.monotonic() + 20
            while broker.client.is_connected:  # until nats-py sees it gone
                assert time.monotonic() < deadline, "nats-py missed the stop"
                await asyncio.sleep(0.05)
            # As a kick sent as the connection dropped: nats-py holds it.
            await broker.client.publish("down", b"held")
    assert shut_down == [app]
    assert handled == ["handler"]  # run by taskiq's shutdown, after the close
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    # Python 3.11 says ConnectionResetError; 3.12 and 3.13 as installed here
    # fail the same close inside asyncio (CPython gh-136234).
    assert len(warnings) == 1, warnings
    assert warnings[0] in {
        "Broker PullBasedJetStreamBroker did not shut down cleanly, its server is "
        f"unreachable ({reason})."
        for reason in (
            "ConnectionResetError: Connection lost",
            "Connection lost (asyncio could not write to the closed connection)",
        )
    }, warnings


async def test_a_shutdown_handler_that_cannot_reach_its_server_runs_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A CLIENT_SHUTDOWN handler of the app's own tells another service, which
    refuses the connection. The error is a connection error, so the broker
    was taken as unable to reach its server, and taskiq's shutdown was run
    again after it: the handler, and every one before it, ran twice."""
    refused = free_port()  # nothing listens there
    handled: list[str] = []

    async def tell_the_other_service(_state: Any) -> None:
        handled.append("told")
        await asyncio.open_connection("127.0.0.1", refused)

    broker = InMemoryBroker()
    broker.add_event_handler(
        TaskiqEvents.CLIENT_SHUTDOWN, lambda _state: handled.append("first")
    )
    broker.add_event_handler(TaskiqEvents.CLIENT_SHUTDOWN, tell_the_other_service)
    warning = await the_one_warning_of_a_stop(broker, caplog)
    assert handled == ["first", "told"]
    assert warning.startswith(
        "Broker InMemoryBroker did not shut down cleanly: a shutdown handler, a "
        "middleware or its result backend could not reach a server "
        "(ConnectionRefusedError"
    ), warning


async def test_a_middleware_that_cannot_reach_its_server_at_shutdown_is_one_warning(
    server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A middleware's shutdown (after the handlers, before the result
    backend's) is refused: one WARNING that says a middleware may be the
    cause, no handler run twice, and the app's own shutdown still runs."""
    refused = free_port()
    handled: list[str] = []

    class Reporting(TaskiqMiddleware):
        async def shutdown(self) -> None:
            handled.append("middleware")
            await asyncio.open_connection("127.0.0.1", refused)

    # Not InMemoryBroker: taskiq 0.11's skips the middlewares' shutdown.
    broker = ListQueueBroker(server.url, queue_name="q").with_middlewares(Reporting())
    broker.add_event_handler(
        TaskiqEvents.CLIENT_SHUTDOWN, lambda _state: handled.append("handler")
    )
    warning = await the_one_warning_of_a_stop(broker, caplog)
    assert handled == ["handler", "middleware"]
    assert "a middleware" in warning, warning


async def the_one_warning_of_a_stop(
    broker: AsyncBroker, caplog: pytest.LogCaptureFixture
) -> str:
    """An app started and stopped with `broker_lifespan(broker)`: its own
    shutdown ran, and one WARNING was logged, returned."""
    shut_down = []

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        shut_down.append(app)

    caplog.set_level(logging.WARNING, logger="taskiq_fastapi")
    app = FastAPI()
    async with taskiq_fastapi.broker_lifespan(broker, lifespan)(app):
        pass
    assert shut_down == [app]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1, warnings
    return warnings[0]


async def test_a_nats_kick_while_the_server_is_down_sends_nothing_at_all() -> None:
    """nats-py buffers a publish made while it reconnects.

    The kick failed after nats-py's 5 s acknowledgement timeout, whatever
    the bound, with nats' TimeoutError; and the message was published all
    the same once the server was back, so a caller that kicked again ran
    the task twice. Now nothing is sent: BrokerUnreachableError at the
    bound, and the stream never gets that message. A result wait too.
    """
    from workerapp.brokers import make_nats_broker

    from tools.nats_server import running_server as running_nats

    with running_nats() as server:
        broker: Any = make_nats_broker(server.url, "gate")
        async with api(broker, retry_timeout=1):
            task = await AsyncKicker("workerapp.tasks:mark", broker, {}).kiq(0)
            server.stop()
            deadline = time.monotonic() + 20
            clients = [broker.client, broker.result_backend.nats_client]
            while any(client.is_connected for client in clients):  # both see it
                assert time.monotonic() < deadline, "nats-py missed the stop"
                await asyncio.sleep(0.05)
            with pytest.raises(SendTaskError) as raised:
                await kiq(broker, 1)
            with pytest.raises(ResultIsReadyError) as waited:
                await task.wait_result(timeout=30)
            server.start()  # with its store
            while not broker.client.is_connected:
                assert time.monotonic() < deadline, "nats-py did not reconnect"
                await asyncio.sleep(0.05)
            await kiq(broker, 2)
            assert (await broker.js.stream_info("gate")).state.messages == 2  # 0, 2
    named = {raised.value: "Broker", waited.value: "Result backend of broker"}
    for error, name in named.items():
        cause = error.__cause__
        assert isinstance(cause, taskiq_fastapi.BrokerUnreachableError), cause
        assert str(cause).startswith(
            f"{name} PullBasedJetStreamBroker unreachable for 1 s: "
        ), cause


@pytest.mark.parametrize("down", ["both", "broker"])
async def test_an_api_started_while_nats_is_down_fails_its_startup_at_the_bound(
    down: str,
) -> None:
    """nats-py tries connecting for two minutes inside the startup, one log
    line an attempt, then raised its NoServersError. Now the startup waits
    for the server up to the bound, then one error names what it could not
    reach: the result backend starts first (taskiq starts it before the
    broker connects), so with the broker's server alone down, the broker."""
    from workerapp.brokers import make_nats_broker

    from tools.nats_server import running_server as running_nats

    with running_nats() as server:
        dead = f"nats://127.0.0.1:{free_port()}"
        broker: Any = make_nats_broker(dead, "gate")
        if down == "broker":
            backend = make_nats_broker(server.url, "gate").result_backend
            broker = broker.with_result_backend(backend)
        started = time.monotonic()
        with pytest.raises(taskiq_fastapi.BrokerUnreachableError) as raised:
            async with api(broker, retry_timeout=3):
                pass
        waited = time.monotonic() - started
    name = "Broker" if down == "broker" else "Result backend of broker"
    assert str(raised.value).startswith(
        f"{name} PullBasedJetStreamBroker unreachable for 3 s: "
    ), raised.value
    assert waited < 7, waited


async def test_an_api_started_before_nats_starts_once_the_server_is_up() -> None:
    """docker-compose's order: the server comes up within the bound, and the
    app's startup goes on as soon as it is there; a kick then goes through."""
    from workerapp.brokers import make_nats_broker

    from tools.nats_server import running_server as running_nats

    with running_nats() as server:
        server.stop()
        broker: Any = make_nats_broker(server.url, "gate")
        later = threading.Timer(1.0, server.start)
        later.start()
        try:
            async with api(broker, retry_timeout=30):
                await kiq(broker, 1)
                assert (await broker.js.stream_info("gate")).state.messages == 1
        finally:
            later.join()


async def test_an_api_on_core_nats_started_while_it_is_down_fails_at_the_bound() -> (
    None
):
    """The README says "taskiq-nats' brokers": its NatsBroker (core NATS, no
    JetStream) connects in its startup too, and took nats-py's two minutes
    (60 log lines, then NoServersError)."""
    from taskiq_nats import NatsBroker

    broker = NatsBroker(f"nats://127.0.0.1:{free_port()}", queue="gate")
    started = time.monotonic()
    with pytest.raises(taskiq_fastapi.BrokerUnreachableError) as raised:
        async with api(broker, retry_timeout=3):
            pass
    waited = time.monotonic() - started
    assert str(raised.value).startswith("Broker NatsBroker unreachable for 3 s: "), (
        raised.value
    )
    assert waited < 7, waited


async def test_an_api_with_no_retry_time_starts_while_nats_is_up() -> None:
    """`broker_retry_timeout=0` is "no retries", not "no time to connect":
    the bound cuts a startup that is still waiting for an unreachable
    server, never one connecting to a server that answers (it cut every
    startup at 0, as no connect is done within no time at all)."""
    from workerapp.brokers import make_nats_broker

    from tools.nats_server import running_server as running_nats

    with running_nats() as server:
        broker: Any = make_nats_broker(server.url, "gate")
        async with api(broker, retry_timeout=0):
            await kiq(broker, 1)
            assert (await broker.js.stream_info("gate")).state.messages == 1


@pytest.mark.parametrize("ready", [_poll_ready, _select_ready])
def test_asking_a_socket_whether_its_server_closed_it(ready: Any) -> None:
    """How a kick tells a pooled connection the server closed from an idle
    one, with poll (where there is one) and with select (Windows): an idle
    socket has nothing; one with a byte or an end-of-file to read has."""
    ours, server = socket.socketpair()
    with ours, server:
        assert not ready(ours.fileno())
        server.send(b"+")
        assert ready(ours.fileno())
        ours.recv(1)
        assert not ready(ours.fileno())
        server.close()
        assert ready(ours.fileno())


def test_a_socket_numbered_past_1024_is_asked_too() -> None:
    """An API with many sockets open (past select's 1024): an idle pooled
    connection is not taken for one the server closed, which had every kick
    connect again."""
    resource = pytest.importorskip("resource")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 1500:
        pytest.fail(f"this test needs more than 1500 open files, the limit is {hard}")
    # Many systems start processes with a soft limit of 1024: raised for the
    # test, up to the hard limit, and put back.
    wanted = 2048 if hard == resource.RLIM_INFINITY else min(hard, 2048)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    ours, server = socket.socketpair()
    high = os.dup2(ours.fileno(), 1500)
    try:
        with ours, server:
            assert not _ready_to_read(high)
            server.close()
            assert _ready_to_read(high)
    finally:
        os.close(high)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
