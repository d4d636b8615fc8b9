"""The report: the machine, then per model its limit, its scenarios and its targets as Markdown tables."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

from serving.tools.bench.summary import fmt
from serving.tools.bench.targets import Target, resize_targets, targets

KEPT = "<!-- bench keeps what follows: figures recorded by hand -->"


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


def publish(lines: list[str], out: Path | None) -> None:
    """A bench script's report: printed, and written to `out` when one is given."""
    text = "\n".join(lines) + "\n"
    print(text)
    if out is not None:
        out.write_text(text)


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
        lines += model_section(summary)
    if compared := resize_targets(summaries):
        lines += ["## resize modes against stretch", "", *target_table(compared), ""]
    text = "\n".join(lines)
    path.parent.mkdir(parents=True, exist_ok=True)
    old = path.read_text() if path.exists() else ""
    if KEPT in old:  # figures recorded by hand (perf_analyzer's) survive a new run
        text += "\n" + old[old.index(KEPT) :]
    path.write_text(text)
    return text


def model_section(summary: dict) -> list[str]:
    """One model's tables: the in-process limit, the server scenarios, the targets."""
    lines = [
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
        ratio = "–" if r["ratio_to_limit"] is None else f"{r['ratio_to_limit']:.2f}× (b{r['limit_batch']})"
        lines.append(
            f"| {name} | {r['images_per_s']:.0f} [{r['range'][0]:.0f}–{r['range'][1]:.0f}] | "
            f"{r['p50_ms']:.2f} | {r['p95_ms']:.2f} | {r['p99_ms']:.2f} | "
            f"{fmt(r['mean_batch'], '.1f')} | "
            f"{ratio} | {fmt(r['ratio_to_best_limit'], '.2f')} | {fmt(r['cpu_ms_per_image'], '.3f')} |"
            + (f" {r['errors']} errors" if r["errors"] else "")
        )
    return [*lines, "", *target_table(targets(summary)), ""]


def target_table(rows: list[Target]) -> list[str]:
    lines = ["| target | held | figure |", "|---|---|---|"]
    for target, held, figure in rows:
        lines.append(f"| {target} | {'–' if held is None else 'yes' if held else 'NO'} | {figure} |")
    return lines
