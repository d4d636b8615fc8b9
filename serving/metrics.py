"""The Prometheus endpoint (`--metrics-port`): figures the server already keeps, read when scraped.

Nothing here runs on the request path. The batchers' counters and histograms (`BatchStats`), the
registry's version states, the input budget and the per-protocol request counts (`CallStats`) are
plain numbers kept by the event loop thread; a scrape copies them on that thread (one callback, so
the copy is consistent and no lock is needed) and formats them in the HTTP server's own thread.
Each server has its own `CollectorRegistry`, so several servers in one process never share figures.
The batch-size histogram is built from `BatchStats.batch_sizes`, the very counts `GetModel` returns.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from serving.core.batch_settings import BatchStats
from serving.core.budget import InputBudget
from serving.core.timing import Histogram
from serving.models.registry import ModelRegistry, VersionState
from serving.protocols.calls import CallStats

SCRAPE_TIMEOUT_S = 5.0  # the event loop must hand over a copy within this


@dataclass
class HistogramCopy:
    buckets: list[tuple[float, int]]  # cumulative, ending with +inf
    total: float

    @classmethod
    def of(cls, histogram: Histogram) -> HistogramCopy:
        return cls(histogram.cumulative(), histogram.total)


@dataclass
class VersionCopy:
    model: str
    version: str
    state: VersionState
    stats: BatchStats | None = None  # a copy of the numbers; None when the version is not loaded
    batch_sizes: dict[int, int] = field(default_factory=dict)
    max_batch_size: int = 0
    pending_rows: int = 0
    queue_wait: HistogramCopy | None = None
    decode: HistogramCopy | None = None
    compute: HistogramCopy | None = None
    preprocessing_drift: bool = False  # served although its fixtures did not match (certificate.py)


@dataclass
class CallsCopy:
    labels: tuple[str, str, str]  # protocol, model, version
    ok: int
    images: int
    failed: dict[str, int]
    duration: HistogramCopy


@dataclass
class Snapshot:
    versions: list[VersionCopy]
    calls: list[CallsCopy]
    pending_bytes: int
    budget_bytes: int


def take_snapshot(registry: ModelRegistry, budget: InputBudget, calls: CallStats | None) -> Snapshot:
    """Copies every figure; runs on the event loop thread, so nothing changes while it reads."""
    versions = []
    for entry in registry.entries():
        copy = VersionCopy(entry.name, str(entry.version), entry.state)
        model = entry.model
        if model is not None:
            stats = model.stats
            copy.stats = BatchStats(
                submitted=stats.submitted,
                items=stats.items,
                batches=stats.batches,
                rejected=stats.rejected,
                expired=stats.expired,
                dropped_rows=stats.dropped_rows,
            )
            copy.batch_sizes = dict(stats.batch_sizes)
            copy.max_batch_size = model.batcher.config.max_batch_size
            copy.pending_rows = model.batcher.queued_rows
            copy.queue_wait = HistogramCopy.of(stats.queue_wait)
            copy.decode = HistogramCopy.of(stats.decode)
            copy.compute = HistogramCopy.of(stats.compute)
            copy.preprocessing_drift = bool(model.preprocessing_drift)
        versions.append(copy)
    series = [] if calls is None else list(calls.series.items())
    return Snapshot(
        versions,
        [
            CallsCopy(labels, s.ok, s.images, dict(s.failed), HistogramCopy.of(s.duration))
            for labels, s in series
        ],
        budget.used,
        budget.limit,
    )


def batch_size_bounds(max_batch_size: int) -> list[int]:
    """The batch-size buckets: powers of two below the largest batch, then the largest batch itself."""
    bounds, bound = [], 1
    while bound < max_batch_size:
        bounds.append(bound)
        bound *= 2
    return [*bounds, max_batch_size]


def histogram_buckets(copy: HistogramCopy) -> list[tuple[str, int]]:
    return [(floatToGoString(bound), count) for bound, count in copy.buckets]


def families(snapshot: Snapshot) -> Iterator[Metric]:
    """The Prometheus metric families of one snapshot (docs/reference/metrics.md is generated from them)."""
    call_labels = ["protocol", "model", "version"]
    requests = CounterMetricFamily(
        "convserve_requests",
        "Requests answered, by protocol, model, version and gRPC status code (a stream's messages "
        "count one by one).",
        labels=[*call_labels, "code"],
    )
    images = CounterMetricFamily(
        "convserve_images", "Images in the requests answered OK.", labels=call_labels
    )
    duration = HistogramMetricFamily(
        "convserve_request_duration_seconds",
        "Time from a request reaching the server's handler to its answer, requests answered OK.",
        labels=call_labels,
    )
    for c in snapshot.calls:
        labels = list(c.labels)
        if c.ok:
            requests.add_metric([*labels, "OK"], c.ok)
        for code, count in sorted(c.failed.items()):
            requests.add_metric([*labels, code], count)
        if c.ok:
            images.add_metric(labels, c.images)
            duration.add_metric(labels, histogram_buckets(c.duration), c.duration.total)
    yield from (requests, images, duration)

    version_labels = ["model", "version"]
    state = GaugeMetricFamily(
        "convserve_model_state",
        "1 for the state each model version is in (LOADING, WARMING, READY, UNAVAILABLE, DRAINING, "
        "UNLOADED), 0 for the others.",
        labels=[*version_labels, "state"],
    )
    timed = {
        "queue_wait": HistogramMetricFamily(
            "convserve_queue_wait_seconds",
            "Time a request's rows waited in the batcher's queue for a batch.",
            labels=version_labels,
        ),
        "decode": HistogramMetricFamily(
            "convserve_decode_seconds",
            "Time to turn a request's images into model input rows (decoding, or taking raw tensors).",
            labels=version_labels,
        ),
        "compute": HistogramMetricFamily(
            "convserve_compute_seconds",
            "Time of one model call on one batch (stacking the rows and running the model).",
            labels=version_labels,
        ),
    }
    batch_size = HistogramMetricFamily(
        "convserve_batch_size", "Rows in each batch the batcher formed.", labels=version_labels
    )
    pending_rows = GaugeMetricFamily(
        "convserve_pending_rows",
        "Rows queued for a batch, not yet handed to the model.",
        labels=version_labels,
    )
    rejected = CounterMetricFamily(
        "convserve_rejected_requests",
        "Requests refused as overloaded (RESOURCE_EXHAUSTED: the queue or the input budget was full).",
        labels=version_labels,
    )
    expired = CounterMetricFamily(
        "convserve_expired_requests",
        "Requests whose deadline passed while they were decoded or queued (DEADLINE_EXCEEDED).",
        labels=version_labels,
    )
    dropped = CounterMetricFamily(
        "convserve_dropped_rows",
        "Queued rows taken off the queue without running: their deadline passed or their caller left.",
        labels=version_labels,
    )
    drift = GaugeMetricFamily(
        "convserve_preprocessing_drift",
        "1 for a loaded version served although its preprocessing certificate failed "
        "(--allow-preprocessing-drift): its inputs differ from training's; 0 otherwise.",
        labels=version_labels,
    )
    for v in snapshot.versions:
        labels = [v.model, v.version]
        for s in VersionState:
            state.add_metric([*labels, s.value], 1.0 if s is v.state else 0.0)
        if v.stats is None:
            continue
        drift.add_metric(labels, 1.0 if v.preprocessing_drift else 0.0)
        for name, family in timed.items():
            copy: HistogramCopy = getattr(v, name)
            family.add_metric(labels, histogram_buckets(copy), copy.total)
        sizes = v.batch_sizes.items()
        buckets = [
            (floatToGoString(bound), sum(count for size, count in sizes if size <= bound))
            for bound in batch_size_bounds(v.max_batch_size)
        ]
        buckets.append(("+Inf", v.stats.batches))
        batch_size.add_metric(labels, buckets, v.stats.items)
        pending_rows.add_metric(labels, v.pending_rows)
        rejected.add_metric(labels, v.stats.rejected)
        expired.add_metric(labels, v.stats.expired)
        dropped.add_metric(labels, v.stats.dropped_rows)
    yield from (state, *timed.values(), batch_size, pending_rows, rejected, expired, dropped, drift)

    yield GaugeMetricFamily(
        "convserve_pending_bytes",
        "Model input bytes reserved by requests being decoded or queued (the input budget in use).",
        value=snapshot.pending_bytes,
    )
    yield GaugeMetricFamily(
        "convserve_input_budget_bytes", "The input budget (--input-budget-mb).", value=snapshot.budget_bytes
    )


class ServerCollector(Collector):
    """Reads the server's figures at scrape time, copied on the event loop's thread."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        registry: ModelRegistry,
        budget: InputBudget,
        calls: CallStats | None,
    ) -> None:
        self.loop = loop
        self.registry = registry
        self.budget = budget
        self.calls = calls

    def snapshot(self) -> Snapshot:
        return asyncio.run_coroutine_threadsafe(self._copy(), self.loop).result(SCRAPE_TIMEOUT_S)

    async def _copy(self) -> Snapshot:
        """Runs on the event loop, where every change to the registry and the stats is made."""
        return take_snapshot(self.registry, self.budget, self.calls)

    def collect(self) -> Iterator[Metric]:
        yield from families(self.snapshot())


class MetricsEndpoint:
    """`GET /metrics` in Prometheus's text format, from its own thread and registry."""

    def __init__(self, collector: ServerCollector) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self, host: str, port: int) -> int:
        try:
            server, self._thread = start_http_server(port, host, self.registry)
        except OSError as exc:
            raise OSError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from None
        self._server = server
        return server.server_port

    def stop(self) -> None:
        """Blocks until the HTTP thread has stopped (call it off the event loop: a scrape may wait on it)."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)
        self._server = self._thread = None
