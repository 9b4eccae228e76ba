"""A broker server that restarts without its data loses nothing kicked since (issue 19).

A real uvicorn serves an API that kicks tasks (`broker_lifespan`), the real
worker command serves them, and the test's own server (Redis without
persistence, NATS without its store directory) is stopped and started again
empty on the same port. Every task the API kicked after the restart runs
exactly once, in the same worker processes. For taskiq-redis' stream
brokers, also behind a real Redis Sentinel (its master restarts empty) and
on a one-node Redis Cluster (the node restarts empty, its nodes.conf kept).

Where tasks were lost is the window between the restart and the workers' next
fetch. How long that is depends on where each worker is in its backoff, so
the test holds the worker processes (SIGSTOP) across the restart and the
first kicks, and checks on the server itself that those kicks landed before
any worker fetched again: the test cannot pass by missing the window.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import nats
import pytest
from nats.js.errors import NotFoundError
from redis.asyncio import Redis
from workerapp.brokers import make_broker
from workers import APP, BROKER, WorkerRun, get_json

from tools.nats_server import NatsServer
from tools.nats_server import running_server as running_nats
from tools.redis_server import (
    MASTER_NAME,
    RedisServer,
    running_cluster,
    running_sentinel,
)
from tools.redis_server import running_server as running_redis

pytestmark = pytest.mark.anyio

BEFORE = range(5)  # waited for through the API before the restart
DURING = 99  # kicked while the server is down
AFTER = range(100, 120)  # kicked by the API after it


def call(port: int, path: str) -> tuple[int, object]:
    """One GET, no retry: the status the API answered, and its JSON."""
    url = f"http://127.0.0.1:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


@contextmanager
def paused(pid: int) -> Iterator[None]:
    """The process stopped (SIGSTOP) until the block ends, however it ends."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def hold(worker_pids: list[int], sig: signal.Signals) -> None:
    for pid in worker_pids:
        os.kill(pid, sig)


async def waiting_in_redis(server: RedisServer, queue: str, streams: bool) -> int:
    """Messages the server holds that no worker has fetched since the restart."""
    async with Redis.from_url(server.url) as redis:
        if not streams:
            return int(await redis.llen(queue))
        groups = await redis.xinfo_groups(queue)
        assert groups == [], groups  # no worker has read the new stream
        return int(await redis.xlen(queue))


async def waiting_in_nats(server: NatsServer, queue: str) -> int:
    client = await nats.connect(server.url)
    try:
        js = client.jetstream()
        with pytest.raises(NotFoundError):  # no worker has made its consumer yet
            await js.consumer_info(queue, queue)
        return int((await js.stream_info(queue)).state.messages)
    finally:
        await client.close()


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with running_redis(persistent=False) as server:
        yield server


@pytest.fixture
def nats_server() -> Iterator[NatsServer]:
    with running_nats() as server:
        yield server


