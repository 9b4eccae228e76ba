"""`make demo`: the sign-up service end to end, on real servers, in one command.

Starts a Redis server (or uses REDIS_URL) for the app's data and, with
`make demo BROKER=nats`, a NATS server with JetStream (or uses NATS_URL) as
the broker instead of Redis; then the API under uvicorn and two worker
processes with `taskiq-fastapi worker`, signs up a few users over HTTP,
prints what each welcome-e-mail task did and where, then stops all.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the repository's tools/, when run directly
from tools.nats_server import nats_url  # noqa: E402
from tools.processes import free_port  # noqa: E402
from tools.redis_server import redis_url  # noqa: E402

BIN = Path(sys.executable).parent
PEOPLE = [
    ("ada@example.com", "Ada"),
    ("grace@example.com", "Grace"),
    ("alan@example.com", "Alan"),
    ("barbara@example.com", "Barbara"),
]


def call(method: str, url: str, body: dict[str, str] | None = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        url, data=data, method=method, headers={"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def wait_until_up(base: str, processes: list[subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in processes):
            raise RuntimeError("a process of the demo exited early")
        try:
            if call("GET", f"{base}/health")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError("the API did not come up in 30 s")


def stop(process: subprocess.Popen[bytes]) -> int:
    process.send_signal(signal.SIGINT)
    try:
        return process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


def main() -> int:
    broker = os.environ.get("BROKER") or "redis"
    if broker not in ("redis", "nats"):
        print(f"BROKER={broker!r}: expected redis or nats.", file=sys.stderr)
        return 2
    with ExitStack() as servers:
        redis = servers.enter_context(redis_url())
        env = {**os.environ, "REDIS_URL": redis, "SIGNUP_BROKER": broker}
        where = f"Redis at {redis}"
        if broker == "nats":
            env["NATS_URL"] = servers.enter_context(nats_url())
            where += f" (the app's data); NATS JetStream at {env['NATS_URL']} (broker)"
        return run(env, where)


def run(env: dict[str, str], where: str) -> int:
    with tempfile.TemporaryDirectory() as logs:
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        log = Path(logs)
        api = subprocess.Popen(
            [str(BIN / "uvicorn"), "signup.app:app", "--port", str(port)],
            cwd=HERE, env=env, stdout=(log / "api.log").open("wb"),
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        worker = subprocess.Popen(
            [
                str(BIN / "taskiq-fastapi"), "worker", "signup.broker:broker",
                "signup.tasks", "--app", "signup.app:app", "--workers", "2",
                "--base-url", base,
            ],
            cwd=HERE, env=env, stdout=(log / "worker.log").open("wb"),
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        ok = False
        try:
            print(f"{where}; API at {base} (uvicorn); 2 worker processes.\n")
            wait_until_up(base, [api, worker])
            with ThreadPoolExecutor(len(PEOPLE)) as pool:
                replies = list(
                    pool.map(
                        lambda p: call(
                            "POST", f"{base}/signup", {"email": p[0], "name": p[1]}
                        ),
                        PEOPLE,
                    )
                )
            ok = True
            for (email, _), (status, reply) in zip(PEOPLE, replies, strict=True):
                print(f"POST /signup {email} -> {status}")
                if status != 200:
                    print(f"  {reply}")
                    ok = False
                    continue
                mail = reply["email"]
                link_status, user = call("GET", mail["link"])
                print(
                    f"  task ran in       {mail['worker']}, "
                    f"mailer session {mail['mailer_session']}"
                )
                print(f"  e-mail            to {mail['to']}: {mail['subject']!r}")
                print(f"  url_for link      {mail['link']}")
                print(f"  GET that link  -> {link_status} {user}")
                ok = ok and link_status == 200 and user["email"] == email
            workers = {r[1]["email"]["worker"] for r in replies if r[0] == 200}
            print(f"\n{len(replies)} tasks ran in {len(workers)} worker process(es).")
        finally:
            worker_code, api_code = stop(worker), stop(api)
            print(f"Stopped: worker exited {worker_code}, API exited {api_code}.")
            if not ok or worker_code or api_code:
                for name in ("api", "worker"):
                    print(f"\n--- {name} log ---\n{(log / f'{name}.log').read_text()}")
        return 0 if ok and worker_code == 0 and api_code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
