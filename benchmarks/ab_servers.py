"""Two running servers, the same load, in alternating rounds: what one change costs, with the machine's
drift shared by both sides.

    python benchmarks/ab_servers.py A=127.0.0.1:18571@PID B=127.0.0.1:18572@PID [--model digits]
        [--scenario "unary c1 tensor" ...] [--rounds 10] [--duration 3] [--out FILE.md]

Each round runs every scenario once against A, then against B, then B, then A (so neither side is
always first): the load generator (`serving.tools.loadgen`, as the bench uses it) in its own process,
the servers idle while the other is measured. The table has each side's median images/s and p50, and
the median over rounds of the per-round ratio B/A — steadier than the ratio of medians on a machine
whose speed drifts between minutes. Start the servers with the same flags but the one under test.

With each server's process id (`@PID`), the table also has the CPU time the server spent per image
(user + system, from /proc, over the whole run): a cost figure that other processes on the machine
disturb much less than images/s, which they share the cores with.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serving.tools.bench.markdown import publish
from serving.tools.bench.processes import LoadGenerator
from serving.tools.bench.scenarios import scenarios
from serving.tools.launch import process_cpu_seconds


def cpu_of(pid: int | None) -> float:
    return process_cpu_seconds(pid) if pid is not None else 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sides", nargs=2, metavar="NAME=HOST:PORT")
    parser.add_argument("--model", default="digits")
    parser.add_argument("--scenario", action="append", default=None)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument(
        "--settle",
        type=float,
        default=0.0,
        help="seconds to wait after each run before reading the server's CPU time (work it left, such "
        "as spans still to be made, then counts for it and not during the other side's run)",
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    sides = []
    for side in args.sides:
        name, _, target = side.partition("=")
        address, _, pid = target.partition("@")
        sides.append((name, address, int(pid) if pid else None))
    wanted = args.scenario or ["unary c1 tensor", "unary c64 tensor"]
    chosen = [s for s in scenarios() if s.name in wanted]
    results: dict[tuple[str, str], list[dict]] = {(s.name, n): [] for s in chosen for n, _, _ in sides}
    load = LoadGenerator()
    try:
        for index in range(args.rounds):
            order = sides if index % 2 == 0 else sides[::-1]
            for scenario in chosen:
                for name, address, pid in order:
                    cpu = cpu_of(pid)
                    result = load.run(scenario.command(address, args.model, args.duration))
                    time.sleep(args.settle)
                    result["server_cpu_s"] = cpu_of(pid) - cpu
                    results[scenario.name, name].append(result)
            print(f"round {index + 1}/{args.rounds}", file=sys.stderr)
    finally:
        load.close()
    (a, _, pid_a), (b, _, pid_b) = sides
    with_cpu = pid_a is not None and pid_b is not None
    lines = [
        "Command: `python " + shlex.join(sys.argv) + "`",
        "",
        f"| scenario | {a} images/s | {b} images/s | {a} p50 ms | {b} p50 ms "
        f"| {b} / {a} images/s (median of rounds) |"
        + (f" {a} server CPU µs/image | {b} | {b} / {a} CPU (median of rounds) |" if with_cpu else ""),
        "|---|---|---|---|---|---|" + ("---|---|---|" if with_cpu else ""),
    ]
    for scenario in chosen:
        ra, rb = results[scenario.name, a], results[scenario.name, b]
        ratios = [y["images_per_s"] / x["images_per_s"] for x, y in zip(ra, rb, strict=True)]
        ips = [statistics.median(r["images_per_s"] for r in side) for side in (ra, rb)]
        p50 = [statistics.median(r["p50_ms"] for r in side) for side in (ra, rb)]
        lines.append(
            f"| {scenario.name} | {ips[0]:.0f} | {ips[1]:.0f} | {p50[0]:.2f} | {p50[1]:.2f} | "
            f"{statistics.median(ratios):.3f} [{min(ratios):.3f}–{max(ratios):.3f}] |"
            + (cpu_columns(ra, rb) if with_cpu else "")
        )
    publish(lines, args.out)
    return 0


def cpu_per_image_us(result: dict) -> float:
    """The server's CPU time over the run per image answered in its measuring window (the run's
    warm-up images are in the CPU time too, for both sides alike)."""
    return result["server_cpu_s"] / max(result["images"], 1) * 1e6


def cpu_columns(ra: list[dict], rb: list[dict]) -> str:
    cpu_a, cpu_b = [cpu_per_image_us(r) for r in ra], [cpu_per_image_us(r) for r in rb]
    ratios = [y / x for x, y in zip(cpu_a, cpu_b, strict=True) if x > 0]
    return (
        f" {statistics.median(cpu_a):.0f} | {statistics.median(cpu_b):.0f} | "
        f"{statistics.median(ratios):.3f} [{min(ratios):.3f}–{max(ratios):.3f}] |"
    )


if __name__ == "__main__":
    sys.exit(main())
