"""Processes for tests, the demo and benchmarks: servers, and trees to read.

Linux /proc only, which the suite and `make bench` run on; no root needed.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import TypeVar

STARTUP_TIMEOUT = 10.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """A server on a fixed loopback port that can stop and start again."""

    name = "server"
    url: str

    def __init__(self) -> None:
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def answers(self) -> bool:
        raise NotImplementedError

    def start(self) -> None:
        self.process = subprocess.Popen(
            self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not self.answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not start on port {self.port}.")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None


Server = TypeVar("Server", bound=ServerProcess)


@contextmanager
def started(make: Callable[[str], Server], name: str) -> Iterator[Server]:
    """A server made with a work directory of its own, started, then stopped.

    Stopped also when the caller fails; the directory goes with it.
    """
    with tempfile.TemporaryDirectory(prefix=f"taskiq-fastapi-{name}-") as workdir:
        server = make(workdir)
        try:
            server.start()
            yield server
        finally:
            server.stop()


@contextmanager
def url_of(
    variable: str, running: Callable[[], AbstractContextManager[ServerProcess]]
) -> Iterator[str]:
    """The URL in the environment `variable`, or that of a server started here."""
    if os.environ.get(variable):
        yield os.environ[variable]
        return
    with running() as server:
        yield server.url


@contextmanager
def silent_port() -> Iterator[int]:
    """A loopback port that accepts connections and never answers: a dead server.

    The kernel completes each connection into the listen backlog; nothing
    ever reads or writes on it.
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        yield int(sock.getsockname()[1])


@contextmanager
def frozen(server: ServerProcess) -> Iterator[None]:
    """The server process stopped (SIGSTOP) while in the block.

    The kernel still accepts connections on its port; nothing answers.
    Continued (SIGCONT) on the way out.
    """
    assert server.process is not None
    os.kill(server.process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.process.pid, signal.SIGCONT)


def greets(port: int, send: bytes, expect: bytes) -> bool:
    """Whether something on the port answers `send` with `expect` first."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            if send:
                sock.sendall(send)
            return sock.recv(len(expect)).startswith(expect)
    except OSError:
        return False


def children(pid: int, keep: Callable[[str], bool] = lambda state: True) -> list[int]:
    """Pids of the running processes whose parent is `pid`.

    `keep` sees each one's state letter (`Z` for an exited, unreaped one).
    """
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces: the fields after it are fixed.
        state, parent = stat.rpartition(")")[2].split()[:2]
        if int(parent) == pid and keep(state):
            found.append(int(entry))
    return found
