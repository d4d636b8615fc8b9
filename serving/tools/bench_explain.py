"""`python -m serving bench --explain`: what an explanation costs, and what it costs classification.

Per model, in interleaved rounds against one server started here (so every scenario sees the same
machine state), with one image per request:
  * classify c1, explain cam c1, explain occlusion c1: p50 latency, so cam / classify is the price of a
    class activation map over a plain answer, and occlusion's ms per image with its copies;
  * classify c16, alone and beside 2 clients looping on occlusion explanations: classification's p99
    with explanations running over without, the priority's figure;
  * in process, ONNX Runtime alone: explain.onnx over model.onnx at batch 1, the graphs' own ratio.
Medians over the rounds are written to `--out` (markdown) with the command that made them.

A model whose batch call takes about `--inline-below-ms` (the Fashion-MNIST CNN: ~0.4 ms against the
default 0.5) runs inline or in a worker thread as noise moves its moving average, which moves its
latency by more than the explain graph costs: give the bench `--inline-below-ms` below (or above)
every model's call so each path takes one route.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
from PIL import Image

from protos.convserve.v1 import convserve_pb2 as pb
from protos.convserve.v1 import convserve_pb2_grpc as pb_grpc
from serving.tools.launch import launch_server

CAM_GOAL = 1.5  # explain cam c1 p50 over classify c1 p50
PRIORITY_GOAL = 1.10  # classify c16 p99 beside 2 occlusion clients over classify c16 p99 alone
CLASSIFIERS = 16
EXPLAINERS = 2
Scenario = Callable[[float, "Sample | None"], list[Awaitable[None]]]  # (until, sample) -> the clients


@dataclass
class Sample:
    latencies: list[float] = field(default_factory=list)  # seconds, one per call
    seconds: float = 0.0
    copies: int = 0

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) * 1000 if self.latencies else float("nan")

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds else 0.0


async def loop(call: Callable[[], Awaitable[object]], until: float, sample: Sample | None) -> None:
    while time.perf_counter() < until:
        started = time.perf_counter()
        await call()
        if sample is not None:
            sample.latencies.append(time.perf_counter() - started)


def model_image(info: pb.ModelInfo) -> bytes:
    """A PNG of the model's input size and colour mode (noise: the cost does not depend on the content)."""
    spec = info.input
    shape = (spec.height, spec.width) if spec.color_mode == "L" else (spec.height, spec.width, 3)
    pixels = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


async def measure_model(address: str, model: str, duration: float, rounds: int) -> dict[str, list[Sample]]:
    samples: dict[str, list[Sample]] = {}
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        info = await stub.GetModel(pb.GetModelRequest(name=model))
        if "cam" not in info.explain_methods:
            raise SystemExit(f"error: model {model} has no explain graph (explain.onnx): nothing to compare")
        image = pb.Image(encoded=model_image(info))
        classify = pb.ClassifyRequest(model=model, images=[image])
        cam = pb.ExplainRequest(model=model, images=[image], methods=["cam"])
        occlusion = pb.ExplainRequest(model=model, images=[image], methods=["occlusion"])
        copies = (await stub.Explain(occlusion)).occlusion.copies

        def run_classify() -> Awaitable[object]:
            return stub.Classify(classify)

        def run_cam() -> Awaitable[object]:
            return stub.Explain(cam)

        def run_occlusion() -> Awaitable[object]:
            return stub.Explain(occlusion)

        def clients(classifiers: int, call: Callable[[], Awaitable[object]], explainers: int = 0) -> Scenario:
            def make(until: float, sample: Sample | None) -> list[Awaitable[None]]:
                return [
                    *(loop(call, until, sample) for _ in range(classifiers)),
                    *(loop(run_occlusion, until, None) for _ in range(explainers)),
                ]

            return make

        scenarios = {
            "classify c1": clients(1, run_classify),
            "explain cam c1": clients(1, run_cam),
            "explain occlusion c1": clients(1, run_occlusion),
            f"classify c{CLASSIFIERS}": clients(CLASSIFIERS, run_classify),
            f"classify c{CLASSIFIERS} + {EXPLAINERS} occlusion": clients(
                CLASSIFIERS, run_classify, EXPLAINERS
            ),
        }
        for _ in range(rounds):
            for name, make in scenarios.items():
                await asyncio.gather(*make(time.perf_counter() + 0.2, None))  # warm, unrecorded
                sample = Sample(copies=copies if "occlusion c1" in name else 0)
                started = time.perf_counter()
                await asyncio.gather(*make(started + duration, sample))
                sample.seconds = time.perf_counter() - started
                samples.setdefault(name, []).append(sample)
    return samples


