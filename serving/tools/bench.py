"""`python -m serving bench`: how much of the model's raw speed survives the trip through the server.

For each model, in one run:
  (a) the limit: ONNX Runtime in this process, the server's session options, at several batch sizes;
  (b) the server (started here, or --server) under load from `serving.tools.loadgen` in a separate process:
      unary single-image requests at concurrency 1, 16 and 64, unary requests of 32 images, and
      ClassifyStream as the scoring job uses it, each with PNG images and with raw tensors;
  (c) a second server with batching off (max_batch_size 1), the baseline batching must beat;
  (d) the transport's ceiling: the Echo RPC on the same server and load generator (the benchmark-only
      `convserve.v1.Bench` service: servers started here get `--bench-service`; a server given with
      --server needs it too for the echo scenarios, and takes the connection flags: TLS, token).
  (e) the same server's HTTP port (--http-server with --server), from the same load generator: the Open
      Inference Protocol's infer with binary tensor data (PNG as BYTES, and tensors) at concurrency 1 and
      64, with JSON tensors, and one PNG per request as curl sends it to :classify, against their gRPC
      counterparts (`kserve …`, `unary c64 png`).
With `--metrics on,off` every scenario runs against a server with its metrics endpoint on and one with
it off, in the same rounds (names ending "(metrics off)"), to measure what the metrics cost.
The limit and the scenarios alternate in short rounds, every model in every round, so drift in the
machine's speed hits them all alike; figures are medians over the rounds with their range. Writes a
Markdown table and JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from serving.client.connection import PLAINTEXT, Connection, add_connection_arguments, connection_from_args
from serving.tools.launch import LaunchedServer, launch_server

LIMIT_BATCH_SIZES = (1, 4, 16, 32)
KEPT = "<!-- bench keeps what follows: figures recorded by hand -->"
METRICS_OFF = " (metrics off)"
METRICS_GOAL = 0.97  # metrics on over metrics off, images/s


def variant(name: str, metrics: str) -> str:
    """A scenario's name in the report: as is with metrics on (the server's default), marked when off."""
    return name if metrics == "on" else name + METRICS_OFF


@dataclass(frozen=True)
class Scenario:
    name: str
    kind: str  # unary | stream | kserve | echo | http | http-json | http-classify
    payload: str = "png"  # png | tensor
    concurrency: int = 1
    images: int = 1
    server: str = "batching"  # batching | no-batching

    def command(
        self,
        target: str,
        model: str,
        duration: float,
        connection: Connection = PLAINTEXT,
        image_size: tuple[int, int] | None = None,
        http_target: str | None = None,
        channels: int = 1,
    ) -> dict:
        return {
            "channels": channels,
            "image_size": list(image_size) if image_size else None,
            "target": target,
            "http_target": http_target,
            "connection": connection.to_json(),
            "kind": self.kind,
            "payload": self.payload,
            "concurrency": self.concurrency,
            "images": self.images,
            "model": model,
            "duration": duration,
            "streams": 2,
            "inflight": 512,
        }


def scenarios() -> list[Scenario]:
    found = []
    for payload in ("png", "tensor"):
        for concurrency in (1, 16, 64):
            found.append(Scenario(f"unary c{concurrency} {payload}", "unary", payload, concurrency))
        found.append(Scenario(f"unary 32-image c4 {payload}", "unary", payload, 4, 32))
        found.append(Scenario(f"stream 32/msg {payload}", "stream", payload, images=32))
        found.append(Scenario(f"no-batching unary c64 {payload}", "unary", payload, 64, server="no-batching"))
        # The Open Inference Protocol on the same server: png is its BYTES input, tensor its FP32 one.
        for concurrency in (1, 64):
            found.append(Scenario(f"kserve c{concurrency} {payload}", "kserve", payload, concurrency))
        # The same over HTTP: binary tensor data, as tritonclient.http sends it.
        for concurrency in (1, 64):
            found.append(Scenario(f"http c{concurrency} {payload}", "http", payload, concurrency))
    found.append(Scenario("http-json c1 tensor", "http-json", "tensor", 1))
    found.append(Scenario("http-json c64 tensor", "http-json", "tensor", 64))
    found.append(Scenario("http-classify c1 png", "http-classify", "png", 1))
    found.append(Scenario("http-classify c64 png", "http-classify", "png", 64))
    found.append(Scenario("echo c1", "echo", concurrency=1))
    found.append(Scenario("echo c64", "echo", concurrency=64))
    return found


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", type=Path, default=Path("benchmarks/models"), help="model repository")
    parser.add_argument("--model", action="append", help="model(s) to measure (default: digits and resnet18)")
    parser.add_argument("--server", default=None, help="measure this running server instead of starting one")
    parser.add_argument(
        "--http-server", default=None, help="with --server: its HTTP address (HOST:PORT), for http scenarios"
    )
    parser.add_argument("--duration", type=float, default=1.5, help="seconds per scenario per round")
    parser.add_argument("--rounds", type=int, default=3)
    names = ", ".join(s.name for s in scenarios())
    parser.add_argument("--scenario", action="append", help=f"run only these (repeatable): {names}")
    parser.add_argument(
        "--workers", type=int, default=1, help="server processes per server started here (--workers)"
    )
    parser.add_argument(
        "--channels",
        type=int,
        default=1,
        help="gRPC connections the load generator spreads its callers and streams over (--workers "
        "balances connections, not calls)",
    )
    parser.add_argument(
        "--explain",
        action="store_true",
        help="measure explanations instead (serving.tools.bench_explain): cam and occlusion against "
        "classify, and classify's p99 beside occlusion clients; --model defaults to digits",
    )
    parser.add_argument(
        "--inline-below-ms",
        type=float,
        default=None,
        help="with --explain: the server's --inline-below-ms (default: the server's own)",
    )
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-delay-ms", type=float, default=2.0)
    parser.add_argument(
        "--out", type=Path, default=None, help="default: benchmarks/RESULTS.md (EXPLAIN.md with --explain)"
    )
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results.json"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--metrics",
        choices=("on", "off", "on,off"),
        default="on",
        help="the servers' metrics endpoint; on,off: every scenario against both, to compare",
    )
    add_connection_arguments(parser)  # for --server; the servers started here are plaintext
    parser.add_argument(
        "--image-size",
        type=image_size,
        default=None,
        metavar="WxH",
        help="PNG images of this size (default: the model's input size), so the server resizes them",
    )


def image_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WxH, got {text!r}") from None
    if width < 1 or height < 1:
        raise argparse.ArgumentTypeError(f"expected a positive size, got {text!r}")
    return width, height


# -- processes ------------------------------------------------------------------------------------


@dataclass
class ExternalServer:
    """A server given with --server: measured, but neither started, stopped nor profiled here."""

    address: str
    http_address: str | None = None

    def cpu_seconds(self) -> None:
        return None

    def stop(self) -> None:
        pass


class LoadGenerator:
    """`python -m serving.tools.loadgen` in its own process, fed one scenario at a time."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "serving.tools.loadgen"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def run(self, command: dict) -> dict:
        assert self.process.stdin and self.process.stdout
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError("the load generator died")
        return json.loads(line)

    def close(self) -> None:
        if self.process.stdin:
            self.process.stdin.close()
        self.process.wait(30)


