"""Overload of a 3x320x320 model at 10x what it can hold: refusals, not memory growth."""

from __future__ import annotations

import asyncio
import io
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from protos.convserve.v1 import convserve_pb2 as pb
from protos.convserve.v1 import convserve_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow
MB = 1024 * 1024
ROW_BYTES = 3 * 320 * 320 * 4
BUDGET_MB = 256
IMAGES_PER_CALL = 16
CALLERS = 10 * (BUDGET_MB * MB // ROW_BYTES) // IMAGES_PER_CALL  # 10x the rows the budget holds


def rss(pid: int, field: str = "VmRSS") -> int:
    """A field of /proc/PID/status in bytes: VmRSS (resident now) or VmHWM (the peak)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def photos(count: int) -> list[bytes]:
    """Smooth 320x320 RGB pictures with some noise: real PNGs of a few tens of KB."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:320, 0:320]
    files = []
    for i in range(count):
        base = np.stack([(x + 7 * i) % 256, (y + 13 * i) % 256, (x + y) // 3 % 256], axis=-1)
        pixels = np.clip(base + rng.integers(-4, 5, base.shape), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        files.append(buffer.getvalue())
    return files


async def load(address: str, seconds: float) -> Counter:
    request = pb.ClassifyRequest(
        model="conv320", images=[pb.Image(encoded=f) for f in photos(IMAGES_PER_CALL)]
    )
    codes: Counter = Counter()
    until = time.monotonic() + seconds
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.ClassifierStub(channel)

        async def caller() -> None:
            while time.monotonic() < until:
                try:
                    await stub.Classify(request, timeout=30)
                    codes[grpc.StatusCode.OK] += 1
                except grpc.aio.AioRpcError as exc:
                    codes[exc.code()] += 1
                    if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        await asyncio.sleep(0.05)  # a client backing off, as the status asks

        await asyncio.gather(*(caller() for _ in range(CALLERS)))
    return codes


def test_overload_is_refused_and_memory_stays_bounded(conv_repo, server_factory) -> None:
    server = server_factory(conv_repo, "--input-budget-mb", str(BUDGET_MB))
    pid = server.process.pid
    start = rss(pid)
    codes = asyncio.run(load(server.address, 8.0))
    peak = rss(pid, "VmHWM")
    settled = rss(pid)
    deadline = time.monotonic() + 15
    while settled - start > 200 * MB and time.monotonic() < deadline:
        time.sleep(0.5)
        settled = rss(pid)
    print(
        f"{CALLERS} callers: {dict(codes)}; RSS start {start / MB:.0f} MB, peak {peak / MB:.0f} MB, "
        f"after {settled / MB:.0f} MB"
    )
    assert codes[grpc.StatusCode.OK] > 0 and codes[grpc.StatusCode.RESOURCE_EXHAUSTED] > 0
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
    # What the server holds at most: the input budget's rows, and the requests in flight, which gRPC
    # receives and Python parses before the budget can refuse them (raw bytes, the parsed message, the
    # images' bytes, the transport's buffers: four copies each), plus what the allocator keeps of
    # freed copies when the machine is busy: six in all. Measured peaks: 1.3-1.6 GB on a quiet
    # machine, 2.4 GB beside a parallel test run. Decoding, not the budget, paces this load (without
    # a budget the peak is the same), so the budget is proven by the refusals above and this bound
    # proves that requests in flight are held a fixed number of times, not accumulated.
    request_bytes = sum(len(f) for f in photos(IMAGES_PER_CALL))
    bound = start + BUDGET_MB * MB + 6 * CALLERS * request_bytes + 256 * MB  # + the model, threads
    assert peak < bound, f"peak {peak / MB:.0f} MB, bound {bound / MB:.0f} MB"
    assert settled - start < 200 * MB
