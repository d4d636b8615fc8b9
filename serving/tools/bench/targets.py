"""The issue's targets, each as (target, held, figures): what a summary's figures are measured against."""

from __future__ import annotations

from serving.tools.bench.scenarios import METRICS_OFF
from serving.tools.bench.summary import fmt

Target = tuple[str, bool | None, str]  # (target, held (None: recorded, no goal), figures)

METRICS_GOAL = 0.97  # metrics on over metrics off, images/s
ECHO_SHARE_GOAL = 0.85  # digits unary c64 images/s over the Echo RPC's calls/s on the same server
ECHO_OVER_MS = 0.15  # digits unary c1 p50 over the Echo RPC's p50: the request path's own cost
RESNET_LIMIT_GOAL = 0.95  # ResNet-18 unary c64 over in-process ONNX Runtime at batch 32
HTTP_GOAL = 0.9  # HTTP binary tensor data over the gRPC Open Inference Protocol, images/s at c64
HTTP_P50_MS = 0.5  # HTTP over gRPC, p50 at concurrency 1 (digits)
RESIZE_MODES = ("letterbox", "crop")
RESIZE_COST = 1.10  # letterbox and crop may cost at most 10 % more than stretch


def targets(summary: dict) -> list[Target]:
    """The issue's targets, as (target, held, figures)."""
    return [
        *resnet_targets(summary),
        *digits_targets(summary),
        *fixed_cost_targets(summary),
        *kserve_targets(summary),
        *http_targets(summary),
        *metrics_targets(summary),
        *latency_targets(summary),
    ]


def resnet_targets(summary: dict) -> list[Target]:
    """ResNet-18 unary and streamed PNGs against in-process ONNX Runtime."""
    s, model = summary["scenarios"], summary["model"]
    out: list[Target] = []
    if model.startswith("resnet18"):
        for name, goal in (("unary c64 png", 0.8), ("stream 32/msg png", 0.9)):
            if (r := s.get(name)) is not None:
                out.append(
                    (
                        f"{model}: {name} ≥ {goal}× limit",
                        r["ratio_to_limit"] >= goal,
                        f"{r['ratio_to_limit']:.2f}×",
                    )
                )
    return out


def digits_targets(summary: dict) -> list[Target]:
    """The digits CNN: streamed tensors against the limit, batching against batching off and against
    the Echo RPC's ceiling."""
    s, model = summary["scenarios"], summary["model"]
    out: list[Target] = []
    if not model.startswith("digits"):
        return out
    if (r := s.get("stream 32/msg tensor")) is not None:
        out.append(
            (
                f"{model}: stream tensors ≥ 0.3× limit",
                r["ratio_to_limit"] >= 0.3,
                f"{r['ratio_to_limit']:.2f}× ({r['images_per_s']:.0f} images/s)",
            )
        )
    for payload in ("png", "tensor"):
        unary, off = s.get(f"unary c64 {payload}"), s.get(f"no-batching unary c64 {payload}")
        ceiling = s.get("echo c64")
        if unary and off:
            ratio = unary["images_per_s"] / off["images_per_s"]
            out.append((f"{model}: unary c64 {payload} ≥ 3× batching off", ratio >= 3, f"{ratio:.2f}×"))
        if unary and ceiling:
            ratio = unary["images_per_s"] / ceiling["images_per_s"]
            goal = ECHO_SHARE_GOAL
            out.append(
                (f"{model}: unary c64 {payload} ≥ {goal}× echo ceiling", ratio >= goal, f"{ratio:.2f}×")
            )
    return out


def fixed_cost_targets(summary: dict) -> list[Target]:
    """The request path's fixed cost: a tiny model's call against the bare transport (digits), and a
    model that fills the cores against in-process ONNX Runtime (ResNet-18), for both gRPC protocols."""
    s, model = summary["scenarios"], summary["model"]
    out: list[Target] = []
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


def kserve_targets(summary: dict) -> list[Target]:
    """The Open Inference Protocol's ModelInfer against convserve.v1's Classify, on the same server."""
    s, model = summary["scenarios"], summary["model"]
    out: list[Target] = []
    for payload in ("png", "tensor"):
        v1, v2 = s.get(f"unary c64 {payload}"), s.get(f"kserve c64 {payload}")
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
    return out


def http_targets(summary: dict) -> list[Target]:
    """HTTP against gRPC on the same server: binary infer against ModelInfer (a target), JSON and curl's
    :classify against the binary path and gRPC (recorded, no target), p50 at c1 on digits (a target)."""
    s, model = summary["scenarios"], summary["model"]
    out: list[Target] = []

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


def metrics_targets(summary: dict) -> list[Target]:
    """Each scenario with the metrics endpoint on against the same with it off (`--metrics on,off`)."""
    s, model = summary["scenarios"], summary["model"]
    out: list[Target] = []
    for name, on in s.items():
        if (off := s.get(name + METRICS_OFF)) is not None:
            ratio = on["images_per_s"] / off["images_per_s"]
            out.append(
                (
                    f"{model}: {name} metrics on ≥ {METRICS_GOAL}× off",
                    ratio >= METRICS_GOAL,
                    f"{ratio:.3f}× ({on['images_per_s']:.0f} vs {off['images_per_s']:.0f} images/s)",
                )
            )
    return out


def latency_targets(summary: dict) -> list[Target]:
    """One image at concurrency 1 against an in-process call of batch 1."""
    s, model = summary["scenarios"], summary["model"]
    out: list[Target] = []
    for payload in ("png", "tensor"):
        if (r := s.get(f"unary c1 {payload}")) is not None:
            over = r["p50_ms"] - summary["limit"]["1"]["latency_ms"]
            out.append(
                (
                    f"{model}: c1 {payload} p50 ≤ in-process batch-1 + 1 ms",
                    over <= 1.0,
                    f"+{over:.2f} ms ({r['p50_ms']:.2f} vs {summary['limit']['1']['latency_ms']:.2f} ms)",
                )
            )
    return out


def resize_targets(summaries: list[dict]) -> list[Target]:
    """`<model>-letterbox` and `<model>-crop` against `<model>` (stretch), scenario by scenario: the
    server's CPU time per image (decoding is where the modes differ) and images/s."""
    by_name = {s["model"]: s for s in summaries}
    out: list[Target] = []
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
