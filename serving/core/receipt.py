"""A receipt for one request: where the server's time went, and which batches its rows ran in.

Every edge starts one when a request arrives and hands it to the data plane in the request; the data
plane adds the decode, the batcher the queue wait, the model calls and the size of every batch the
request's rows ran in (several when it was split). The edge seals it when its answer is ready and
sends it back (gRPC trailing metadata, the Open Inference Protocol's response parameters, HTTP
`Server-Timing`, the access log, the trace's spans).

The stages are wall-clock segments on one clock (`time.perf_counter`), one after the other, so they
add up: decode, then queue (first row handed over → its first batch starts), then compute (first batch
starts → last batch done: the model calls, with the hand-off to their worker thread), and `other`, the
rest of the total (parsing, checks, top-k, building the answer). A request whose work runs in several
batches at once (an explanation: graph and occlusion copies) counts each stage once, from its first
start to its last end.

Cheap on purpose, since it is always on: a few clock reads and attribute writes per request, nothing
formatted until the edge asks.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import quote

# Left as they are in a `desc="..."`: printable ASCII (gRPC metadata allows nothing else) but the
# quoted-string's own `"` and `\`, the comma naive readers split the header on, and `%` itself.
DESC_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) not in '%"\\,')
MAX_BATCH_SIZES = 32  # batch sizes listed per receipt; an explanation's copies can run in hundreds
STAGES = ("decode", "queue", "compute", "other", "total")
STAGES_TIMING = ", ".join(f"{stage};dur=%.3f" for stage in STAGES)

# Called once per batch with the receipts of its requests (tracing links a batch to each of them);
# None unless tracing is on (`serving.tracing`).
BatchObserver = Callable[[Sequence["Receipt"], int, float, float], None]


class Receipt:
    """Times in seconds on `time.perf_counter`'s clock; `trace_id` as 32 hex digits, or ""."""

    __slots__ = (
        "_figures",
        "batch_sizes",
        "batches",
        "decode_at",
        "decode_s",
        "enqueued",
        "first_batch",
        "last_done",
        "model",
        "parent_span_id",
        "span",
        "started",
        "total_s",
        "trace_id",
        "version",
    )

    def __init__(self, started: float | None = None, trace_id: str = "", parent_span_id: str = "") -> None:
        self.started = time.perf_counter() if started is None else started
        self.trace_id = trace_id
        self.parent_span_id = parent_span_id
        self.span: Any = None  # the request's tracing span, when tracing is on
        self.decode_s = 0.0
        self.decode_at: float | None = None  # when the (first) decode began
        self.enqueued: float | None = None
        self.first_batch: float | None = None
        self.last_done: float | None = None
        self.batches = 0
        self.batch_sizes: list[int] = []
        self.model = ""
        self.version = 0
        self.total_s: float | None = None
        self._figures: tuple[float, float, float, float, float] | None = None  # once asked, kept

    # Recorded along the request path -----------------------------------------------------------

    def decoded(self, started: float, seconds: float) -> None:
        if self.decode_at is None:
            self.decode_at = started
        self.decode_s += seconds

    def handed_over(self, now: float) -> None:
        """Rows of this request reached a batcher."""
        if self.enqueued is None:
            self.enqueued = now

    # A sealed receipt records no more batches: a call that was cancelled or ran past its deadline
    # has ended (its figures sent, its spans handed to another thread) while a batch holding its rows
    # may still finish.

    def batch_started(self, rows: int, now: float) -> None:
        if self.total_s is not None:
            return
        if self.first_batch is None or now < self.first_batch:  # batches in flight can finish out of order
            self.first_batch = now
        self.batches += 1
        if len(self.batch_sizes) < MAX_BATCH_SIZES:
            self.batch_sizes.append(rows)

    def batch_done(self, now: float) -> None:
        if self.total_s is not None:
            return
        if self.last_done is None or now > self.last_done:
            self.last_done = now

    def answered_by(self, model: str, version: int) -> None:
        self.model, self.version = model, version

    def seal(self) -> Receipt:
        """Fixes the total (once: the first edge step that needs the figures seals them)."""
        if self.total_s is None:
            self.total_s = time.perf_counter() - self.started
        return self

    # The figures -------------------------------------------------------------------------------

    @property
    def total(self) -> float:
        return self.seal().total_s  # type: ignore[return-value]  # seal() sets it

    def figures_ms(self) -> tuple[float, float, float, float, float]:
        """(decode, queue, compute, other, total) in milliseconds; the first four add up to total.
        Worked out once, when first asked (sealed then): every answer asks twice or more (the
        `server-timing` value, the body's receipt or parameters, the access log)."""
        if self._figures is None:
            self._figures = self._measure()
        return self._figures

    def _measure(self) -> tuple[float, float, float, float, float]:
        total, decode = self.total, self.decode_s
        enqueued, first, last = self.enqueued, self.first_batch, self.last_done
        # queue: first row handed over -> first batch starts; compute: -> last batch done
        queue = first - enqueued if enqueued is not None and first is not None and first > enqueued else 0.0
        compute = last - first if first is not None and last is not None and last > first else 0.0
        other = max(0.0, total - decode - queue - compute)
        return decode * 1e3, queue * 1e3, compute * 1e3, other * 1e3, total * 1e3

    def stages_ms(self) -> dict[str, float]:
        """decode, queue, compute, other and total, in milliseconds; the first four add up to total."""
        return dict(zip(STAGES, self.figures_ms(), strict=True))

    def batch_text(self, separator: str = ",") -> str:
        """The batch sizes, comma-separated unless told ("8" or "32,32"); "+N" names batches left off
        the list."""
        if self.batches == 1:  # most requests (a third of the formatting's time went to the join)
            return str(self.batch_sizes[0])
        text = separator.join(map(str, self.batch_sizes))
        more = self.batches - len(self.batch_sizes)
        return f"{text}{separator}+{more}" if more > 0 else text

    def server_timing(self) -> str:
        """The whole receipt as one `Server-Timing` value: the HTTP header, and the one gRPC trailing
        metadata entry. The stages as `dur`, then the batch sizes, the version that answered and the
        trace id as `desc` (spaces, not commas, between batch sizes: naive readers split on commas).
        One %-format: it runs on every answer (a format per figure cost three times as much)."""
        text = STAGES_TIMING % self.figures_ms()
        if self.batches:
            text += f', batch;desc="{self.batch_text(" ")}"'
        if self.model:
            text += version_timing(self.model, self.version)
        if self.trace_id:
            text += f', trace;desc="{self.trace_id}"'
        return text

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """gRPC trailing metadata: one entry. Each entry costs the call (gRPC's header compression
        cannot reuse values that change every call): four entries cost 9 % of the images/s of a
        small model, one about 1 % (measured when receipts came; docs/guides/observability.md)."""
        return (("server-timing", self.server_timing()),)

    def fields(self) -> dict[str, Any]:
        """The receipt as plain values (JSON bodies, the Open Inference Protocol's parameters, logs)."""
        fields: dict[str, Any] = {f"{name}_ms": round(ms, 3) for name, ms in self.stages_ms().items()}
        fields["batch_sizes"] = self.batch_text()
        if self.model:
            fields["model"] = self.model
            fields["model_version"] = self.version
        if self.trace_id:
            fields["trace_id"] = self.trace_id
        return fields


@functools.lru_cache(maxsize=256)
def version_timing(model: str, version: int) -> str:
    """The `version` entry of a `Server-Timing` value; every answer repeats one of a few."""
    return f', version;desc="{desc_text(model)}/{version}"'


@functools.lru_cache(maxsize=256)
def desc_text(name: str) -> str:
    """A model's name as a `desc` may hold it (see DESC_SAFE). Only names of served models reach it,
    and every answer repeats one: encoded once each."""
    return quote(name, safe=DESC_SAFE)


def batch_ran(receipts: Sequence[Receipt], rows: int, started: float, done: float) -> None:
    """Every request's receipt learns of a batch its rows ran in (the batcher calls this)."""
    for receipt in receipts:
        receipt.batch_started(rows, started)
        receipt.batch_done(done)
    if observer is not None and receipts:
        observer(receipts, rows, started, done)


observer: BatchObserver | None = None  # set by `serving.tracing` while tracing is on
