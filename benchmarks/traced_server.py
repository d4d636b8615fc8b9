"""`convserve serve` with tracing on and every span kept in memory: what tracing costs, without a
collector or a network in the measure.

    python benchmarks/traced_server.py --models benchmarks/models --port 8500 [serve flags ...]

The server's own `--otlp-endpoint` path runs (the request and batch spans built from each receipt,
handed to its `SpanBatcher`), with the SDK's `InMemorySpanExporter` in place of the OTLP exporter,
emptied after every export: kept for the whole run, millions of spans would make Python's garbage
collector walk them all, a cost of the benchmark, not of tracing. Needs the `otel` extra.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from collections.abc import Sequence

from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from serving import tracing
from serving.cli import main
from serving.span_export import SpanBatcher


class LastBatchInMemory(InMemorySpanExporter):
    """The SDK's in-memory exporter, holding the last batch only; `exported` counts them all."""

    exported = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.clear()
        LastBatchInMemory.exported += len(spans)
        return super().export(spans)


def in_memory_processor(endpoint: str) -> SpanProcessor:
    """Stands in for `tracing.otlp_processor`: the same batching processor, the in-memory exporter."""
    return SpanBatcher(LastBatchInMemory())


if __name__ == "__main__":
    tracing.otlp_processor = in_memory_processor
    sys.exit(main(["serve", *sys.argv[1:], "--otlp-endpoint", "http://in-memory.invalid/v1/traces"]))
