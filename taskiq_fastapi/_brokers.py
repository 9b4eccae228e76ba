"""Every reliance on an internal of taskiq-redis, taskiq-nats, redis-py, nats-py.

A broker server that restarts without its data (Redis without persistence, a
JetStream server without its store directory) comes back empty. What the
brokers and their clients do about it, and what this module does instead:

- redis-py 8 skips its check of a pooled connection before use when
  maintenance notifications are on, which is their default ("auto"): each
  connection kept from before a restart failed its next command with
  "Connection closed by server", though the command never reached the new
  server. `guard_connections` checks again in the API process, and retries
  getting a connection (nothing is sent before one is had) for a bounded time;
  `renew_closed_connections` checks again in workers.
- taskiq-redis's `RedisStreamBroker`, and its sentinel and cluster variants,
  create their consumer group once, at startup, at `$`: after the restart
  their fetch fails with NOGROUP for ever, and a group created again at `$`
  skips what the API kicked meanwhile. `LostState` creates it again in
  place, at the stream's beginning when the server lost its state (INFO's
  run_id of the server, or cluster node, holding the stream changed since
  startup, and the stream no longer holds the newest message this process
  knew delivered), else after that message: the group's last delivered one
  at startup or when a fetch reconnected, or a newer one this process
  fetched (it reads ids where taskiq-redis makes each message's ack,
  `_ack_generator`).
- They make a missing group at startup at `consumer_id`, `$` by default: a
  worker that began before its server started (docker-compose) skipped what
  the API kicked until its retries connected. `LostState` makes it at `0`
  when the server started after the process began and every entry of the
  stream was added since the server started (INFO's uptime, TIME).
- taskiq-redis 1.1's stream brokers take a Redis lock, with no expiry,
  around the XAUTOCLAIM after each fetch (`autoclaim:<group>:<stream>`). A
  worker inside that step when the server restarted empty released a lock
  the new server does not have: redis-py raised LockNotOwnedError, and the
  worker process died. `LostState` fetches again instead (taskiq-redis 1.2
  sends the lock in the XAUTOCLAIM's pipeline, and never raises it).
- taskiq-redis's sentinel brokers and backends get a client and pool of the
  master for every command (`master_for`): `guard_connections` retries
  getting a connection there too. Its cluster ones keep one RedisCluster,
  which sends a failed command again itself once it has found its nodes
  again (`initialize`), also one whose reply timed out after it was sent:
  no retry is added there, as waiting for the nodes would let such a kick
  be sent twice; but a node's connection the server closed is renewed
  before use (`_renew_closed_cluster_connections`): redis-py's own refresh
  of the nodes meets them and gives up (6: for good; 8.2: once).
- taskiq-nats creates its JetStream stream and durable consumer, and its
  result bucket, once, at startup: after the restart publishing fails with
  "no stream", fetching with "service unavailable" (no consumer answers),
  saving a result with "not found". `LostState` creates each again with the
  broker's own configuration; `guard_connections` does so for the stream when
  the API publishes. One at a time per broker (`_once`): concurrent kicks
  that meet the loss together recreate it once.

- taskiq-redis' `ListQueueBroker` waits for a message with a BRPOP that
  never ends on the server, read under the connection's socket timeout
  (redis-py 8: 5 s by default). When the server stopped answering for
  longer (frozen, overloaded, a paused host), the read timed out and
  redis-py closed the connection; the BRPOP was still in the server's
  input, and once it answered again it popped a message for a connection
  that was gone: one task lost per worker process and per such stall, with
  no log line (2 of 4000 at each 7 s freeze, two processes). In workers,
  `fetch_without_client_timeout` gives each BRPOP a server-side timeout
  (`LIST_BLOCK_SECONDS`: an idle fetch ends with nil, not an error) and
  awaits its reply without the socket timeout, for as long as the worker
  would keep retrying the server: a server that does not answer is found
  out by the outage watch's PINGs (taskiq_fastapi_cli/runtime/outages.py),
  and the fetch waiting on it gets its message once the server answers
  again. A reply still missing well after that (the connection itself is
  dead, say a NAT dropped it) ends the fetch with a `TimeoutError`, as the
  socket timeout did; the next fetch uses a new connection.

tests/test_restart_empty.py exercises each through the real command, and
tests/test_restart_rules.py the API's retries and `_ack_generator`;
tests/test_list_fetch.py the frozen server.

Where TaskStatus keeps its records (`record_storage`, at the end) relies on
them too: taskiq-redis' client pools and list broker, taskiq-nats' result
bucket, and which backends delete a result when it is read.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import select
import sys
import time
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from taskiq import AsyncBroker, AsyncResultBackend, BrokerMessage, TaskiqResult
from taskiq.depends.progress_tracker import TaskProgress

from taskiq_fastapi.connections import (
    backoff,
    cancel_until_done,
    describe,
    is_connection_error,
    one_line,
)
from taskiq_fastapi.exceptions import BrokerUnreachableError

logger = logging.getLogger("taskiq_fastapi")

# The API process's retries of getting a connection: short, a request waits.
FIRST_DELAY_SECONDS = 0.1
MAX_DELAY_SECONDS = 1.0
# A JetStream error whose stream, consumer and bucket all exist is tried again
# after this (another process recreated them; or the server is still starting).
NOTHING_MISSING_PAUSE_SECONDS = 0.25


def guard_connections(broker: AsyncBroker, retry_timeout: float) -> None:
    """Make the API process's kicks and result reads ride out a server restart.

    Only what provably sent nothing is retried: getting a connection, and a
    pooled connection found closed before the command went out.
    """
    _guard_redis_pools(broker, retry_timeout)
    for owner in (broker, broker.result_backend):
        _guard_cluster(owner)
        _guard_sentinel_pools(owner, _error_name(broker, owner), retry_timeout)
        _share_master_lookups(owner)
    if _is_core_nats(broker) or _is_jetstream(broker):
        _bound_nats_connects(broker, retry_timeout)
    if _is_jetstream(broker):
        _guard_nats_kick(broker, retry_timeout)
        _guard_nats_results(broker, retry_timeout)
        logging.getLogger("nats.aio.client").addFilter(one_line)


def _error_name(broker: AsyncBroker, owner: object) -> str:
    """How an error names `owner`, the broker or its result backend.

    Its result backend may be on a server of its own: an error about that
    server named the broker, so its reader looked for the fault at the
    broker's server (the worker's lines say "Result backend of broker").
    """
    name = type(broker).__name__
    return f"Broker {name}" if owner is broker else f"Result backend of broker {name}"


def renew_closed_connections(broker: AsyncBroker) -> None:
    """In a worker: a pooled connection the server closed is made anew before use.

    Workers retry outages themselves (taskiq_fastapi_cli/outages.py); without
    this, each connection kept from before a restart failed one ack or one
    result save first.
    """
    _guard_redis_pools(broker, None)
    for owner in (broker, broker.result_backend):
        _guard_cluster(owner)


# A list broker's idle BRPOP is answered nil by the server after this...
LIST_BLOCK_SECONDS = 5
# ...and a reply missing this long past it and the retry timeout is taken for
# a dead connection.
LIST_SLACK_SECONDS = 5.0


def fetch_without_client_timeout(broker: AsyncBroker, retry_timeout: float) -> None:
    """In a worker: a `ListQueueBroker` fetch that no socket timeout cuts off.

    Replaces exactly taskiq-redis' own `ListQueueBroker.listen`: not a
    subclass's, nor a fetch the project wrapped. Per fetch, one BRPOP on a
    pooled connection, as taskiq-redis sends it.
    """
    try:
        from taskiq_redis import ListQueueBroker
    except ImportError:  # pragma: no cover - taskiq-redis is optional
        return
    own = getattr(broker.listen, "__func__", None) is ListQueueBroker.listen
    if type(broker) is not ListQueueBroker or not own:
        return
    wait = LIST_BLOCK_SECONDS + retry_timeout + LIST_SLACK_SECONDS

    async def listen() -> AsyncGenerator[bytes, None]:
        while True:
            reply = await _brpop(broker, wait)
            if reply is not None:
                yield reply[1]

    broker.listen = listen  # type: ignore[method-assign]


async def _brpop(broker: Any, wait: float) -> Any:
    """One BRPOP of the broker's queue; its reply awaited up to `wait` seconds.

    The write keeps the socket timeout (nothing was sent if it times out);
    the read has `wait` as its socket timeout, so that redis-py closes the
    connection when it runs out, as for any read timeout (`read_response`'s
    own `timeout` argument would leave the reply on the connection for its
    next user), and when the fetch is cancelled.
    """
    pool = broker.connection_pool
    connection = await pool.get_connection()
    try:
        await connection.send_command("BRPOP", broker.queue_name, LIST_BLOCK_SECONDS)
        socket_timeout = connection.socket_timeout
        connection.socket_timeout = wait
        try:
            return await connection.read_response()
        finally:
            connection.socket_timeout = socket_timeout
    finally:
        await pool.release(connection)


def pinger(owner: object) -> Callable[[], Awaitable[None]] | None:
    """How to ask the server of a broker or result backend for an answer.

    A PING on a connection of its Redis pool; behind Sentinel, to its master;
    on a Redis Cluster, to the nodes it waits on (`_cluster_pinger`); or a
    PING/PONG round trip of its NATS client (`flush`). None for a client we do
    not know. The caller bounds it with a deadline: a server that accepts
    connections and never answers makes it wait for ever. A cancelled PING
    leaves no reply behind: redis-py closes a connection whose read is
    cancelled (`read_response`).
    """
    if getattr(owner, "_acquire_master_conn", None) is not None:

        async def sentinel_ping() -> None:
            # A client of the master, asked of the sentinels, as taskiq-redis
            # gets one for every command; closed with its pool afterwards.
            async with _redis(owner) as redis:
                await redis.ping()

        return sentinel_ping
    cluster = _cluster_client(owner)
    if cluster is not None:
        return _cluster_pinger(owner, cluster)
    pools = _redis_pools(owner)
    if pools:
        pool = pools[0]

        async def redis_ping() -> None:
            from redis.asyncio import Redis

            # A pool passed in is not closed with the client.
            async with Redis(connection_pool=pool) as redis:
                await redis.ping()

        return redis_ping
    client: Any = getattr(owner, "client", None) or getattr(owner, "nats_client", None)
    if type(client).__module__ == "nats.aio.client":

        async def nats_ping() -> None:
            if not client.is_connected:
                raise ConnectionError("the NATS client is not connected")
            # A PING, and its PONG awaited; not with `flush`. nats-py 2.16
            # sets the result of the future its PING left for the PONG, even
            # a cancelled one: InvalidStateError ended the client's read
            # loop, and the client, still "connected", never read again (a
            # worker took no task after a 12 s freeze of the server). flush's
            # own timeout and our deadline both cancelled that future; this
            # one is left pending (shielded) for a late PONG to set.
            pong = asyncio.get_running_loop().create_future()
            await client._send_ping(pong)
            await asyncio.shield(pong)

        return nats_ping
    return None


def _cluster_pinger(owner: object, cluster: Any) -> Callable[[], Awaitable[None]]:
    """A PING to each node a cluster broker fetches from, or to every primary.

    redis-py sends a bare PING to the client's default node only, which
    need not hold the broker's streams. A broker waits on the nodes holding
    its queue (and additional streams); a result backend's save, on the node
    of its task's key, which may be any primary. With the nodes given,
    redis-py sends it without its cluster-level retries. `initialize` first
    finds the nodes again if a failure asked for it (a no-op otherwise): the
    PING then knows where the slots are.
    """
    queue = getattr(owner, "queue_name", None)
    keys = [] if queue is None else [queue, *getattr(owner, "additional_streams", ())]

    async def cluster_ping() -> None:
        await cluster.initialize()
        if keys:
            nodes = {node.name: node for node in map(cluster.get_node_from_key, keys)}
            await cluster.ping(target_nodes=list(nodes.values()))
        else:
            await cluster.ping(target_nodes=cluster.get_primaries())

    return cluster_ping


def _guard_cluster(owner: object) -> None:
    """On a Redis Cluster, in the API and in workers: ride out a node's restart."""
    cluster = _cluster_client(owner)
    if cluster is not None:
        _renew_closed_cluster_connections(cluster)
        _keep_startup_nodes(cluster)


