"""The load generator `bench` drives: a separate process, so it never shares the server's GIL.

`python -m serving.tools.loadgen` reads one JSON scenario per line on stdin and answers one JSON result per
line on stdout. Scenarios: `unary` (Classify from `concurrency` callers, `images` per request),
`stream` (ClassifyStream as the scoring job uses it: `streams` calls, `images` per message, at most
`inflight` images unanswered), `kserve` (the Open Inference Protocol's ModelInfer from `concurrency`
callers: `png` as a BYTES tensor of encoded images, `tensor` as the model's own input tensor in
`raw_input_contents`, as tritonclient sends them), `echo` (the transport alone), and over HTTP (to
`http_target`, serving.tools.http_load): `http` (infer with binary tensor data), `http-json` (infer with
JSON numbers) and `http-classify` (curl's raw image body), from `concurrency` callers like `unary`.
Payloads are PNG files or raw tensors of the model's input shape, made here from seeded random pixels.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import grpc
import numpy as np
from PIL import Image

from protos.convserve.v1 import convserve_pb2 as pb
from protos.convserve.v1 import convserve_pb2_grpc as pb_grpc
from protos.inference import grpc_service_pb2 as kserve
from protos.inference import grpc_service_pb2_grpc as kserve_grpc
from serving.client import Connection, pixels_to_tensor, to_image
from serving.tools import http_load

DISTINCT_IMAGES = 64
WARMUP_S = 0.3


@dataclass
class Tally:
    images: int = 0
    requests: int = 0
    errors: int = 0

    def __post_init__(self) -> None:
        self.latencies: list[float] = []

    def record(self, sent: float, images: int, ok: bool, window_start: float, window_end: float) -> None:
        """Counts an answer that arrived inside the measuring window, whenever it was sent."""
        now = time.perf_counter()
        if not window_start <= now <= window_end:
            return
        self.requests += 1
        self.images += images if ok else 0
        self.errors += not ok
        self.latencies.append(now - sent)


KSERVE_DATATYPES = http_load.KSERVE_DATATYPES


def make_images(
    info: pb.ModelInfo,
    payload: str,
    count: int = DISTINCT_IMAGES,
    seed: int = 0,
    size: tuple[int, int] | None = None,
) -> list[pb.Image]:
    """Random pixels of the model's size, as PNG bytes or as raw tensors in its input layout.

    `size` (width, height) makes PNGs of another size, which the server must resize (and letterbox or
    crop, as the model's contract says): the bench compares those costs.
    """
    spec = info.input
    channels = 1 if spec.color_mode == "L" else 3
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        width, height = size if size and payload == "png" else (spec.width, spec.height)
        pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
        if payload == "png":
            images.append(to_image(Image.fromarray(pixels[:, :, 0] if channels == 1 else pixels)))
        else:
            images.append(to_image(pixels_to_tensor(pixels, spec)))
    return images


def requests_of(
    info: pb.ModelInfo, payload: str, per_request: int, size: tuple[int, int] | None = None
) -> list[pb.ClassifyRequest]:
    images = make_images(info, payload, size=size)
    return [
        pb.ClassifyRequest(
            model=info.name,
            version=info.version,
            top_k=5,
            images=[images[(i + j) % len(images)] for j in range(per_request)],
        )
        for i in range(len(images))
    ]


def kserve_requests_of(
    info: pb.ModelInfo, payload: str, per_request: int, size: tuple[int, int] | None = None
) -> list[kserve.ModelInferRequest]:
    """The same images as `requests_of`, as ModelInfer requests (serialized as tritonclient does)."""
    images = make_images(info, payload, size=size)
    requests = []
    for i in range(len(images)):
        chosen = [images[(i + j) % len(images)] for j in range(per_request)]
        request = kserve.ModelInferRequest(model_name=info.name, model_version=str(info.version))
        if payload == "png":
            request.inputs.add(name="image_bytes", datatype="BYTES", shape=[per_request, 1])
            raw = b"".join(len(x.encoded).to_bytes(4, "little") + x.encoded for x in chosen)
        else:
            shape = [per_request, *info.input.shape]
            datatype = KSERVE_DATATYPES[info.input.dtype]
            request.inputs.add(name=info.input.name, datatype=datatype, shape=shape)
            raw = b"".join(x.tensor.data for x in chosen)
        request.raw_input_contents.append(raw)
        requests.append(request)
    return requests


async def unary(
    call: Callable[..., Awaitable[object]] | list[Callable[..., Awaitable[object]]],
    requests: list,
    images_of: Callable[[Any], int],  # a request of `requests` -> its image count
    concurrency: int,
    until: float,
    measure_from: float,
    tally: Tally,
    failures: tuple[type[BaseException], ...] = (grpc.aio.AioRpcError,),
) -> None:
    """`concurrency` callers, each sending its next request as soon as the last is answered; with a
    list of calls (one per channel), caller i uses call i modulo their number."""
    calls = call if isinstance(call, list) else [call]

    async def caller(offset: int) -> None:
        i = offset
        own = calls[offset % len(calls)]
        while (start := time.perf_counter()) < until:
            request = requests[i % len(requests)]
            i += 1
            try:
                await own(request, timeout=30)
                ok = True
            except failures:
                ok = False
            tally.record(start, images_of(request), ok, measure_from, until)

    await asyncio.gather(*(caller(i) for i in range(concurrency)))


async def echo(
    stubs: list[pb_grpc.BenchStub], concurrency: int, until: float, measure_from: float, tally: Tally
) -> None:
    message = pb.EchoMessage(payload=b"\0" * 256)

    async def caller(stub: pb_grpc.BenchStub) -> None:
        while (start := time.perf_counter()) < until:
            await stub.Echo(message, timeout=30)
            tally.record(start, 1, True, measure_from, until)

    await asyncio.gather(*(caller(stubs[i % len(stubs)]) for i in range(concurrency)))


async def stream(
    stubs: list[pb_grpc.ClassifierStub],
    requests: list[pb.ClassifyRequest],
    streams: int,
    inflight: int,
    until: float,
    measure_from: float,
    tally: Tally,
) -> None:
    per_request = len(requests[0].images)
    window = max(1, inflight // per_request // streams)

    async def one_stream(index: int) -> None:
        call = stubs[index % len(stubs)].ClassifyStream()
        sent: dict[str, float] = {}
        slots = asyncio.Semaphore(window)
        done_writing = asyncio.Event()

        async def writer() -> None:
            i = 0
            while time.perf_counter() < until:
                await slots.acquire()
                request = pb.ClassifyRequest()
                request.CopyFrom(requests[i % len(requests)])
                request.id = f"{index}-{i}"
                sent[request.id] = time.perf_counter()
                await call.write(request)
                i += 1
            await call.done_writing()
            done_writing.set()

        async def reader() -> None:
            while (response := await call.read()) != grpc.aio.EOF:
                slots.release()
                ok = not response.HasField("error")
                tally.record(sent.pop(response.id), len(response.results), ok, measure_from, until)

        await asyncio.gather(writer(), reader())

    await asyncio.gather(*(one_stream(i) for i in range(streams)))


async def run_scenario(scenario: dict) -> dict:
    size = 64 * 1024 * 1024
    options = [("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", size)]
    connection = Connection.from_json(scenario.get("connection"))
    count = max(1, int(scenario.get("channels", 1)))
    if count > 1:  # a connection each: gRPC shares one between channels of equal arguments otherwise
        options.append(("grpc.use_local_subchannel_pool", 1))
    async with contextlib.AsyncExitStack() as stack:
        channels = [
            await stack.enter_async_context(connection.aio_channel(scenario["target"], options))
            for _ in range(count)
        ]
        return await run_on_channels(scenario, connection, channels)


async def run_on_channels(scenario: dict, connection: Connection, channels: list[grpc.aio.Channel]) -> dict:
    """One scenario over `channels` (one connection each): callers and streams take them in turn."""
    channel = channels[0]
    stub = pb_grpc.ClassifierStub(channel)
    tally = Tally()
    kind = scenario["kind"]
    requests: list[Any] = []  # built before the clock starts: ClassifyRequests, or ModelInfer ones
    if kind != "echo":
        info = await stub.GetModel(pb.GetModelRequest(name=scenario["model"]), timeout=10)
        image_size = tuple(scenario["image_size"]) if scenario.get("image_size") else None
    if kind in http_load.HTTP_KINDS:
        await run_http(scenario, connection, info, image_size, tally)
        return result_of(scenario["duration"], tally)
    if kind != "echo":
        build = kserve_requests_of if kind == "kserve" else requests_of
        requests = build(info, scenario["payload"], scenario["images"], image_size)
    measure_from = time.perf_counter() + WARMUP_S
    until = measure_from + scenario["duration"]
    if kind == "echo":
        benches = [pb_grpc.BenchStub(c) for c in channels]
        work = echo(benches, scenario["concurrency"], until, measure_from, tally)
    elif kind == "kserve":
        infers = [kserve_grpc.GRPCInferenceServiceStub(c).ModelInfer for c in channels]
        count, images_of = scenario["concurrency"], lambda r: r.inputs[0].shape[0]
        work = unary(infers, requests, images_of, count, until, measure_from, tally)
    elif kind == "unary":
        count = scenario["concurrency"]
        classifies = [pb_grpc.ClassifierStub(c).Classify for c in channels]
        work = unary(classifies, requests, lambda r: len(r.images), count, until, measure_from, tally)
    else:
        streams, inflight = scenario.get("streams", 2), scenario.get("inflight", 256)
        stubs = [pb_grpc.ClassifierStub(c) for c in channels]
        work = stream(stubs, requests, streams, inflight, until, measure_from, tally)
    await run_until(work, until, (asyncio.CancelledError, grpc.aio.AioRpcError))
    return result_of(scenario["duration"], tally)


async def run_http(
    scenario: dict,
    connection: Connection,
    info: pb.ModelInfo,
    image_size: tuple[int, int] | None,
    tally: Tally,
) -> None:
    """An HTTP scenario: the same images as the gRPC ones, to the server's HTTP port."""
    concurrency, payload = scenario["concurrency"], scenario["payload"]
    url = http_load.base_url(scenario["http_target"], connection)
    async with http_load.http_session(connection, concurrency) as session:
        output = await http_load.output_name(session, url, info.name)
        images = make_images(info, payload, size=image_size)
        requests = http_load.http_requests_of(
            scenario["kind"], info, images, scenario["images"], payload, output
        )
        measure_from = time.perf_counter() + WARMUP_S
        until = measure_from + scenario["duration"]
        failures = (http_load.HttpFailure, aiohttp.ClientError, asyncio.TimeoutError)
        call = http_load.http_call(session, url)
        work = unary(call, requests, lambda r: r.images, concurrency, until, measure_from, tally, failures)
        await run_until(work, until, (asyncio.CancelledError, *failures))


async def run_until(work: Awaitable[None], until: float, expected: tuple[type[BaseException], ...]) -> None:
    task = asyncio.ensure_future(work)
    await asyncio.wait({task}, timeout=until - time.perf_counter() + 0.01)
    if not task.done():  # answers after the window do not count: stop waiting for them
        task.cancel()
    with contextlib.suppress(*expected):
        await task


def result_of(duration: float, tally: Tally) -> dict:
    elapsed = duration
    latencies = np.asarray(tally.latencies) * 1000
    p50, p95, p99 = np.percentile(latencies, [50, 95, 99]) if len(latencies) else (0.0, 0.0, 0.0)
    return {
        "images": tally.images,
        "requests": tally.requests,
        "errors": tally.errors,
        "elapsed_s": elapsed,
        "images_per_s": tally.images / elapsed,
        "p50_ms": p50,
        "p95_ms": p95,
        "p99_ms": p99,
    }


def main() -> int:
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    for line in sys.stdin:
        if line.strip():
            result = asyncio.run(run_scenario(json.loads(line)))
            print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
