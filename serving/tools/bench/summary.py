"""A model's figures over the rounds: medians with their range, and ratios to the in-process limit."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Measured:
    images_per_s: list[float] = field(default_factory=list)
    p50: list[float] = field(default_factory=list)
    p95: list[float] = field(default_factory=list)
    p99: list[float] = field(default_factory=list)
    batch: list[float] = field(default_factory=list)
    cpu_ms_per_image: list[float] = field(default_factory=list)
    errors: int = 0


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def fmt(value: float | None, spec: str = ".0f") -> str:
    return "–" if value is None else format(value, spec)


def nearest_limit(limits: dict[int, float], batch: float) -> tuple[int, float]:
    size = min(limits, key=lambda b: abs(np.log(b) - np.log(max(batch, 1.0))))
    return size, limits[size]


def summarise(model: str, limits: dict[int, list[tuple[float, float]]], results: dict[str, Measured]) -> dict:
    limit_rate = {b: median([r for r, _ in v]) for b, v in limits.items()}
    summary: dict[str, Any] = {
        "model": model,
        "limit": {
            str(b): {
                "images_per_s": limit_rate[b],
                "range": [min(r for r, _ in v), max(r for r, _ in v)],
                "latency_ms": 1000 * median([t for _, t in v]),
            }
            for b, v in limits.items()
        },
        "scenarios": {},
    }
    for name, m in results.items():
        batch = median(m.batch) if m.batch else 1.0
        size, reference = nearest_limit(limit_rate, batch)
        rate = median(m.images_per_s)
        summary["scenarios"][name] = {
            "images_per_s": rate,
            "range": [min(m.images_per_s), max(m.images_per_s)],
            "p50_ms": median(m.p50),
            "p95_ms": median(m.p95),
            "p99_ms": median(m.p99),
            "mean_batch": batch if m.batch else None,
            "limit_batch": size,
            "ratio_to_limit": rate / reference if not name.startswith("echo") else None,
            "ratio_to_best_limit": rate / max(limit_rate.values()) if not name.startswith("echo") else None,
            "cpu_ms_per_image": median(m.cpu_ms_per_image) if m.cpu_ms_per_image else None,
            "errors": m.errors,
        }
    return summary
