"""Which errors a worker retries, and how it backs off (issue 8)."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import redis.exceptions
from fastapi import FastAPI
from taskiq import InMemoryBroker, TaskiqEvents, TaskiqState

import taskiq_fastapi
from taskiq_fastapi import connections
from taskiq_fastapi_cli.runtime import outages


def cluster_error_from(cause: Exception) -> Exception:
    """redis-py's RedisClusterException, raised from `cause` as redis-py raises it.

    "Redis Cluster cannot be connected" when no node answers.
    """
    try:
        raise redis.exceptions.RedisClusterException("Redis Cluster") from cause
    except redis.exceptions.RedisClusterException as error:
        return error


@pytest.mark.parametrize(
    "error",
    [
        redis.exceptions.ConnectionError("Connection closed by server."),
        redis.exceptions.TimeoutError("Timeout reading from socket"),
        redis.exceptions.BusyLoadingError("Redis is loading the dataset"),
        ConnectionRefusedError(111, "Connection refused"),
        OSError(113, "No route to host"),
        asyncio.TimeoutError(),
        type("AMQPConnectionError", (Exception,), {})(),  # aio-pika / aiormq
        type("NoServersError", (Exception,), {})(),  # nats-py
        redis.exceptions.ClusterDownError("CLUSTERDOWN The cluster is down"),
        redis.exceptions.MasterDownError("MASTERDOWN Link with MASTER is down"),
        cluster_error_from(redis.exceptions.ConnectionError("Error 111")),
    ],
    ids=lambda e: type(e).__name__,
)
def test_connection_type_errors_are_retried(error: BaseException) -> None:
    assert connections.is_connection_error(error)


@pytest.mark.parametrize(
    "error",
    [
        redis.exceptions.ResponseError("NOGROUP No such key"),
        json.JSONDecodeError("bad message", "{", 0),
        ValueError("a bug in a broker"),
        KeyError("data"),
        # asyncio's, from a closed connection, is an outage; any other is a bug.
        TypeError("'NoneType' object is not callable"),
        redis.exceptions.RedisClusterException("No targets were found"),
        cluster_error_from(ValueError("a bug")),
        # Wrong credentials, though redis-py makes them ConnectionErrors.
        redis.exceptions.AuthenticationError("invalid username-password pair"),
        redis.exceptions.AuthorizationError("NOPERM"),
        cluster_error_from(redis.exceptions.AuthenticationError("invalid")),
    ],
    ids=lambda e: type(e).__name__,
)
def test_other_errors_keep_taskiqs_behaviour(error: BaseException) -> None:
    assert not connections.is_connection_error(error)


@pytest.mark.parametrize(
    ("error", "ended"),
    [
        (redis.exceptions.ConnectionError("Connection closed by server."), True),
        (redis.exceptions.ResponseError("WRONGTYPE Operation against a key"), False),
    ],
    ids=["outage", "failing"],
)
def test_a_ping_answered_ends_an_outage_not_a_failing_fetch(
    error: Exception, ended: bool
) -> None:
    """A fetch answered WRONGTYPE waits in its backoff; the server answers the
    PING the watch then sends: the broker was said to be back, its clock
    started again, and the command never gave up (20 s past a 3 s timeout).
    """
    outcomes: list[bool] = []
    broker = outages.Dependency("Broker 'b'", object(), 3, outcomes.append)
    assert broker.failed(error, "fetch") is not None
    broker.answered()
    assert broker.since is None if ended else broker.since is not None
    assert outcomes == ([True, False] if ended else [True])  # what /readyz says
    broker.failed(error, "fetch")
    broker.recovered()  # a fetch that worked ends either
    assert broker.since is None


def test_a_ping_answered_while_the_failing_fetch_waits_ends_its_failure() -> None:
    """The fetch was sent again and waits (an idle queue): it works. Only an
    operation of another's waiting does not end it."""
    error = redis.exceptions.ResponseError("READONLY You can't write")
    broker = outages.Dependency("Broker 'b'", object(), 3, lambda _: None)
    broker.failed(error, "fetch")
    broker.answered(["an ack"])
    assert broker.since is not None
    broker.answered(["an ack", "fetch"])
    assert broker.since is None