def _renew_closed_cluster_connections(cluster: Any) -> None:
    """On a Redis Cluster: a node's connection the server closed is renewed before use.

    A node that restarted left each pooled connection to it closed, and
    redis-py's cluster client, on a command that failed on one, finds its
    nodes again over the same pooled connections, as closed: redis-py 6
    then failed every command until the process restarted, 8.2 the first
    one on each client (RedisClusterUnreachableError; 8.0 and 8.1 sent the
    command again itself). Before each command and pipeline, a node whose
    next connection (`_free[0]`, handed out first) its server closed has
    each closed one disconnected; redis-py connects it again when it is
    next used, so nothing goes out on a closed one. redis-py's cluster
    nodes have slots: the client's `execute_command` and `pipeline` are
    wrapped, not the nodes'.
    """
    manager = cluster.nodes_manager
    execute_command = cluster.execute_command
    pipeline = cluster.pipeline

    async def renew_closed() -> None:
        if cluster._initialize:
            # The nodes first, by one command at a time (redis-py's lock):
            # redis-py 8.1 asks a node about the command before it finds
            # them, so concurrent first commands of a client not yet
            # initialized (its cluster unreachable at startup, or after
            # `aclose`) had one's search disconnect the others' connections
            # ("'NoneType' object has no attribute 'writelines'").
            await cluster.initialize()
        # Taken first: a command that failed on a node has redis-py drop it
        # from these dicts (6) or move it last (8.2). Each node once: the
        # dicts mostly hold the same ones.
        nodes = {
            id(node): node
            for node in (*manager.startup_nodes.values(), *manager.nodes_cache.values())
        }
        for node in nodes.values():
            free = node._free
            if not free or not _closed(free[0]):
                continue
            for connection in tuple(free):
                if _closed(connection):
                    # Closed without waiting for the transport to finish
                    # (nowait): redis-py 6 and 8.2 then never suspend, so no
                    # command meets one half-closed, and none is out of
                    # `_free` meanwhile (taken out while they closed, a
                    # pool at its max_connections failed the concurrent
                    # kicks with MaxConnectionsError; a kick that went
                    # through these dicts meanwhile raised RuntimeError).
                    await connection.disconnect(nowait=True)

    async def execute_renewed(*args: Any, **kwargs: Any) -> Any:
        await renew_closed()
        return await execute_command(*args, **kwargs)

    def renewed_pipeline(*args: Any, **kwargs: Any) -> Any:
        # redis-py 8.2 sends a command with keys in several slots (EXISTS,
        # as the result backend sends it) as a pipeline.
        made = pipeline(*args, **kwargs)
        execute = made.execute

        async def execute_pipeline_renewed(*args: Any, **kwargs: Any) -> Any:
            try:
                await renew_closed()
            except BaseException:
                # Emptied, as redis-py's `execute` leaves a pipeline whatever
                # it raises: one that failed finding the nodes (the cluster
                # unreachable) kept its commands, and sent them again with
                # the next ones.
                await made.reset()
                raise
            return await execute(*args, **kwargs)

        made.execute = execute_pipeline_renewed
        return made

    cluster.execute_command = execute_renewed
    cluster.pipeline = renewed_pipeline


def _keep_startup_nodes(cluster: Any) -> None:
    """On a Redis Cluster with redis-py 6: its nodes are asked for again.

    redis-py 6 drops a node from the nodes it starts its search from
    (`startup_nodes`) when a command to it fails with a connection error;
    with every node dropped (one node restarting, or all of them), each
    search after fails for good ("Redis Cluster cannot be connected ...:
    None", with no cause), and a worker never got past the restart. Each
    search (`initialize`, which commands and our PINGs run first) starts
    again from the nodes the client was made with when none is left.
    redis-py 8 keeps them (it asks a failed node last).
    """
    manager = cluster.nodes_manager
    made_with = dict(manager.startup_nodes)
    initialize = cluster.initialize

    async def initialize_from_a_node(*args: Any, **kwargs: Any) -> Any:
        # Whatever redis-py passes on (8.1: which node failed last).
        if not manager.startup_nodes:
            manager.startup_nodes.update(made_with)
        return await initialize(*args, **kwargs)

    cluster.initialize = initialize_from_a_node


def _cluster_client(owner: object) -> Any:
    """The RedisCluster of taskiq-redis' cluster brokers and backends, or None."""
    try:
        from redis.asyncio import RedisCluster
    except ImportError:
        return None
    client = getattr(owner, "redis", None)
    return client if isinstance(client, RedisCluster) else None


def _guard_redis_pools(broker: AsyncBroker, retry_timeout: float | None) -> None:
    for owner in (broker, broker.result_backend):
        for pool in _redis_pools(owner):
            _guard_redis_pool(pool, _error_name(broker, owner), retry_timeout)


def _redis_pools(owner: object) -> list[Any]:
    """taskiq-redis keeps its pools as attributes of brokers and backends."""
    try:
        from redis.asyncio import ConnectionPool
    except ImportError:
        return []
    return [v for v in vars(owner).values() if isinstance(v, ConnectionPool)]


def _guard_sentinel_pools(owner: object, named: str, retry_timeout: float) -> None:
    """The same for each pool of taskiq-redis' sentinel brokers and backends.

    They ask their `sentinel` (a redis-py Sentinel) for a client of the
    master, with a pool of its own, for every command (`master_for`, in
    their `_acquire_master_conn`): no connection is kept from before a
    restart, but a kick while the master is down failed at once.
    """
    sentinel = _sentinel_of(owner)
    if sentinel is None:
        return
    master_for = sentinel.master_for

    def guarded_master_for(*args: Any, **kwargs: Any) -> Any:
        client = master_for(*args, **kwargs)
        _guard_redis_pool(client.connection_pool, named, retry_timeout)
        return client

    sentinel.master_for = guarded_master_for


def _sentinel_of(owner: object) -> Any:
    """The redis-py Sentinel of taskiq-redis' sentinel brokers and backends, or None."""
    try:
        from redis.asyncio import Sentinel
    except ImportError:
        return None
    sentinel = getattr(owner, "sentinel", None)
    return sentinel if isinstance(sentinel, Sentinel) else None


