"""Server interceptors: what every call goes through, whatever its service.

`ProtocolGuard` (every method, health and reflection included):
  * parses the request inside the handler, so bytes that are not a valid message get
    INVALID_ARGUMENT with a plain message, and one rate-limited log line, instead of gRPC's UNKNOWN
    with a Python class name and a traceback per call;
  * maps what the handler raises through the one status table (`status.status_of`): domain errors
    keep their message, anything else is INTERNAL with a generic one.
`AdmissionGate` (the data-plane methods only): parks and refuses new calls while the server drains
(see `admission`), and counts unary calls as work in flight.

Wrapped handlers are built once per method and cached. With `--auth-token-file`, `auth.TokenAuth`
runs before both: a call without a valid token is neither parsed nor admitted.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from typing import Any

import grpc

from serving.core.errors import InvalidInput
from serving.protocols.admission import Admission
from serving.protocols.status import log_limited, status_of

Behavior = Callable[..., Any]


class BadMessage(InvalidInput):
    """The request's bytes are not a valid protobuf message of the method's request type."""


def rebuild(handler: grpc.RpcMethodHandler, wrap: Callable[[Behavior, bool], Behavior], raw: bool) -> Any:
    """The same handler with its behavior wrapped; with `raw` the wrapper gets unparsed bytes."""
    deserializer = None if raw else handler.request_deserializer
    serializer = handler.response_serializer
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(
            wrap(handler.stream_stream, True), deserializer, serializer
        )
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(
            wrap(handler.stream_unary, False), deserializer, serializer
        )
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(
            wrap(handler.unary_stream, True), deserializer, serializer
        )
    return grpc.unary_unary_rpc_method_handler(wrap(handler.unary_unary, False), deserializer, serializer)


class CachingInterceptor(grpc.aio.ServerInterceptor):
    """Wraps each method's handler once; `wrap_handler` returns None to leave a method alone."""

    def __init__(self) -> None:
        self._cache: dict[str, tuple[Any, Any]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        cached = self._cache.get(details.method)
        if cached is None or cached[0] is not handler:
            cached = (handler, self.wrap_handler(handler, details.method) or handler)
            self._cache[details.method] = cached
        return cached[1]

    def wrap_handler(self, handler: grpc.RpcMethodHandler, method: str) -> Any:
        raise NotImplementedError


async def abort(context: grpc.aio.ServicerContext, error: Exception, method: str) -> None:
    if isinstance(error, grpc.aio.AbortError) or context.done():
        raise error
    if isinstance(error, BadMessage):
        log_limited(
            f"bad-message:{method}",
            logging.WARNING,
            "refused a request from %s: %s",
            context.peer(),
            error,
        )
    code, message = status_of(error, method)
    await context.abort(code, message)


class ProtocolGuard(CachingInterceptor):
    def wrap_handler(self, handler: grpc.RpcMethodHandler, method: str) -> Any:
        parse = handler.request_deserializer

        def parse_one(raw: bytes) -> Any:
            if parse is None:
                return raw
            try:
                return parse(raw)
            except Exception:
                raise BadMessage(f"the request is not a valid protobuf message for {method}") from None

        async def parse_stream(requests: AsyncIterator[bytes]) -> AsyncIterator[Any]:
            async for raw in requests:
                yield parse_one(raw)

        def wrap(inner: Behavior, streaming_response: bool) -> Behavior:
            prepare = parse_stream if handler.request_streaming else parse_one
            if streaming_response and inspect.isasyncgenfunction(inner):

                async def stream_behavior(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator:
                    try:
                        async for response in inner(prepare(request), context):
                            yield response
                    except Exception as error:
                        await abort(context, error, method)

                return stream_behavior

            async def behavior(request: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    result = inner(prepare(request), context)
                    return await result if inspect.isawaitable(result) else result
                except Exception as error:
                    await abort(context, error, method)

            return behavior

        return rebuild(handler, wrap, raw=True)


class AdmissionGate(CachingInterceptor):
    """Applies `Admission` to the methods named (full names, '/package.Service/Method')."""

    def __init__(self, admission: Admission, methods: Collection[str]) -> None:
        super().__init__()
        self.admission = admission
        self.methods = set(methods)

    def wrap_handler(self, handler: grpc.RpcMethodHandler, method: str) -> Any:
        if method not in self.methods:
            return None
        admission = self.admission

        def wrap(inner: Behavior, streaming_response: bool) -> Behavior:
            if streaming_response:
                # A stream is admitted once; its messages count as work one by one (the servicer).
                async def stream_behavior(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator:
                    admission.arrive()
                    await admission.refuse_if_draining()
                    async for response in inner(request, context):
                        yield response

                return stream_behavior

            async def behavior(request: Any, context: grpc.aio.ServicerContext) -> Any:
                admission.arrive()
                await admission.refuse_if_draining()
                with admission.working():
                    return await inner(request, context)

            return behavior

        return rebuild(handler, wrap, raw=False)
