"""`/readyz` and `/livez`, served by the main process for container probes.

With --metrics, `/metrics` too: the workers' metrics, merged (metrics.py).

The main process runs taskiq's process manager and serves nothing else, so
probes never compete with tasks: a stdlib HTTP server on its own thread reads
the rows the workers write (`report.py`) and which worker processes are
alive. The socket is bound before any worker starts, so a port in use is an
error of the command, not of a probe.
"""

from __future__ import annotations

import json
import logging
import math
import socket
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING, Any

from taskiq_fastapi_cli.exceptions import CLIError
from taskiq_fastapi_cli.health.report import (
    BEAT,
    DONE,
    LAST_DONE,
    PID,
    READY,
    READY_AT,
    STARTED,
    STATE,
    STATES,
    Slots,
)

if TYPE_CHECKING:
    from taskiq_fastapi_cli.health.metrics import Exposition

# taskiq's manager notices a dead process within a second and starts another;
# a slot empty for longer than this is down, not restarting.
RESTART_GRACE_SECONDS = 10.0
STALL_CHECK_SECONDS = 1.0
logger = logging.getLogger("taskiq_fastapi")


def _when(timestamp: float) -> str | None:
    if not timestamp:
        return None
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat()


class HealthView:
    """Judges readiness and liveness from the slots and the live processes."""

    def __init__(self, slots: Slots, stall_timeout: float) -> None:
        self.slots = slots
        self.stall_timeout = stall_timeout
        self.processes: Callable[[], Sequence[BaseProcess]] = list
        self.draining = False
        self.down_since: dict[int, float] = {}

    def drain(self) -> None:
        """A stop signal reached the main process: not ready from now on.

        Called from a signal handler: it only sets an attribute.
        """
        self.draining = True

    def report(self) -> tuple[bool, bool, dict[str, Any]]:
        """(ready, live, JSON body)."""
        now = time.time()
        processes = list(self.processes())
        workers, not_ready, not_live = [], [], []
        for slot in range(self.slots.workers):
            process = processes[slot] if slot < len(processes) else None
            worker, ready, why = self._worker(slot, process, now)
            workers.append(worker)
            if why is not None:
                not_live.append(why)
            elif not ready:
                not_ready.append(_describe(worker))
        if self.draining:
            not_ready.insert(0, "shutting down: a stop signal arrived")
        ready = not not_ready and not not_live
        body = {
            "status": "ready" if ready else ("live" if not not_live else "failing"),
            "ready": ready,
            "live": not not_live,
            "problems": not_live + not_ready,
            "workers": workers,
        }
        return ready, not not_live, body

    def _worker(
        self, slot: int, process: BaseProcess | None, now: float
    ) -> tuple[dict[str, Any], bool, str | None]:
        """A worker's row; whether it is ready; why it is not live, if so."""
        row = self.slots.row(slot)
        name = f"worker-{slot}"
        alive = process is not None and process.is_alive()
        pid = process.pid if process is not None else None
        state = STATES.get(row[STATE], "absent")
        if process is None:
            state = "starting"  # the manager has not started it yet
        elif not alive and self.draining:
            # Done stopping, while the others finish their tasks: nothing
            # restarts it, and it is not down.
            state = "stopped"
        elif not alive:
            state = "restarting"
            self.down_since.setdefault(slot, now)
        else:
            self.down_since.pop(slot, None)
            if pid != int(row[PID]):
                state = "starting"  # a new process, not yet reporting
        silent = now - row[BEAT] if alive and pid == int(row[PID]) else None
        worker = {
            "worker": name,
            "pid": pid,
            "state": state,
            "started": _when(row[STARTED]) if alive else None,
            "ready_since": _when(row[READY_AT]) if state == "ready" else None,
            "tasks_finished": int(row[DONE]),
            "last_task_finished": _when(row[LAST_DONE]),
            "loop_silent_seconds": None if silent is None else _up(silent, 3),
        }
        why = None
        if silent is not None and self.stall_timeout and silent > self.stall_timeout:
            why = (
                f"{name} (pid {pid}) is stalled: its event loop has not run for "
                f"{_up(silent, 1):.1f} s (--stall-timeout {self.stall_timeout:g})"
            )
        down = now - self.down_since.get(slot, now)
        if state == "restarting" and down > RESTART_GRACE_SECONDS:
            why = f"{name} has been down for {down:.0f} s"
        ready = alive and row[STATE] == READY and pid == int(row[PID])
        return worker, ready and why is None, why


