"""`convserve serve` without receipts: the baseline that says what receipts cost, in the same build.

    python benchmarks/receiptless_server.py [--trailer-only] --models MODELS --port 8500 [serve flags ...]

Receipts are always on in the server; this script takes them out for a measurement, nothing else.
Every edge's `begin` gets a bare stand-in that is never made the current receipt, so no request has
one: no trace id, no clock readings in the data plane or the batcher, no `server-timing` trailing
metadata (an empty tuple is set), no receipt in the convserve.v1 body, no Open Inference Protocol
`parameters`. What the server kept before receipts stays: the request ledger's duration (the stand-in
has the request's start and total). Unary gRPC only (the scenarios `receipts_cost.sh` measures).

With `--trailer-only`, receipts stay and only their gRPC trailing metadata entry is left out: what that
one entry costs inside gRPC, apart from the receipt's Python.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serving.cli import main
from serving.core.receipt import Receipt
from serving.protocols import gate


class NoReceipt(Receipt):
    """What the call gate reads of a receipt (its start, its total, `Receipt.seal` and `.total`), and
    no metadata; nothing else is set up."""

    __slots__ = ()

    def __init__(self) -> None:  # Receipt's own sets up every field; this, what the gate reads
        self.started = time.perf_counter()
        self.total_s = None

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return ()


def no_receipt(traceparent: str | None = None) -> NoReceipt:
    return NoReceipt()


def no_metadata(receipt: Receipt) -> tuple[tuple[str, str], ...]:
    return ()


if __name__ == "__main__":
    flags = sys.argv[1:]
    if flags[:1] == ["--trailer-only"]:
        flags = flags[1:]
        Receipt.metadata = no_metadata  # type: ignore[method-assign, assignment]
    else:
        gate.begin = no_receipt  # the gate's own name for it
        gate.traceparent_of = lambda: None  # receipts alone read it
    sys.exit(main(["serve", *flags]))
