"""What share of a running server's event loop a set of functions takes, sampled under load.

    python benchmarks/sampled_share.py HOST:PORT@PID [--scenario "unary c64 tensor"] [--model digits]
        [--duration 10] [--rate 100] [--function NAME ...] [--out FILE.md]

Timing a function alone (benchmarks/receipt_path_cost.py) runs it hot, in a tight loop; in the
server it runs once per request among everything else, with cold caches, and costs several times
as much. This samples the server itself: py-spy (`pip install py-spy`; it reads the process's
memory, so it needs ptrace rights over it) records the server's threads while the load generator
runs the scenario, and the share is the main thread's samples whose stack holds any of the named
functions (by default, the receipt's: begun, read, formatted, written, ended) over all its samples
while it was busy (py-spy leaves out a thread's idle samples: the loop waiting for work).
The main thread runs the event loop, the server's bottleneck on a small model, so its share is what
those functions cost the images/s there. py-spy pauses the server for each sample (unpaused, it reads
torn stacks that mix frames of different calls), so the run's images/s are lower than the bench's:
the share is the figure. Now and then the sampled server slows to a crawl (a tenth of its speed or
less; seen at the end of a long `receipts_cost.sh` run, and at concurrency 64 sampled 250 times a
second) and its share drops with it: read the share only from a run whose images/s stayed near the
bench's.
"""

from __future__ import annotations

import argparse
import collections
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serving.tools.bench.markdown import publish
from serving.tools.bench.processes import LoadGenerator
from serving.tools.bench.scenarios import scenarios

RECEIPT_PATH = (
    "traceparent_of",
    "begin",
    "Receipt.__init__",
    "current",
    "Receipt.decoded",
    "Receipt.handed_over",
    "batch_ran",
    "Receipt.answered_by",
    "write_receipt",
    "Receipt.metadata",
    "Receipt.server_timing",
    "Receipt.seal",
    "Receipt.total",
    "ended",
)


def shares(raw: Path, functions: set[str]) -> tuple[int, int, collections.Counter[str]]:
    """(main thread's samples, those in any of `functions`, those by the outermost such function)."""
    total, inside, outermost = 0, 0, collections.Counter[str]()
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if "MainThread" not in frames[0]:
            continue
        samples = int(count)
        total += samples
        # py-spy's raw frames read "name (file:line)"
        hit = next((name for name in (f.split(" (")[0] for f in frames[1:]) if name in functions), None)
        if hit is not None:
            inside += samples
            outermost[hit] += samples
    return total, inside, outermost


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("server", metavar="HOST:PORT@PID")
    parser.add_argument("--scenario", default="unary c64 tensor")
    parser.add_argument("--model", default="digits")
    parser.add_argument("--duration", type=float, default=10.0)
    # 250 a second made the server crawl at concurrency 64 in every run of one day (67-498 images/s
    # against ~1,200); 100 a second kept its speed in all six runs of the same hour.
    parser.add_argument("--rate", type=int, default=100, help="samples a second")
    parser.add_argument("--function", action="append", default=None, help="default: the receipt's")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    address, _, pid = args.server.partition("@")
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    (scenario,) = [s for s in scenarios() if s.name == args.scenario]
    functions = set(args.function or RECEIPT_PATH)
    load = LoadGenerator()
    record: subprocess.Popen[str] | None = None
    with tempfile.TemporaryDirectory() as work:
        raw = Path(work) / "samples.txt"
        try:
            load.run(scenario.command(address, args.model, 1.0))  # connections made, caches warm
            seconds = str(round(args.duration) + 2)  # the whole measured run; py-spy takes whole seconds
            command = [spy, "record", "--pid", pid, "--rate", str(args.rate), "--duration", seconds]
            command += ["--format", "raw", "--output", str(raw), "--threads"]
            record = subprocess.Popen(
                command,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            result = load.run(scenario.command(address, args.model, args.duration))
            _, error = record.communicate(timeout=args.duration + 60)
        finally:
            load.close()
            if record is not None and record.poll() is None:  # the load failed: stop sampling too
                record.kill()
                record.wait()
        if record.returncode != 0 or not raw.exists():
            print(f"py-spy failed: {error.strip()}", file=sys.stderr)
            return 1
        total, inside, outermost = shares(raw, functions)
    lines = [
        "Command: `python " + shlex.join(sys.argv) + "`",
        "",
        f"{scenario.name}, {result['images_per_s']:.0f} images/s while sampled: the main thread (event loop)"
        f" had {total} busy samples, {inside} of them ({inside / max(total, 1):.1%}) in these functions.",
        "",
        "| outermost of them on the stack | samples | share of the main thread |",
        "|---|---:|---:|",
        *(f"| `{name}` | {n} | {n / max(total, 1):.1%} |" for name, n in outermost.most_common()),
    ]
    publish(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
