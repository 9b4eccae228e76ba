"""The kicking request's OpenTelemetry trace, continued in its task: opt-in.

`trace_tasks(broker)` gives the broker taskiq's own `OpenTelemetryMiddleware`
(taskiq 0.12 and newer), first in its middleware list. Called where the
broker is made, it works in both processes: in the API, a kick opens a
`send/<task>` span, a child of whatever span is current (the request's, with
OpenTelemetry's FastAPI instrumentor), and writes its context into the
message's labels (`traceparent`); in the worker, the task runs in an
`execute/<task>` span, a child of that kick. Nothing here configures
OpenTelemetry: the app does, as for its routes. Without the call nothing
changes and OpenTelemetry is never imported.
"""

from __future__ import annotations

import re
from importlib.metadata import version
from typing import Any

from taskiq import AsyncBroker

from taskiq_fastapi.exceptions import TracingUnavailableError

# The first taskiq that ships `taskiq.middlewares.opentelemetry_middleware`.
FIRST_TASKIQ = (0, 12)
INSTALL = "pip install 'taskiq-fastapi[otel]'"


def trace_tasks(broker: AsyncBroker) -> AsyncBroker:
    """Continue the current trace in the tasks this broker kicks and runs.

    Adds taskiq's `OpenTelemetryMiddleware` once, first, so its span is
    current while the other middlewares and the task run; a broker that
    already has one (`TaskiqInstrumentor`, or added by hand) keeps it.
    Returns the broker. Raises `TracingUnavailableError` when the installed
    taskiq is older than 0.12 or OpenTelemetry is not installed.
    """
    middleware = opentelemetry_middleware()
    if not any(isinstance(each, middleware) for each in broker.middlewares):
        added = middleware()
        added.set_broker(broker)
        broker.middlewares.insert(0, added)
    return broker


def opentelemetry_middleware() -> Any:
    """The `OpenTelemetryMiddleware` class of taskiq, or one line saying why not."""
    installed = version("taskiq")
    if _release(installed) < FIRST_TASKIQ:
        raise TracingUnavailableError(
            f"trace_tasks needs taskiq 0.12 or newer, whose OpenTelemetry "
            f"middleware it adds; taskiq {installed} is installed: {INSTALL}."
        )
    try:
        from taskiq.middlewares.opentelemetry_middleware import (
            OpenTelemetryMiddleware,
        )
    except ImportError as exc:  # taskiq's own words name what is missing
        cause = exc.__cause__ or exc
        raise TracingUnavailableError(
            f"trace_tasks needs OpenTelemetry and taskiq's opentelemetry extra "
            f"({cause}): {INSTALL}."
        ) from None
    return OpenTelemetryMiddleware


def _release(text: str) -> tuple[int, ...]:
    """`0.11.20` as (0, 11, 20); pre-release and local parts are ignored."""
    return tuple(int(part) for part in re.findall(r"\d+", text.split("+")[0])[:3])
