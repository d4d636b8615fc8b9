"""OpenTelemetry spans for every request (`--otlp-endpoint`), drawn from the receipts the edges keep.

Imported only when tracing is on (the `otel` extra) or by tests. Nothing here runs while a request
works: its receipt records plain clock readings, and once the answer is out its spans are made from
them, with the receipt's start and end times, on the processor's thread (the event loop hands over the
request's record, a deque append; see `SpanBatcher.on_end_later`):

- the request's span (SERVER; "convserve_v1/Classify", "kserve_v2/ModelInfer", "POST /v2/models/
  {model}/infer"), a child of the client's span when it sent a W3C `traceparent`, else the root of a
  trace whose id is the receipt's (the one the answer's `server-timing` and the access log show);
- its children `receive`, `decode`, `queue`, `compute`, `respond`, one after the other;
- one `batch` span per model call, the root of its own trace, linking to the span of every request
  whose rows it ran (a batch serves many traces, so it belongs to none).

Spans whose times are all known when they are written need none of the SDK's machinery for a live
span (a lock, a sampler call and attribute checks per span: about 25 µs each here, the whole budget of
a small request): they are made finished, as the SDK's `ReadableSpan`, and a request's spans are handed
to the processor in one go (`serving.span_export.SpanBatcher`). The sampler (`OTEL_TRACES_SAMPLER`;
by default always, and a client's sampled span's children too, which needs no call) decides once per
request; a batch is written when one of its requests is. The request's ids are drawn when first needed
(a batch links to it, and may be made before it): `receipt.span` holds its `SpanContext`, written on
the processor's thread only. The processor is a
`SpanBatcher` with the OTLP/HTTP exporter in the server, and what a test gives `install`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.sampling import DEFAULT_ON
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags

from serving.core import receipt as receipts_core
from serving.core.receipt import Receipt
from serving.protocols import receipts
from serving.protocols.receipts import Ended
from serving.protocols.status import RateLimitedLog
from serving.span_export import Build, SpanBatcher

log = logging.getLogger(__name__)
trouble = RateLimitedLog(log)

SERVICE_NAME = "convserve"
SCOPE = InstrumentationScope("convserve.serving")
EXPORT_TIMEOUT_S = 5.0  # one OTLP export (a collector that is down must not hold the shutdown long)
SAMPLED, NOT_SAMPLED = TraceFlags(TraceFlags.SAMPLED), TraceFlags(TraceFlags.DEFAULT)
UNSET = Status(StatusCode.UNSET)

Stage = tuple[str, float, float, dict[str, Any] | None]


def otlp_processor(endpoint: str) -> SpanProcessor:
    """Batches of spans sent to `endpoint` (OTLP over HTTP/protobuf) from a background thread; when the
    collector is slow or down, its queue fills and spans are dropped, never a request slowed."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return SpanBatcher(OTLPSpanExporter(endpoint=endpoint, timeout=EXPORT_TIMEOUT_S))


def failed(status: str) -> bool:
    """A gRPC code other than OK, or an HTTP status of 400 and up."""
    return int(status) >= 400 if status.isdigit() else status != "OK"


def span_name(record: Ended) -> str:
    return record.method if record.protocol == "http" else f"{record.protocol}/{record.method}"


