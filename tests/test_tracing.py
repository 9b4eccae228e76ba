"""`trace_tasks` on the installed taskiq: taskiq's middleware, or one clear error."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version

import pytest
from taskiq import InMemoryBroker

import taskiq_fastapi
from taskiq_fastapi.tracing import FIRST_TASKIQ, _release


def test_trace_tasks_adds_taskiqs_middleware_once_or_says_it_needs_taskiq_0_12(
    broker: InMemoryBroker,
) -> None:
    """Both branches are real: `make test` runs the first, `make test-oldest`
    (taskiq 0.11.20) the second."""
    installed = version("taskiq")
    if _release(installed) >= FIRST_TASKIQ:
        from taskiq.middlewares.opentelemetry_middleware import (
            OpenTelemetryMiddleware,
        )

        taskiq_fastapi.CarryRequestContext(
            lambda *_: None,  # type: ignore[arg-type,return-value]
            broker=broker,
        )
        assert taskiq_fastapi.trace_tasks(broker) is broker
        taskiq_fastapi.trace_tasks(broker)  # again: still one
        kinds = [type(each) for each in broker.middlewares]
        assert kinds[0] is OpenTelemetryMiddleware  # first: current for the rest
        assert kinds.count(OpenTelemetryMiddleware) == 1
        assert broker.middlewares[0].broker is broker
        return
    with pytest.raises(taskiq_fastapi.TracingUnavailableError) as raised:
        taskiq_fastapi.trace_tasks(broker)
    assert str(raised.value) == (
        f"trace_tasks needs taskiq 0.12 or newer, whose OpenTelemetry middleware "
        f"it adds; taskiq {installed} is installed: "
        "pip install 'taskiq-fastapi[otel]'."
    )
    assert broker.middlewares == []


@pytest.mark.parametrize(
    ("text", "release"),
    [("0.11.20", (0, 11, 20)), ("0.12.0", (0, 12, 0)), ("0.12.0rc1", (0, 12, 0)),
     ("1.0.0+local.3", (1, 0, 0))],
)  # fmt: skip
def test_release_numbers(text: str, release: tuple[int, ...]) -> None:
    assert _release(text) == release


def test_without_trace_tasks_taskiqs_middleware_is_never_imported() -> None:
    """(FastAPI itself may import OpenTelemetry's API: newer ones do.)"""
    code = (
        "import sys, taskiq_fastapi, taskiq_fastapi_cli.runtime.runner\n"
        "print('taskiq.middlewares.opentelemetry_middleware' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.stdout == "False\n", result.stderr
