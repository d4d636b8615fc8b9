"""Answering a bidirectional stream: many requests in flight at once, exactly one response each.

Shared by every protocol's streaming RPC. Responses come back in the order they are ready (each
carries its request's id). A request that fails gets the protocol's error response (`fail`), with the
status the status table gives it; the stream itself goes on. A message that cannot be parsed ends the
stream with INVALID_ARGUMENT, after the answers to the requests read before it. At shutdown
(`Admission.release`) the stream stops reading and ends with UNAVAILABLE once its answers are out.
When the metrics count the call (`gate.CallGate`), each message is counted as a request of its own,
with that status.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from serving.core.errors import Unavailable
from serving.core.receipt import Receipt
from serving.protocols.admission import Admission
from serving.protocols.calls import STREAM, CallStats, Reading
from serving.protocols.receipts import current, ended, listeners, message_receipt
from serving.protocols.status import status_of

Request = TypeVar("Request")
Response = TypeVar("Response")
STREAM_INFLIGHT = 64  # requests of one stream processed concurrently


async def answer_stream(
    requests: AsyncIterator[Request],
    answer: Callable[[Request], Awaitable[Response]],
    fail: Callable[[Request, grpc.StatusCode, str], Response],
    admission: Admission,
    method: str,
    inflight: int = STREAM_INFLIGHT,
    peer: str = "",
) -> AsyncIterator[Response]:
    """`answer` gives a request's response; `fail(request, code, message)` the one for a failure;
    `peer` (the client's address) goes to the access log with each message."""
    responses: asyncio.Queue[Response | None] = asyncio.Queue()
    slots = asyncio.Semaphore(inflight)
    tasks: set[asyncio.Task] = set()

    counted = STREAM.get()  # (reading, stats or None) for the data methods
    stream_receipt = current()  # the stream's: its trace id is every message's
    name = method.rpartition("/")[2]

    async def respond(request: Request) -> tuple[Response, str | None]:
        """Exactly one response per request, whatever happens to it, and its failure's code name."""
        with admission.working():
            try:
                if admission.draining:  # the stream stays open, but takes no new work
                    raise Unavailable("server is shutting down")
                return await answer(request), None
            except Exception as error:
                code, message = status_of(error, method)
                return fail(request, code, message), code.name

    async def answer_one(request: Request) -> None:
        try:
            receipt = message_receipt(stream_receipt)
            response, failure = await respond(request)
            if counted is not None:
                record_message(counted, name, peer, request, response, failure, receipt)
            responses.put_nowait(response)
        finally:
            slots.release()

    async def read_all() -> None:
        try:
            try:
                async for request in requests:
                    await slots.acquire()
                    task = asyncio.create_task(answer_one(request))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
            finally:  # a bad message ends the reading, never the answers owed to what came before it
                if tasks:
                    await asyncio.gather(*list(tasks), return_exceptions=True)
        finally:
            responses.put_nowait(None)

    reader = asyncio.create_task(read_all())
    unregister = admission.on_release(reader.cancel)  # shutdown ends the stream
    try:
        while (response := await responses.get()) is not None:
            yield response
        if reader.cancelled():
            raise Unavailable("server is shutting down")
        await reader  # surfaces a failure of the request stream itself (e.g. a bad message)
    finally:
        unregister()
        reader.cancel()
        for task in list(tasks):
            task.cancel()


def record_message(
    counted: tuple[Reading, CallStats | None],
    method: str,
    peer: str,
    request: Any,
    response: Any,
    failure: str | None,
    receipt: Receipt,
) -> None:
    """One message of a data stream is a request of its own: counted in the ledger with its status,
    and its receipt handed to the access log and the spans."""
    reading, stats = counted
    receipt.seal()
    if stats is not None:
        stats.record(reading, request, response, failure, receipt.total)
    if listeners:
        answer = reading.answered(response) if failure is None else None
        images = answer[2] if answer is not None else 0
        ended(reading.protocol, method, failure or "OK", images, peer, receipt)
