"""An API traced with OpenTelemetry's FastAPI instrumentor, whose task logs (issue 25).

Served by a real uvicorn and a real worker in tests/test_tracing_worker.py.
Both processes import it, so both write their spans to SPANS_FILE: the
worker through a batching processor (SPANS_BATCHED=1), as apps configure it,
uvicorn at once, as it ends on SIGTERM by the signal itself, without atexit
hooks. TRACE_TASKS=1 calls `trace_tasks`.
"""

import json
import logging
import os
from collections.abc import Sequence
from typing import Annotated, Any

from fastapi import Depends, FastAPI
from opentelemetry import trace
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)

import taskiq_fastapi
from workerapp.app import lifespan
from workerapp.broker import broker

logger = logging.getLogger("workerapp.traced")


class FileExporter(SpanExporter):
    """One JSON line per span, appended by whichever process ends it."""

    def __init__(self, path: str) -> None:
        self.path = path

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = "".join(json.dumps(_row(span)) + "\n" for span in spans)
        with open(self.path, "a") as file:
            file.write(lines)
        return SpanExportResult.SUCCESS


def _row(span: ReadableSpan) -> dict[str, Any]:
    assert span.context is not None
    return {
        "name": span.name,
        "kind": span.kind.name,
        "trace_id": f"{span.context.trace_id:032x}",
        "span_id": f"{span.context.span_id:016x}",
        "parent_id": f"{span.parent.span_id:016x}" if span.parent else None,
        "pid": os.getpid(),
    }


provider = TracerProvider()
exporter = FileExporter(os.environ["SPANS_FILE"])
batched = os.environ.get("SPANS_BATCHED") == "1"
provider.add_span_processor(
    BatchSpanProcessor(exporter) if batched else SimpleSpanProcessor(exporter)
)
trace.set_tracer_provider(provider)

if os.environ.get("TRACE_TASKS") == "1":
    taskiq_fastapi.trace_tasks(broker)


def checked() -> int:
    logger.info("in a dependency")
    return 1


@broker.task
async def logged(one: Annotated[int, Depends(checked)]) -> int:
    logger.info("in the task")
    with trace.get_tracer(__name__).start_as_current_span("inside the task"):
        pass
    logging.getLogger("some.library").warning("from a library")
    return os.getpid()


app = FastAPI(lifespan=taskiq_fastapi.broker_lifespan(broker, lifespan))
app.add_middleware(
    taskiq_fastapi.CarryRequestContext, broker=broker, headers=["X-Request-ID"]
)
FastAPIInstrumentor.instrument_app(app)


@app.get("/traced")
async def kick() -> dict[str, Any]:
    task = await logged.kiq()
    result = await task.wait_result(timeout=30)
    return {"task_id": task.task_id, "pid": result.return_value}
