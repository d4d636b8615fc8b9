"""What every HTTP route goes through, written once over the shared pieces gRPC uses too.

`HttpEdge.route` wraps a route's handler:
  * bearer tokens (`auth.check_bearer`): every route but `/v2/health/*` needs `Authorization: Bearer`;
    401 without one, 403 with a wrong one;
  * admission and drain (`admission.Admission`, as for gRPC): a data route is admitted and counted as
    work in flight; from SIGTERM a new request is parked, and refused with 503 and `Connection: close`
    once the server has stopped accepting. A client that loops on requests therefore waits on its
    parked request instead of opening connections that the closing listener would reset: it sees a
    503, then a refused connection, never a connection dropped without an answer. Every answer given
    while draining closes its connection;
  * the body: refused with 413 from `Content-Length` before anything is read when it is over
    --max-message-mb, and a chunked body cut off as soon as it passes it; its JSON may take at most
    an eighth of that (`json_limit`): parsed JSON numbers cost some 30 times their bytes in memory, so
    big tensors go with the binary tensor extension;
  * deadlines: header `Timeout-Ms` (milliseconds) on any route, or the Open Inference Protocol's
    `timeout` request parameter (microseconds, as Triton reads it); past it the request gets 504;
  * errors through the one table (`status.http_status_of`): JSON `{"error": "..."}`, a domain error's
    message, or 500 with a generic one (details logged once, rate-limited);
  * metrics: each data request counted in `calls.CallStats` with protocol="http".
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from serving.core.dataplane import DataPlane
from serving.core.errors import DeadlineExceeded, InvalidInput, TooLarge, shown
from serving.core.receipt import Receipt
from serving.models.lifecycle import ModelLifecycle
from serving.models.registry import ModelRegistry
from serving.protocols.admission import Admission
from serving.protocols.auth import TokenFile, check_bearer
from serving.protocols.calls import CallStats, Reading
from serving.protocols.receipts import TRACEPARENT, begin, ended, listeners
from serving.protocols.status import http_status_of

PROTOCOL = "http"  # the metrics' protocol label
TIMEOUT_HEADER = "timeout-ms"
MISSING_TOKEN = "this server needs a bearer token: send the header `Authorization: Bearer <token>`"
# A data request's labels: (model, version as asked); CallStats resolves them as it does gRPC's.
READING = Reading(PROTOCOL, lambda raw: None, lambda asked: asked, lambda answer: answer)


@dataclass
class Call:
    """What a handler gets besides the request: its deadline, and where to say which model it asked
    for (the metrics' labels) and what answered (model, version, images)."""

    deadline: float | None
    receipt: Receipt
    asked: tuple[str, int] | None = None
    answered: tuple[str, str, int] | None = None

    def deadline_from_us(self, microseconds: Any) -> None:
        """Triton's `timeout` request parameter, in microseconds; the earlier of it and the header's."""
        if microseconds is None:
            return
        if isinstance(microseconds, bool) or not isinstance(microseconds, int) or microseconds < 0:
            raise InvalidInput("request parameter 'timeout' must be a non-negative integer (microseconds)")
        if microseconds == 0:
            return
        deadline = time.monotonic() + microseconds / 1e6
        self.deadline = deadline if self.deadline is None else min(self.deadline, deadline)


Handler = Callable[[Request, Call], Awaitable[Response]]


def error_response(status: int, message: str, close: bool = False) -> Response:
    headers = {"connection": "close"} if close else None
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def header_deadline(request: Request) -> float | None:
    text = request.headers.get(TIMEOUT_HEADER)
    if text is None:
        return None
    try:
        ms = float(text)
    except ValueError:
        ms = -1.0
    if not math.isfinite(ms) or ms <= 0:
        raise InvalidInput(f"header Timeout-Ms must be a positive number of milliseconds, got {shown(text)}")
    return time.monotonic() + ms / 1000


def bearer(request: Request) -> bytes | None:
    text = request.headers.get("authorization")
    if text is None:
        return None
    scheme, _, token = text.strip().partition(" ")
    return token.strip().encode("latin-1") if scheme.lower() == "bearer" and token.strip() else None


class HttpEdge:
    """The shared state every route reads, and the one wrapper every route goes through."""

    def __init__(
        self,
        dataplane: DataPlane,
        registry: ModelRegistry,
        admission: Admission,
        lifecycle: ModelLifecycle,
        calls: CallStats,
        max_body_bytes: int,
        tokens: TokenFile | None = None,
    ) -> None:
        self.dataplane = dataplane
        self.registry = registry
        self.admission = admission
        self.lifecycle = lifecycle
        self.max_body_bytes = max_body_bytes
        self.max_json_bytes = json_limit(max_body_bytes)
        self.tokens = tokens
        self.calls = calls

    def route(self, handler: Handler, *, open_route: bool = False, data: bool = False) -> Callable:
        """A Starlette endpoint: auth, admission, deadline, errors and counting around `handler`."""

        async def endpoint(request: Request) -> Response:
            receipt = begin(request.headers.get(TRACEPARENT))
            call = Call(None, receipt)
            where = f"HTTP {request.method} {request.url.path[:200]}"
            try:
                if not open_route and self.tokens is not None:
                    check_bearer(self.tokens, bearer(request), where, MISSING_TOKEN)
                call.deadline = header_deadline(request)
                if not data:
                    return self._closing_if_draining(await handler(request, call))
                admission = self.admission
                admission.arrive()
                await admission.refuse_if_draining()
                with admission.working():
                    response = await self._within_deadline(handler(request, call), call)
            except Exception as error:
                status, code, message = http_status_of(error, where)
                if data:
                    self.calls.failed(READING, call.asked, code, receipt.seal().total)
                close = isinstance(error, TooLarge) or self.admission.draining
                return self._receipted(error_response(status, message, close), request, receipt, 0)
            if call.answered is not None:
                model, version, images = call.answered
                self.calls.answered(PROTOCOL, model, version, images, receipt.seal().total)
            images = call.answered[2] if call.answered is not None else 0
            return self._closing_if_draining(self._receipted(response, request, receipt, images))

        return endpoint

    @staticmethod
    def _receipted(response: Response, request: Request, receipt: Receipt, images: int) -> Response:
        """The receipt as `Server-Timing` (browsers' developer tools and the web page show it) and the
        trace id; then the request's record to the access log and tracing."""
        headers = response.headers
        headers["server-timing"] = receipt.seal().server_timing()
        headers["convserve-trace-id"] = receipt.trace_id
        if listeners:
            route = request.scope.get("route")
            method = f"{request.method} {route.path if route is not None else request.url.path[:200]}"
            client = request.client
            peer = f"{client.host}:{client.port}" if client is not None else ""
            ended(PROTOCOL, method, str(response.status_code), images, peer, receipt)
        return response

    def _closing_if_draining(self, response: Response) -> Response:
        """While the server drains, every answer closes its connection: the client reconnects elsewhere."""
        if self.admission.draining:
            response.headers["connection"] = "close"
        return response

    @staticmethod
    async def _within_deadline(work: Awaitable[Response], call: Call) -> Response:
        """The handler, cancelled when the deadline passes (as gRPC cancels a call at its deadline)."""
        if call.deadline is None:
            return await work
        try:
            return await asyncio.wait_for(work, max(0.0, call.deadline - time.monotonic()))
        except TimeoutError:
            raise DeadlineExceeded("the request's deadline passed") from None

    async def body(self, request: Request) -> bytes:
        """The whole body, never more than --max-message-mb: 413 from Content-Length before reading, or as
        soon as a chunked body passes the limit."""
        limit = self.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise TooLarge(f"the request body of {int(length)} bytes is over the limit of {limit} bytes")
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise TooLarge(f"the request body is over the limit of {limit} bytes")
            chunks.append(chunk)
        body = b"".join(chunks)
        encoding = request.headers.get("content-encoding", "identity").strip().lower()
        return body if encoding == "identity" else inflate(body, encoding, limit)


# Content-Encoding -> zlib's wbits (what tritonclient's request_compression_algorithm sends).
WBITS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


def inflate(body: bytes, encoding: str, limit: int) -> bytes:
    """A compressed body, never inflated past `limit` bytes (413: a small body can hide a huge one)."""
    wbits = WBITS.get(encoding)
    if wbits is None:
        raise InvalidInput(f"Content-Encoding {shown(encoding)} is not supported: send gzip, deflate or none")
    inflater = zlib.decompressobj(wbits)
    try:
        data = inflater.decompress(body, limit + 1)
    except zlib.error:
        raise InvalidInput(f"the body is not valid {encoding} data") from None
    if len(data) > limit:
        raise TooLarge(f"the request body inflates past the limit of {limit} bytes")
    if not inflater.eof:
        raise InvalidInput(f"the {encoding} body is truncated")
    return data


def json_limit(max_body_bytes: int) -> int:
    return max(1024 * 1024, max_body_bytes // 8)


def parse_json(data: bytes, limit: int, what: str = "the request body") -> Any:
    if len(data) > limit:
        raise TooLarge(
            f"{what} holds {len(data)} bytes of JSON; at most {limit} are read as JSON (an eighth of "
            "--max-message-mb): send tensors with the binary tensor extension"
        )
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        raise InvalidInput(f"{what} is not valid JSON") from None
