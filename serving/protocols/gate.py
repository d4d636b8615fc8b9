"""The gate every gRPC call goes through, whatever its service, in one step and no interceptor.

`CallGate` is the server's only generic handler: the services are registered with it (it stands in
for the server in the generated `add_*Servicer_to_server` functions) and it resolves each call to
their handler, wrapped once per method (cached: the server's own methods only) in the steps that
method needs, and nothing for features that are off:
  * token (with `--auth-token-file`, every method but health): a call without a valid token gets an
    aborting handler from `auth.TokenCheck` that reads nothing of the request; it is neither parsed
    nor admitted;
  * parse (every method, health and reflection included): the request is parsed inside the handler,
    so bytes that are not a valid message get INVALID_ARGUMENT with a plain message, and one
    rate-limited log line, instead of gRPC's UNKNOWN with a Python class name and a traceback;
  * status: what the handler raises is mapped through the one status table (`status.status_of`):
    domain errors keep their message, anything else is INTERNAL with a generic one;
  * admission (the data-plane methods): parks and refuses new calls while the server drains
    (`admission`), and counts unary calls as work in flight;
  * count (the data-plane methods, when metrics are on): each request by protocol, model, version
    and status in `calls.CallStats`, with every outcome a client sees, token refusals included (a
    stream's messages one by one, in `streams.answer_stream`).
Why this shape (`benchmarks/profile_request_path.py`): grpc.aio awaits each interceptor as a
coroutine on every call, and each wrapper is another, so four interceptors cost four of each; a
generic handler's `service` is one plain call. And the generated functions also register every
method with gRPC core ("registered methods"), for which grpc.aio's server keeps one pending future
per method and waits on all of them again for every call it accepts (`asyncio.wait` over twenty-odd
futures, each given and relieved of a done-callback); generic handlers are one future.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Mapping
from typing import Any

import grpc

from serving.core.dataplane import CLIENT_DEADLINE_LEAD_S
from serving.core.errors import InvalidInput
from serving.protocols.admission import Admission
from serving.protocols.auth import OPEN_PREFIXES, TokenCheck
from serving.protocols.calls import STREAM, CallStats, Reading
from serving.protocols.receipts import TRACEPARENT, begin, current, ended, listeners
from serving.protocols.status import log_limited, status_of

Behavior = Callable[..., Any]
Parse = Callable[[bytes], Any]
# The codes of a call the token check refused: counted without a model, its bytes never parsed.
REFUSED = (grpc.StatusCode.UNAUTHENTICATED.name, grpc.StatusCode.PERMISSION_DENIED.name)
# The call's metadata as gRPC gave it to `CallGate.service`, in the call's own task (grpc.aio finds
# the handler and runs it in one task, and every behavior the gate makes is a coroutine, so none runs
# in an executor thread without this context): `context.invocation_metadata()` builds it anew on
# every read, 2.6 µs with a client's two entries, where this costs 0.2 µs.
CALL_METADATA: contextvars.ContextVar[tuple[Any, ...]] = contextvars.ContextVar(
    "convserve_call_metadata", default=()
)


class BadMessage(InvalidInput):
    """The request's bytes are not a valid protobuf message of the method's request type."""


def rebuild(handler: grpc.RpcMethodHandler, wrap: Callable[[Behavior, bool], Behavior], raw: bool) -> Any:
    """The same handler with its behavior wrapped; with `raw` the wrapper gets unparsed bytes."""
    deserializer = None if raw else handler.request_deserializer
    serializer = handler.response_serializer
    # A handler holds exactly one behavior, the one its two streaming flags name.
    behavior = handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    if behavior is None:
        raise ValueError("a gRPC method handler without a behavior")
    wrapped = wrap(behavior, handler.response_streaming)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(wrapped, deserializer, serializer)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(wrapped, deserializer, serializer)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(wrapped, deserializer, serializer)
    return grpc.unary_unary_rpc_method_handler(wrapped, deserializer, serializer)


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
    receipt = current()
    try:
        if receipt is not None:  # a failed data call's receipt too: where its time went
            context.set_trailing_metadata(receipt.seal().metadata())
        await context.abort(code, message)
    except grpc.aio.AbortError:
        raise
    except Exception:  # the client went away between the check above and the status (ExecuteBatchError)
        raise asyncio.CancelledError from None


def parser(method: str, parse: Parse | None) -> Parse:
    """Parses one request message; bytes that are not one are a BadMessage naming the method."""

    def parse_one(raw: bytes) -> Any:
        if parse is None:
            return raw
        try:
            return parse(raw)
        except Exception:
            raise BadMessage(f"the request is not a valid protobuf message for {method}") from None

    return parse_one


def stream_parser(parse_one: Parse) -> Callable[[AsyncIterator[bytes]], AsyncIterator[Any]]:
    async def parse_stream(requests: AsyncIterator[bytes]) -> AsyncIterator[Any]:
        async for raw in requests:
            yield parse_one(raw)

    return parse_stream


def ended_with(error: BaseException, context: grpc.aio.ServicerContext) -> str:
    """The status a failed unary call ended with: the one it was aborted with (`abort` maps every
    failure through the status table and aborts), or, when the client went away, CANCELLED or (at its
    deadline) DEADLINE_EXCEEDED."""
    if isinstance(error, asyncio.CancelledError) or context.cancelled():
        remaining = context.time_remaining()
        expired = remaining is not None and remaining <= CLIENT_DEADLINE_LEAD_S
        return "DEADLINE_EXCEEDED" if expired else "CANCELLED"
    code = context.code()
    return code.name if isinstance(code, grpc.StatusCode) else grpc.StatusCode.INTERNAL.name


class CallGate(grpc.GenericRpcHandler):
    """Token, parse, status, admission and count (see the module's docstring), for the methods that
    need each: `data_methods` are admitted; with `stats`, those in `readings` are counted; with
    `tokens`, every method but health needs a valid token. Services are added to it as to a server."""

    def __init__(
        self,
        admission: Admission,
        data_methods: Collection[str],
        stats: CallStats | None = None,
        readings: Mapping[str, Reading] | None = None,
        tokens: TokenCheck | None = None,
    ) -> None:
        self.admission = admission
        self.data_methods = frozenset(data_methods)
        self.stats = stats
        self.readings = dict(readings or {})  # the receipts' protocol and images, and the counts
        self.tokens = tokens
        self._services: list[grpc.GenericRpcHandler] = []
        # method -> its wrapped handler. Only methods the server has are kept: a name a client made up
        # resolves to no handler and is never cached, or every unique name would grow the server.
        self._cache: dict[str, Any] = {}
        self._refusals: dict[tuple[str, grpc.StatusCode], Any] = {}  # counted refusals, our methods only

    # What the generated `add_*Servicer_to_server` functions call on a server.
    def add_generic_rpc_handlers(self, handlers: Iterable[grpc.GenericRpcHandler]) -> None:
        self._services.extend(handlers)
        self._cache.clear()

    def add_registered_method_handlers(self, service: str, handlers: Mapping[str, Any]) -> None:
        """Left out on purpose (see the module's docstring): the generic handler added beside it
        serves the same methods."""

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = details.method
        CALL_METADATA.set(details.invocation_metadata or ())
        if self.tokens is not None and not method.startswith(OPEN_PREFIXES):
            refused = self.tokens.refusal(details.invocation_metadata, method)
            if refused is not None:
                return self._refused(self._find(details), method, refused)
        wrapped = self._cache.get(method)
        if wrapped is not None:
            return wrapped
        handler = self._find(details)
        if handler is None:
            return None
        wrapped = self._cache[method] = self._wrap(handler, method)
        return wrapped

    def _find(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        for services in self._services:
            handler = services.service(details)
            if handler is not None:
                return handler
        return None

    def _refused(self, handler: Any, method: str, code: grpc.StatusCode) -> Any:
        """The token check's aborting handler; for a method the ledger counts, the refusal is counted
        and has its receipt (trailing metadata, the access log, a span) like any failed call."""
        assert self.tokens is not None
        denial = self.tokens.denial(handler, code)
        reading = self.readings.get(method) if handler is not None else None
        if reading is None or self.stats is None or handler.response_streaming:
            return denial
        counted = self._refusals.get((method, code))
        if counted is None:
            stats = self.stats
            assert stats is not None
            deny = denial.stream_unary
            name = method.rpartition("/")[2]

            async def refuse(request: Any, context: grpc.aio.ServicerContext) -> Any:
                receipt = begin(traceparent_of())
                context.set_trailing_metadata(receipt.seal().metadata())  # the abort sends them
                try:
                    return await deny(request, context)
                except BaseException as error:
                    status = ended_with(error, context)
                    stats.failed(reading, None, status, receipt.total)  # never parsed: no model
                    ended(reading.protocol, name, status, 0, context.peer() if listeners else "", receipt)
                    raise

            counted = self._refusals[(method, code)] = grpc.stream_unary_rpc_method_handler(refuse)
        return counted

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> Any:
        parse_one = parser(method, handler.request_deserializer)
        parse_stream = stream_parser(parse_one)
        admission = self.admission if method in self.data_methods else None
        reading = self.readings.get(method)
        stats = self.stats

        def wrap(inner: Behavior, streaming_response: bool) -> Behavior:
            prepare: Callable[[Any], Any] = parse_stream if handler.request_streaming else parse_one
            if streaming_response and inspect.isasyncgenfunction(inner):
                return stream_behavior(inner, prepare, method, admission, reading, stats)
            if admission is None:
                return plain_behavior(inner, prepare, method)
            return data_behavior(inner, prepare, method, admission, reading, stats)

        return rebuild(handler, wrap, raw=True)


def plain_behavior(inner: Behavior, prepare: Callable[[Any], Any], method: str) -> Behavior:
    """Parse and status only (health, reflection, model metadata, …)."""
    if inspect.iscoroutinefunction(inner):

        async def behavior(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                return await inner(prepare(request), context)
            except Exception as error:
                await abort(context, error, method)

        return behavior

    async def sync_behavior(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            result = inner(prepare(request), context)
            return await result if inspect.isawaitable(result) else result
        except Exception as error:
            await abort(context, error, method)

    return sync_behavior


def traceparent_of() -> str | None:
    """The call's `traceparent` metadata, if it sent one (read in the call's task)."""
    for key, value in CALL_METADATA.get():
        if key == TRACEPARENT:
            return value if isinstance(value, str) else None
    return None


def data_behavior(
    inner: Behavior,
    prepare: Callable[[Any], Any],
    method: str,
    admission: Admission,
    reading: Reading | None,
    stats: CallStats | None,
) -> Behavior:
    """A unary data-plane call: its receipt (trailing metadata, the access log, tracing), parse,
    admission, status, and its count in the request ledger."""
    protocol = reading.protocol if reading is not None else ""
    name = method.rpartition("/")[2]

    async def admitted(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            message = prepare(request)
            admission.arrive()
            await admission.refuse_if_draining()
            with admission.working():
                return await inner(message, context)
        except Exception as error:
            await abort(context, error, method)

    async def behavior(request: Any, context: grpc.aio.ServicerContext) -> Any:
        receipt = begin(traceparent_of())
        try:
            response = await admitted(request, context)
        except BaseException as error:
            status = ended_with(error, context)
            if reading is not None and stats is not None:
                try:
                    message = reading.parse(request)  # only now: a failure's labels
                except Exception:
                    message = None
                stats.failed(reading, message, status, receipt.seal().total)
            ended(protocol, name, status, 0, context.peer() if listeners else "", receipt)
            raise
        context.set_trailing_metadata(receipt.seal().metadata())
        images = 0
        answer = reading.answered(response) if reading is not None else None
        if answer is not None:  # a unary answer always is one
            model, version, images = answer
            if stats is not None:
                stats.answered(protocol, model, version, images, receipt.total)
        ended(protocol, name, "OK", images, context.peer() if listeners else "", receipt)
        return response

    return behavior


def stream_behavior(
    inner: Behavior,
    prepare: Callable[[Any], Any],
    method: str,
    admission: Admission | None,
    reading: Reading | None,
    stats: CallStats | None,
) -> Behavior:
    """A streamed answer: parse each message, status; a data stream is admitted once (its messages
    count as work one by one, in `streams.answer_stream`, which also counts them)."""
    counter = (reading, stats) if reading is not None else None

    async def behavior(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator:
        try:
            if admission is not None:
                admission.arrive()
                await admission.refuse_if_draining()
            if counter is not None:
                STREAM.set(counter)
                begin(traceparent_of())  # the stream's trace: each message's receipt continues it
            async for response in inner(prepare(request), context):
                yield response
        except Exception as error:
            await abort(context, error, method)

    return behavior