class StallLog:
    """One WARNING line when a worker's loop stalls, one when it runs again.

    The probes only answer when asked; this reads the same rows every second
    on the health endpoint's own thread, so a stall is in the log even where
    nothing probes.
    """

    def __init__(self, slots: Slots, stall_timeout: float) -> None:
        self.slots = slots
        self.stall_timeout = stall_timeout
        self.stalled: dict[int, float] = {}  # slot: its pid

    def check(self, processes: Sequence[BaseProcess], now: float) -> None:
        for slot, process in enumerate(processes[: self.slots.workers]):
            row = self.slots.row(slot)
            pid = int(row[PID])
            silent = now - row[BEAT]
            live = process.is_alive() and process.pid == pid
            stalled = live and silent > self.stall_timeout
            if stalled and slot not in self.stalled:
                self.stalled[slot] = pid
                logger.warning(
                    "worker-%d (pid %d) is stalled: its event loop has not run "
                    "for %.1f s (--stall-timeout %g).",
                    slot,
                    pid,
                    silent,
                    self.stall_timeout,
                )
            elif not stalled and slot in self.stalled:
                was = self.stalled.pop(slot)
                if live:
                    logger.warning(
                        "worker-%d (pid %d): its event loop runs again.", slot, was
                    )

    def watch(
        self, processes: Callable[[], Sequence[BaseProcess]], stop: threading.Event
    ) -> None:
        while not stop.wait(STALL_CHECK_SECONDS):
            self.check(list(processes()), time.time())


def _describe(worker: dict[str, Any]) -> str:
    pid = f" (pid {worker['pid']})" if worker["pid"] else ""
    return f"{worker['worker']}{pid} is {worker['state']}"


class _Handler(BaseHTTPRequestHandler):
    view: HealthView
    metrics: Exposition | None = None

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics" and self.metrics is not None:
            self._send(200, *self.metrics.scrape())
            return
        if path not in ("/readyz", "/livez"):
            paths = "/readyz, /livez" + (", /metrics" if self.metrics else "")
            self._answer(404, {"error": f"no such path {path!r}: {paths}"})
            return
        ready, live, body = self.view.report()
        healthy = ready if path == "/readyz" else live
        self._answer(200 if healthy else 503, body)

    def _answer(self, status: int, body: dict[str, Any]) -> None:
        self._send(status, json.dumps(body, indent=2).encode(), "application/json")

    def _send(self, status: int, data: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        """Probes every few seconds would flood the worker's log."""


class HealthServer:
    """Bound by the command before any worker starts; served by the manager."""

    def __init__(self, host: str, port: int, metrics: str | None = None) -> None:
        self.handler: type[_Handler] = type("Handler", (_Handler,), {})
        self.metrics = metrics  # --metrics: the workers' metrics directory
        try:
            self.server = _server_for(host)((host, port), self.handler)
        except socket.gaierror as exc:
            raise CLIError(f"--health-host {host!r}: {exc.strerror}.", 2) from None
        except OSError as exc:
            raise CLIError(
                f"--health-port {port}: cannot listen on {host}:{port}: "
                f"{exc.strerror or exc}.",
            ) from None
        self.server.daemon_threads = True
        # `shutdown` waits for serve_forever's next poll (0.5 s by default),
        # which the command's exit waited for.
        self.thread = threading.Thread(
            target=self.server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="health",
            daemon=True,
        )
        self.stopping = threading.Event()
        self.watcher: threading.Thread | None = None

    def start(
        self, view: HealthView, processes: Callable[[], Sequence[BaseProcess]]
    ) -> None:
        view.processes = processes
        self.handler.view = view
        if self.metrics is not None:
            from taskiq_fastapi_cli.health.metrics import Exposition

            self.handler.metrics = Exposition(self.metrics, processes)
        self.thread.start()
        if view.stall_timeout:
            stalls = StallLog(view.slots, view.stall_timeout)
            self.watcher = threading.Thread(
                target=stalls.watch,
                args=(processes, self.stopping),
                name="stall-log",
                daemon=True,
            )
            self.watcher.start()

    def stop(self) -> None:
        self.stopping.set()
        if self.thread.is_alive():
            self.server.shutdown()
        self.server.server_close()


def _server_for(host: str) -> type[ThreadingHTTPServer]:
    """The HTTP server class for `host`'s address family.

    The standard library's server is IPv4 only: an IPv6 host (`::1`, or `::`
    on an IPv6 cluster) was refused as a host that does not resolve.
    """
    family, *_ = socket.getaddrinfo(
        host or None, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    if family == socket.AF_INET:
        return ThreadingHTTPServer
    return type("HealthServerV6", (ThreadingHTTPServer,), {"address_family": family})


def _up(seconds: float, digits: int) -> float:
    """Rounded up: a loop silent past --stall-timeout never shows as equal to it."""
    scale = 10.0**digits
    return math.ceil(seconds * scale) / scale