# -- the limit ------------------------------------------------------------------------------------


class InProcessLimit:
    """The model called in this process through the data plane's public API: the server's session
    options, no batcher, no transport."""

    def __init__(self, path: Path, device: str) -> None:
        from serving.core.runtime import RuntimeOptions
        from serving.models.local import open_local

        self.local = open_local(path, RuntimeOptions(device=device))
        (self.model,) = self.local.registry.ready()
        rng = np.random.default_rng(0)
        shape = self.model.contract.image_shape
        self.inputs = {b: rng.random((b, *shape), dtype=np.float32) for b in LIMIT_BATCH_SIZES}

    def measure(self, batch: int, duration: float) -> tuple[float, float]:
        """(images/s, seconds per batch call) over `duration`."""
        x = self.inputs[batch]
        self.model.predict(x)
        calls, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < duration:
            self.model.predict(x)
            calls += 1
        return calls * batch / elapsed, elapsed / calls


# -- the run --------------------------------------------------------------------------------------


@dataclass
class Measured:
    images_per_s: list[float] = field(default_factory=list)
    p50: list[float] = field(default_factory=list)
    p95: list[float] = field(default_factory=list)
    p99: list[float] = field(default_factory=list)
    batch: list[float] = field(default_factory=list)
    cpu_ms_per_image: list[float] = field(default_factory=list)
    errors: int = 0


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def model_stats(address: str, model: str, connection: Connection) -> tuple[int, int]:
    from serving.client import ClassifierClient

    with ClassifierClient(address, timeout=10, connection=connection) as client:
        stats = client.get_model(model).stats
    return stats.items, stats.batches


