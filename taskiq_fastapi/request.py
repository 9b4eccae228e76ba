"""The synthetic Request handed to tasks: a complete scope, so its APIs work."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from typing import Any, NoReturn
from urllib.parse import urlsplit

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


def _shown(base_url: str) -> str:
    """The URL as an error names it: what may be a user or password is masked.

    Everything before the last "@", as the URL is refused: a password with a
    "/" in it ends urllib's authority early, and one in a URL without "//"
    is not an authority at all, yet both are what the user meant as one.
    """
    before, at, after = base_url.rpartition("@")
    if not at:
        return base_url
    scheme, sep, _ = before.partition("://")
    return f"{scheme}{sep}***@{after}" if sep else f"***@{after}"


def _refusal(invalid: str, base_url: str, exc: ValueError, instead: str) -> ValueError:
    """The refusal in urllib's words, or `instead` when the URL has a part masked.

    urllib quotes what it could not read: the port, which for a password with
    a "/" in it is the password's start, or the whole netloc. The error is
    raised `from None`, so no traceback shows urllib's own.
    """
    if _shown(base_url) == base_url:
        return ValueError(f"{invalid}: {exc}.")
    return ValueError(f"{invalid}: {instead}.")


def base_url_scope(base_url: str) -> dict[str, Any]:
    """Scope keys describing where the API is served; its path becomes the root path.

    Every refusal names the URL: urllib's, ipaddress' and the idna codec's own
    errors ("Invalid IPv6 URL") do not, and a user or password in it would
    otherwise become every task's Host header.
    """
    invalid = f"Invalid base URL {_shown(base_url)!r}"
    try:
        parts = urlsplit(base_url)
        hostname = parts.hostname
        has_user = parts.username is not None or parts.password is not None
        if hostname is not None and "[" in parts.netloc:
            # Python 3.11.4+ refuses a bracketed host that is no IP address
            # itself, as it splits; earlier ones took any text.
            ipaddress.ip_address(hostname)
    except ValueError as exc:
        raise _refusal(invalid, base_url, exc, "urllib cannot read it") from None
    if parts.scheme not in _DEFAULT_PORTS or not hostname:
        raise ValueError(f"{invalid}: expected http(s)://host[:port][/root/path].")
    if parts.query or parts.fragment:
        raise ValueError(f"{invalid}: it must not have a query or fragment.")
    if has_user:
        raise ValueError(
            f"{invalid}: it must not have a user or password (they would be "
            "sent as every task's Host header).",
        )
    try:
        port = parts.port or _DEFAULT_PORTS[parts.scheme]
    except ValueError as exc:
        raise _refusal(
            invalid, base_url, exc, "its port is not a number from 0 to 65535"
        ) from None
    try:
        host_header = parts.netloc.encode("idna")
    except UnicodeError as exc:
        raise ValueError(f"{invalid}: {hostname!r} is not a valid host name.") from exc
    root_path = parts.path.rstrip("/")
    return {
        "scheme": parts.scheme,
        "server": (parts.hostname, port),
        "root_path": root_path,
        "path": root_path + "/",
        "raw_path": (root_path + "/").encode(),
        "headers": [(b"host", host_header)],
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
