"""`taskiq-fastapi health`: ask a worker's health endpoint, answer with an exit code."""

from __future__ import annotations

import json
import urllib.error
import urllib.request


def probe(host: str, port: int, ready: bool, timeout: float) -> tuple[bool, str]:
    """(healthy, one line saying so or why not)."""
    what = "ready" if ready else "live"
    url = f"http://{host}:{port}/{'readyz' if ready else 'livez'}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            body = json.loads(response.read())
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
        try:
            body = json.loads(exc.read())
        except ValueError:
            body = {}
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return False, f"Not {what}: cannot reach {url}: {reason}."
    if status == 200:
        count = len(body.get("workers", []))
        processes = "process" if count == 1 else "processes"
        return True, f"{what.capitalize()}: {count} worker {processes} {what}."
    problems = body.get("problems") or [f"HTTP {status}"]
    return False, f"Not {what}: {problems[0]}."
