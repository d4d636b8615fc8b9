"""The results file: one line per image, flushed as it is written, and on a rerun the paths it holds
already (resume)."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path


def output_format(out: Path, chosen: str | None) -> str:
    return chosen or ("csv" if out.suffix.lower() == ".csv" else "jsonl")


def completed_paths(out: Path, fmt: str) -> set[str]:
    """Paths already scored in `out`; a last line cut off by a kill is dropped from the file."""
    if not out.exists():
        return set()
    data = out.read_bytes()
    keep = data[: data.rfind(b"\n") + 1]  # everything up to the last complete line
    if len(keep) != len(data):
        out.write_bytes(keep)
    text = keep.decode("utf-8", "surrogateescape")
    if fmt == "csv":
        return {row["path"] for row in csv.DictReader(io.StringIO(text))}
    return {json.loads(line)["path"] for line in text.splitlines() if line.strip()}


@dataclass
class ImageOutcome:
    path: str
    labels: list[str] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)
    probabilities: list[float] = field(default_factory=list)
    error: str | None = None


class ResultWriter:
    """Appends one line per image and flushes it, so a killed job keeps every finished line."""

    def __init__(self, out: Path, fmt: str, top_k: int) -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        new = not out.exists() or out.stat().st_size == 0
        self.file = out.open("a", newline="", encoding="utf-8", errors="surrogateescape")
        self.fmt = fmt
        self.top_k = top_k
        if fmt == "csv":
            self.csv = csv.writer(self.file)
            if new:
                ranks = [
                    f"{name}_{r}" for r in range(1, top_k + 1) for name in ("index", "label", "probability")
                ]
                self.csv.writerow(["path", "error", *ranks])

    def write(self, outcome: ImageOutcome) -> None:
        if self.fmt == "csv":
            cells = [
                v
                for i, lbl, p in zip(outcome.indices, outcome.labels, outcome.probabilities, strict=True)
                for v in (i, lbl, f"{p:.6g}")
            ]
            self.csv.writerow([outcome.path, outcome.error or "", *cells])
        else:
            top = [
                {"index": i, "label": lbl, "probability": p}
                for i, lbl, p in zip(outcome.indices, outcome.labels, outcome.probabilities, strict=True)
            ]
            self.file.write(json.dumps({"path": outcome.path, "top_k": top, "error": outcome.error}) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()
