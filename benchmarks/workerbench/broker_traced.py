"""The bench broker with `trace_tasks`, and an SDK whose batches go nowhere.

Spans are recorded and batched as a real exporter's would be, so the row
measures what tracing costs a worker, not an exporter's network.
"""

from collections.abc import Sequence

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SpanExporter,
    SpanExportResult,
)

import taskiq_fastapi
from benchmarks.workerbench.broker import broker


class Discard(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


provider = TracerProvider()
provider.add_span_processor(BatchSpanProcessor(Discard()))
trace.set_tracer_provider(provider)
taskiq_fastapi.trace_tasks(broker)