# (server kind, metrics state) -> the server that runs those scenarios for every model
Servers = dict[tuple[str, str], LaunchedServer | ExternalServer]


def chosen_scenarios(args: argparse.Namespace) -> list[Scenario]:
    return [s for s in scenarios() if not args.scenario or s.name in args.scenario]


def launch_servers(args: argparse.Namespace, workdir: Path) -> Servers:
    """One server per (kind, metrics state) the chosen scenarios need, serving every model: each model's
    figures come from its own calls and its own counters, so the models share them."""
    flags = ["--device", args.device, "--max-delay-ms", str(args.max_delay_ms), "--log-level", "WARNING"]
    flags.append("--bench-service")  # the Echo RPC: the transport's ceiling
    flags += ["--workers", str(args.workers)]
    batch_flags = {"batching": str(args.max_batch_size), "no-batching": "1"}
    servers: Servers = {}
    try:
        for kind in dict.fromkeys(s.server for s in chosen_scenarios(args)):
            for state in args.metrics.split(","):
                if args.server and kind == "batching":
                    servers[kind, state] = ExternalServer(args.server, args.http_server)
                else:
                    servers[kind, state] = launch_server(
                        args.models,
                        workdir,
                        "--max-batch-size",
                        batch_flags[kind],
                        *flags,
                        metrics=state == "on",
                        http=True,
                    )
    except BaseException:
        for server in servers.values():
            server.stop()
        raise
    return servers


class ModelBench:
    """One model's in-process limit and figures on the shared servers, measured a round at a time so
    that the rounds of several models interleave: drift in the machine's speed hits every model alike
    (the resize modes are compared across models)."""

    def __init__(
        self, args: argparse.Namespace, model: str, servers: Servers, connection: Connection
    ) -> None:
        self.args, self.model = args, model
        path = args.models / model
        path = path / str(max(int(p.name) for p in path.iterdir() if p.name.isdigit()))
        self.limit = InProcessLimit(path, args.device)
        self.connection = connection
        self.servers = servers
        self.chosen = chosen_scenarios(args)
        self.states = args.metrics.split(",")
        self.limits: dict[int, list[tuple[float, float]]] = {b: [] for b in LIMIT_BATCH_SIZES}
        self.results = {variant(s.name, state): Measured() for s in self.chosen for state in self.states}

    def run_round(self, load: LoadGenerator) -> None:
        args, model = self.args, self.model
        for batch in LIMIT_BATCH_SIZES:  # the limit, then the server, alternating every round
            self.limits[batch].append(self.limit.measure(batch, min(args.duration, 1.0)))
        for scenario, state in ((s, state) for s in self.chosen for state in self.states):
            server = self.servers[scenario.server, state]
            link = self.connection if isinstance(server, ExternalServer) else PLAINTEXT
            items0, batches0 = model_stats(server.address, model, link)
            cpu0 = server.cpu_seconds()
            http = server.http_address
            command = scenario.command(
                server.address, model, args.duration, link, args.image_size, http, args.channels
            )
            result = load.run(command)
            cpu1 = server.cpu_seconds()
            items1, batches1 = model_stats(server.address, model, link)
            measured = self.results[variant(scenario.name, state)]
            measured.images_per_s.append(result["images_per_s"])
            measured.p50.append(result["p50_ms"])
            measured.p95.append(result["p95_ms"])
            measured.p99.append(result["p99_ms"])
            measured.errors += result["errors"]
            # With --workers, GetModel reaches whichever worker takes the connection: its counts are
            # one worker's, so neither the mean batch nor the images seen are known.
            one_process = args.workers == 1
            if scenario.kind != "echo" and batches1 > batches0 and one_process:
                measured.batch.append((items1 - items0) / (batches1 - batches0))
            if cpu0 is not None and cpu1 is not None and result["images"]:
                # Warm-up calls count in the CPU time too: scale by all images the server saw.
                seen = items1 - items0 if scenario.kind != "echo" and one_process else result["images"]
                measured.cpu_ms_per_image.append(1000 * (cpu1 - cpu0) / max(seen, 1))

    def summary(self) -> dict:
        return summarise(self.model, self.limits, self.results)