def _share_master_lookups(owner: object) -> None:
    """In the API, behind Sentinel: one lookup of the master at a time, run to its end.

    redis-py asks the sentinels in order, and puts the one that answered
    first only once a lookup completes (`discover_master`). Behind a
    sentinel that accepts connections and never answers, a lookup waits out
    the socket timeout (redis-py 8.0 and 8.1: and its retries, about 15 s
    with a 1 s timeout; 8.2 asks each sentinel once) before it asks the
    next one: a kick's bound
    (`broker_retry_timeout`) that cancelled it earlier left the frozen
    sentinel first for ever, and every kick failed. Cancelling a wait no
    longer cancels the lookup; the kicks meanwhile (a lookup each with
    taskiq-redis) wait for that one lookup instead of each asking the frozen
    sentinel again. (With redis-py 6 a lookup run to its end retries on the
    connection it had to the frozen sentinel, 6 to 15 s; one cancelled and
    asked again took a new connection and passed it sooner. Workers need
    none of this: nothing of theirs cancels a lookup that a command waits
    for, only their PINGs' own.)
    """
    sentinel = _sentinel_of(owner)
    if sentinel is None:
        return
    discover = sentinel.discover_master
    running = _lookups[sentinel] = {}

    async def discover_master(service_name: str) -> Any:
        lookup = running.get(service_name)
        if (
            lookup is None
            or lookup.done()
            or lookup.get_loop() is not asyncio.get_running_loop()
        ):
            lookup = asyncio.ensure_future(discover(service_name))
            lookup.add_done_callback(_retrieved)
            running[service_name] = lookup
        return await asyncio.shield(lookup)

    sentinel.discover_master = discover_master


async def stop_master_lookups(broker: AsyncBroker) -> None:
    """As the API shuts down: cancel the shared lookups no kick waits for now.

    A lookup behind a frozen sentinel outlives the kicks that gave up on it;
    left running, it outlived the app's lifespan too, and a loop closed
    without cancelling its tasks said "Task was destroyed but it is pending".
    """
    loop = asyncio.get_running_loop()
    sentinels = [_sentinel_of(owner) for owner in (broker, broker.result_backend)]
    pending = [
        lookup
        for sentinel in sentinels
        if sentinel in _lookups
        for lookup in _lookups[sentinel].values()
        if not lookup.done() and lookup.get_loop() is loop
    ]
    for lookup in pending:
        lookup.cancel()
    if pending:
        await asyncio.wait(pending, timeout=_LOOKUP_CANCEL_SECONDS)


# The lookups `_share_master_lookups` runs, by Sentinel and service name.
_lookups: weakref.WeakKeyDictionary[Any, dict[str, asyncio.Future[Any]]] = (
    weakref.WeakKeyDictionary()
)
# How long shutdown waits for a cancelled lookup: redis-py's connect steps
# may hold a cancellation back until they end.
_LOOKUP_CANCEL_SECONDS = 1.0


def _retrieved(lookup: asyncio.Future[Any]) -> None:
    """A lookup whose every waiter gave up: its error is not news."""
    if not lookup.cancelled():
        lookup.exception()


def _where(pool: Any) -> str:
    """host:port or socket path; never the URL, which may hold a password."""
    service = getattr(pool, "service_name", None)
    if service is not None:  # a Sentinel's pool: the master it asks them for
        return f"Sentinel master {service!r}"
    kwargs = pool.connection_kwargs
    if "path" in kwargs:
        return str(kwargs["path"])
    return f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"


def _guard_redis_pool(pool: Any, named: str, retry_timeout: float | None) -> None:
    """Check each connection the pool hands out; retry getting one if asked to.

    Without a retry timeout (a worker), only the stream's end-of-file flag is
    read: a worker's event loop runs between its commands, so the flag is
    set by the time a closed connection is handed out again, and a command
    that fails all the same is retried by the worker's outage layer. The
    API process also polls the socket, as a sync call in an async route can
    keep the loop from running since the server closed it.
    """
    get_connection = pool.get_connection
    if retry_timeout is None:

        async def reopened_connection(*args: Any, **kwargs: Any) -> Any:
            connection = await get_connection(*args, **kwargs)
            reader = getattr(connection, "_reader", None)
            if reader is not None and reader.at_eof():
                try:
                    await _reconnect(connection)
                except BaseException:
                    await pool.release(connection)
                    raise
            return connection

        pool.get_connection = reopened_connection
        return

    _bound_replies(pool, retry_timeout)

    async def live_connection(*args: Any, **kwargs: Any) -> Any:
        connection = await get_connection(*args, **kwargs)
        try:
            await _reconnect_if_closed(connection)
        except BaseException:
            await pool.release(connection)
            raise
        return connection

    def get_live_connection(*args: Any, **kwargs: Any) -> Awaitable[Any]:
        if _next_is_live(pool):
            # What nearly every kick meets: nothing for the server to answer
            # (redis-py hands out the idle connection checked here), so
            # nothing to bound or to retry, and redis-py's own coroutine is
            # returned (one frame fewer on every kick).
            return get_connection(*args, **kwargs)  # type: ignore[no-any-return]
        return get_connection_until_live(*args, **kwargs)

    async def get_connection_until_live(*args: Any, **kwargs: Any) -> Any:
        # One clock from the first attempt: an attempt that never returns (a
        # server that accepts and never answers) counts, as one that fails.
        started = time.monotonic()
        deadline = started + retry_timeout
        attempt = 0
        answered: Exception | None = None  # the last error the client raised
        while True:
            left = deadline - time.monotonic()
            try:
                return await _within(live_connection(*args, **kwargs), left)
            except asyncio.TimeoutError:
                # The last attempt starts at the deadline, with no time left:
                # what was said before is the cause, if anything was.
                exc: Exception = answered or TimeoutError(
                    f"no connection within {retry_timeout:g} s"
                )
            except Exception as error:
                if not is_connection_error(error):
                    raise
                exc = answered = error
            now = time.monotonic()
            if now >= deadline:
                # Its cause is in the message, described: printed whole under
                # a traceback, a redis-py error may hold the sentinels'
                # password (`describe`).
                raise BrokerUnreachableError(
                    f"{named} at {_where(pool)} unreachable for "
                    f"{now - started:.0f} s: {describe(exc)}"
                ) from None
            delay = backoff(attempt, FIRST_DELAY_SECONDS, MAX_DELAY_SECONDS)
            attempt += 1
            await asyncio.sleep(min(delay, deadline - now))

    pool.get_connection = get_live_connection


def _bound_replies(pool: Any, retry_timeout: float) -> None:
    """In the API, a reply that never comes fails the command after the bound.

    With no socket timeout (redis-py 6's default, or `socket_timeout=None`
    given), a command sent to a server that accepts connections and never
    answers (a frozen process, a long CLIENT PAUSE) waited for as long as
    the server did: under uvicorn, every request that kicked hung for the
    whole freeze, and uvicorn's shutdown waited for them, so the app's
    lifespan shutdown never ran. Such a command is then raised as one whose
    reply did not come (redis-py's TimeoutError), never sent again. Only
    where the client set no timeout: a timeout it set is kept.
    """
    kwargs = pool.connection_kwargs
    if "socket_timeout" in kwargs:
        given = kwargs["socket_timeout"]
    else:
        given = _default_socket_timeout(pool.connection_class)
    if given is not None:
        return
    kwargs["socket_timeout"] = retry_timeout
    if "orig_socket_timeout" in kwargs:
        # redis-py 8 puts it back after a maintenance notification's relaxed
        # timeout: this one, not none.
        kwargs["orig_socket_timeout"] = retry_timeout
    for connection in [
        *getattr(pool, "_available_connections", ()),
        *getattr(pool, "_in_use_connections", ()),
    ]:
        if getattr(connection, "socket_timeout", 0) is None:
            connection.socket_timeout = retry_timeout


def _default_socket_timeout(connection_class: type) -> Any:
    """The socket timeout redis-py's connections get by default (6: none, 8: 5 s)."""
    for cls in connection_class.__mro__:
        init = vars(cls).get("__init__")
        if init is None:
            continue
        parameter = inspect.signature(init).parameters.get("socket_timeout")
        if parameter is not None and parameter.default is not inspect.Parameter.empty:
            return parameter.default
    return None


if sys.version_info >= (3, 11):

    async def _within(work: Awaitable[Any], seconds: float) -> Any:
        """`work`, cancelled after `seconds` (asyncio.TimeoutError then)."""
        async with asyncio.timeout(max(seconds, 0.001)):  # no task per call
            return await work

else:  # pragma: no cover - Python 3.10

    async def _within(work: Awaitable[Any], seconds: float) -> Any:
        """`work`, cancelled after `seconds` (asyncio.TimeoutError then)."""
        return await asyncio.wait_for(work, max(seconds, 0.001))


def _next_is_live(pool: Any) -> bool:
    """The connection redis-py's pool hands out next is idle and open.

    Its `get_connection` pops the last of `_available_connections` before it
    awaits anything; an open connection with nothing to read is handed out
    with no command sent.

    The socket is asked every time, however recently the connection was
    last handed out: the stream's end-of-file flag is set only once the
    event loop has run since the server closed it, and a close in the
    instant after a kick (a sync call in the route holding the loop, or one
    long loop iteration in a busy API, where the pool hands out the same
    connection again within milliseconds) left the next kick on a closed
    connection, failed though nothing was sent.
    """
    idle = getattr(pool, "_available_connections", None)
    if not idle:
        return False
    connection = idle[-1]
    return bool(getattr(connection, "is_connected", False)) and not _closed(connection)


