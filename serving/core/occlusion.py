"""Occlusion sensitivity for any model: how much a class's probability drops when a patch is covered.

The masked copies of an input row are ordinary model input, so they run through the model's own
dynamic batcher like any other rows (at a lower priority: `serving.core.explain`). The patch covers
every channel with the contract's fill, the very value letterbox padding gets, so "covered" means
what the model already sees as "nothing there".

The map is at the model's input resolution: each pixel holds the mean drop of the patches covering
it. Patch positions always include the last row and column, so every pixel is covered.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from serving.core.contract import ModelContract
from serving.core.errors import InvalidInput

PATCHES_PER_SIDE = 7  # the default patch is about 1/7 of the shorter side, the stride half of it


@dataclass(frozen=True)
class OcclusionGrid:
    """Where the patches go: top-left corners, `patch` pixels square."""

    patch: int
    stride: int
    tops: tuple[int, ...]
    lefts: tuple[int, ...]

    @property
    def copies(self) -> int:
        return len(self.tops) * len(self.lefts)


def _starts(side: int, patch: int, stride: int) -> tuple[int, ...]:
    starts = list(range(0, side - patch + 1, stride))
    if starts[-1] != side - patch:  # the last patch reaches the edge
        starts.append(side - patch)
    return tuple(starts)


def occlusion_grid(
    height: int, width: int, patch: int | None = None, stride: int | None = None
) -> OcclusionGrid:
    """The default patch is max(2, ceil(side / 7)) and the stride half the patch (13 x 13 = 169 copies
    at 28 x 28 or 224 x 224, 7 x 7 at 8 x 8); either may be given instead. The stride is at most the
    patch: a larger one would leave pixels no patch covers."""
    side = min(height, width)
    if patch is None:
        patch = max(2, math.ceil(side / PATCHES_PER_SIDE))
    if not 1 <= patch <= side:
        raise InvalidInput(f"occlusion patch must be 1 to {side} pixels for this model, got {patch}")
    if stride is None:
        stride = max(1, patch // 2)
    if not 1 <= stride <= patch:
        raise InvalidInput(
            f"occlusion stride must be 1 to {patch} pixels (the patch), got {stride}: a larger stride "
            "leaves pixels no patch covers"
        )
    return OcclusionGrid(patch, stride, _starts(height, patch, stride), _starts(width, patch, stride))


def occluded_copies(
    row: np.ndarray, contract: ModelContract, grid: OcclusionGrid, out: np.ndarray | None = None
) -> np.ndarray:
    """(copies, *row.shape): one copy of the input row per patch, the patch set to the contract's fill;
    written into `out` when given (a slice of all the request's copies: no second copy of them)."""
    if out is None:
        out = np.empty((grid.copies, *row.shape), dtype=row.dtype)
    out[...] = row
    fill = contract.fill_input.astype(row.dtype)  # shaped to broadcast over one row
    p = grid.patch
    for index, (top, left) in enumerate(itertools.product(grid.tops, grid.lefts)):
        if contract.layout == "NCHW":
            out[index, :, top : top + p, left : left + p] = fill
        else:
            out[index, top : top + p, left : left + p, :] = fill
    return out


def probability_drops(base: np.ndarray, masked: np.ndarray, target: int) -> np.ndarray:
    """(copies,): how much the target class's probability falls in each masked copy, base[target] -
    masked[:, target], computed as the rise of all the other classes' probabilities together. The same
    number, but still there when the target's probability rounds to 1.0 in float32 (a confident model
    after calibration): the others' small probabilities keep their precision."""
    others = np.ones(base.shape[-1], dtype=bool)
    others[target] = False
    return masked[:, others].sum(axis=1, dtype=np.float64) - base[others].sum(dtype=np.float64)


def occlusion_map(drops: np.ndarray, grid: OcclusionGrid, height: int, width: int) -> np.ndarray:
    """(height, width) float32: per pixel, the mean of the drops (`probability_drops`, in
    `occluded_copies` order) of the patches covering it. Positive: covering that place lowers the
    class's probability."""
    total = np.zeros((height, width), dtype=np.float64)
    cover = np.zeros((height, width), dtype=np.float64)
    p = grid.patch
    for drop, (top, left) in zip(drops, itertools.product(grid.tops, grid.lefts), strict=True):
        total[top : top + p, left : left + p] += drop
        cover[top : top + p, left : left + p] += 1
    return (total / cover).astype(np.float32)