def nearest_limit(limits: dict[int, float], batch: float) -> tuple[int, float]:
    size = min(limits, key=lambda b: abs(np.log(b) - np.log(max(batch, 1.0))))
    return size, limits[size]


def summarise(model: str, limits: dict[int, list[tuple[float, float]]], results: dict[str, Measured]) -> dict:
    limit_rate = {b: median([r for r, _ in v]) for b, v in limits.items()}
    summary = {
        "model": model,
        "limit": {
            str(b): {
                "images_per_s": limit_rate[b],
                "range": [min(r for r, _ in v), max(r for r, _ in v)],
                "latency_ms": 1000 * median([t for _, t in v]),
            }
            for b, v in limits.items()
        },
        "scenarios": {},
    }
    for name, m in results.items():
        batch = median(m.batch) if m.batch else 1.0
        size, reference = nearest_limit(limit_rate, batch)
        rate = median(m.images_per_s)
        summary["scenarios"][name] = {
            "images_per_s": rate,
            "range": [min(m.images_per_s), max(m.images_per_s)],
            "p50_ms": median(m.p50),
            "p95_ms": median(m.p95),
            "p99_ms": median(m.p99),
            "mean_batch": batch if m.batch else None,
            "limit_batch": size,
            "ratio_to_limit": rate / reference if not name.startswith("echo") else None,
            "ratio_to_best_limit": rate / max(limit_rate.values()) if not name.startswith("echo") else None,
            "cpu_ms_per_image": median(m.cpu_ms_per_image) if m.cpu_ms_per_image else None,
            "errors": m.errors,
        }
    return summary


# -- report ---------------------------------------------------------------------------------------


def targets(summary: dict) -> list[tuple[str, bool | None, str]]:
    """The issue's targets, as (target, held, figures)."""
    s, model = summary["scenarios"], summary["model"]
    out: list[tuple[str, bool | None, str]] = []

    def get(name: str) -> dict | None:
        return s.get(name)

    if model.startswith("resnet18"):
        for name, goal in (("unary c64 png", 0.8), ("stream 32/msg png", 0.9)):
            if (r := get(name)) is not None:
                out.append(
                    (
                        f"{model}: {name} ≥ {goal}× limit",
                        r["ratio_to_limit"] >= goal,
                        f"{r['ratio_to_limit']:.2f}×",
                    )
                )
    if model.startswith("digits"):
        if (r := get("stream 32/msg tensor")) is not None:
            out.append(
                (
                    f"{model}: stream tensors ≥ 0.3× limit",
                    r["ratio_to_limit"] >= 0.3,
                    f"{r['ratio_to_limit']:.2f}× ({r['images_per_s']:.0f} images/s)",
                )
            )
        for payload in ("png", "tensor"):
            unary, off = get(f"unary c64 {payload}"), get(f"no-batching unary c64 {payload}")
            ceiling = get("echo c64")
            if unary and off:
                ratio = unary["images_per_s"] / off["images_per_s"]
                out.append((f"{model}: unary c64 {payload} ≥ 3× batching off", ratio >= 3, f"{ratio:.2f}×"))
            if unary and ceiling:
                ratio = unary["images_per_s"] / ceiling["images_per_s"]
                goal = ECHO_SHARE_GOAL
                out.append(
                    (f"{model}: unary c64 {payload} ≥ {goal}× echo ceiling", ratio >= goal, f"{ratio:.2f}×")
                )
    out += fixed_cost_targets(summary)
    for payload in ("png", "tensor"):
        v1, v2 = get(f"unary c64 {payload}"), get(f"kserve c64 {payload}")
        if v1 and v2:
            ratio = v2["images_per_s"] / v1["images_per_s"]
            out.append(
                (
                    f"{model}: kserve c64 {payload} ≥ 0.9× convserve.v1 unary c64 {payload}",
                    ratio >= 0.9,
                    f"{ratio:.2f}× (mean batch {fmt(v2['mean_batch'], '.1f')} "
                    f"vs {fmt(v1['mean_batch'], '.1f')})",
                )
            )
    out += http_targets(summary)
    for name, on in s.items():
        if (off := get(name + METRICS_OFF)) is not None:
            ratio = on["images_per_s"] / off["images_per_s"]
            out.append(
                (
                    f"{model}: {name} metrics on ≥ {METRICS_GOAL}× off",
                    ratio >= METRICS_GOAL,
                    f"{ratio:.3f}× ({on['images_per_s']:.0f} vs {off['images_per_s']:.0f} images/s)",
                )
            )
    for payload in ("png", "tensor"):
        if (r := get(f"unary c1 {payload}")) is not None:
            over = r["p50_ms"] - summary["limit"]["1"]["latency_ms"]
            out.append(
                (
                    f"{model}: c1 {payload} p50 ≤ in-process batch-1 + 1 ms",
                    over <= 1.0,
                    f"+{over:.2f} ms ({r['p50_ms']:.2f} vs {summary['limit']['1']['latency_ms']:.2f} ms)",
                )
            )
    return out


