"""`python -m serving bench`'s command-line flags."""

from __future__ import annotations

import argparse
from pathlib import Path

from serving.client.connection import add_connection_arguments
from serving.tools.bench.scenarios import scenarios


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
