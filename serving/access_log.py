"""`--access-log`: one event per answered request, on logger `convserve.access`.

A listener on `protocols.receipts`: every edge hands it the request's record once the answer is out.
The event's fields (protocol, method, model, version, status, images, the receipt's times in ms, batch
sizes, trace id, peer) are structured extras, so `--log-format json` writes them as JSON fields; the
text message is one line in which every string is `repr`-escaped (`shown`), so that nothing a client
sends (a model name, a path) can break the line or forge another. Nothing of a request's headers is
logged: a bearer token cannot appear. The listener never raises into the request path.
"""

from __future__ import annotations

import logging
from typing import Any

from serving.core.errors import shown
from serving.logs import JSON_MESSAGE
from serving.protocols import receipts
from serving.protocols.receipts import Ended
from serving.protocols.status import RateLimitedLog

ACCESS_LOGGER = "convserve.access"
log = logging.getLogger(ACCESS_LOGGER)
trouble = RateLimitedLog(log)
STAGES = ("decode", "queue", "compute", "other", "total")


def access_fields(record: Ended) -> dict[str, Any]:
    receipt = record.receipt
    fields: dict[str, Any] = {
        "protocol": record.protocol,
        "method": record.method,
        "model": receipt.model,
        "version": receipt.version,
        "status": record.status,
        "images": record.images,
    }
    stages = receipt.stages_ms()
    fields.update({f"{stage}_ms": round(stages[stage], 3) for stage in STAGES})
    fields["batch_sizes"] = receipt.batch_text()
    fields["trace_id"] = receipt.trace_id
    fields["peer"] = record.peer
    return fields


class AccessLine:
    """The text message, `key=value` pairs with strings escaped; formatted only if a handler writes it."""

    __slots__ = ("fields",)

    def __init__(self, fields: dict[str, Any]) -> None:
        self.fields = fields

    def __str__(self) -> str:
        return " ".join(
            f"{key}={shown(value) if isinstance(value, str) else value}" for key, value in self.fields.items()
        )


def log_access(record: Ended) -> None:
    """The listener: one INFO event per request; a failure here costs the event, never the request."""
    if not log.isEnabledFor(logging.INFO):
        return
    try:
        fields = access_fields(record)
        # Text: the escaped line; JSON: the fields, and a short message (`logs.JSON_MESSAGE`).
        log.info("%s", AccessLine(fields), extra={**fields, JSON_MESSAGE: "access"})
    except Exception:  # a bad value: say so (rate-limited), never raise into the request's path
        trouble("access-log", logging.WARNING, "an access log event could not be written")


_users = 0  # servers in this process that asked for it (tests run several): one listener for all


def install() -> None:
    global _users
    _users += 1
    if log_access not in receipts.listeners:
        receipts.listeners.append(log_access)


def uninstall() -> None:
    global _users
    _users = max(0, _users - 1)
    if not _users and log_access in receipts.listeners:
        receipts.listeners.remove(log_access)