ECHO_SHARE_GOAL = 0.85  # digits unary c64 images/s over the Echo RPC's calls/s on the same server
ECHO_OVER_MS = 0.15  # digits unary c1 p50 over the Echo RPC's p50: the request path's own cost
RESNET_LIMIT_GOAL = 0.95  # ResNet-18 unary c64 over in-process ONNX Runtime at batch 32


def fixed_cost_targets(summary: dict) -> list[tuple[str, bool | None, str]]:
    """The request path's fixed cost: a tiny model's call against the bare transport (digits), and a
    model that fills the cores against in-process ONNX Runtime (ResNet-18), for both gRPC protocols."""
    s, model = summary["scenarios"], summary["model"]
    out: list[tuple[str, bool | None, str]] = []
    if model.startswith("digits") and (echo := s.get("echo c1")) is not None:
        for name in ("unary c1 tensor", "unary c1 png", "kserve c1 tensor", "kserve c1 png"):
            if (r := s.get(name)) is not None:
                over = r["p50_ms"] - echo["p50_ms"]
                out.append(
                    (
                        f"{model}: {name} p50 ≤ echo c1 p50 + {ECHO_OVER_MS} ms",
                        over <= ECHO_OVER_MS,
                        f"+{over:.2f} ms ({r['p50_ms']:.2f} vs {echo['p50_ms']:.2f} ms)",
                    )
                )
        if (ceiling := s.get("echo c64")) is not None:
            for name in ("kserve c64 tensor", "kserve c64 png"):
                if (r := s.get(name)) is not None:
                    ratio = r["images_per_s"] / ceiling["images_per_s"]
                    held = ratio >= ECHO_SHARE_GOAL
                    out.append((f"{model}: {name} ≥ {ECHO_SHARE_GOAL}× echo ceiling", held, f"{ratio:.2f}×"))
    if model.startswith("resnet18"):
        batch32 = summary["limit"].get("32", {}).get("images_per_s")
        for name in ("unary c64 png", "unary c64 tensor", "kserve c64 png", "kserve c64 tensor"):
            if (r := s.get(name)) is not None and batch32:
                ratio = r["images_per_s"] / batch32
                held = ratio >= RESNET_LIMIT_GOAL
                goal = RESNET_LIMIT_GOAL
                out.append((f"{model}: {name} ≥ {goal}× in-process batch 32", held, f"{ratio:.2f}×"))
    return out


HTTP_GOAL = 0.9  # HTTP binary tensor data over the gRPC Open Inference Protocol, images/s at c64
HTTP_P50_MS = 0.5  # HTTP over gRPC, p50 at concurrency 1 (digits)