async def restart_empty_under_load(
    run: WorkerRun,
    server: RedisServer | NatsServer,
    kick_during: bool = True,
    held_in_autoclaim: Path | None = None,
) -> tuple[str, str]:
    """The scenario; returns the worker command's and the API's output.

    Without `kick_during`, nothing is kicked while the server is down (on a
    Redis Cluster, such a kick fails at once, as in redis-py). With
    `held_in_autoclaim` (a file path), the workers serve
    `workerapp.autoclaim_held`, and the server stops while one of them is
    held inside taskiq-redis' autoclaim step; it goes on once resumed.
    """
    broker = BROKER
    if held_in_autoclaim is not None:
        run.env["TASKIQ_TEST_HOLD_AUTOCLAIM"] = str(held_in_autoclaim)
        broker = ["workerapp.autoclaim_held:broker", *BROKER[1:]]
    worker = run.start("worker", *broker, *APP, "--workers", "2")
    run.wait_for("startup", processes=2)
    api, port = run.serve("workerapp.api:app")
    get_json(f"http://127.0.0.1:{port}/openapi.json")  # uvicorn is serving
    assert [call(port, f"/wait/{n}") for n in BEFORE] == [(200, n) for n in BEFORE]
    pids = list(run.count("startup"))
    if held_in_autoclaim is not None:
        held_in_autoclaim.touch()
        # taskiq-redis 1.2 autoclaims only after a fetch that got messages;
        # 1.1 also after each idle one (a 2 s XREADGROUP).
        assert call(port, f"/wait/{len(BEFORE)}") == (200, len(BEFORE))
        run.wait_for("in autoclaim", processes=1)

    server.stop()
    hold(pids, signal.SIGSTOP)  # their next fetch comes after the kicks below
    if held_in_autoclaim is not None:
        held_in_autoclaim.unlink()  # the held worker sends its XAUTOCLAIM once resumed
    try:
        await asyncio.sleep(0.5)
        # A kick while the server is down waits for it (broker_retry_timeout).
        during = None
        if kick_during:
            kick = asyncio.to_thread(call, port, f"/kick/{DURING}")
            during = asyncio.ensure_future(kick)
        await asyncio.sleep(1.5)
        assert during is None or not during.done()
        if isinstance(server, NatsServer):
            server.forget()
        server.start()  # empty, on the same port
        if during is not None:
            assert await during == (200, DURING)
        answers = [call(port, f"/kick/{n}") for n in AFTER]
        assert answers == [(200, n) for n in AFTER], run.output(api)
        if isinstance(server, NatsServer):
            waiting = await waiting_in_nats(server, run.queue)
        else:
            streams = run.env["TASKIQ_TEST_STREAMS"] == "1"
            waiting = await waiting_in_redis(server, run.queue, streams)
        # Every kick landed in the window.
        assert waiting == len(AFTER) + kick_during
    finally:
        hold(pids, signal.SIGCONT)

    answer = call(port, "/wait/200")  # a result wait, after the restart
    assert answer == (200, 200), run.output(api)
    # One process may still be running what it fetched (99..119) when the
    # other has run 200: each kicked task is counted once it has run.
    kicked = [*[DURING] * kick_during, *AFTER, 200]
    ran = run.wait_for_each([f"ran {n}" for n in kicked])
    for n in kicked:
        assert ran[f"ran {n}"] == 1, (n, ran)
    assert run.count("startup") == Counter(dict.fromkeys(pids, 1))  # same processes
    assert run.stop(worker) == 0, run.output(worker)
    assert run.count("shutdown") == Counter(dict.fromkeys(pids, 1))
    run.stop(api)
    worker_output, api_output = run.output(worker), run.output(api)
    assert "Traceback" not in worker_output
    assert "Traceback" not in api_output
    return worker_output, api_output


@pytest.mark.parametrize("streams", [False, True], ids=["list", "stream"])
async def test_redis_restarted_without_data_loses_no_task_kicked_since(
    redis_server: RedisServer, tmp_path: Path, streams: bool
) -> None:
    run = WorkerRun(redis_server.url, tmp_path, streams=streams)
    try:
        worker_output, _ = await restart_empty_under_load(run, redis_server)
    finally:
        run.kill_all()
    if streams:
        assert_group_recreated_once(worker_output, run.queue)


