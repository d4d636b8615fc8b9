"""Where a request's time goes inside the server: cProfile over the event loop's thread.

    python benchmarks/profile_request_path.py [--models benchmarks/models] [--model digits]

An in-process `Server` (the flags `bench` gives its servers: metrics on, HTTP on, the Echo RPC) is
driven by `serving.tools.loadgen` in its own process: one caller sending single-image unary
`Classify` calls (raw tensors), then 32-image `ClassifyStream` messages, then `Bench.Echo` for the
transport's own cost. First, the handler's steps timed in process without a profiler (the median
of five runs). For a model as small as digits the event loop's thread does all the work
(decode and batches run inline), so its profile is the request path. The table groups the functions'
own time (tottime) by the room they belong to, in microseconds per request; cProfile's own overhead
inflates Python functions against C ones, so read the shares, not the absolute figures.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import socket
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serving.config import ServerConfig
from serving.server import Server, install_uvloop
from serving.tools.bench.processes import LoadGenerator

# (room, what in a function's file or name puts it there), first match wins.
ROOMS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "call gate or interceptors (token, parse, admission, count)",
        ("protocols/gate", "protocols/interceptors", "protocols/auth", "protocols/admission"),
    ),
    ("metrics ledger", ("protocols/calls", "core/timing", "metrics.py")),
    (
        "servicer: protobuf ↔ dataclasses",
        ("protocols/convserve_v1", "protocols/streams", "protocols/kserve_v2"),
    ),
    (
        "data plane: checks, budget, rows",
        ("core/dataplane", "core/budget", "core/preprocess", "core/pixels", "core/model", "models/registry"),
    ),
    ("batcher hand-off", ("core/batching",)),
    ("ONNX Runtime run", ("onnxruntime", "core/runtime", "<method 'run' of")),
    ("top-k", ("core/postprocess",)),
    (
        "protobuf (parse, build, serialize)",
        ("google/protobuf", "protobuf", "SerializeToString", "FromString", "_pb2"),
    ),
    ("gRPC aio server (Cython)", ("grpc/_cython", "grpc/aio", "cygrpc", "grpc/_")),
    ("event loop, asyncio", ("asyncio", "uvloop", "contextvars", "<built-in method _asyncio")),
    ("numpy", ("numpy", "<method 'tolist'", "<built-in method numpy")),
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def room_of(filename: str, name: str) -> str:
    where = f"{filename}:{name}"
    for room, marks in ROOMS:
        if any(mark in where for mark in marks):
            return room
    return "other"


def rooms(profile: cProfile.Profile) -> dict[str, float]:
    stats = pstats.Stats(profile)
    totals: dict[str, float] = defaultdict(float)
    for (filename, _, name), (_, _, tottime, _, _) in stats.stats.items():  # type: ignore[attr-defined]
        totals[room_of(filename, name)] += tottime
    return totals


def table(title: str, totals: dict[str, float], requests: int) -> str:
    whole = sum(totals.values())
    lines = [f"### {title}: {requests} requests, {whole / requests * 1e6:.0f} µs of event-loop time each", ""]
    lines += ["| where | µs per request | share |", "|---|---|---|"]
    for room, seconds in sorted(totals.items(), key=lambda item: -item[1]):
        lines.append(f"| {room} | {seconds / requests * 1e6:.1f} | {seconds / whole:.0%} |")
    return "\n".join(lines)


async def profile_scenarios(args: argparse.Namespace) -> list[str]:
    work = Path(tempfile.mkdtemp(prefix="convserve-profile-"))
    config = ServerConfig(
        models=args.models,
        port=0,
        http_port=0,
        metrics_port=0 if args.metrics_off else free_port(),
        bench_service=True,
        device="cpu",
        max_batch_size=32,
        max_delay_ms=2.0,
        log_level="WARNING",
        port_file=work / "port",
    )
    server = Server(config)
    port = await server.start()
    load = LoadGenerator()
    scenarios = [
        ("unary c1 tensor", {"kind": "unary", "payload": "tensor", "concurrency": 1, "images": 1}),
        ("unary c64 tensor", {"kind": "unary", "payload": "tensor", "concurrency": 64, "images": 1}),
        ("stream 32/msg tensor", {"kind": "stream", "payload": "tensor", "concurrency": 1, "images": 32}),
        ("echo c1", {"kind": "echo", "payload": "tensor", "concurrency": 1, "images": 1}),
        ("echo c64", {"kind": "echo", "payload": "tensor", "concurrency": 64, "images": 1}),
    ]
    out = []
    try:
        for title, scenario in scenarios:
            command = {
                "image_size": None,
                "target": f"127.0.0.1:{port}",
                "http_target": None,
                "connection": {},
                "model": args.model,
                "duration": args.duration,
                "streams": 1,
                "inflight": 64,
                **scenario,
            }
            profile = cProfile.Profile()
            result: dict = {}

            def drive(command: dict = command, result: dict = result) -> None:
                result.update(load.run(command))

            profile.enable()
            await asyncio.to_thread(drive)
            profile.disable()
            requests = result["requests"] if result else 1
            out.append(table(title, rooms(profile), requests))
            if args.top:
                stats = pstats.Stats(profile)
                stats.sort_stats("tottime").print_stats(args.top)
    finally:
        load.close()
        await server.shut_down()
    return out


async def in_process(args: argparse.Namespace) -> str:
    """The handler's own steps timed without a profiler: one image as a raw tensor, `--calls` times."""
    import time

    import numpy as np

    from protos.convserve.v1 import convserve_pb2 as pb
    from serving.core.runtime import RuntimeOptions
    from serving.models.local import open_local
    from serving.protocols import convserve_v1

    folder = args.models / args.model
    version = max(int(p.name) for p in folder.iterdir() if p.name.isdigit())
    local = open_local(folder / str(version), RuntimeOptions(device="cpu"))
    (model,) = local.registry.ready()
    shape = model.contract.image_shape
    x = np.random.default_rng(0).random((1, *shape), dtype=np.float32)
    tensor = pb.Tensor(shape=list(shape), dtype="float32", data=x.tobytes())
    raw = pb.ClassifyRequest(images=[pb.Image(tensor=tensor)]).SerializeToString()

    async def handler() -> bytes:
        message = pb.ClassifyRequest.FromString(raw)
        result = await local.dataplane.classify(convserve_v1.to_request(message, None))
        return convserve_v1.to_response(message, result).SerializeToString()

    async def batcher() -> object:
        return await model.infer(x)

    async def runtime() -> object:
        return model.runtime.run(x)

    lines = ["| step (in process, no profiler) | µs per call |", "|---|---|"]
    try:
        for name, step in (
            ("parse → data plane → response bytes", handler),
            ("batcher (submit, model, result)", batcher),
            ("ONNX Runtime run alone", runtime),
        ):
            for _ in range(500):
                await step()
            times = []
            for _ in range(5):
                started = time.perf_counter()
                for _ in range(args.calls // 5):
                    await step()
                times.append((time.perf_counter() - started) / (args.calls // 5))
            lines.append(f"| {name} | {sorted(times)[2] * 1e6:.1f} |")
    finally:
        await local.close()
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, default=Path("benchmarks/models"))
    parser.add_argument("--model", default="digits")
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--metrics-off", action="store_true")
    parser.add_argument("--calls", type=int, default=20000, help="calls per in-process step")
    parser.add_argument("--top", type=int, default=0, help="also print the N functions with most own time")
    args = parser.parse_args()
    install_uvloop()
    print(asyncio.run(in_process(args)), end="\n\n")
    for section in asyncio.run(profile_scenarios(args)):
        print(section, end="\n\n")


if __name__ == "__main__":
    main()