def http_targets(summary: dict) -> list[tuple[str, bool | None, str]]:
    """HTTP against gRPC on the same server: binary infer against ModelInfer (a target), JSON and curl's
    :classify against the binary path and gRPC (recorded, no target), p50 at c1 on digits (a target)."""
    s, model = summary["scenarios"], summary["model"]
    out: list[tuple[str, bool | None, str]] = []

    def ratio(over: str, under: str) -> tuple[float, str] | None:
        a, b = s.get(over), s.get(under)
        if not a or not b or not b["images_per_s"]:
            return None
        value = a["images_per_s"] / b["images_per_s"]
        batches = f"mean batch {fmt(a['mean_batch'], '.1f')} vs {fmt(b['mean_batch'], '.1f')}"
        return value, f"{value:.2f}× ({a['images_per_s']:.0f} vs {b['images_per_s']:.0f} images/s, {batches})"

    for payload in ("tensor", "png"):
        if found := ratio(f"http c64 {payload}", f"kserve c64 {payload}"):
            goal = f"{model}: http c64 {payload} ≥ {HTTP_GOAL}× kserve c64 {payload} (gRPC)"
            out.append((goal, found[0] >= HTTP_GOAL, found[1]))
    for over, under in (
        ("http-json c64 tensor", "http c64 tensor"),
        ("http-json c64 tensor", "kserve c64 tensor"),
        ("http-classify c64 png", "unary c64 png"),
        ("http-classify c64 png", "http c64 png"),
    ):
        if found := ratio(over, under):
            out.append((f"{model}: {over} / {under} (recorded)", None, found[1]))
    if model.startswith("digits"):
        for payload in ("tensor", "png"):
            http, grpc = s.get(f"http c1 {payload}"), s.get(f"kserve c1 {payload}")
            if http and grpc:
                over = http["p50_ms"] - grpc["p50_ms"]
                out.append(
                    (
                        f"{model}: http c1 {payload} p50 ≤ kserve c1 {payload} p50 + {HTTP_P50_MS} ms",
                        over <= HTTP_P50_MS,
                        f"{over:+.2f} ms ({http['p50_ms']:.2f} vs {grpc['p50_ms']:.2f} ms)",
                    )
                )
    return out


def machine() -> str:
    import onnxruntime

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return (
        f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"onnxruntime {onnxruntime.__version__}, {platform.system()} {platform.release()}"
    )


def fmt(value: float | None, spec: str = ".0f") -> str:
    return "–" if value is None else format(value, spec)


RESIZE_MODES = ("letterbox", "crop")
RESIZE_COST = 1.10  # letterbox and crop may cost at most 10 % more than stretch


def resize_targets(summaries: list[dict]) -> list[tuple[str, bool | None, str]]:
    """`<model>-letterbox` and `<model>-crop` against `<model>` (stretch), scenario by scenario: the
    server's CPU time per image (decoding is where the modes differ) and images/s."""
    by_name = {s["model"]: s for s in summaries}
    out: list[tuple[str, bool | None, str]] = []
    for name, summary in by_name.items():
        base, _, mode = name.rpartition("-")
        if mode not in RESIZE_MODES or base not in by_name:
            continue
        for scenario, r in summary["scenarios"].items():
            stretch = by_name[base]["scenarios"].get(scenario)
            if stretch is None or "png" not in scenario:
                continue
            cpu, cpu0 = r["cpu_ms_per_image"], stretch["cpu_ms_per_image"]
            held = None if not cpu or not cpu0 else cpu <= RESIZE_COST * cpu0
            speed = r["images_per_s"] / stretch["images_per_s"] if stretch["images_per_s"] else float("nan")
            out.append(
                (
                    f"{name}: {scenario} CPU/img ≤ {RESIZE_COST:.2f}× {base}'s (stretch)",
                    held,
                    f"{fmt(cpu, '.3f')} vs {fmt(cpu0, '.3f')} ms "
                    f"({fmt(cpu / cpu0 if cpu and cpu0 else None, '.2f')}×); images/s {speed:.2f}×",
                )
            )
    return out


