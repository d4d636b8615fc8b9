"""The request ledger: every data-plane request counted once, by protocol, model, version and status.

Always on, and the only count of requests: the Prometheus families (`convserve_requests_total`),
`GetModel`'s `stats.requests` and `failed` and the Open Inference Protocol's `ModelStatistics` all read
it, so they agree exactly. The call gate, `gate.CallGate` (unary calls), `streams.answer_stream` (each
message of a stream) and the HTTP edge record here; the metrics endpoint reads a copy when scraped.
A request's status is the one the status table gives it: a unary call's is the code it was aborted
with; a stream message's is the code `answer_stream` turned into its error response. No handler
counts anything itself.

Labels stay bounded whatever clients send: a request answered OK is labelled with the model and
version that answered it; a failed one with those its request resolves to, or "" when it names no
model or version the server has.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from serving.core.timing import Histogram
from serving.models.registry import ModelRegistry

# (model, version as asked: 0 for the newest) of a request message.
Asked = Callable[[Any], tuple[str, int]]
# (model, version, images) of a response message, or None when it carries an error (a stream's).
Answered = Callable[[Any], tuple[str, str, int] | None]


@dataclass(frozen=True, slots=True)
class Reading:
    """How one data method's messages say what a request was for; each protocol module declares its own."""

    protocol: str  # the `protocol` label: convserve_v1, kserve_v2
    parse: Callable[[bytes], Any]  # the request message from its bytes (to label a failed unary call)
    asked: Asked
    answered: Answered


class Series:
    """The figures of one (protocol, model, version)."""

    __slots__ = ("duration", "failed", "failed_s", "images", "last_ms", "ok")

    def __init__(self) -> None:
        self.ok = 0
        self.images = 0
        self.duration = Histogram()  # requests answered OK
        self.failed: dict[str, int] = {}  # status code name -> requests
        self.failed_s = 0.0  # the failed requests' time in the server, summed
        self.last_ms = 0  # when a request was last answered OK, ms since the epoch


@dataclass(frozen=True, slots=True)
class VersionTotals:
    """One model version's requests over every protocol (what GetModel and ModelStatistics report)."""

    ok: int = 0
    ok_s: float = 0.0
    failed: int = 0
    failed_s: float = 0.0
    last_ms: int = 0


class CallStats:
    """Requests by (protocol, model, version) and status; images and duration of those answered OK.

    Written from the event loop thread only; the metrics endpoint reads a copy made on that thread.
    """

    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry
        self.series: dict[tuple[str, str, str], Series] = {}

    def _series(self, key: tuple[str, str, str]) -> Series:
        series = self.series.get(key)
        if series is None:
            series = self.series[key] = Series()
        return series

    def answered(self, protocol: str, model: str, version: str, images: int, seconds: float) -> None:
        series = self._series((protocol, model, version))
        series.ok += 1
        series.images += images
        series.duration.observe(seconds)
        series.last_ms = int(time.time() * 1000)

    def failed(self, reading: Reading, request: Any, code: str, seconds: float = 0.0) -> None:
        model, version = self.labels(reading, request)
        series = self._series((reading.protocol, model, version))
        series.failed[code] = series.failed.get(code, 0) + 1
        series.failed_s += seconds

    def of_version(self, model: str, version: int | str) -> VersionTotals:
        """A model version's requests summed over the protocols."""
        ok = failed = last_ms = 0
        ok_s = failed_s = 0.0
        version = str(version)
        for (_, name, number), series in self.series.items():
            if name == model and number == version:
                ok += series.ok
                ok_s += series.duration.total
                failed += sum(series.failed.values())
                failed_s += series.failed_s
                last_ms = max(last_ms, series.last_ms)
        return VersionTotals(ok, ok_s, failed, failed_s, last_ms)

    def labels(self, reading: Reading, request: Any) -> tuple[str, str]:
        """The model and version a request resolves to, or "" for what the server does not have."""
        if request is None:
            return "", ""
        try:
            entry = self.registry.entry(*reading.asked(request))
        except Exception:  # a name or version the server does not know, or not a valid one
            return "", ""
        return entry.name, str(entry.version)

    def record(
        self, reading: Reading, request: Any, response: Any, failure: str | None, seconds: float
    ) -> None:
        """One stream message's end: answered OK, or failed with the code name `failure`."""
        answer = reading.answered(response) if failure is None else None
        if answer is not None:
            self.answered(reading.protocol, answer[0], answer[1], answer[2], seconds)
        else:
            self.failed(reading, request, failure or "UNKNOWN", seconds)


# Set by the call gate around a stream call: how answer_stream reads each message (its receipt) and
# counts it in the ledger (stats: None only for a gate made without one, in tests).
STREAM: contextvars.ContextVar[tuple[Reading, CallStats | None] | None] = contextvars.ContextVar(
    "convserve_stream", default=None
)
