"""Run the real `taskiq-fastapi worker` command in a subprocess, and talk to it."""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Sequence
from contextlib import suppress
from pathlib import Path
from typing import Any

from taskiq.kicker import AsyncKicker
from workerapp.brokers import (
    make_broker,
    make_cluster_broker,
    make_nats_broker,
    make_sentinel_broker,
)

from tools.processes import free_port

TESTS_DIR = Path(__file__).parent
COMMAND = str(Path(sys.executable).with_name("taskiq-fastapi"))
TASKIQ = str(Path(sys.executable).with_name("taskiq"))
UVICORN = str(Path(sys.executable).with_name("uvicorn"))
# The worker app's broker, task module and app, as the command takes them.
BROKER = ["workerapp.broker:broker", "workerapp.tasks"]
APP = ["--app", "workerapp.app:app"]


@functools.cache
def commands_tmpdir() -> str:
    """TMPDIR of the commands this test process runs, removed when it exits.

    A command the suite kills (SIGKILL to its group) leaves its --metrics
    directory behind, as documented; here, not in the machine's /tmp. Short,
    as the fork server's socket lives there too (AF_UNIX paths are short).
    """
    path = tempfile.mkdtemp(prefix="tqf-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def get_json(url: str, timeout: float = 30) -> Any:
    """GET `url` as JSON, retrying until a server that is starting answers."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return json.loads(response.read())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def error_line(output: str) -> str:
    """The command's one `Error:` line: a failure is said once."""
    errors = [line for line in output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, output
    return errors[0]


class WorkerRun:
    """One worker command, its environment, and the lifespan events it logs."""

    def __init__(
        self,
        redis_url: str,
        tmp_path: Path,
        *,
        streams: bool = False,
        nats_url: str | None = None,
        sentinel: str | None = None,
        cluster: bool = False,
    ) -> None:
        self.queue = f"test-{uuid.uuid4().hex}"
        self.events_file = tmp_path / f"events-{self.queue}.log"
        self.events_file.touch()
        self.env = {
            **os.environ,
            "REDIS_URL": redis_url,
            "TASKIQ_TEST_QUEUE": self.queue,
            "TASKIQ_TEST_STREAMS": "1" if streams else "0",
            "EVENTS_FILE": str(self.events_file),
            "PYTHONUNBUFFERED": "1",
            # A command that hangs shows each process's stack (`exit_status`).
            "PYTHONFAULTHANDLER": "1",
            "TMPDIR": commands_tmpdir(),
        }
        self.env.pop("TASKIQ_TEST_SENTINEL", None)
        self.env.pop("TASKIQ_TEST_CLUSTER", None)
        if nats_url is not None:  # the workers' broker: NATS JetStream
            self.env["NATS_URL"] = nats_url
            self.sender = make_nats_broker(nats_url, self.queue)
        elif sentinel is not None:  # a stream broker behind Redis Sentinel
            self.env.pop("NATS_URL", None)
            self.env["TASKIQ_TEST_SENTINEL"] = sentinel
            self.env["TASKIQ_TEST_STREAMS"] = "1"
            self.sender = make_sentinel_broker(sentinel, self.queue)
        elif cluster:  # a stream broker on a Redis Cluster at `redis_url`
            self.env.pop("NATS_URL", None)
            self.env["TASKIQ_TEST_CLUSTER"] = "1"
            self.env["TASKIQ_TEST_STREAMS"] = "1"
            self.sender = make_cluster_broker(redis_url, self.queue)
        else:
            self.env.pop("NATS_URL", None)
            self.sender = make_broker(redis_url, self.queue, streams=streams)
        self.tmp_path = tmp_path
        self.processes: list[subprocess.Popen[bytes]] = []
        self.stopped: list[subprocess.Popen[bytes]] = []

    def start(
        self, *args: str, command: Sequence[str] = (COMMAND,)
    ) -> subprocess.Popen[bytes]:
        log = self.tmp_path / f"worker-{len(self.processes)}.log"
        process = subprocess.Popen(
            [*command, *args],
            cwd=TESTS_DIR,
            env=self.env,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        process.log = log  # type: ignore[attr-defined]
        self.processes.append(process)
        return process

    def serve(self, app: str) -> tuple[subprocess.Popen[bytes], int]:
        """A real uvicorn serving `app` on a free port, and that port."""
        port = free_port()
        api = self.start(
            app, "--port", str(port), "--log-level", "warning", command=(UVICORN,)
        )
        return api, port

    def output(self, process: subprocess.Popen[bytes]) -> str:
        return process.log.read_text()  # type: ignore[attr-defined,no-any-return]

    def events(self) -> list[tuple[int, str]]:
        lines = self.events_file.read_text().splitlines()
        return [(int(pid), event) for pid, event in (ln.split(" ", 1) for ln in lines)]

    def count(self, event: str) -> Counter[int]:
        return Counter(pid for pid, name in self.events() if name == event)

    def wait_for(self, event: str, processes: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while len(self.count(event)) < processes:
            for process in self.processes:
                if process not in self.stopped and process.poll() is not None:
                    raise AssertionError(
                        f"worker exited with {process.returncode}:\n"
                        + self.output(process)
                    )
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{processes} x {event!r} not seen: {self.events()}"
                )
            time.sleep(0.05)

    def wait_for_each(self, events: list[str], timeout: float = 30) -> Counter[str]:
        """How often each of `events` was logged, once each was, or at the deadline."""
        deadline = time.monotonic() + timeout
        while True:
            seen = Counter(name for _, name in self.events() if name in events)
            if len(seen) == len(set(events)) or time.monotonic() > deadline:
                return seen
            time.sleep(0.05)

    def stop(
        self,
        process: subprocess.Popen[bytes],
        sig: int = signal.SIGTERM,
        timeout: float = 30,
    ) -> int:
        self.stopped.append(process)
        process.send_signal(sig)
        return process.wait(timeout=timeout)

    def exit_status(self, process: subprocess.Popen[bytes], timeout: float) -> int:
        """How the command exited; if it has not within `timeout`, a failure
        showing its output and where each of its processes was stuck.
        """
        try:
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            # faulthandler writes every thread's stack to the log, then the
            # process dies; the whole session, supervisor and workers.
            with suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGABRT)
            with suppress(subprocess.TimeoutExpired):
                process.wait(timeout=5)
            self.kill_all()
            raise AssertionError(
                f"the command did not exit within {timeout:g} s:\n"
                + self.output(process)
            ) from None

    def kill_all(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()

    async def kiq(self, task: str, *args: Any, **kwargs: Any) -> Any:
        kicker: AsyncKicker[Any, Any] = AsyncKicker(
            f"workerapp.tasks:{task}", self.sender, {}
        )
        return await kicker.kiq(*args, **kwargs)

    async def kiq_all(self, task: str, args: list[tuple[Any, ...]]) -> list[Any]:
        return [await self.kiq(task, *a) for a in args]
