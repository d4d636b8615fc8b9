"""`python -m serving score`'s command-line flags."""

from __future__ import annotations

import argparse
from pathlib import Path

from serving.client import DEFAULT_SERVER, add_connection_arguments


def add_score_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="a folder (recursive), a glob, a text file of paths, or - for stdin")
    parser.add_argument("--out", type=Path, required=True, help="results file; appended to on restart")
    parser.add_argument(
        "--format", choices=["jsonl", "csv"], default=None, help="default: from --out's suffix"
    )
    parser.add_argument(
        "--server",
        action="append",
        help=f"HOST:PORT or dns:///NAME:PORT; repeatable (default {DEFAULT_SERVER})",
    )
    parser.add_argument(
        "--local", type=Path, default=None, help="score in process with this model (no server)"
    )
    parser.add_argument("--model", default="", help="model name (default: the server's only model)")
    parser.add_argument("--version", type=int, default=0)
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16, help="images per message")
    parser.add_argument(
        "--max-message-mb",
        type=int,
        default=64,
        help="the server's --max-message-mb: messages are packed under it, a larger file gets an error "
        "line; a server that refuses a message as too large is followed to its own limit (default 64)",
    )
    parser.add_argument("--inflight", type=int, default=256, help="images sent and not yet answered, at most")
    parser.add_argument("--streams", type=int, default=2, help="ClassifyStream calls per server")
    parser.add_argument("--fail-on-error", action="store_true", help="exit 1 when any image failed")
    parser.add_argument(
        "--shard",
        default=None,
        help="INDEX/COUNT: score only this shard of the input (serving/tools/shard.py)",
    )
    add_connection_arguments(parser)