def in_process_ratio(version: Path, repeats: int = 300) -> tuple[float, float]:
    """(model.onnx, explain.onnx) median ms at batch 1 on one thread, in process."""
    timings = []
    for name in ("model.onnx", "explain.onnx"):
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        session = ort.InferenceSession(str(version / name), options, providers=["CPUExecutionProvider"])
        spec = session.get_inputs()[0]
        dtype = np.float16 if spec.type == "tensor(float16)" else np.float32  # an fp16 export's input
        x = np.random.default_rng(0).random((1, *spec.shape[1:]), dtype=np.float32).astype(dtype)
        for _ in range(20):
            session.run(None, {spec.name: x})
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            session.run(None, {spec.name: x})
            times.append(time.perf_counter() - started)
        timings.append(statistics.median(times) * 1000)
    return timings[0], timings[1]


def newest_version(models: Path, model: str) -> Path:
    return max((p for p in (models / model).iterdir() if p.name.isdigit()), key=lambda p: int(p.name))


def round_ratio(top: list[Sample], bottom: list[Sample], q: float) -> float:
    """The median over rounds of one round's ratio: a slow drift of the machine cancels out."""
    return statistics.median(a.percentile(q) / b.percentile(q) for a, b in zip(top, bottom, strict=True))


def report(
    results: dict[str, dict[str, list[Sample]]], graphs: dict[str, tuple[float, float]], command: str
) -> str:
    def med(samples: list[Sample], get: Callable[[Sample], float]) -> float:
        return statistics.median(get(s) for s in samples)

    lines = [
        "# Explanations: cost and priority",
        "",
        f"Command: `{command}`  ",
        "Medians over the rounds; one image per request; latencies in ms. Ratios: the median over rounds "
        "of each round's ratio. Written by the bench.",
        "",
        "| model | scenario | p50 | p99 | calls/s |",
        "|---|---|---|---|---|",
    ]
    for model, samples in results.items():
        for name, runs in samples.items():
            lines.append(
                f"| {model} | {name} | {med(runs, lambda s: s.percentile(50)):.2f} | "
                f"{med(runs, lambda s: s.percentile(99)):.2f} | {med(runs, lambda s: s.rate):.0f} |"
            )
    lines += ["", "| model | figure | value | target |", "|---|---|---|---|"]
    for model, samples in results.items():
        occlusion = med(samples["explain occlusion c1"], lambda s: s.percentile(50))
        copies = samples["explain occlusion c1"][0].copies
        cam = round_ratio(samples["explain cam c1"], samples["classify c1"], 50)
        priority = round_ratio(
            samples[f"classify c{CLASSIFIERS} + {EXPLAINERS} occlusion"],
            samples[f"classify c{CLASSIFIERS}"],
            99,
        )
        graph_model, graph_explain = graphs[model]
        lines += [
            f"| {model} | explain cam / classify, c1 p50 | {cam:.2f}× | ≤ {CAM_GOAL}× "
            f"({'held' if cam <= CAM_GOAL else 'missed'}) |",
            f"| {model} | explain.onnx / model.onnx in process, batch 1 | "
            f"{graph_explain / graph_model:.2f}× ({graph_explain:.3f} / {graph_model:.3f} ms) | — |",
            f"| {model} | occlusion per image | {occlusion:.1f} ms for {copies} copies "
            f"({occlusion / max(copies, 1) * 1000:.0f} µs per copy) | — |",
            f"| {model} | classify c{CLASSIFIERS} p99 beside {EXPLAINERS} occlusion clients / alone | "
            f"{priority:.2f}× | ≤ {PRIORITY_GOAL}× ({'held' if priority <= PRIORITY_GOAL else 'missed'}) |",
        ]
    return "\n".join(lines) + "\n"


def run_explain_bench(args: argparse.Namespace) -> int:
    command = "python -m serving bench " + shlex.join(
        sys.argv[2:] if sys.argv[1:2] == ["bench"] else sys.argv[1:]
    )
    models = args.model or ["digits"]
    missing = [m for m in models if not (args.models / m).is_dir()]
    if missing:
        print(f"error: no model {missing} under {args.models}", file=sys.stderr)
        return 2
    graphs = {m: in_process_ratio(newest_version(args.models, m)) for m in models}
    results: dict[str, dict[str, list[Sample]]] = {}
    with tempfile.TemporaryDirectory() as workdir:
        flags = ["--device", args.device, "--max-delay-ms", str(args.max_delay_ms), "--log-level", "WARNING"]
        if args.inline_below_ms is not None:
            flags += ["--inline-below-ms", str(args.inline_below_ms)]
        server = launch_server(
            args.models, Path(workdir), *flags, "--max-batch-size", str(args.max_batch_size)
        )
        try:
            for model in models:
                results[model] = asyncio.run(measure_model(server.address, model, args.duration, args.rounds))
                print(f"{model} done", file=sys.stderr, flush=True)
        finally:
            server.stop()
    text = report(results, graphs, command)
    out = args.out or Path("benchmarks/EXPLAIN.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    return 0