def _closed(connection: Any) -> bool:
    """The server closed this connection (or it has something unread)."""
    reader = getattr(connection, "_reader", None)
    if reader is None:
        return False
    return bool(reader.at_eof()) or _readable(getattr(connection, "_writer", None))


async def _reconnect_if_closed(connection: Any) -> None:
    """A connection the server closed is made anew before a command goes out.

    What redis-py's pool does itself unless maintenance notifications are on.
    Reads the end-of-file flag of the connection's asyncio stream (redis-py
    keeps it as `_reader`, `_writer`), and, as that flag is only set once
    the event loop has run since the server closed it, asks the socket
    itself whether it has anything to read (an idle connection never has
    but the server's close): no await, a live connection costs one poll.
    """
    if not _closed(connection):
        return
    await _reconnect(connection)


async def _reconnect(connection: Any) -> None:
    logger.debug("Pooled Redis connection found closed by the server; reconnecting.")
    await connection.disconnect()
    await connection.connect()


def _readable(writer: Any) -> bool:
    sock = None if writer is None else writer.get_extra_info("socket")
    if sock is None:
        return False
    try:
        return _ready_to_read(sock.fileno())
    except (OSError, ValueError):  # closed meanwhile
        return True


def _poll_ready(fd: int) -> bool:
    # A poll object made for the one socket: about half of what a `select`
    # costs, on every kick, and any descriptor number (select refuses those
    # past 1024, which an API with many sockets open reaches: each kick then
    # took its connection for closed and connected again). An error or a
    # hang-up is an event whatever the mask.
    poll = select.poll()
    poll.register(fd, select.POLLIN)
    return bool(poll.poll(0))


def _select_ready(fd: int) -> bool:
    readable, _, _ = select.select([fd], [], [], 0)
    return bool(readable)


# Windows has no poll.
_ready_to_read = _poll_ready if hasattr(select, "poll") else _select_ready


def _is_jetstream(broker: AsyncBroker) -> bool:
    try:
        from taskiq_nats.broker import BaseJetStreamBroker
    except ImportError:
        return False
    return isinstance(broker, BaseJetStreamBroker)


def _is_core_nats(broker: AsyncBroker) -> bool:
    """taskiq-nats' NatsBroker (core NATS): its startup connects as well."""
    try:
        from taskiq_nats.broker import NatsBroker
    except ImportError:
        return False
    return isinstance(broker, NatsBroker)


def _bound_nats_connects(broker: Any, retry_timeout: float) -> None:
    """The app's startup waits for its NATS server at most `retry_timeout`.

    nats-py tries connecting 60 times, 2 s apart, inside `connect`: an API
    started while NATS was down logged every attempt and failed two minutes
    later with nats-py's NoServersError under a traceback of its own. The
    broker's client connects in the broker's startup, and taskiq-nats'
    object-store result backend in its own.

    The bound is for a server that cannot be reached, not for one that
    answers: it is at least one attempt (nats-py's `connect_timeout`), and
    a startup whose client has connected is not cut (`broker_retry_timeout=0`
    cut every startup, a live server's too, as nothing connects in no time).
    """
    client = broker.client
    connect: Callable[..., Awaitable[None]] = client.connect

    async def connect_within(*args: Any, **kwargs: Any) -> None:
        named = _error_name(broker, broker)
        bound = max(retry_timeout, kwargs.get("connect_timeout", NATS_CONNECT_SECONDS))
        await _connecting_within(connect(*args, **kwargs), named, bound, client, client)

    client.connect = connect_within
    backend = broker.result_backend
    if _is_nats_object_store(backend):
        start: Callable[[], Awaitable[None]] = backend.startup
        options = getattr(backend, "connect_options", {})
        bound = max(retry_timeout, options.get("connect_timeout", NATS_CONNECT_SECONDS))

        async def start_within() -> None:
            named = _error_name(broker, backend)
            connected = _BackendClient(backend)
            await _connecting_within(start(), named, bound, None, connected)

        backend.startup = start_within


# nats-py's default `connect_timeout`: how long one connection attempt takes
# at most.
NATS_CONNECT_SECONDS = 2.0


class _BackendClient:
    """The NATS client of taskiq-nats' result backend, once it connected."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend

    @property
    def is_connected(self) -> bool:
        client = getattr(self.backend, "nats_client", None)
        return bool(client is not None and client.is_connected)


async def _connecting_within(
    connecting: Awaitable[None],
    named: str,
    retry_timeout: float,
    client: Any,
    connected: Any,
) -> None:
    """Await `connecting`; cut at `retry_timeout`, BrokerUnreachableError.

    Not cut once `connected.is_connected`: the rest is not waiting for the
    server. Its message names `client`'s last error, where there is a
    client to ask.
    """
    attempt = asyncio.ensure_future(connecting)
    started = time.monotonic()
    try:
        await asyncio.wait({attempt}, timeout=retry_timeout)
        if not attempt.done() and connected.is_connected:
            await asyncio.wait({attempt})
    finally:
        cut = not attempt.done()
        if cut:  # at the bound, or the startup was cancelled
            await cancel_until_done(attempt)
    if not cut:
        return attempt.result()
    cause = None if client is None else client.last_error
    why = "nats-py was still connecting" if cause is None else describe(cause)
    raise BrokerUnreachableError(
        f"{named} unreachable for {time.monotonic() - started:.0f} s: {why}"
    )


def _guard_nats_kick(broker: Any, retry_timeout: float) -> None:
    """A kick waits for a connection; one no stream took is published again.

    A publish made while nats-py reconnects goes to its reconnect buffer:
    the kick failed after nats-py's 5 s acknowledgement timeout, whatever
    the bound, and the message was published all the same once the server
    was back, so a caller that kicked again ran the task twice. Nothing is
    sent before nats-py is connected. "No stream" means nothing stored the
    message, so sending it again cannot duplicate it.
    """
    kick: Callable[[BrokerMessage], Awaitable[None]] = broker.kick
    from nats.js.errors import NoStreamResponseError

    async def kick_recreating_stream(message: BrokerMessage) -> None:
        if not broker.client.is_connected:
            await _nats_connected(
                broker.client, _error_name(broker, broker), retry_timeout
            )
        try:
            await kick(message)
        except NoStreamResponseError:
            what = await _once(broker, _recreate_nats_stream, broker)
            if what is not None:
                logger.warning("Broker %s: %s.", type(broker).__name__, what)
            await kick(message)  # recreated here or by another process

    broker.kick = kick_recreating_stream


def _guard_nats_results(broker: Any, retry_timeout: float) -> None:
    """A result read waits for its client's connection, as a kick does.

    Made while nats-py reconnects, it failed after nats-py's 5 s timeout,
    whatever the bound, with nats' TimeoutError.
    """
    backend = broker.result_backend
    if not _is_nats_object_store(backend):
        return
    for name in ("is_result_ready", "get_result"):
        read: Callable[..., Awaitable[Any]] = getattr(backend, name)

        async def read_when_connected(
            *args: Any, read: Callable[..., Awaitable[Any]] = read, **kwargs: Any
        ) -> Any:
            if not backend.nats_client.is_connected:
                await _nats_connected(
                    backend.nats_client, _error_name(broker, backend), retry_timeout
                )
            return await read(*args, **kwargs)

        setattr(backend, name, read_when_connected)


async def _nats_connected(client: Any, named: str, retry_timeout: float) -> None:
    """Wait until nats-py is connected again; past `retry_timeout`, raise.

    nats-py reconnects by itself: nothing to do but wait. A client that
    closed (out of reconnect attempts) never connects again.
    """
    started = time.monotonic()
    while not client.is_connected:
        waited = time.monotonic() - started
        if client.is_closed or waited >= retry_timeout:
            cause = client.last_error
            why = describe(cause) if cause is not None else "not connected"
            closed = " (nats-py gave up reconnecting)" if client.is_closed else ""
            raise BrokerUnreachableError(
                f"{named} unreachable for {waited:.0f} s{closed}: {why}"
            )
        await asyncio.sleep(min(FIRST_DELAY_SECONDS, retry_timeout - waited))


class _Recreating:
    """One recreation at a time, per broker and event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.lock = asyncio.Lock()
        self.finished = 0  # recreations (or checks that found it all there)


# Per broker, per what is recreated (its function's name).
_recreating: weakref.WeakKeyDictionary[Any, dict[str, _Recreating]] = (
    weakref.WeakKeyDictionary()
)


async def _once(
    broker: Any, recreate: Callable[..., Awaitable[str | None]], *args: Any
) -> str | None:
    """`recreate(*args)`, unless one that finished while this one waited did it.

    Concurrent kicks (or result saves) that all meet the same loss then make
    one recreation and log one WARNING, not one each: those that waited behind
    it return None ("nothing was missing") and try again. A lock per event
    loop, as an asyncio.Lock may only be waited for in the loop it was first
    waited for in, and an app (its tests) can run its broker in several.
    """
    loop = asyncio.get_running_loop()
    states = _recreating.setdefault(broker, {})
    state = states.get(recreate.__name__)
    if state is None or state.loop is not loop:
        state = states[recreate.__name__] = _Recreating(loop)
    seen = state.finished
    async with state.lock:
        if state.finished != seen:
            return None
        what = await recreate(*args)
        state.finished += 1
        return what


