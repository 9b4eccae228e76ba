"""Spans a worker process made, exported before it exits.

multiprocessing ends a worker process with `os._exit`, so the atexit hook
the OpenTelemetry SDK relies on (`TracerProvider.shutdown`) never runs
there: a `BatchSpanProcessor` would drop what it still holds, the spans of
the last seconds, the last tasks' included. Nothing is imported here: a
process that never imported OpenTelemetry has nothing to export.
"""

from __future__ import annotations

import sys


def flush_spans(timeout: float) -> None:
    """Export the spans the global tracer provider holds, within `timeout` s."""
    if "opentelemetry.trace" not in sys.modules:
        return
    from opentelemetry import trace

    flush = getattr(trace.get_tracer_provider(), "force_flush", None)
    if flush is not None:  # the SDK's provider; the API's default has none
        flush(int(timeout * 1000))
