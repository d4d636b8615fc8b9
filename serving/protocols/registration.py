"""Registering services with the gRPC aio server as generic handlers only.

The generated `add_*Servicer_to_server` functions also register every method with gRPC core
("registered methods"). grpc.aio's server then keeps one pending request future per registered
method and, for every call it accepts, waits on all of them again (`asyncio.wait` over the whole
set: a done-callback added to and removed from each). With the Classifier, the Open Inference
Protocol, health and reflection that is over twenty futures touched per call, on the event loop's
thread, for every call to any method. Generic handlers are one future, resolved by a dict lookup per
service. `GenericOnly` stands in for the server when a servicer is added, and passes on only the
generic registration.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import grpc


class GenericOnly:
    """The part of `grpc.aio.Server` the generated registration functions use, generic handlers only."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self.server = server

    def add_generic_rpc_handlers(self, handlers: Iterable[grpc.GenericRpcHandler]) -> None:
        self.server.add_generic_rpc_handlers(tuple(handlers))

    def add_registered_method_handlers(self, service: str, handlers: Mapping[str, Any]) -> None:
        """Left out on purpose: the generic handler added beside it serves the same methods."""
