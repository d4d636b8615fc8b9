"""The limit: the model called in this process, the figure every server scenario is a ratio of."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

LIMIT_BATCH_SIZES = (1, 4, 16, 32)


class InProcessLimit:
    """The model called in this process through the data plane's public API: the server's session
    options, no batcher, no transport."""

    def __init__(self, path: Path, device: str) -> None:
        from serving.core.runtime import RuntimeOptions
        from serving.models.local import open_local

        self.local = open_local(path, RuntimeOptions(device=device))
        (self.model,) = self.local.registry.ready()
        rng = np.random.default_rng(0)
        shape = self.model.contract.image_shape
        self.inputs = {b: rng.random((b, *shape), dtype=np.float32) for b in LIMIT_BATCH_SIZES}

    def measure(self, batch: int, duration: float) -> tuple[float, float]:
        """(images/s, seconds per batch call) over `duration`."""
        x = self.inputs[batch]
        self.model.predict(x)
        calls, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < duration:
            self.model.predict(x)
            calls += 1
        return calls * batch / elapsed, elapsed / calls