async def _recreate_nats_stream(broker: Any) -> str | None:
    """Create the broker's stream if the server has none; say what was done."""
    from nats.js.errors import NotFoundError

    name = broker.stream_config.name or broker.stream_name
    try:
        await broker.js.stream_info(name)
    except NotFoundError:
        await broker.js.add_stream(config=broker.stream_config)
        return (
            f"recreated JetStream stream {name!r}, which the server no longer "
            "had (it restarted without its store)"
        )
    return None


async def _recreate_nats_consumer(broker: Any) -> str | None:
    from nats.js.errors import NotFoundError

    stream = await _recreate_nats_stream(broker)
    name = broker.stream_config.name or broker.stream_name
    try:
        await broker.js.consumer_info(name, broker.durable)
    except NotFoundError:
        await broker.js.add_consumer(stream=name, config=broker.consumer_config)
        consumer = f"durable consumer {broker.durable!r}"
        what = f"JetStream stream {name!r} and {consumer}" if stream else consumer
        return (
            f"recreated {what}, which the server no longer had "
            "(it restarted without its store)"
        )
    return stream


class LostState:
    """A worker's broker and result backend, made again when the server lost them.

    `remember` runs once the broker has started; `recover` is asked about each
    error a fetch, an acknowledgement or a result save raised that is not an
    outage. It logs one WARNING naming what it recreated and why, and says
    whether to try again; a concurrent task or process may have recreated
    it first, which is logged at DEBUG.
    """

    def __init__(self, broker: AsyncBroker, name: str) -> None:
        self.broker = broker
        self.name = name
        # Per stream, the run_id of the server that holds it (on a cluster,
        # each stream's node).
        self.run_ids: dict[str, str | None] = {}
        # Per stream, the newest message id this process knows was delivered:
        # its group's last delivered one at startup and when a fetch
        # reconnected, and each it fetched.
        self.fetched: dict[str, tuple[int, int]] = {}
        # A connection of the broker's connected again since the server was
        # last learnt: it may be another server (`reconnected`).
        self.unsure = False
        self.connected: weakref.WeakSet[Any] = weakref.WeakSet()  # once, at least
        if _is_redis_stream(broker):
            self._track_fetched_ids()
            self._declare_groups_skipping_nothing_new()
            self._note_connects()

    async def remember(self) -> None:
        """Which server the broker talks to, and how far its group had delivered.

        Redis stream brokers only. The group's last delivered id is where a
        group that vanishes before this process fetches anything is made
        again: a process started since (another worker's, or one taskiq
        started again) made it again at the stream's beginning, and every
        task the stream kept ran again.
        """
        if _is_redis_stream(self.broker):
            self.run_ids = await self._redis_run_ids()
            delivered, _ = await self._delivered()
            for stream, number in delivered.items():
                self._note_fetched(stream, number)

    async def reconnected(self) -> None:
        """After a fetch's connection error: learn the server, where it has the group.

        A server that restarted empty, whose group another worker made again
        first, is never met missing by this process: it kept the old
        server's run_id and a position the new stream does not hold, and a
        group destroyed later was made again at `0`, as after a restart,
        running again what the other workers had run. A group missing here
        is made again here, as a fetch meeting NOGROUP would, and then
        learnt: left to the next fetch, another worker could make it in
        between (two workers reconnecting together), and this process kept
        the old server's run_id all the same.
        """
        if not _is_redis_stream(self.broker):
            return
        self.unsure = False
        delivered, missing = await self._delivered()
        if missing:
            self._report(await self._recreate_redis_group())
            delivered, _ = await self._delivered()
        if not delivered:
            return
        run_ids = await self._redis_run_ids()
        for stream, number in delivered.items():
            if run_ids[stream] != self.run_ids.get(stream):
                self.fetched.pop(stream, None)  # the old server's position
                self.run_ids[stream] = run_ids[stream]
            self._note_fetched(stream, number)

    async def recover(self, exc: BaseException, fetching: bool = False) -> bool:
        """Recreate what `exc` says the server lost; whether to try again.

        `fetching`: `exc` came out of the broker's fetch (not an ack or a
        result save, whose own locks are none of taskiq-redis' autoclaim).
        """
        what: str | None = None
        if fetching and _is_redis_stream(self.broker) and _lost_lock(exc):
            # The fetch's own error (NOGROUP, or the old server's connection
            # closing) comes again from the next fetch, and is handled there.
            logger.debug("Broker %s: %s; fetching again.", self.name, describe(exc))
            return True
        if _is_redis_stream(self.broker) and _no_group(exc):
            what = await self._recreate_redis_group()
        elif _is_jetstream(self.broker):
            from nats.js.errors import (
                NoStreamResponseError,
                NotFoundError,
                ServiceUnavailableError,
            )

            if isinstance(exc, ServiceUnavailableError):  # fetching
                what = await _once(self.broker, _recreate_nats_consumer, self.broker)
            elif isinstance(exc, (NotFoundError, NoStreamResponseError)):  # saving
                what = await _once(self.broker, self._recreate_nats_bucket)
            else:
                return False
            if what is None:  # all there: recreated by someone else meanwhile
                logger.debug("Broker %s: %s; trying again.", self.name, describe(exc))
                await asyncio.sleep(NOTHING_MISSING_PAUSE_SECONDS)  # never a busy loop
                return True
        else:
            return False
        self._report(what)
        return True

    def _report(self, what: str) -> None:
        """One WARNING for what this process recreated; DEBUG for another's."""
        if what.startswith("recreated"):
            logger.warning("Broker %s: %s.", self.name, what)
        else:
            logger.debug("Broker %s: %s.", self.name, what)

    def _track_fetched_ids(self) -> None:
        """taskiq-redis makes each message's ack with its id and stream."""
        broker: Any = self.broker
        make_ack = broker._ack_generator
        note = self._note_fetched

        def ack_generator(id: Any, queue_name: Any) -> Any:
            note(_text(queue_name), _stream_id(id))
            return make_ack(id=id, queue_name=queue_name)

        broker._ack_generator = ack_generator

    def _note_connects(self) -> None:
        """Each connection of the broker's pool tells when it connects again.

        A fetch that lost its connection is not the only sign of a restart:
        a process whose every task slot was busy had no fetch under way, its
        next fetch went out on a connection its pool made again, and met
        the group another worker had made again. It kept the old server's
        run_id, and a group destroyed later was made again at `0`: the
        tasks the other worker had run ran again (10 of 10). A connection's
        first connect says nothing (the pool grows with the tasks in
        flight). The clients of Sentinel and Redis Cluster brokers are not
        watched.
        """
        for pool in _redis_pools(self.broker):
            self._note_pool(pool)

    def _note_pool(self, pool: Any) -> None:
        """A function per pool: each wrapper keeps its own pool's maker."""
        make = pool.make_connection

        def make_connection() -> Any:
            connection = make()
            connection.register_connect_callback(self._connected)
            return connection

        pool.make_connection = make_connection

    def _connected(self, connection: Any) -> None:
        if connection in self.connected:
            self.unsure = True  # again: the server closed it, or went
        else:
            self.connected.add(connection)

    def _declare_groups_skipping_nothing_new(self) -> None:
        """A group the startup makes starts at `0` where every entry is newer.

        taskiq-redis makes a missing group at the broker's `consumer_id`,
        `$`: past what the stream holds. A worker that began before its
        server started (docker-compose starts both; the worker retries
        connecting with a backoff up to 30 s) skipped every task the API
        kicked in between. When the server started after this process
        began, and every entry of the stream was added since the server
        started (so none is history from before, kept by persistence), no
        worker of this group can have read them: the group starts at `0`.
        Not on a Redis Cluster (its nodes' uptimes are not asked).
        """
        broker: Any = self.broker
        declare: Callable[[], Awaitable[None]] = broker._declare_consumer_group
        began = time.monotonic()

        async def declare_consumer_group() -> None:
            if broker.consumer_id == "$" and _cluster_client(broker) is None:
                waited = time.monotonic() - began
                try:
                    async with _redis(broker) as redis:
                        for stream in self._streams():
                            await self._group_at_0_if_all_new(redis, stream, waited)
                except Exception as exc:
                    if is_connection_error(exc):
                        raise
                    # INFO or TIME refused (a managed server): as taskiq-redis.
                    logger.debug("Consumer group at $: %s", describe(exc))
            await declare()  # BUSYGROUP, where made above

        broker._declare_consumer_group = declare_consumer_group

    async def _group_at_0_if_all_new(
        self, redis: Any, stream: str, waited: float
    ) -> None:
        from redis.exceptions import ResponseError

        # INFO's uptime is a difference of whole seconds of the server's
        # clock: it is off by up to a second either way.
        uptime = int((await redis.info("server"))["uptime_in_seconds"])
        if uptime - 1 >= waited:
            return  # the server was up before this process began
        oldest = await redis.xrange(stream, count=1)
        if not oldest:
            return  # nothing to skip (or no stream yet)
        seconds, micros = await redis.time()
        started_ms = (int(seconds) - uptime - 1) * 1000 + int(micros) // 1000
        if _stream_id(oldest[0][0])[0] < started_ms:
            return  # kept from before the server started
        broker: Any = self.broker
        group = broker.consumer_group_name
        try:
            await redis.xgroup_create(stream, group, id="0")
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
            return  # there already
        logger.warning(
            "Broker %s: made consumer group %r on %r at 0: the server started "
            "after this worker, and every entry of the stream was added since "
            "(taskiq-redis would make it at $, past them).",
            self.name,
            group,
            stream,
        )

    def _note_fetched(self, stream: str, number: tuple[int, int]) -> None:
        if number > self.fetched.get(stream, (0, 0)):
            self.fetched[stream] = number

    async def _delivered(self) -> tuple[dict[str, tuple[int, int]], list[str]]:
        """Per stream, its group's last delivered id; and streams without the group.

        From XINFO GROUPS; a stream that no longer exists has no group. Both
        empty where the server refuses XINFO (a managed server may).
        """
        from redis.exceptions import ResponseError

        broker: Any = self.broker
        group = broker.consumer_group_name
        delivered: dict[str, tuple[int, int]] = {}
        missing: list[str] = []
        try:
            async with _redis(broker) as redis:
                for stream in self._streams():
                    try:
                        groups = await redis.xinfo_groups(stream)
                    except ResponseError as exc:
                        if "no such key" not in str(exc):
                            raise
                        groups = []
                    for info in groups:
                        if _text(info["name"]) == group:
                            delivered[stream] = _stream_id(info["last-delivered-id"])
                            break
                    else:
                        missing.append(stream)
        except Exception as exc:
            if is_connection_error(exc):
                raise
            logger.debug("No XINFO GROUPS from the Redis server (%s).", describe(exc))
            return {}, []
        return delivered, missing

    def _streams(self) -> list[str]:
        broker: Any = self.broker
        return [broker.queue_name, *broker.additional_streams]

    async def _redis_run_ids(self) -> dict[str, str | None]:
        """Per stream, INFO's run_id of the server (the cluster node) holding it."""
        streams = self._streams()
        try:
            async with _redis(self.broker) as redis:
                return {stream: await _run_id(redis, stream) for stream in streams}
        except Exception as exc:
            if is_connection_error(exc):
                raise
            logger.debug("No INFO from the Redis server (%s).", describe(exc))
            return dict.fromkeys(streams)

    async def _recreate_redis_group(self) -> str:
        """The consumer group again, where nothing added since it vanished is skipped.

        A server with another run_id restarted: every entry of its streams was
        added since, so the group starts at the beginning. Unless the stream
        still holds the newest message this process knew delivered: then
        the restart came before that message, and the run_id remembered was
        older than it (another worker made the group again after the
        restart, so this process never met it missing). Same server (the
        group was destroyed, or the key deleted): the group starts after
        that message, else at the beginning.
        """
        broker: Any = self.broker
        run_ids = await self._redis_run_ids()
        created = []
        async with _redis(broker) as redis:
            restarted = {
                stream
                for stream, run_id in run_ids.items()
                if self.run_ids.get(stream) not in (None, run_id)
                and not await self._holds_fetched(redis, stream)
            }
            self.run_ids = run_ids
            for stream in restarted:
                self.fetched.pop(stream, None)  # the old server's position
            for stream in run_ids:
                start = "0" if stream in restarted else self._after_fetched(stream)
                try:
                    await redis.xgroup_create(
                        stream, broker.consumer_group_name, id=start, mkstream=True
                    )
                except Exception as exc:
                    if "BUSYGROUP" not in str(exc):
                        raise
                    continue  # another worker made it first
                created.append(f"{stream!r} at {start}")
        why = (
            "the Redis server restarted without its data"
            if restarted
            else "the server no longer had it"
        )
        group = broker.consumer_group_name
        if not created:
            return f"consumer group {group!r} was recreated by another worker: {why}"
        return f"recreated consumer group {group!r} on {', '.join(created)}: {why}"

    async def _holds_fetched(self, redis: Any, stream: str) -> bool:
        """Whether `stream` still holds the newest message this process knew."""
        if stream not in self.fetched:
            return False
        newest = self._after_fetched(stream)
        return bool(await redis.xrange(stream, min=newest, max=newest, count=1))

    def _after_fetched(self, stream: str) -> str:
        if stream not in self.fetched:
            return "0"
        ms, seq = self.fetched[stream]
        return f"{ms}-{seq}"

    async def _recreate_nats_bucket(self) -> str | None:
        from nats.js.errors import BucketNotFoundError

        backend: Any = self.broker.result_backend
        bucket = getattr(backend, "bucket_name", None)
        if bucket is None:
            return None
        try:
            await backend.nats_jetstream.object_store(bucket)
        except BucketNotFoundError:
            await backend.nats_jetstream.create_object_store(bucket)
            return (
                f"recreated result bucket {bucket!r}, which the server no "
                "longer had (it restarted without its store)"
            )
        return None


