"""What the dynamic batcher is told (`BatchingConfig`: sizes, waits, priorities) and what it counts
(`BatchStats`: batches, their sizes, waits and model calls), apart from how it batches
(`serving.core.batching`), so that the metrics, `GetModel` and the settings read them alone."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

from serving.core import defaults
from serving.core.timing import Histogram


@dataclass(frozen=True)
class BatchingConfig:
    max_batch_size: int = defaults.MAX_BATCH_SIZE
    max_delay_s: float = defaults.MAX_DELAY_MS / 1000
    max_queue_rows: int = defaults.MAX_QUEUE_ROWS
    max_inflight: int = 2
    # A batch expected to take less than this runs in the event loop when nothing else is in flight.
    inline_below_s: float = defaults.INLINE_BELOW_MS / 1000
    # The longest low-priority rows wait before they go ahead of high-priority ones.
    low_max_wait_s: float = defaults.LOW_PRIORITY_MAX_WAIT_MS / 1000
    # Rows per batch of low-priority rows (0: a quarter of max_batch_size) while high rows come: a high
    # row that arrives while one runs waits for a short batch, not a full one.
    low_batch_size: int = 0
    # No high row for this long: low rows run in full batches.
    quiet_after_s: float = 0.05

    @property
    def low_rows_per_batch(self) -> int:
        return self.low_batch_size or max(1, self.max_batch_size // 4)

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.max_queue_rows < self.max_batch_size or self.max_inflight < 1:
            raise ValueError(f"invalid batching settings: {self}")
        if not 0 <= self.low_batch_size <= self.max_batch_size:
            raise ValueError(f"low_batch_size must be 0 (automatic) to max_batch_size: {self}")
        if self.max_delay_s < 0 or self.low_max_wait_s < 0:
            raise ValueError("max_delay and low_max_wait must not be negative")


@dataclass
class BatchStats:
    """Counters of one batcher. `rejected` and `expired` count requests (the data plane adds those
    refused or timed out before they reached the batcher); `dropped_rows` counts rows taken off the
    queue without running because their deadline passed or their caller went away."""

    submitted: int = 0  # calls into the batcher: one per classification, several per explanation
    items: int = 0
    batches: int = 0
    batch_sizes: collections.Counter[int] = field(default_factory=collections.Counter)
    rejected: int = 0
    expired: int = 0
    dropped_rows: int = 0
    # Model calls (stack + run), cumulative time per batch size, for Triton-style statistics.
    batch_compute_ns: collections.Counter[int] = field(default_factory=collections.Counter)
    # Waits from enqueue to batch and model calls one by one, in seconds, for the metrics' histograms;
    # `decode` is the data plane's: the time to turn each request's images into rows.
    queue_wait: Histogram = field(default_factory=Histogram)
    compute: Histogram = field(default_factory=Histogram)
    decode: Histogram = field(default_factory=Histogram)

    @property
    def queued(self) -> int:
        """Chunks that left the queue for a batch."""
        return self.queue_wait.count

    @property
    def queue_ns(self) -> int:
        return int(self.queue_wait.total * 1e9)

    @property
    def compute_ns(self) -> int:
        return sum(self.batch_compute_ns.values())
