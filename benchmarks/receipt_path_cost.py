"""What a receipt and a request's spans cost in CPU, timed alone: steadier than images/s on a shared
machine, where two runs of one build differ by ±5 % (benchmarks/RECEIPTS.md).

    python benchmarks/receipt_path_cost.py [--out FILE.md]

In process, the best of 5 repeats of 20,000 requests each, the garbage collector on:
  * the receipt's Python on one unary convserve.v1 answer: reading `traceparent` from the call's
    metadata (a client's `user-agent`, as the call gate keeps it), `begin` (trace id, the receipt),
    the data plane's and the batcher's clock readings, the `server-timing` value, the body's `receipt`
    field, `ended`;
  * with tracing on, what the event loop spends per request (the hand-over) and what the export
    thread spends making a request's spans, with a batch span for 0.7 requests in 1 (the share the
    digits model's c64 scenario runs).
Then in two processes: gRPC's own cost of one trailing metadata entry, an echo server with and without
`server-timing` set (the same value a receipt sends), its CPU time per call over 8 alternating rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import statistics
import subprocess
import sys
import time
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc

from protos.convserve.v1 import convserve_pb2 as pb
from serving.core.receipt import Receipt, batch_ran
from serving.protocols import receipts
from serving.protocols.convserve_v1 import write_receipt
from serving.protocols.gate import CALL_METADATA, traceparent_of
from serving.tools.bench.markdown import publish
from serving.tools.launch import free_port, process_cpu_seconds

REQUESTS, REPEATS = 20_000, 5
TIMING = (
    'decode;dur=0.012, queue;dur=0.051, compute;dur=0.302, other;dur=0.164, total;dur=0.529, batch;desc="1", '
    'version;desc="digits/1", trace;desc="489a83ed9a63c3dffa4b8c58baf8baa9"'
)

CLIENT_METADATA = (("user-agent", "grpc-python-asyncio/1.85.4 grpc-c/58.0.0 (linux; chttp2)"),)


def answered() -> Receipt:
    """One request's receipt, as a unary call with one image writes it."""
    CALL_METADATA.set(CLIENT_METADATA)  # what `CallGate.service` keeps of every call
    receipt = receipts.begin(traceparent_of())
    now = time.perf_counter
    receipt.decoded(now(), 1e-5)
    receipt.handed_over(now())
    receipt.answered_by("digits", 1)
    batch_ran((receipt,), 1, now(), now())
    return receipt


def receipt_path() -> None:
    receipt = answered()
    response = pb.ClassifyResponse(id="a")
    write_receipt(response.receipt, receipt)
    receipt.metadata()
    receipts.ended("convserve_v1", "Classify", "OK", 1, "", receipt)


def answer_alone() -> None:
    """The answer message the server makes anyway: taken off `receipt_path`'s time."""
    pb.ClassifyResponse(id="a")


def per_request_us(step, collector: bool = True) -> float:
    """Best of REPEATS, with the garbage collector on as in the server (timeit turns it off), unless
    the step leaves objects behind that the server would not keep."""
    runs = timeit.repeat(step, "gc.enable()" if collector else "pass", number=REQUESTS, repeat=REPEATS)
    return min(runs) / REQUESTS * 1e6


def tracing_costs() -> tuple[float, float]:
    """(event loop's hand-over, with a batch's for every request; export thread's building, with a
    batch span for 0.7 requests in 1), µs per request."""
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from serving import tracing
    from serving.span_export import SpanBatcher

    # The collector off for both: here the hand-overs pile up (100,000 of them), where the server's
    # export thread takes them every 256; the collector walking the pile would be this bench's cost.
    bare = per_request_us(answered_and_ended, collector=False)
    batcher = SpanBatcher(InMemorySpanExporter(), delay_s=3600, wake_after=10**9, max_requests=10**9)
    installed = tracing.install(batcher)
    try:
        handed = per_request_us(answered_and_ended, collector=False) - bare
        records = [record_of(answered()) for _ in range(REQUESTS)]
        building = []
        for _ in range(REPEATS):
            for record in records:
                record.receipt.span = None
            started = time.perf_counter()
            for index, record in enumerate(records):
                if index % 10 < 7:
                    installed.batch_spans(((record.receipt,), 1, 1.0, 2.0))
                installed.request_spans(record)
            building.append((time.perf_counter() - started) / REQUESTS * 1e6)
        return handed, min(building)
    finally:
        batcher._queue.clear()
        tracing.uninstall(installed)