class Tracing:
    """Spans from receipts (see the module's docstring); `install` puts one in place."""

    def __init__(self, processor: SpanProcessor) -> None:
        # The provider holds what OpenTelemetry's environment variables say (resource, sampler), and
        # the processor, which it flushes and shuts down.
        self.provider = TracerProvider(
            resource=Resource.create({"service.name": SERVICE_NAME}),
            shutdown_on_exit=False,  # `uninstall` flushes it, within the server's grace period
        )
        self.provider.add_span_processor(processor)
        self.processor = processor
        self.resource = self.provider.resource
        self.sampler = self.provider.sampler
        # The default sampler samples every request (a client's span is taken as sampled): no call.
        self.always = self.sampler.get_description() == DEFAULT_ON.get_description()
        hand_many = getattr(processor, "on_end_many", None)
        self.hand: Callable[[Sequence[ReadableSpan]], None] = hand_many or self._one_by_one
        # A processor that builds spans on its own thread (SpanBatcher) gets what to build them of; the
        # event loop then spends a deque append on each request and batch. Others get them built.
        # Unsampled requests are handed over too (the sampler decides on that thread): under a low
        # sampling ratio they still count against the processor's bound.
        self.later: Callable[[Build, Any], None] = getattr(processor, "on_end_later", None) or self._now
        self._request_spans, self._batch_spans = self.request_spans, self.batch_spans  # bound once
        self.ids = self.provider.id_generator
        # Receipts read time.perf_counter; spans want ns since the epoch. One offset, taken once.
        self.offset_ns = time.time_ns() - time.perf_counter_ns()

    def ns(self, seconds: float) -> int:
        return int(seconds * 1e9) + self.offset_ns

    def _one_by_one(self, spans: Sequence[ReadableSpan]) -> None:
        for span in spans:
            self.processor.on_end(span)

    def _now(self, build: Build, what: Any) -> None:
        self.hand(build(what))

    def span(
        self,
        name: str,
        context: SpanContext,
        parent: SpanContext | None,
        start: int,
        end: int,
        attributes: dict[str, Any] | None = None,
        links: Sequence[Link] = (),
        kind: SpanKind = SpanKind.INTERNAL,
        status: Status = UNSET,
    ) -> ReadableSpan:
        # By position, in the order of `ReadableSpan.__init__` (a span's test checks each field), the one
        # place that knows it: keywords cost 0.5 µs a span more (1.12 against 0.61 µs).
        return ReadableSpan(
            name, context, parent, self.resource, attributes, (), links, kind, None, status, start, end, SCOPE
        )

    # The request's span -------------------------------------------------------------------------

    def request_context(self, receipt: Receipt) -> SpanContext:
        """The ids of the receipt's span (drawn, and sampled or not, the first time they are asked for)."""
        if receipt.span is not None:
            return receipt.span
        client = self.client_context(receipt)
        trace_id = client.trace_id if client is not None else int(receipt.trace_id or "0", 16)
        trace_id = trace_id or self.ids.generate_trace_id()
        flags = SAMPLED
        if not self.always:
            parent = trace.set_span_in_context(NonRecordingSpan(client)) if client is not None else Context()
            decision = self.sampler.should_sample(parent, trace_id, "request", SpanKind.SERVER)
            flags = SAMPLED if decision.decision.is_sampled() else NOT_SAMPLED
        receipt.span = SpanContext(trace_id, self.ids.generate_span_id(), False, flags)
        return receipt.span

    @staticmethod
    def client_context(receipt: Receipt) -> SpanContext | None:
        """The client's span (W3C `traceparent`), as a remote parent; sampled, as the receipt keeps no
        flags."""
        if not (receipt.trace_id and receipt.parent_span_id):
            return None
        return SpanContext(int(receipt.trace_id, 16), int(receipt.parent_span_id, 16), True, SAMPLED)

    def ended(self, record: Ended) -> None:
        """The listener: the request's span and its stages, ending at the receipt's total (made later,
        on the processor's thread: the receipt is final once its request has ended)."""
        try:
            self.later(self._request_spans, record)
        except Exception as error:  # tracing must never fail a request
            trouble(
                "request-span", logging.WARNING, "a request's spans could not be recorded", exc_info=error
            )

    def request_spans(self, record: Ended) -> Sequence[ReadableSpan]:
        receipt = record.receipt
        context = self.request_context(receipt)
        if not context.trace_flags.sampled:
            return ()
        end = receipt.started + receipt.total
        trace_id, flags, new_id = context.trace_id, context.trace_flags, self.ids.generate_span_id
        spans = [  # the stages, children of the request's span
            self.span(
                name,
                SpanContext(trace_id, new_id(), False, flags),
                context,
                self.ns(begun),
                self.ns(ended),
                more,
            )
            for name, begun, ended, more in stages(receipt, end)
        ]
        status = Status(StatusCode.ERROR, record.status) if failed(record.status) else UNSET
        request = self.span(
            span_name(record),
            context,
            self.client_context(receipt),
            self.ns(receipt.started),
            self.ns(end),
            request_attributes(record),
            (),
            SpanKind.SERVER,
            status,
        )
        spans.append(request)
        return spans

    # Batches --------------------------------------------------------------------------------------

    def batch_ran(self, ran: Sequence[Receipt], rows: int, started: float, done: float) -> None:
        """The batcher's observer: one span per model call, made later (`batch_spans`). `ran` is the
        batcher's own list, made for this call."""
        try:
            self.later(self._batch_spans, (ran, rows, started, done))
        except Exception as error:  # never into the batcher: its callers still get their rows
            trouble("batch-span", logging.WARNING, "a batch's span could not be recorded", exc_info=error)

    def batch_spans(self, batch: tuple[Sequence[Receipt], int, float, float]) -> Sequence[ReadableSpan]:
        """A batch's span, linked to each sampled request it served."""
        ran, rows, started, done = batch
        contexts = [self.request_context(receipt) for receipt in ran]
        links = [Link(context) for context in contexts if context.trace_flags.sampled]
        if not links:
            return ()
        first = ran[0]
        attributes = {
            "convserve.batch_size": rows,
            "convserve.requests": len(ran),
            "convserve.model": first.model,
            "convserve.model_version": first.version,
        }
        context = SpanContext(self.ids.generate_trace_id(), self.ids.generate_span_id(), False, SAMPLED)
        start, end = self.ns(started), self.ns(done)
        return (self.span("batch", context, None, start, end, attributes, links),)