def test_an_unanswered_ping_said_just_after_a_failure_starts_the_clock() -> None:
    """A NATS server frozen 14 s, 8 s retry timeout, a SIGTERM while results
    waited: the watch's PING sent at t+4 went unanswered, but a save timing
    out at t+6 was recorded a moment before the watch's failure, and only
    the first failure of an outage set the clock: it ran from t+6, was at
    7.9 s when the server came back, and the command exited 0 ("back after
    8.1 s"), where the run in which the PING's failure came first exited 3.
    """
    broker = outages.Dependency("Result backend", object(), 8, lambda _: None)
    pinged = time.monotonic() - 2.0  # the PING the watch sent, unanswered
    assert broker.failed(TimeoutError("nats: timeout"), "a save") is not None
    broker.failed(ConnectionError("no answer"), "watch", pinged, 2.0)
    assert broker.since == pinged


@asynccontextmanager
async def connection() -> AsyncIterator[asyncio.StreamWriter]:
    """An open connection to a real local server, on the running loop."""
    accepted: list[asyncio.StreamWriter] = []
    server = await asyncio.start_server(
        lambda _, writer: accepted.append(writer), "127.0.0.1", 0
    )
    try:
        port = server.sockets[0].getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        yield writer
    finally:
        for peer in accepted:
            peer.close()
        server.close()
        await server.wait_closed()


async def closed_after_a_bug(writer: asyncio.StreamWriter) -> None:
    """Data that is not bytes, on the open connection: TypeError, a bug in
    the caller, shown as itself; then the connection is closed."""
    with pytest.raises(TypeError) as bug:
        writer.writelines(["text, not bytes"])  # type: ignore[list-item]
    assert not connections.is_connection_error(bug.value)
    assert connections.describe(bug.value).startswith("TypeError: "), bug.value
    writer.close()
    await writer.wait_closed()


@pytest.mark.anyio
async def test_only_asyncios_write_to_a_closed_connection_is_an_outage() -> None:
    """CPython gh-136234 (3.12, 3.13): writelines on a closed selector
    transport raises TypeError, an outage. The same writelines given data
    that is not bytes raises TypeError too, on an open connection: a bug in
    the caller, shown as itself. It was retried as an outage and described
    as "Connection lost". Python 3.10 and 3.11 raise neither from asyncio's
    selector_events.py (their writelines is the base class's)."""
    async with connection() as writer:
        await closed_after_a_bug(writer)
        closed: TypeError | None = None
        try:
            writer.transport.writelines([b"held"])
        except TypeError as exc:  # 3.12, 3.13 as installed here
            closed = exc
        if closed is not None:
            assert connections.is_connection_error(closed)
            assert connections.describe(closed) == (
                "Connection lost (asyncio could not write to the closed connection)"
            )


def test_uvloops_refusal_to_use_a_closed_connection_is_an_outage() -> None:
    """uvloop is the loop of uvicorn and of taskiq's worker wherever it is
    installed (FastAPI's "standard" extra installs it). Any use of a closed
    transport raises RuntimeError there: nats-py's close with the server gone
    raised it out of broker_lifespan, and the app's own shutdown never ran."""
    import uvloop

    async def scenario() -> None:
        async with connection() as writer:
            await closed_after_a_bug(writer)
            with pytest.raises(RuntimeError) as closed:
                writer.transport.writelines([b"held"])
            assert connections.is_connection_error(closed.value)
            assert connections.describe(closed.value) == (
                "Connection lost (uvloop could not use the closed connection)"
            )

    uvloop.run(scenario())


def test_uvloops_refusal_to_use_a_closed_pipe_is_no_outage() -> None:
    """uvloop says the same of any closed handle: an app's broker shutdown
    handler that writes to a subprocess pipe it closed itself (a bug) raised
    it out of broker_lifespan as a WARNING that the broker's server was
    unreachable, an InMemoryBroker's too, and the handlers ran a second
    time. Only a socket's transport is a connection."""
    import uvloop

    broker = InMemoryBroker()
    ran: list[str] = []

    @broker.on_event(TaskiqEvents.CLIENT_SHUTDOWN)
    async def write_to_a_closed_pipe(_state: TaskiqState) -> None:
        ran.append("handler")
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-c", "pass", stdin=asyncio.subprocess.PIPE
        )
        assert child.stdin is not None
        child.stdin.close()
        await child.wait()
        child.stdin.write(b"the app's bug")

    async def scenario() -> None:
        async with taskiq_fastapi.broker_lifespan(broker)(FastAPI()):
            pass

    with pytest.raises(RuntimeError, match="WriteUnixTransport") as bug:
        uvloop.run(scenario())
    assert not connections.is_connection_error(bug.value)
    assert ran == ["handler"]


