"""Server interceptors: what every call goes through, whatever its service.

`ProtocolGuard` (every method, health and reflection included):
  * parses the request inside the handler, so bytes that are not a valid message get
    INVALID_ARGUMENT with a plain message, and one rate-limited log line, instead of gRPC's UNKNOWN
    with a Python class name and a traceback per call;
  * maps what the handler raises through the one status table (`status.status_of`): domain errors
    keep their message, anything else is INTERNAL with a generic one.
`AdmissionGate` (the data-plane methods only): parks and refuses new calls while the server drains
(see `admission`), and counts unary calls as work in flight.
`CallCounter` (the data-plane methods only, when metrics are on; first, outside the others, so it
sees every outcome a client sees): counts each request by protocol, model, version and status in
`calls.CallStats` (a stream's messages one by one, in `streams.answer_stream`).

Wrapped handlers are built once per method and cached. With `--auth-token-file`, `auth.TokenAuth`
runs before both: a call without a valid token is neither parsed nor admitted.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping
from typing import Any

import grpc

from serving.core.dataplane import CLIENT_DEADLINE_LEAD_S
from serving.core.errors import InvalidInput
from serving.protocols.admission import Admission
from serving.protocols.calls import STREAM, CallStats, Reading
from serving.protocols.status import log_limited, status_of

Behavior = Callable[..., Any]
# The codes of a call the token check refused: counted without a model, its bytes never parsed.
REFUSED = (grpc.StatusCode.UNAUTHENTICATED.name, grpc.StatusCode.PERMISSION_DENIED.name)


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
    """Wraps each method's handler once; `wrap_handler` returns None to leave a method alone.

    Only wrapped handlers are kept, so the cache holds at most the server's own methods: a handler
    for a name a client made up (the token check's refusal of it, outside ProtocolGuard) is passed
    through unkept, or every unique name would grow the server."""

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
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self.wrap_handler(handler, details.method)
        if wrapped is None:
            return handler
        self._cache[details.method] = (handler, wrapped)
        return wrapped

    def wrap_handler(self, handler: grpc.RpcMethodHandler, method: str) -> Any:
        raise NotImplementedError


async def abort(context: grpc.aio.ServicerContext, error: Exception, method: str) -> None:
    if isinstance(error, grpc.aio.AbortError) or context.done():
        raise error
    if context.cancelled():
        # The client has gone (it cancelled, or its deadline passed): there is nobody to tell, and
        # sending a status now fails in gRPC core, which logs that with a traceback. End quietly.
        raise asyncio.CancelledError from None
    if isinstance(error, BadMessage):
        log_limited(
            f"bad-message:{method}",
            logging.WARNING,
            "refused a request from %s: %s",
            context.peer(),
            error,
        )
    code, message = status_of(error, method)
    try:
        await context.abort(code, message)
    except grpc.aio.AbortError:
        raise
    except Exception:  # the client went away between the check above and the status (ExecuteBatchError)
        raise asyncio.CancelledError from None


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


def ended_with(error: BaseException, context: grpc.aio.ServicerContext) -> str:
    """The status a failed unary call ended with: the one it was aborted with (ProtocolGuard maps every
    failure through the status table and aborts), or, when the client went away, CANCELLED or (at its
    deadline) DEADLINE_EXCEEDED."""
    if isinstance(error, asyncio.CancelledError) or context.cancelled():
        remaining = context.time_remaining()
        expired = remaining is not None and remaining <= CLIENT_DEADLINE_LEAD_S
        return "DEADLINE_EXCEEDED" if expired else "CANCELLED"
    code = context.code()
    return code.name if isinstance(code, grpc.StatusCode) else grpc.StatusCode.INTERNAL.name


class CallCounter(CachingInterceptor):
    """Counts the requests of the methods in `readings` (full names) into `stats`."""

    def __init__(self, stats: CallStats, readings: Mapping[str, Reading]) -> None:
        super().__init__()
        self.stats = stats
        self.readings = dict(readings)

    def wrap_handler(self, handler: grpc.RpcMethodHandler, method: str) -> Any:
        reading = self.readings.get(method)
        if reading is None:
            return None
        stats = self.stats

        def wrap(inner: Behavior, streaming_response: bool) -> Behavior:
            if streaming_response:
                # Each message is a request: answer_stream counts them, finding the counter here.
                async def stream_behavior(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator:
                    STREAM.set((reading, stats))
                    async for response in inner(request, context):
                        yield response

                return stream_behavior

            async def behavior(request: Any, context: grpc.aio.ServicerContext) -> Any:
                started = time.perf_counter()
                try:
                    response = await inner(request, context)
                except BaseException as error:
                    status = ended_with(error, context)
                    message = None  # a refused call's request is never parsed (nor labelled by it)
                    if status not in REFUSED:
                        try:
                            message = reading.parse(request)  # only now: a failure's labels
                        except Exception:
                            message = None
                    stats.failed(reading, message, status)
                    raise
                model, version, images = reading.answered(response)  # a unary answer is always one
                stats.answered(reading.protocol, model, version, images, time.perf_counter() - started)
                return response

            return behavior

        # Outside ProtocolGuard, whose handler takes the request's bytes: they pass through unparsed.
        return rebuild(handler, wrap, raw=True)