def _is_redis_stream(broker: AsyncBroker) -> bool:
    """taskiq-redis' stream brokers: on one server, behind Sentinel, on a cluster.

    They share their consumer group's handling: created once at startup
    (`_declare_consumer_group`), each message's ack made by `_ack_generator`
    with its id and stream.
    """
    try:
        from taskiq_redis import (
            RedisStreamBroker,
            RedisStreamClusterBroker,
            RedisStreamSentinelBroker,
        )
    except ImportError:
        return False
    return isinstance(
        broker, (RedisStreamBroker, RedisStreamSentinelBroker, RedisStreamClusterBroker)
    )


@asynccontextmanager
async def _redis(broker: Any) -> AsyncIterator[Any]:
    """A client of the broker's server, as taskiq-redis makes its own.

    A client of the master's for a sentinel broker (`_acquire_master_conn`);
    the broker's own RedisCluster for a cluster one (`redis`), left open: it
    is the broker's; else one on the broker's pool (`connection_pool`).
    """
    from redis.asyncio import Redis

    acquire = getattr(broker, "_acquire_master_conn", None)
    cluster = _cluster_client(broker)
    if acquire is not None:
        async with acquire() as redis:
            yield redis
    elif cluster is not None:
        yield cluster
    else:
        async with Redis(connection_pool=broker.connection_pool) as redis:
            yield redis


async def _run_id(redis: Any, key: str) -> str | None:
    """INFO's run_id of the server holding `key`: on a cluster, its node's."""
    from redis.asyncio import RedisCluster

    if isinstance(redis, RedisCluster):
        node = redis.get_node_from_key(key)
        info = await redis.info("server", target_nodes=node)
    else:
        info = await redis.info("server")
    run_id = info.get("run_id")
    return None if run_id is None else str(run_id)


def _no_group(exc: BaseException) -> bool:
    """Redis's NOGROUP, alone or as a pipeline's (XAUTOCLAIM) error."""
    from redis.exceptions import ResponseError

    return isinstance(exc, ResponseError) and "NOGROUP" in str(exc)


def _lost_lock(exc: BaseException) -> bool:
    """A Redis lock the server no longer had, as its release found.

    In a stream broker's fetch, only taskiq-redis' autoclaim lock: the server
    restarted without its data while the fetch held it.
    """
    from redis.exceptions import LockNotOwnedError

    return isinstance(exc, LockNotOwnedError)


