"""Domain errors: what went wrong, in the data plane's words.

The core never speaks gRPC or HTTP. The edges map these classes to gRPC codes and HTTP statuses in one
table (`serving.protocols.status`); anything else that escapes is a bug and becomes INTERNAL there.
"""

from __future__ import annotations


class ServingError(Exception):
    """Base of the errors a request can end with; the message is safe to send to the client."""


class InvalidInput(ServingError):
    """The request or one of its images cannot be used as sent."""


class NotFound(ServingError):
    """No such model or version."""


class Unavailable(ServingError):
    """The model (or the whole server) cannot take work now: loading, failed, draining, shutting down."""


class FailedPrecondition(ServingError):
    """The request is well formed but the server's state or mode does not allow it (e.g. loading a
    model while the server is not in explicit model control, or a model whose files do not load)."""


class Overloaded(ServingError):
    """A queue or memory budget is full; the client may retry later or elsewhere."""


class DeadlineExceeded(ServingError):
    """The caller's deadline passed before the work could be done."""


class TooLarge(ServingError):
    """The request is larger than the server takes (--max-message-mb)."""


class Unauthenticated(ServingError):
    """The request carries no bearer token, and the server needs one."""


class PermissionDenied(ServingError):
    """The request's bearer token is not one the server accepts."""


class Unimplemented(ServingError):
    """A part of a protocol this server does not offer (e.g. shared-memory tensors)."""


ECHO_LIMIT = 80  # characters of a client's value an error message repeats


def shown(value: object, limit: int = ECHO_LIMIT) -> str:
    """`repr(value)` cut to `limit` characters: error messages repeat what a client sent, never all of
    it (a 16 KiB model name would otherwise turn NOT_FOUND into RESOURCE_EXHAUSTED on the way back)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 1]}…"