def request_attributes(record: Ended) -> dict[str, Any]:
    receipt = record.receipt
    attributes: dict[str, Any] = {
        "convserve.protocol": record.protocol,
        "convserve.status": record.status,
        "convserve.images": record.images,
        "convserve.batch_sizes": tuple(receipt.batch_sizes),
        "convserve.peer": record.peer,
    }
    if record.protocol == "http":  # and OpenTelemetry's own names, which tracing UIs know
        verb, _, route = record.method.partition(" ")
        attributes |= {"http.request.method": verb, "http.route": route}
        if record.status.isdigit():
            attributes["http.response.status_code"] = int(record.status)
    else:
        attributes |= {"rpc.system": "grpc", "rpc.method": record.method}
    if receipt.model:
        attributes["convserve.model"] = receipt.model
        attributes["convserve.model_version"] = receipt.version
    return attributes


def stages(receipt: Receipt, end: float) -> list[Stage]:
    """(name, start, end, attributes) of each stage the request went through, in order: receive
    (arrival → decode, or hand-over to the batcher), decode, queue, compute, respond (→ the answer)."""
    first_step = receipt.decode_at if receipt.decode_at is not None else receipt.enqueued
    found: list[Stage] = [("receive", receipt.started, first_step if first_step is not None else end, None)]
    if receipt.decode_at is not None:
        found.append(("decode", receipt.decode_at, receipt.decode_at + receipt.decode_s, None))
    if receipt.enqueued is not None and receipt.first_batch is not None:
        found.append(("queue", receipt.enqueued, receipt.first_batch, None))
    if receipt.first_batch is not None and receipt.last_done is not None:
        batches = {"convserve.batch_sizes": tuple(receipt.batch_sizes), "convserve.batches": receipt.batches}
        found.append(("compute", receipt.first_batch, receipt.last_done, batches))
    found.append(("respond", found[-1][2], end, None))  # from the last stage's end
    return found


_installed: list[Tracing] = []


def install(processor: SpanProcessor) -> Tracing:
    """Tracing on, for this process: every request's spans and every batch's go to `processor`. One
    at a time: the batch observer is the last one installed, and a receipt's span ids are drawn on
    its processor's thread."""
    tracing = Tracing(processor)
    _installed.append(tracing)
    receipts.listeners.append(tracing.ended)
    receipts_core.observer = tracing.batch_ran
    return tracing


def uninstall(tracing: Tracing, timeout_s: float = EXPORT_TIMEOUT_S) -> None:
    """Tracing off: the listener and the batch observer removed, the spans still queued sent (at most
    `timeout_s`, on a daemon thread: a collector that is down cannot hold the process)."""
    if tracing.ended in receipts.listeners:
        receipts.listeners.remove(tracing.ended)
    if tracing in _installed:
        _installed.remove(tracing)
    if receipts_core.observer == tracing.batch_ran:
        receipts_core.observer = _installed[-1].batch_ran if _installed else None
    closing = threading.Thread(target=tracing.provider.shutdown, name="tracing-shutdown", daemon=True)
    closing.start()
    closing.join(timeout_s)