def _text(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def _stream_id(raw: Any) -> tuple[int, int]:
    ms, _, seq = _text(raw).partition("-")
    return int(ms), int(seq or 0)


# TaskStatus's records (task_status/), kept where each backend allows:
# tests/test_task_status.py and tests/test_task_status_worker.py pin these.


class ProgressSlots:
    """Records kept through the result backend's public progress storage.

    It never deletes what it reads (unlike `get_result` with
    keep_results=False in taskiq-redis and taskiq-nats), and taskiq-redis
    gives each entry the result's expiry.
    """

    def __init__(self, backend: AsyncResultBackend[Any]) -> None:
        self.backend = backend

    async def put(self, key: str, record: dict[str, Any], first: bool = False) -> None:
        """Write it; `first`: only if the key has none yet.

        A kick's write is first, and never goes over a worker's: a retried
        task is kicked again under its id. The progress API has no "if
        absent": a read first, which can race a worker's write by a moment.
        """
        if first and await self.get(key) is not None:
            return
        progress = TaskProgress[Any](state=str(record.get("state")), meta=record)
        await self.backend.set_progress(key, progress)

    async def get(self, key: str) -> dict[str, Any] | None:
        progress = await self.backend.get_progress(key)
        if progress is None or not isinstance(progress.meta, dict):
            return None
        return progress.meta

    async def delete(self, key: str) -> None:
        """Left to the backend's own expiry: the API has no delete."""


class NatsKeyValues:
    """Records in a JetStream key-value bucket next to taskiq-nats' results.

    taskiq-nats 0.6 stores no progress (its backend keeps the base class's
    no-op `set_progress`), and its object store (`backend.object_store`)
    has no expiry, and a read racing a rewrite of the same object can wait
    forever for chunks the rewrite purged. A key-value bucket has neither
    problem: each value is one message, and the bucket's `ttl` is
    TaskStatus' `keep_for`. It uses the backend's JetStream context
    (`backend.nats_jetstream`, made by its startup).
    """

    def __init__(self, backend: AsyncResultBackend[Any], ttl: float) -> None:
        self.backend = backend
        self.ttl = ttl
        self.bucket: Any = None
        # The bucket a write last went to: a loss is said when it is lost.
        self.written: Any = None
        self.name = f"{backend.bucket_name}-taskiq-fastapi"  # type: ignore[attr-defined]

    async def _bucket(self) -> Any:
        if self.bucket is None:
            from nats.js.errors import BucketNotFoundError

            jetstream = self.backend.nats_jetstream  # type: ignore[attr-defined]
            try:
                self.bucket = await jetstream.key_value(self.name)
            except BucketNotFoundError:
                self.bucket = await jetstream.create_key_value(
                    bucket=self.name, ttl=self.ttl
                )
        return self.bucket

    async def put(self, key: str, record: dict[str, Any], first: bool = False) -> None:
        from nats.js.errors import (
            KeyWrongLastSequenceError,
            NoStreamResponseError,
            NotFoundError,
        )

        value = json.dumps(record).encode()
        for attempt in range(2):
            bucket = await self._bucket()
            try:
                if not first:
                    await bucket.put(key, value)
                else:
                    with contextlib.suppress(KeyWrongLastSequenceError):  # a worker's
                        await bucket.create(key, value)
                self.written = bucket
                return
            except (NoStreamResponseError, NotFoundError):
                if attempt:
                    raise
                # The server lost the bucket (restarted without its store):
                # make it again, as LostState does taskiq-nats' own. Said
                # once per loss: concurrent writes that met it too find the
                # bucket already dropped, or made again and not yet written
                # to (one the server just made can fail a write or two more).
                if self.bucket is bucket:
                    if self.written is bucket:
                        logger.warning(
                            "Recreated JetStream key-value bucket %r: the "
                            "server lost it.",
                            self.name,
                        )
                    self.bucket = None

    async def get(self, key: str) -> dict[str, Any] | None:
        """The key's record; None where there is none.

        Also for a key the bucket refuses (a space, `*`, `>`, a leading
        dot...: nats-py's InvalidKeyError): none can be there, and the key
        comes from a task id in a request's path.
        """
        from nats.js.errors import InvalidKeyError, KeyNotFoundError

        try:
            entry = await (await self._bucket()).get(key)
        except (KeyNotFoundError, InvalidKeyError):  # KeyDeletedError included
            return None
        return json.loads(entry.value)  # type: ignore[no-any-return]

    async def delete(self, key: str) -> None:
        from nats.js.errors import InvalidKeyError

        with contextlib.suppress(InvalidKeyError):  # none can be there: see get
            await (await self._bucket()).delete(key)


class RedisRecords:
    """Records as keys of taskiq-redis' `RedisAsyncResultBackend`'s server.

    Through its connection pool (`backend.redis_pool`) with one client for
    the process, as JSON, expiring with the backend's results
    (`result_ex_time` / `result_px_time`) or, where it sets none, after
    `keep_for`: half the cost of its `set_progress`, which makes a client
    and pickles a model per call, so that recording a kick stays cheap. A
    kick's write is `SET NX`, so it can never overwrite a worker's.
    """

    def __init__(self, backend: AsyncResultBackend[Any], keep_for: float) -> None:
        from redis.asyncio import Redis

        self.pool = backend.redis_pool  # type: ignore[attr-defined]
        self.client = Redis(connection_pool=self.pool)
        self.prefix = backend.prefix_str  # type: ignore[attr-defined]
        self.ex: int | None = backend.result_ex_time  # type: ignore[attr-defined]
        self.px: int | None = backend.result_px_time  # type: ignore[attr-defined]
        if not (self.ex or self.px):
            self.ex = max(1, int(keep_for))

    def _key(self, key: str) -> str:
        return key if self.prefix is None else f"{self.prefix}:{key}"

    async def put(self, key: str, record: dict[str, Any], first: bool = False) -> None:
        value = json.dumps(record)
        await self.client.set(self._key(key), value, ex=self.ex, px=self.px, nx=first)

    async def get(self, key: str) -> dict[str, Any] | None:
        found = await self.client.get(self._key(key))
        return None if found is None else json.loads(found)

    async def delete(self, key: str) -> None:
        await self.client.delete(self._key(key))

    def send_with_kicks(
        self, broker: AsyncBroker
    ) -> Callable[[str, str, dict[str, Any]], bool]:
        """Send each kick's first write in the kick's own command, if it can.

        For taskiq-redis' ListQueueBroker and RedisStreamBroker on the
        records' server, whose `kick` sends the message to its `queue_name`
        label or its queue (`broker.queue_name`, through
        `broker.connection_pool`) with one command (`_push_command` says
        which): the broker's kick is replaced by one that runs a script doing
        the SET NX and that command, one round trip (a pipeline of two costs
        nearly as much as two). Returns what stashes a record for its task's
        kick; it returns False where kicks cannot carry it (write it yourself
        then).
        """
        from redis.asyncio import Redis
        from redis.exceptions import NoPermissionError
        from taskiq_redis.redis_broker import BaseRedisBroker

        push = _push_command(broker)
        if (
            push is None
            or not isinstance(broker, BaseRedisBroker)
            or _server(broker.connection_pool) != _server(self.pool)
        ):
            return lambda _task_id, _key, _record: False
        stashed: dict[str, tuple[str, str]] = {}
        kick = broker.kick
        script = Redis(connection_pool=broker.connection_pool).register_script(
            _SET_AND_PUSH
        )
        expiry = ["EX", self.ex] if self.ex else ["PX", self.px]

        refused = False

        async def kick_with_record(message: BrokerMessage) -> None:
            nonlocal refused
            record = stashed.pop(message.task_id, None)
            if record is None:
                await kick(message)
                return
            queue = message.labels.get("queue_name") or broker.queue_name
            key, value = record
            if not refused:
                try:
                    await script(
                        keys=[key, queue],
                        args=[value, *expiry, *push(message.message)],
                    )
                    return
                except NoPermissionError as exc:
                    # A user without scripting (Redis ACL): the script never
                    # ran, so nothing was sent. Kick and write apart from now.
                    refused = True
                    logger.warning(
                        "TaskStatus writes each kick's record apart from the "
                        "kick: the Redis user may not run scripts (%s).",
                        describe(exc),
                    )
            await kick(message)
            try:
                await self.client.set(key, value, ex=self.ex, px=self.px, nx=True)
            except Exception as exc:  # the task was sent: a record fails no kick
                logger.warning(
                    "Task %s: its queued state was not recorded: %s",
                    message.task_id,
                    describe(exc),
                )

        def stash(task_id: str, key: str, record: dict[str, Any]) -> bool:
            # Kicks that fail before sending leave theirs here: keep it bounded.
            if len(stashed) >= _MAX_STASHED:
                del stashed[next(iter(stashed))]
            stashed[task_id] = (self._key(key), json.dumps(record))
            return True

        broker.kick = kick_with_record  # type: ignore[method-assign]
        return stash


# Records of kicks being made, waiting for their kick (more would be kicks
# that failed before they were sent).
_MAX_STASHED = 10_000
# A kick's record (unless a worker's is there) and its message, at once:
# ARGV is the record, its expiry (EX or PX, and the time), then the command
# sending the message to KEYS[2] and that command's arguments.
_SET_AND_PUSH = """
redis.call('SET', KEYS[1], ARGV[1], ARGV[2], ARGV[3], 'NX')
return redis.call(ARGV[4], KEYS[2], unpack(ARGV, 5))
"""


def _push_command(broker: AsyncBroker) -> Callable[[bytes], list[Any]] | None:
    """The command, after its key, of the broker's kick, for a message.

    What taskiq-redis' kicks send through redis-py: ListQueueBroker's
    `lpush(queue, message)`, RedisStreamBroker's `xadd(queue, {b"data":
    message}, maxlen=broker.maxlen, approximate=broker.approximate)` (redis-py
    puts `MAXLEN`, `~` if approximate, and the length, before the id `*`).
    None for any other broker.
    """
    from taskiq_redis import ListQueueBroker, RedisStreamBroker

    if type(broker) is ListQueueBroker:
        return lambda message: ["LPUSH", message]
    if type(broker) is not RedisStreamBroker:
        return None
    trim: list[Any] = []
    if broker.maxlen is not None:
        trim = ["MAXLEN", *(["~"] if broker.approximate else []), broker.maxlen]
    return lambda message: ["XADD", *trim, "*", "data", message]


def _server(pool: Any) -> tuple[Any, ...]:
    """What tells two redis-py connection pools' servers apart."""
    kwargs = {"port": 6379, "db": 0, **pool.connection_kwargs}  # redis-py's defaults
    fields = ("host", "port", "path", "db", "username", "password")
    return (pool.connection_class, *(kwargs.get(f) for f in fields))


RecordStorage = ProgressSlots | NatsKeyValues | RedisRecords


def record_storage(
    backend: AsyncResultBackend[Any], keep_for: float
) -> RecordStorage | None:
    """Where TaskStatus can keep records in this result backend; None: nowhere.

    `AsyncResultBackend.set_progress` does nothing (taskiq#464); the backends
    that store progress override it: InMemoryBroker's, taskiq-redis', and
    taskiq-nats' from 0.7; for taskiq-nats, at every version, records go to
    a key-value bucket of their own instead (NatsKeyValues says why), and
    for taskiq-redis' RedisAsyncResultBackend to keys of their own
    (RedisRecords says why).
    """
    if _is_nats_object_store(backend):
        return NatsKeyValues(backend, keep_for)
    if type(backend).__name__ == "RedisAsyncResultBackend" and type(
        backend
    ).__module__.startswith("taskiq_redis"):
        return RedisRecords(backend, keep_for)
    if type(backend).set_progress is not AsyncResultBackend.set_progress:
        return ProgressSlots(backend)
    return None


def keeps_results(backend: AsyncResultBackend[Any]) -> bool:
    """Whether reading a result leaves it in the backend.

    taskiq-redis' and taskiq-nats' backends delete it on read with
    `keep_results=False`; InMemoryBroker's never does (it has no such flag).
    """
    return getattr(backend, "keep_results", True) is not False


async def peek_result(
    backend: AsyncResultBackend[Any], task_id: str
) -> TaskiqResult[Any] | None:
    """The task's result if it is ready and reading it does not take it.

    taskiq-nats' object store: a read racing a rewrite of the same result (a
    task delivered again saves its result again) can wait for ever for
    chunks the rewrite purged; such a read is given up and made again. Its
    `is_result_ready` reads the whole object too, so it is bounded the same
    way (a fresh-clone run of the suite waited on it for ever).
    """
    if not keeps_results(backend):
        return None
    if not _is_nats_object_store(backend):
        if not await backend.is_result_ready(task_id):
            return None
        return await backend.get_result(task_id)
    for _ in range(_NATS_RESULT_READS - 1):
        with contextlib.suppress(asyncio.TimeoutError):
            return await _read_nats_result(backend, task_id)
    return await _read_nats_result(backend, task_id)


async def _read_nats_result(
    backend: AsyncResultBackend[Any], task_id: str
) -> TaskiqResult[Any] | None:
    """One bounded ready check and read of taskiq-nats' object store."""
    ready = await _within(backend.is_result_ready(task_id), _NATS_RESULT_READ_SECONDS)
    if not ready:
        return None
    result: TaskiqResult[Any] = await _within(
        backend.get_result(task_id), _NATS_RESULT_READ_SECONDS
    )
    return result


# How long one read of a result from taskiq-nats' object store may take, and
# how many are made: see `peek_result`.
_NATS_RESULT_READ_SECONDS = 2.0
_NATS_RESULT_READS = 3


def _is_nats_object_store(backend: AsyncResultBackend[Any]) -> bool:
    kind = type(backend)
    return (
        kind.__name__ == "NATSObjectStoreResultBackend"
        and kind.__module__.startswith("taskiq_nats")
    )


# Cancel requests (task_status/cancel.py), on the records' server: each
# channel's `watch` calls `cancel(task_id, sent_at)` for every request sent
# within its `keep` seconds, those sent before it began first, then
# `ready()`, then each new one as it comes.
CancelCallback = Callable[[str, float], None]
# NATS: a request is the key `<prefix><task id>`; a `>` watch takes every
# token after it, so task ids with dots in them are followed too.
_CANCEL_PREFIX = "taskiq_fastapi_cancel."
# How long a NATS worker waits for cancel requests the server says it sent.
_CATCH_UP_SECONDS = 5.0
# A watching worker's blocking read; new requests end it at once.
_CANCEL_BLOCK_MS = 1000
_CANCEL_BATCH = 1000


class RedisCancels:
    """Cancel requests as entries of one Redis stream beside the records.

    A stream rather than pub/sub: a worker that starts reads every request
    still kept (one sent while it was down included), then blocks for new
    ones, and after a lost connection reads on from the last entry it saw.
    Entries are trimmed (MINID) to the records' expiry as new ones are
    added, and the key expires with the newest.

    Requests are sent through the records' client; the watch reads on a
    connection of its own, made with the settings of the backend's pool
    (`connection_class`, `connection_kwargs`): a blocking read held one of
    the pool's connections, so a backend with `max_connection_pool_size=1`
    saved no result while it blocked. Its socket timeout, if the backend
    sets one, is the backend's plus the blocking time, so that a read
    blocking for new requests is no timeout.
    """

    def __init__(self, records: RedisRecords) -> None:
        self.client = records.client
        self.pool = records.pool
        self.key = records._key("taskiq_fastapi:cancels")
        self.keep_ms = records.ex * 1000 if records.ex else (records.px or 0)
        self.keep = self.keep_ms / 1000
        self.last = "0"

    async def send(self, task_id: str) -> None:
        oldest = int(time.time() * 1000) - self.keep_ms
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.xadd(self.key, {"task_id": task_id}, minid=oldest, approximate=True)
            pipe.pexpire(self.key, self.keep_ms)
            await pipe.execute()

    def _watch_client(self) -> Any:
        from redis.asyncio import ConnectionPool, Redis

        kwargs = dict(self.pool.connection_kwargs)
        if kwargs.get("socket_timeout") is not None:
            kwargs["socket_timeout"] += _CANCEL_BLOCK_MS / 1000
        pool = ConnectionPool(
            connection_class=self.pool.connection_class, max_connections=1, **kwargs
        )
        return Redis(connection_pool=pool)

    async def watch(self, cancel: CancelCallback, ready: Callable[[], None]) -> None:
        client = self._watch_client()
        try:
            await self._read(client, cancel, ready)
        finally:
            await client.connection_pool.disconnect()

    async def _read(
        self, client: Any, cancel: CancelCallback, ready: Callable[[], None]
    ) -> None:
        caught_up = False
        while True:
            # [[stream, [(id, fields), ...]]] in RESP2, the client's protocol.
            found: Any = await client.xread(
                {self.key: self.last},
                count=_CANCEL_BATCH,
                block=_CANCEL_BLOCK_MS if caught_up else None,
            )
            entries = found[0][1] if found else []
            for entry_id, fields in entries:
                self.last = _text(entry_id)
                task_id = fields.get(b"task_id") or fields.get("task_id")
                if task_id is not None:
                    cancel(_text(task_id), _stream_id(entry_id)[0] / 1000)
            if not caught_up and len(entries) < _CANCEL_BATCH:
                caught_up = True
                ready()


class NatsCancels:
    """Cancel requests as keys `taskiq_fastapi_cancel.<task id>` of the records' bucket.

    A worker watches those keys: nats-py's watcher gives the values the
    bucket holds (its ttl is keep_for), then a None marker, then each new one.
    """

    def __init__(self, records: NatsKeyValues) -> None:
        self.records = records
        self.keep = records.ttl

    async def send(self, task_id: str) -> None:
        await self.records.put(_CANCEL_PREFIX + task_id, {"cancel": True})

    async def watch(self, cancel: CancelCallback, ready: Callable[[], None]) -> None:
        bucket = await self.records._bucket()
        # Deletes too (skipped below): every message the server delivers is
        # an entry, so the entries given can be counted against them.
        watcher = await bucket.watch(_CANCEL_PREFIX + ">")
        given = 0  # entries given
        due: int | None = None  # caught up once `given` reaches it
        waiting = True
        bound: asyncio.TimerHandle | None = None

        def caught_up() -> None:
            nonlocal waiting
            if waiting:
                waiting = False
                if bound is not None:
                    bound.cancel()
                ready()

        try:
            async for entry in watcher:
                if entry is None:
                    # nats-py's marker that what the bucket held is all given.
                    # Not always: it trusts it when the server has nothing
                    # left to send and nats-py has read nothing, and a
                    # message sent but not yet read is in neither count
                    # (3 in 300 watches of a bucket of 3 requests, under
                    # load: a worker's first task began before its cancel
                    # request was read). The server's own count settles it.
                    if waiting:
                        due = await _delivered_up_to(watcher)
                        if given >= due:
                            caught_up()
                        else:  # a message nats-py drops unseen: not for ever
                            loop = asyncio.get_running_loop()
                            bound = loop.call_later(_CATCH_UP_SECONDS, caught_up)
                    continue
                given += 1
                if entry.operation is None:  # a request, not a delete or purge
                    sent_at = (
                        entry.created.timestamp() if entry.created else time.time()
                    )
                    cancel(entry.key[len(_CANCEL_PREFIX) :], sent_at)
                if waiting and due is not None and given >= due:
                    caught_up()
        finally:
            if bound is not None:
                bound.cancel()
            with contextlib.suppress(Exception):
                await watcher.stop()


async def _delivered_up_to(watcher: Any) -> int:
    """How many messages the server has given a KV watcher so far.

    Relies on nats-py's `KeyWatcher._sub`, the JetStream subscription its
    own marker reads the consumer's state from (pinned in test_nats).
    """
    from nats.js.errors import NotFoundError

    try:
        info = await watcher._sub.consumer_info()
    except NotFoundError as exc:
        # The server lost the watch's consumer (it restarted): an outage to
        # watch again from, not an error to go on from with requests unread.
        raise ConnectionError(f"the cancel requests' watch is gone: {exc}") from exc
    return int(info.delivered.consumer_seq)


CancelChannel = RedisCancels | NatsCancels


def cancel_channel(storage: RecordStorage) -> CancelChannel | None:
    """Where cancel requests go for records kept in `storage`; None: nowhere.

    ProgressSlots has no channel: its backends are InMemoryBroker's (where
    the tasks run in the process that cancels them) and taskiq-redis'
    cluster and sentinel ones, whose clients this module sends no records
    through.
    """
    if isinstance(storage, RedisRecords):
        return RedisCancels(storage)
    if isinstance(storage, NatsKeyValues):
        return NatsCancels(storage)
    return None
