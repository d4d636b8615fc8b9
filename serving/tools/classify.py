"""`python -m serving classify IMAGE...`: top-k of each image, as a table or JSON."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from serving.client import ClassifierClient, Connection, ImageResult


def format_table(paths: Sequence[str], results: Sequence[ImageResult]) -> str:
    lines = []
    for path, result in zip(paths, results, strict=True):
        lines.append(path)
        if not result.ok:
            lines.append(f"  error: {result.error}")
            continue
        lines.append(f"  {'rank':>4}  {'class':>5}  {'label':<20} {'probability':>11}")
        for rank, p in enumerate(result.predictions, 1):
            lines.append(f"  {rank:>4}  {p.index:>5}  {p.label:<20} {p.probability:>11.4f}")
    return "\n".join(lines)


def as_json(paths: Sequence[str], results: Sequence[ImageResult]) -> str:
    return json.dumps(
        [
            {
                "path": path,
                "error": r.error,
                "top_k": [
                    {"index": p.index, "label": p.label, "probability": p.probability} for p in r.predictions
                ],
            }
            for path, r in zip(paths, results, strict=True)
        ],
        indent=2,
    )


def classify_files(
    paths: Sequence[str],
    server: str,
    model: str,
    version: int,
    top_k: int,
    emit_json: bool,
    timeout: float,
    connection: Connection | None = None,
) -> tuple[str, list[ImageResult]]:
    with ClassifierClient(server, timeout=timeout, connection=connection) as client:
        results = client.classify([Path(p) for p in paths], model=model, version=version, top_k=top_k)
    return (as_json if emit_json else format_table)(paths, results), results