def answered_and_ended() -> None:
    receipts.ended("convserve_v1", "Classify", "OK", 1, "", answered())


def record_of(receipt: Receipt) -> receipts.Ended:
    return receipts.Ended("convserve_v1", "Classify", "OK", 1, "ipv4:127.0.0.1:50000", receipt.seal())


# gRPC's trailing entry -----------------------------------------------------------------------------


def echo_server(port: int, trailer: bool) -> None:
    async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        if trailer:
            context.set_trailing_metadata((("server-timing", TIMING),))
        return request

    class Echo(grpc.GenericRpcHandler):
        def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
            return grpc.unary_unary_rpc_method_handler(echo)

    async def serve() -> None:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((Echo(),))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    asyncio.run(serve())


async def calls(port: int, count: int, concurrency: int) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        method: grpc.aio.UnaryUnaryMultiCallable = channel.unary_unary("/echo/Echo")

        async def caller() -> None:
            for _ in range(count // concurrency):
                await method(b"x" * 300)

        await asyncio.gather(*(caller() for _ in range(concurrency)))


def trailer_cost(rounds: int = 8, count: int = 12_800) -> dict[int, tuple[float, float]]:
    """Per concurrency: echo server CPU µs per call, without and with the trailing entry (medians)."""
    ports = {False: free_port("127.0.0.1"), True: free_port("127.0.0.1")}
    servers = {
        trailer: subprocess.Popen([sys.executable, __file__, "--echo", str(port), str(int(trailer))])
        for trailer, port in ports.items()
    }
    try:
        time.sleep(3)
        found = {}
        for concurrency in (1, 64):
            cpu: dict[bool, list[float]] = {False: [], True: []}
            for index in range(rounds):
                for trailer in (False, True) if index % 2 == 0 else (True, False):
                    before = process_cpu_seconds(servers[trailer].pid)
                    asyncio.run(calls(ports[trailer], count, concurrency))
                    made = count // concurrency * concurrency
                    cpu[trailer].append((process_cpu_seconds(servers[trailer].pid) - before) / made * 1e6)
            found[concurrency] = (statistics.median(cpu[False]), statistics.median(cpu[True]))
        return found
    finally:
        for server in servers.values():
            server.kill()
            server.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--echo", nargs=2, type=int, metavar=("PORT", "TRAILER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.echo:
        echo_server(args.echo[0], bool(args.echo[1]))
        return 0
    receipt_us = per_request_us(receipt_path) - per_request_us(answer_alone)
    handed_us, building_us = tracing_costs()
    echo = trailer_cost()
    lines = [
        "Command: `python " + shlex.join(sys.argv) + "`",
        "",
        "| what | CPU µs per request |",
        "|---|---|",
        f"| the receipt's Python (begin → server-timing, body field → ended) | {receipt_us:.1f} |",
        f"| tracing: the event loop's hand-over (a request's and a batch's) | {handed_us:.1f} |",
        f"| tracing: making the spans (export thread), 0.7 batch spans each | {building_us:.1f} |",
    ]
    for concurrency, (without, with_entry) in echo.items():
        lines.append(
            f"| gRPC's own, one trailing entry, echo server at concurrency {concurrency} "
            f"({without:.0f} → {with_entry:.0f} µs a call) | {with_entry - without:.1f} |"
        )
    publish(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
