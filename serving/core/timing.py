"""A histogram of durations as plain numbers: what the request path records, cheaply, for the metrics.

One `observe` is a bisect over a short tuple and two additions (well under a microsecond); nothing is
formatted or locked on the request path. Whoever exposes the figures (the server's Prometheus
endpoint) reads `counts` and `total` when it is asked. Used from the event loop thread only.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence

# Upper bounds in seconds: from a 20 µs digits call to a multi-second ResNet-18 queue under overload.
SECONDS_BOUNDS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


class Histogram:
    """Counts of observations per bucket (`counts[i]`: values ≤ `bounds[i]` and above the bound before;
    the last entry: above every bound) and their sum."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float] = SECONDS_BOUNDS) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations ≤ it) for every bound and then +inf: Prometheus's `le` buckets."""
        out, running = [], 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            out.append((bound, running))
        return out
