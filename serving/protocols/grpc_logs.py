"""What gRPC's own Python layer logs, kept to what an operator needs.

gRPC's asyncio server logs `ExecuteBatchError raised in core by servicer method [...]` at ERROR,
with a traceback, when it cannot send a call's response because the client has already gone (its
deadline passed, or it cancelled, while the answer was on its way). Nothing is wrong on the server
and nothing a client sends should write a traceback, so that record is replaced by one rate-limited
DEBUG line. (Our own handlers never send a status to a client that has gone: `gate.abort`.)
"""

from __future__ import annotations

import logging

from serving.protocols.status import log_limited

GRPC_LOGGER = "grpc._cython.cygrpc"
CLIENT_GONE = "ExecuteBatchError raised in core by servicer method"


class ClientGone(logging.Filter):
    """Drops gRPC's traceback for a response a departed client could not receive."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(CLIENT_GONE):
            return True
        log_limited("client-gone", logging.DEBUG, "a call's client had gone before its answer could be sent")
        return False


def quiet_client_gone() -> None:
    """Installs the filter on gRPC's logger, once."""
    logger = logging.getLogger(GRPC_LOGGER)
    if not any(isinstance(f, ClientGone) for f in logger.filters):
        logger.addFilter(ClientGone())
