"""In-process ONNX Runtime speed of an exported model (CPU), for `export --speed`: the model alone,
no server, so precisions can be compared with each other. Serving speed is `python -m serving bench`."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort


@dataclass(frozen=True)
class Timing:
    batch_size: int
    ms_per_batch: float  # median over rounds

    @property
    def images_per_s(self) -> float:
        return self.batch_size / (self.ms_per_batch / 1000)


def measure(
    path: Path, batch_sizes: tuple[int, ...] = (1, 32), seconds: float = 1.0, rounds: int = 5
) -> list[Timing]:
    """Median time of one batch over `rounds` rounds of about `seconds` each, per batch size."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    spec = session.get_inputs()[0]
    dtype = np.float16 if spec.type == "tensor(float16)" else np.float32
    shape = [d if isinstance(d, int) else 1 for d in spec.shape[1:]]
    timings = []
    for size in batch_sizes:
        x = np.random.default_rng(0).random((size, *shape)).astype(dtype)
        for _ in range(10):  # warm-up: allocations, thread pool
            session.run(None, {spec.name: x})
        per_round = []
        for _ in range(rounds):
            count, started = 0, time.perf_counter()
            while (elapsed := time.perf_counter() - started) < seconds / rounds:
                session.run(None, {spec.name: x})
                count += 1
            per_round.append(elapsed * 1000 / count)
        timings.append(Timing(size, statistics.median(per_round)))
    return timings
