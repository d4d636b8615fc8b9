"""Finished spans to an exporter (OTLP) from a background thread, a request's spans in one hand-over.

The SDK's `BatchSpanProcessor` takes spans one at a time (`on_end`: about 2 µs each, and a request
has seven), which on a small model is 3 % of the images/s by itself. `SpanBatcher` takes a request's
spans in one call (`on_end_many`: a deque append), or what to build them from (`on_end_later`: the
spans are made on its thread, just before their export, and the event loop only appends), and
exports them in batches every `delay_s`, or sooner once `wake_after` requests wait. When the exporter
falls behind (a collector slow or down), hand-overs past `max_requests` are lost, counted in
`dropped`, never a request slowed.

Imported with `serving.tracing` only (the `otel` extra).
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.sdk.trace.export import SpanExporter

from serving.protocols.status import RateLimitedLog

log = logging.getLogger(__name__)
trouble = RateLimitedLog(log)

# Spans from what they are built of (a request's record, a batch's receipts): called on the thread.
Build = Callable[[Any], Sequence[ReadableSpan]]


class SpanBatcher(SpanProcessor):
    def __init__(
        self,
        exporter: SpanExporter,
        delay_s: float = 1.0,
        batch_size: int = 512,
        wake_after: int = 256,
        max_requests: int = 4096,
    ) -> None:
        self.exporter = exporter
        self.delay_s, self.batch_size = delay_s, batch_size
        self.wake_after, self.max_requests = wake_after, max_requests
        # deque appends and pops are atomic: the event loop appends, the thread pops, no lock. Each
        # entry is (None, spans) or (build, what build makes the spans of).
        self._queue: collections.deque[tuple[Build | None, Any]] = collections.deque()
        self._wake = threading.Event()
        # Held for a whole export pass: a flush that gets it knows no popped batch is still on its way.
        self._exporting = threading.Lock()
        self._stopping = False
        self.dropped = 0  # hand-overs (a request's spans, a batch's) lost to a full queue
        self._thread = threading.Thread(target=self._run, name="span-export", daemon=True)
        self._thread.start()

    # The SpanProcessor interface: spans one at a time still work (the SDK's own tracer).
    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        self.on_end_many((span,))

    def on_end_many(self, spans: Sequence[ReadableSpan]) -> None:
        """A request's spans, in one call from the event loop."""
        self.on_end_later(None, spans)

    def on_end_later(self, build: Build | None, what: Any) -> None:
        """Spans to be made by `build(what)` on the export thread (`what` must not change after this
        call); with `build` None, `what` are the spans."""
        queue = self._queue
        if self._stopping or len(queue) >= self.max_requests:
            self.dropped += 1
            return
        queue.append((build, what))
        if len(queue) == self.wake_after:
            self._wake.set()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        """True once everything queued before the call has been exported (here, in the caller's
        thread, unless the export thread is in the middle of a pass: then once that pass is done)."""
        if not self._exporting.acquire(timeout=timeout_millis / 1000):
            return False
        try:
            self._export_queued()
        finally:
            self._exporting.release()
        return True

    def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=10)
        self.exporter.shutdown()

    # The thread -----------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            self._wake.wait(self.delay_s)
            self._wake.clear()
            stopping = self._stopping  # read first: what came in before it was set is exported below
            with self._exporting:
                self._export_queued()
            if stopping:
                return

    def _export_queued(self) -> None:
        queue = self._queue
        while queue:
            batch: list[ReadableSpan] = []
            while queue and len(batch) < self.batch_size:
                build, what = queue.popleft()
                if build is None:
                    batch.extend(what)
                    continue
                try:
                    batch.extend(build(what))
                except Exception as error:  # one request's spans lost, never the thread
                    trouble("build", logging.WARNING, "spans could not be made", exc_info=error)
            if not batch:
                continue
            try:
                self.exporter.export(batch)
            except Exception as error:  # an exporter that raises must not end the thread
                trouble("export", logging.WARNING, "spans could not be exported", exc_info=error)
