"""The one table from domain errors to gRPC status codes and HTTP statuses, and the log of what must
not flood it.

Every protocol edge maps failures through `status_of` (gRPC) or `http_status_of` (HTTP), both
reading `STATUS_OF`: a domain error keeps its message; anything else is a bug, reaches the client as
INTERNAL / 500 with a generic message, and its details are logged (with a traceback, rate-limited)
on the server only.
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
    PermissionDenied,
    ServingError,
    TooLarge,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)

log = logging.getLogger(__name__)

Code = grpc.StatusCode
# Domain error -> (gRPC code, HTTP status). FailedPrecondition is 400 as Triton answers a repository call
# outside explicit model control; Overloaded is 429 (retry later), TooLarge 413.
STATUS_OF: dict[type[ServingError], tuple[grpc.StatusCode, int]] = {
    InvalidInput: (Code.INVALID_ARGUMENT, 400),
    NotFound: (Code.NOT_FOUND, 404),
    Unavailable: (Code.UNAVAILABLE, 503),
    Overloaded: (Code.RESOURCE_EXHAUSTED, 429),
    DeadlineExceeded: (Code.DEADLINE_EXCEEDED, 504),
    FailedPrecondition: (Code.FAILED_PRECONDITION, 400),
    TooLarge: (Code.RESOURCE_EXHAUSTED, 413),
    Unauthenticated: (Code.UNAUTHENTICATED, 401),
    PermissionDenied: (Code.PERMISSION_DENIED, 403),
    Unimplemented: (Code.UNIMPLEMENTED, 501),
}
INTERNAL = (Code.INTERNAL, 500)
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


def statuses_of(error: BaseException, method: str = "") -> tuple[grpc.StatusCode, int, str]:
    """The gRPC code, HTTP status and message a client gets for `error`."""
    for kind in type(error).__mro__:
        statuses = STATUS_OF.get(kind)
        if statuses is not None:
            return statuses[0], statuses[1], str(error)
    log_limited(
        f"internal:{type(error).__name__}",
        logging.ERROR,
        "unexpected %s in %s: %s",
        type(error).__name__,
        method or "a call",
        error,
        exc_info=error,
    )
    return INTERNAL[0], INTERNAL[1], INTERNAL_MESSAGE


def status_of(error: BaseException, method: str = "") -> tuple[grpc.StatusCode, str]:
    """The gRPC status code and message a client gets for `error`."""
    code, _, message = statuses_of(error, method)
    return code, message


def http_status_of(error: BaseException, route: str = "") -> tuple[int, str, str]:
    """The HTTP status, the gRPC code's name (the metrics' `code` label) and message for `error`."""
    code, status, message = statuses_of(error, route)
    return status, code.name, message