async def test_worker_held_in_its_autoclaim_step_rides_out_an_empty_restart(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """The server restarts empty while a worker is inside its autoclaim step.

    taskiq-redis 1.1 takes a Redis lock, with no expiry, around the XAUTOCLAIM
    that follows each fetch; the restarted server no longer has it, and its
    release raised LockNotOwnedError: that worker process died with a
    traceback and was started again, its lifespan run twice. Held there
    across the restart, it goes on in the same process (the assertions of
    the scenario), and the group is recreated once.
    """
    run = WorkerRun(redis_server.url, tmp_path, streams=True)
    try:
        worker_output, _ = await restart_empty_under_load(
            run, redis_server, held_in_autoclaim=tmp_path / "hold-autoclaim"
        )
    finally:
        run.kill_all()
    assert_group_recreated_once(worker_output, run.queue)


def assert_group_recreated_once(worker_output: str, queue: str) -> None:
    """The first process to meet the missing group recreated it, one WARNING line.

    Where the restarted server's stream begins: every entry is newer.
    """
    recreated = [
        line for line in worker_output.splitlines() if "consumer group 'taskiq'" in line
    ]
    assert len(recreated) == 1, worker_output
    assert "WARNING" in recreated[0], recreated
    assert recreated[0].endswith(
        f"recreated consumer group 'taskiq' on '{queue}' at 0: the Redis "
        "server restarted without its data."
    ), recreated


async def test_sentinel_master_restarted_without_data_loses_no_task_kicked_since(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """RedisStreamSentinelBroker: its master restarts empty, on the same address."""
    with running_sentinel(redis_server) as sentinel:
        run = WorkerRun(
            redis_server.url, tmp_path, sentinel=f"{sentinel.url}/{MASTER_NAME}"
        )
        try:
            worker_output, _ = await restart_empty_under_load(run, redis_server)
        finally:
            run.kill_all()
    assert_group_recreated_once(worker_output, run.queue)


async def test_cluster_node_restarted_without_data_loses_no_task_kicked_since(
    tmp_path: Path,
) -> None:
    """RedisStreamClusterBroker: a node restarts empty, its slots kept.

    A kick while the node is down fails at once, as in redis-py (its cluster
    client sends failed commands again itself; waiting could send one twice).
    The API's first kick and result wait after the restart go through with
    redis-py 6 (6.4, beside taskiq-redis 1.1.2 in the oldest setup), which
    failed every one until the API restarted, and with 8.2, which failed
    the first.
    """
    with running_cluster() as node:
        run = WorkerRun(node.url, tmp_path, cluster=True)
        try:
            worker_output, _ = await restart_empty_under_load(
                run, node, kick_during=False
            )
        finally:
            run.kill_all()
    assert_group_recreated_once(worker_output, run.queue)


async def test_nats_restarted_without_store_loses_no_task_kicked_since(
    nats_server: NatsServer, redis_url: str, tmp_path: Path
) -> None:
    run = WorkerRun(redis_url, tmp_path, nats_url=nats_server.url)
    try:
        worker_output, api_output = await restart_empty_under_load(run, nats_server)
    finally:
        run.kill_all()
    assert api_output.count(f"recreated JetStream stream '{run.queue}'") == 1
    # JetStream creates idempotently: each of the two processes that met the
    # loss may have been the one that made it, one WARNING line each at most.
    for what in ("durable consumer", "result bucket"):
        assert 1 <= worker_output.count(f"recreated {what} '{run.queue}'") <= 2


async def destroy_group(server: RedisServer, queue: str) -> None:
    """An operator's XGROUP DESTROY: the group goes, the stream keeps its entries."""
    async with Redis.from_url(server.url) as redis:
        assert await redis.xgroup_destroy(queue, "taskiq")


async def fetching(server: RedisServer, besides: frozenset[str] = frozenset()) -> None:
    """Wait until a connection not among `besides` has sent an XREADGROUP.

    A worker process sends its first once its broker has started (a group
    destroyed before then would be made by taskiq-redis' startup, at `$`).
    Redis 6.2 adds a consumer to the group only once one got a message.
    Connections are told apart by id, not counted: a worker's fetch and
    ack connections trade places, and both can have sent XREADGROUP last.
    """
    async with Redis.from_url(server.url) as redis:
        for _ in range(600):
            clients = await redis.client_list()
            if any(
                c["cmd"] == "xreadgroup" and c["id"] not in besides for c in clients
            ):
                return
            await asyncio.sleep(0.05)
    raise AssertionError(f"no new connection fetching: {clients}")


async def connections(server: RedisServer) -> frozenset[str]:
    async with Redis.from_url(server.url) as redis:
        return frozenset(c["id"] for c in await redis.client_list())


def assert_each_ran_once(run: WorkerRun, kicked: range) -> None:
    """Each of `kicked` ran exactly once, counted after a task kicked last ran.

    A group made again too early hands the worker the old entries first, in
    the same fetch as the new ones: by the time the last one ran, so had any
    entry run again.
    """
    ran = run.wait_for_each([f"ran {n}" for n in kicked])
    assert {n: ran[f"ran {n}"] for n in kicked} == dict.fromkeys(kicked, 1), ran


def group_recreated(worker_output: str) -> list[str]:
    return [line for line in worker_output.splitlines() if "consumer group" in line]


async def one_worker_that_ran_3(
    run: WorkerRun, server: RedisServer
) -> tuple[subprocess.Popen[bytes], int]:
    """A one-process command, fetching, that ran tasks 0 to 2; and its pid."""
    worker = run.start("worker", *BROKER, *APP, "--workers", "1")
    await fetching(server)
    await run.kiq_all("mark", [(n,) for n in range(3)])
    assert_each_ran_once(run, range(3))
    [pid] = run.count("startup")
    return worker, pid


async def destroyed_once_fetching_again(
    run: WorkerRun, server: RedisServer, worker: subprocess.Popen[bytes]
) -> None:
    """Once the worker fetches from the group again, an operator destroys it;
    tasks 20 to 24 are kicked, and each runs once; the command stops cleanly."""
    await fetching(server)
    await destroy_group(server, run.queue)
    await run.kiq_all("mark", [(n,) for n in range(20, 25)])
    assert_each_ran_once(run, range(20, 25))
    assert run.stop(worker) == 0


def assert_the_others_tasks_not_run_again(
    run: WorkerRun, worker: subprocess.Popen[bytes]
) -> None:
    """Tasks 10 to 19, which another worker took, never ran here; the group
    was made again once, as one that vanished from the same server."""
    taken_again = {event for _, event in run.events()} & {
        f"ran {n}" for n in range(10, 20)
    }
    assert not taken_again, sorted(taken_again)
    [recreated] = group_recreated(run.output(worker))
    assert recreated.endswith("the server no longer had it."), recreated


async def test_a_group_destroyed_before_a_process_fetched_anything_replays_nothing(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """The process that meets the vanished group first has fetched nothing.

    Here a second worker command, started once the first had run 10 tasks
    (as one taskiq starts again past --max-tasks-per-child); the first is
    held, so the second meets the group missing. It is made again after
    what the group had delivered when that process started: before, at the
    stream's beginning, and each of the 10 tasks the stream kept ran again.
    """
    run = WorkerRun(redis_server.url, tmp_path, streams=True)
    try:
        first = run.start("worker", *BROKER, *APP, "--workers", "1")
        await fetching(redis_server)  # its group made (at `$`): kicks reach it
        await run.kiq_all("mark", [(n,) for n in range(10)])
        assert_each_ran_once(run, range(10))
        [held] = run.count("startup")
        with paused(held):  # its connections stay as they are
            first_ones = await connections(redis_server)
            second = run.start("worker", *BROKER, *APP, "--workers", "1")
            await fetching(redis_server, first_ones)  # the second's has started
            await destroy_group(redis_server, run.queue)
            await run.kiq_all("mark", [(n,) for n in range(10, 15)])
            assert_each_ran_once(run, range(15))
        assert run.stop(first) == 0
        assert run.stop(second) == 0
    finally:
        run.kill_all()
    [recreated] = group_recreated(run.output(second))
    assert recreated.endswith("the server no longer had it."), recreated


async def test_a_group_destroyed_after_an_empty_restart_another_worker_met(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """The server restarted empty, and another worker made the group again.

    This process never met the group missing, so the run_id it remembered
    is the old server's; it fetched from the new one since. When the group
    is then destroyed, it is made again after what this process fetched:
    before, at the stream's beginning ("the Redis server restarted without
    its data"), and every task run since the restart ran again.
    """
    run = WorkerRun(redis_server.url, tmp_path, streams=True)
    try:
        worker = run.start("worker", *BROKER, *APP, "--workers", "1")
        await fetching(redis_server)
        [pid] = run.count("startup")
        with paused(pid):
            redis_server.stop()
            redis_server.start()
            async with Redis.from_url(redis_server.url) as redis:  # another worker
                await redis.xgroup_create(run.queue, "taskiq", id="0", mkstream=True)
        run.sender = make_broker(redis_server.url, run.queue, streams=True)
        await run.kiq_all("mark", [(n,) for n in range(10)])
        assert_each_ran_once(run, range(10))
        await destroy_group(redis_server, run.queue)
        await run.kiq_all("mark", [(n,) for n in range(10, 15)])
        assert_each_ran_once(run, range(15))
        assert run.stop(worker) == 0
    finally:
        run.kill_all()
    [recreated] = group_recreated(run.output(worker))
    assert recreated.endswith("the server no longer had it."), recreated


@pytest.mark.parametrize("consumer_id", ["$", "0"])
async def test_a_worker_started_while_the_server_is_empty_makes_the_group_as_configured(
    redis_server: RedisServer, tmp_path: Path, consumer_id: str
) -> None:
    """The README's limit and its remedy: the group a starting process makes.

    Redis restarts empty while the only running worker is held; the API
    kicks 10 tasks; a second worker command starts. Its broker's startup
    makes the group at the broker's `consumer_id`: at taskiq-redis' `$`, the
    10 are skipped and the running worker finds the group there; at `0`,
    each runs once. Tasks kicked afterwards run once either way.
    """
    run = WorkerRun(redis_server.url, tmp_path, streams=True)
    run.env["TASKIQ_TEST_CONSUMER_ID"] = consumer_id
    try:
        first = run.start("worker", *BROKER, *APP, "--workers", "1")
        await fetching(redis_server)
        [held] = run.count("startup")
        with paused(held):
            redis_server.stop()
            redis_server.start()
            run.sender = make_broker(redis_server.url, run.queue, streams=True)
            await run.kiq_all("mark", [(n,) for n in range(10)])
            # Begun well after the server started (Redis's uptime counts
            # whole seconds): what taskiq-redis does is left as configured.
            await asyncio.sleep(2)
            second = run.start("worker", *BROKER, *APP, "--workers", "1")
            await fetching(redis_server)  # the second's group is made
        await run.kiq_all("mark", [(n,) for n in range(10, 12)])
        if consumer_id == "0":
            assert_each_ran_once(run, range(12))
        else:
            assert_each_ran_once(run, range(10, 12))
        assert run.stop(first) == 0
        assert run.stop(second) == 0
        if consumer_id == "$":
            skipped = {f"ran {n}" for n in range(10)}
            assert not skipped & {event for _, event in run.events()}
    finally:
        run.kill_all()
    assert not group_recreated(run.output(first) + run.output(second))


async def test_a_worker_started_before_its_server_runs_what_was_kicked_meanwhile(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """docker-compose's order: the worker starts first, retrying its broker.

    The API kicks 10 tasks as soon as Redis is up, before the worker's next
    attempt (held here, as its backoff grows to 30 s). taskiq-redis made
    the group at `$`, past them: none of the 10 ran. The server started
    after this worker, and each entry was added since: the group starts at
    `0`, one WARNING line, and each runs once.
    """
    redis_server.stop()
    run = WorkerRun(redis_server.url, tmp_path, streams=True)
    try:
        worker = run.start("worker", *BROKER, *APP, "--workers", "1")
        run.wait_for("startup", processes=1)  # the lifespan, then the broker
        [pid] = run.count("startup")
        with paused(pid):
            await asyncio.sleep(2)  # Redis's uptime counts whole seconds
            redis_server.start()
            await run.kiq_all("mark", [(n,) for n in range(10)])
        assert_each_ran_once(run, range(10))
        assert run.stop(worker) == 0
    finally:
        run.kill_all()
    [made] = group_recreated(run.output(worker))
    assert "WARNING" in made, made
    assert f"made consumer group 'taskiq' on '{run.queue}' at 0: the server " in made


async def test_a_group_destroyed_after_a_restart_this_process_fetched_nothing_since(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """As above, but another worker took every task since the restart.

    This process only reconnects: it learns the new server and its group's
    position then, where the group is there. Before, it kept the old
    server's run_id and position, and when the group was destroyed made it
    again at `0`: the 10 tasks the other worker had taken ran again here.
    """
    run = WorkerRun(redis_server.url, tmp_path, streams=True)
    try:
        worker, pid = await one_worker_that_ran_3(run, redis_server)
        with paused(pid):
            redis_server.stop()
            redis_server.start()
            run.sender = make_broker(redis_server.url, run.queue, streams=True)
            async with Redis.from_url(redis_server.url) as other:  # another worker
                await other.xgroup_create(run.queue, "taskiq", id="0", mkstream=True)
                await run.kiq_all("mark", [(n,) for n in range(10, 20)])
                [(_, taken)] = await other.xreadgroup(
                    "taskiq", "other", {run.queue: ">"}, count=100
                )
                assert len(taken) == 10
        await destroyed_once_fetching_again(run, redis_server, worker)
    finally:
        run.kill_all()
    assert_the_others_tasks_not_run_again(run, worker)


async def blocked(redis: Redis, count: int) -> None:
    """Wait until `count` connections have a command held by CLIENT PAUSE."""
    for _ in range(600):
        clients = await redis.client_list()
        if sum("b" in c["flags"] for c in clients) >= count:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"not {count} commands held: {clients}")


async def test_a_group_another_worker_makes_while_this_one_reconnects_is_learnt(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """Two workers reconnect together after an empty restart; the other is first.

    This process reconnects while the group is missing; the other worker
    makes it and takes the 10 tasks kicked since before this process's
    next command (ordered with CLIENT PAUSE WRITE: reads go on, writes wait
    and then run in the order they came). Before, this process learnt
    nothing when it reconnected and never met the group missing: it kept
    the old server's run_id, and when the group was later destroyed made
    it again at `0`, and the 10 tasks ran again here. Now it makes the
    group when it reconnects (the other was first) and learns it.
    """
    run = WorkerRun(redis_server.url, tmp_path, streams=True)
    try:
        worker, pid = await one_worker_that_ran_3(run, redis_server)
        async with Redis.from_url(redis_server.url) as other:  # another worker
            with paused(pid):
                redis_server.stop()
                redis_server.start()
                run.sender = make_broker(redis_server.url, run.queue, streams=True)
                await run.kiq_all("mark", [(n,) for n in range(10, 20)])
                await other.execute_command("CLIENT", "PAUSE", 60_000, "WRITE")
                create = asyncio.ensure_future(
                    other.xgroup_create(run.queue, "taskiq", id="0", mkstream=True)
                )
                await blocked(other, 1)
                take = asyncio.ensure_future(
                    other.xreadgroup("taskiq", "other", {run.queue: ">"}, count=100)
                )
                await blocked(other, 2)
            await blocked(other, 3)  # this process's first write since
            await other.execute_command("CLIENT", "UNPAUSE")
            assert await create
            [(_, taken)] = await take
            assert len(taken) == 10
        await destroyed_once_fetching_again(run, redis_server, worker)
    finally:
        run.kill_all()
    assert_the_others_tasks_not_run_again(run, worker)


async def restart_while_the_only_slot_is_busy(
    run: WorkerRun, server: RedisServer
) -> subprocess.Popen[bytes]:
    """A one-process command with one task slot, held by a task across an
    empty restart; another worker makes the group again and takes the 10
    tasks kicked since; then the held task ends. Returns the command."""
    worker = run.start(
        "worker", *BROKER, *APP, "--workers", "1", "--max-async-tasks", "1"
    )
    await fetching(server)
    await run.kiq_all("mark", [(n,) for n in range(3)])
    assert_each_ran_once(run, range(3))
    await run.kiq("held", 50)
    run.wait_for("task 50 started", processes=1)
    server.stop()
    server.start()
    run.sender = make_broker(server.url, run.queue, streams=True)
    async with Redis.from_url(server.url) as other:  # another worker
        await other.xgroup_create(run.queue, "taskiq", id="0", mkstream=True)
        await run.kiq_all("mark", [(n,) for n in range(10, 20)])
        [(_, taken)] = await other.xreadgroup(
            "taskiq", "other", {run.queue: ">"}, count=100
        )
        assert len(taken) == 10
    Path(f"{run.events_file}.release-50").touch()
    run.wait_for("task 50 done", processes=1)
    return worker


async def test_a_restart_while_this_process_had_no_fetch_under_way_is_learnt(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """The server restarts empty while this process's one task slot is busy.

    No fetch is under way (taskiq 0.13 fetches only for a free slot), so
    none loses its connection. The held task's ack reconnects a connection
    of the pool, and the process learns the new server before its next
    fetch. Before, it kept the old server's run_id, and when the group was
    destroyed made it again at `0`: the 10 tasks ran again here.
    """
    run = WorkerRun(redis_server.url, tmp_path, streams=True)
    try:
        worker = await restart_while_the_only_slot_is_busy(run, redis_server)
        await destroyed_once_fetching_again(run, redis_server, worker)
    finally:
        run.kill_all()
    assert_the_others_tasks_not_run_again(run, worker)