def write_report(summaries: list[dict], command: str, path: Path) -> str:
    lines = [
        "# convserve benchmark",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine()}  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "",
        "Medians over rounds (range in brackets); the limit and the server alternate every round. "
        "Ratio: the server's images/s over in-process ONNX Runtime at the batch size nearest the one "
        "the server formed (best: over the best in-process figure). CPU: server process CPU time "
        "per image (both cores count).",
        "",
    ]
    for summary in summaries:
        lines += [
            f"## {summary['model']}",
            "",
            "| in process (a) | images/s | ms per call |",
            "|---|---|---|",
        ]
        for batch, limit in summary["limit"].items():
            lines.append(
                f"| batch {batch} | {limit['images_per_s']:.0f} [{limit['range'][0]:.0f}–"
                f"{limit['range'][1]:.0f}] | {limit['latency_ms']:.3f} |"
            )
        lines += [
            "",
            "| server scenario | images/s | p50 ms | p95 ms | p99 ms | mean batch | ratio (a) | "
            "ratio best (a) | CPU ms/img |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, r in summary["scenarios"].items():
            ratio = (
                "–" if r["ratio_to_limit"] is None else f"{r['ratio_to_limit']:.2f}× (b{r['limit_batch']})"
            )
            lines.append(
                f"| {name} | {r['images_per_s']:.0f} [{r['range'][0]:.0f}–{r['range'][1]:.0f}] | "
                f"{r['p50_ms']:.2f} | {r['p95_ms']:.2f} | {r['p99_ms']:.2f} | "
                f"{fmt(r['mean_batch'], '.1f')} | "
                f"{ratio} | {fmt(r['ratio_to_best_limit'], '.2f')} | {fmt(r['cpu_ms_per_image'], '.3f')} |"
                + (f" {r['errors']} errors" if r["errors"] else "")
            )
        lines += ["", "| target | held | figure |", "|---|---|---|"]
        for target, held, figure in targets(summary):
            lines.append(f"| {target} | {'–' if held is None else 'yes' if held else 'NO'} | {figure} |")
        lines.append("")
    if compared := resize_targets(summaries):
        lines += ["## resize modes against stretch", "", "| target | held | figure |", "|---|---|---|"]
        for target, held, figure in compared:
            lines.append(f"| {target} | {'–' if held is None else 'yes' if held else 'NO'} | {figure} |")
        lines.append("")
    text = "\n".join(lines)
    path.parent.mkdir(parents=True, exist_ok=True)
    old = path.read_text() if path.exists() else ""
    if KEPT in old:  # figures recorded by hand (perf_analyzer's) survive a new run
        text += "\n" + old[old.index(KEPT) :]
    path.write_text(text)
    return text


def run_bench(args: argparse.Namespace) -> int:
    if args.explain:
        from serving.tools.bench_explain import run_explain_bench

        return run_explain_bench(args)
    command = "python -m serving bench " + shlex.join(
        sys.argv[2:] if sys.argv[1:2] == ["bench"] else sys.argv[1:]
    )
    models = args.model or ["digits", "resnet18"]
    unknown = set(args.scenario or ()) - {s.name for s in scenarios()}
    if unknown:
        print(f"error: unknown scenario(s) {sorted(unknown)}", file=sys.stderr)
        return 2
    missing = [m for m in models if not (args.models / m).is_dir()]
    if missing:
        print(
            f"error: no model {missing} under {args.models}; build the reference models with "
            f"`python -m training reference digits|resnet18 --repository {args.models}` (make bench does)",
            file=sys.stderr,
        )
        return 2
    http_chosen = any(s.kind.startswith("http") for s in chosen_scenarios(args))
    if args.server and not args.http_server and http_chosen:
        print("error: the http scenarios need --http-server with --server (or --scenario)", file=sys.stderr)
        return 2
    if args.server and "off" in args.metrics.split(","):
        print("error: --metrics off needs servers the bench starts (not --server)", file=sys.stderr)
        return 2
    load = LoadGenerator()
    connection = connection_from_args(args) if args.server else PLAINTEXT
    servers: Servers = {}
    try:
        with tempfile.TemporaryDirectory() as workdir:
            servers = launch_servers(args, Path(workdir))
            benches = [ModelBench(args, model, servers, connection) for model in models]
            for round_index in range(args.rounds):
                for bench in benches:  # every model in every round
                    bench.run_round(load)
                print(f"round {round_index + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    finally:
        for server in servers.values():
            server.stop()
        load.close()
    summaries = [bench.summary() for bench in benches]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps({"command": command, "machine": machine(), "results": summaries}, indent=2)
    )
    print(write_report(summaries, command, args.out or Path("benchmarks/RESULTS.md")))
    return 0