def test_backoff_grows_to_the_cap_with_jitter() -> None:
    delays = [outages._backoff(attempt) for attempt in range(12)]
    assert 0.25 <= delays[0] <= 0.5
    assert 2.0 <= delays[3] <= 4.0
    assert all(15.0 <= d <= 30.0 for d in delays[7:])
    assert len({round(outages._backoff(9), 6) for _ in range(20)}) > 1  # jitter


@pytest.mark.anyio
async def test_a_sentinel_error_with_a_multi_line_option_is_short_and_secret_free() -> (
    None
):
    """A TLS sentinel given its CA as text (`ssl_ca_data`, a PEM: several
    lines): redis-py's MasterNotFoundError still names it by its repr, which
    holds the PEM (and, before redis-py 8, the password)."""
    from redis.asyncio import Sentinel

    from tools.processes import free_port

    pem = "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIUQ\n-----END CERTIFICATE-----\n"
    password = "sentinel-password-5e1c"
    sentinel = Sentinel(
        [("127.0.0.1", free_port()), ("127.0.0.1", free_port())],
        sentinel_kwargs={"password": password, "ssl": True, "ssl_ca_data": pem},
    )
    with pytest.raises(redis.exceptions.ConnectionError) as raised:
        await sentinel.discover_master("taskiq-master")
    described = connections.describe(raised.value)
    assert password not in described
    assert "\n" not in described
    assert len(described) < 500, described


@pytest.mark.anyio
async def test_a_result_save_that_finds_its_lock_expired_fails_once() -> None:
    """redis-py's LockNotOwnedError is "fetch again" for a stream broker's
    fetch only (taskiq-redis 1.1's autoclaim lock after an empty restart):
    a backend saving under a Redis lock its save outlives was tried again for
    ever, with nothing logged, and a SIGTERM did not stop the worker. taskiq
    reports the save's error once, as without this project."""
    from redis.asyncio import Redis
    from taskiq import TaskiqResult
    from taskiq_redis import RedisAsyncResultBackend, RedisStreamBroker

    from taskiq_fastapi_cli.runtime.outages import BrokerOutages
    from tools.redis_server import running_server

    attempts: list[float] = []

    class LockedSaves(RedisAsyncResultBackend[Any]):
        async def set_result(self, task_id: str, result: TaskiqResult[Any]) -> None:
            attempts.append(time.monotonic())
            if len(attempts) > 3:  # enough to tell; the test never hangs
                await super().set_result(task_id, result)
                return
            redis = Redis.from_url(url)
            async with redis, redis.lock(f"save:{task_id}", timeout=0.05):
                await asyncio.sleep(0.1)  # outlives the lock
                await super().set_result(task_id, result)

    with running_server() as server:
        url = server.url
        backend = LockedSaves(url)
        broker = RedisStreamBroker(url, queue_name="q").with_result_backend(backend)
        BrokerOutages(broker, "b:b", 5, give_up=lambda message: None)
        result = TaskiqResult(is_err=False, return_value=1, execution_time=0.0)
        with pytest.raises(redis.exceptions.LockNotOwnedError):
            await broker.result_backend.set_result("t", result)
        await backend.shutdown()
    assert len(attempts) == 1, f"{len(attempts)} saves"


@pytest.mark.anyio
async def test_a_fetch_that_fails_as_the_worker_stops_is_no_outage(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A stop signal came; then the broker's shutdown closed the connection
    a fetch still waited on (taskiq 0.11 leaves that fetch running; 0.12
    cancels it without waiting, and before Python 3.12 redis-py could swallow
    the cancellation). The fetch ends quietly: it was logged as an outage of
    the broker, "retrying", in a worker that had just shut down."""
    from redis.asyncio import Redis
    from taskiq_redis import ListQueueBroker

    from taskiq_fastapi_cli.runtime.outages import BrokerOutages
    from tools.redis_server import running_server

    with running_server() as server:
        broker = ListQueueBroker(server.url, queue_name="q")
        broker.is_worker_process = True
        stops = BrokerOutages(broker, "b:b", 5, give_up=lambda message: None)
        await broker.startup()
        source = broker.listen()
        fetch = asyncio.ensure_future(anext(source))
        async with Redis.from_url(server.url) as redis:
            for _ in range(600):  # until the fetch's BRPOP waits on the server
                if (await redis.info("clients"))["blocked_clients"]:
                    break
                await asyncio.sleep(0.05)
        stops.stop()  # the stop signal
        await broker.connection_pool.disconnect()  # as the broker shuts down
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(fetch, 10)
        await broker.shutdown()
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert said == []
    assert stops.broker.since is None  # no outage began: readiness untouched
