"""Before and after: two or more `python -m serving bench` runs side by side, as one Markdown table.

    python benchmarks/compare_runs.py NAME=RUN.json NAME=RUN.json [...] [--targets RUN.json] [--out FILE]

Each run is the JSON a bench run wrote (`--json`); its command and machine are quoted. For every model
and scenario: images/s and p50 of each run, and each later run's images/s over the first's. With
`--targets`, the target table of that run (re-derived from its figures by `serving.tools.bench`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serving.tools.bench.summary import fmt
from serving.tools.bench.targets import http_targets, targets


def load(spec: str) -> tuple[str, dict]:
    name, _, path = spec.partition("=")
    return name, json.loads(Path(path).read_text())


def by_model(run: dict) -> dict[str, dict]:
    return {summary["model"]: summary for summary in run["results"]}


def comparison(runs: list[tuple[str, dict]]) -> list[str]:
    first_name = runs[0][0]
    lines: list[str] = []
    models = list(by_model(runs[0][1]))
    for model in models:
        summaries = [(name, by_model(run).get(model)) for name, run in runs]
        lines += [f"## {model}", ""]
        head = "| scenario | " + " | ".join(f"{name} images/s · p50 ms" for name, _ in summaries)
        head += " | " + " | ".join(f"{name} / {first_name}" for name, _ in summaries[1:]) + " |"
        lines += [head, "|" + "---|" * (1 + 2 * len(summaries) - 1)]
        first = summaries[0][1]
        assert first is not None
        for scenario, base in first["scenarios"].items():
            cells, ratios = [], []
            for _, summary in summaries:
                found = summary["scenarios"].get(scenario) if summary else None
                if found is None:
                    cells.append("–")
                    ratios.append("–")
                    continue
                cells.append(f"{found['images_per_s']:.0f} · {fmt(found['p50_ms'], '.2f')}")
                ratios.append(f"{found['images_per_s'] / base['images_per_s']:.2f}×")
            lines.append(f"| {scenario} | " + " | ".join(cells) + " | " + " | ".join(ratios[1:]) + " |")
        lines.append("")
    return lines


def target_table(run: dict) -> list[str]:
    lines = ["| target | held | figure |", "|---|---|---|"]
    for summary in run["results"]:
        for target, held, figure in targets(summary):
            if target in {t for t, _, _ in http_targets(summary)}:
                continue
            mark = "–" if held is None else ("yes" if held else "NO")
            lines.append(f"| {target} | {mark} | {figure} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="NAME=RUN.json")
    parser.add_argument("--targets", metavar="NAME", help="the run whose targets to list")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    runs = [load(spec) for spec in args.runs]
    lines = [f"- **{name}**: `{run['command']}` ({run['machine']})" for name, run in runs]
    lines += ["", *comparison(runs)]
    if args.targets:
        lines += [f"### Targets, {args.targets}", "", *target_table(dict(runs)[args.targets]), ""]
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.write_text(text)
    else:
        print(text, end="")


if __name__ == "__main__":
    main()
