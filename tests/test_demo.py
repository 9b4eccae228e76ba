"""`make demo` runs the example project end to end (issue 4)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parent.parent / "examples" / "demo.py"


@pytest.mark.parametrize("broker", ["redis", "nats"])
def test_demo_runs_the_example_end_to_end(
    broker: str, redis_url: str, request: pytest.FixtureRequest
) -> None:
    """`make demo` and `make demo BROKER=nats`: the same example, either broker."""
    env = {**os.environ, "REDIS_URL": redis_url, "BROKER": broker}
    if broker == "nats":
        env["NATS_URL"] = request.getfixturevalue("nats_url")
    result = subprocess.run(
        [sys.executable, str(DEMO)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    if broker == "nats":
        assert f"NATS JetStream at {env['NATS_URL']} (broker)" in out
    for email in ("ada@example.com", "grace@example.com", "alan@example.com"):
        assert f"POST /signup {email} -> 200" in out
    links = re.findall(r"url_for link +(http://127\.0\.0\.1:\d+/users/\d+)", out)
    assert len(links) == 4
    assert out.count("GET that link  -> 200") == 4
    assert re.search(r"task ran in +worker-\d \(pid \d+\), mailer session \d", out)
    assert "Stopped: worker exited 0, API exited 0." in out
