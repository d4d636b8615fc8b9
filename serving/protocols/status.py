"""The one table from domain errors to gRPC status codes, and the log of what must not flood it.

Every protocol edge maps failures through `status_of`: a domain error keeps its message; anything
else is a bug, reaches the client as INTERNAL with a generic message, and its details are logged
(with a traceback, rate-limited) on the server only.
"""

from __future__ import annotations

import logging
import time

import grpc

from serving.core.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidInput,
    NotFound,
    Overloaded,
    ServingError,
    Unavailable,
    Unimplemented,
)

log = logging.getLogger(__name__)

STATUS_OF: dict[type[ServingError], grpc.StatusCode] = {
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    Unimplemented: grpc.StatusCode.UNIMPLEMENTED,
}
INTERNAL_MESSAGE = "internal error; the server's log has the details"


class RateLimitedLog:
    """Logs a kind of event at most once per `interval_s`, saying how many were left out meanwhile."""

    def __init__(self, logger: logging.Logger, interval_s: float = 10.0) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def __call__(
        self, key: str, level: int, message: str, *args: object, exc_info: BaseException | None = None
    ) -> None:
        now = time.monotonic()
        if now - self._last.get(key, -self.interval_s) < self.interval_s:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        self._last[key] = now
        left_out = self._suppressed.pop(key, 0)
        if left_out:
            message += f" ({left_out} more like it in the last {self.interval_s:.0f}s not logged)"
        self.logger.log(level, message, *args, exc_info=exc_info)


log_limited = RateLimitedLog(log)


def status_of(error: BaseException, method: str = "") -> tuple[grpc.StatusCode, str]:
    """The status code and message a client gets for `error`."""
    for kind in type(error).__mro__:
        code = STATUS_OF.get(kind)  # type: ignore[call-overload]
        if code is not None:
            return code, str(error)
    log_limited(
        f"internal:{type(error).__name__}",
        logging.ERROR,
        "unexpected %s in %s: %s",
        type(error).__name__,
        method or "a call",
        error,
        exc_info=error,
    )
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE
