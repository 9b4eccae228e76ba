"""The synthetic Request handed to tasks: a complete scope, so its APIs work."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, NoReturn
from urllib.parse import urlsplit, urlunsplit

from starlette.requests import Request
from starlette.types import ASGIApp

from taskiq_fastapi.request_context import LABEL as CARRIED_LABEL
from taskiq_fastapi.request_context import carried_scope

BASE_URL_ENV = "TASKIQ_FASTAPI_BASE_URL"
DEFAULT_BASE_URL = "http://localhost:8000"
CLIENT = ("127.0.0.1", 0)
_DEFAULT_PORTS = {"http": 80, "https": 443}


def resolve_base_url(base_url: str | None) -> str:
    """Explicit value first, then the environment, then uvicorn's default address."""
    return base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL


def shown_url(url: str) -> str:
    """`url` for a log line or an error: its password, if it has one, as ***.

    A base URL may carry credentials (links that authenticate); logs and
    terminals must not.
    """
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:  # not a URL this can read: shown as given
        return url
    if not password:
        return url
    userinfo, _, host = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def base_url_scope(base_url: str) -> dict[str, Any]:
    """Scope keys describing where the API is served; its path becomes the root path."""
    parts = urlsplit(base_url)
    shown = shown_url(base_url)
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
        raise ValueError(
            f"Invalid base URL {shown!r}: expected http(s)://host[:port][/root/path].",
        )
    if parts.query or parts.fragment:
        raise ValueError(
            f"Invalid base URL {shown!r}: it must not have a query or fragment.",
        )
    try:
        port = parts.port or _DEFAULT_PORTS[parts.scheme]
    except ValueError as exc:
        raise ValueError(f"Invalid base URL {shown!r}: {exc}.") from exc
    root_path = parts.path.rstrip("/")
    return {
        "scheme": parts.scheme,
        "server": (parts.hostname, port),
        "root_path": root_path,
        "path": root_path + "/",
        "raw_path": (root_path + "/").encode(),
        "headers": [(b"host", parts.netloc.encode("idna"))],
    }


async def _no_body() -> NoReturn:
    raise RuntimeError(
        "The Request injected into a taskiq task has no body: "
        "pass the data your task needs as task arguments.",
    )


class RequestFactory:
    """Builds one fresh Request per task from a prepared scope template."""

    def __init__(
        self,
        app: ASGIApp,
        lifespan_state: Mapping[str, Any] | None,
        base_url: str,
    ) -> None:
        self.state = dict(lifespan_state or {})
        self.template: dict[str, Any] = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": "GET",
            "query_string": b"",
            "client": CLIENT,
            "app": app,
            **base_url_scope(base_url),
        }

    def __call__(self, labels: Mapping[str, Any] | None = None) -> Request:
        """A fresh Request; that of the kicking request when the message carries it."""
        scope = self.template.copy()
        if labels and CARRIED_LABEL in labels:
            scope.update(carried_scope(labels[CARRIED_LABEL], self.template))
        # As under uvicorn: every request gets a shallow copy of the lifespan state.
        scope["state"] = self.state.copy()
        return Request(scope, receive=_no_body)
