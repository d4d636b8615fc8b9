"""Occlusion sensitivity for any model: how much a class's probability drops when a patch is covered.

The masked copies of an input row are ordinary model input, so they run through the model's own
dynamic batcher like any other rows (at a lower priority: `serving.core.explain`). The patch covers
every channel with the contract's fill, the very value letterbox padding gets, so "covered" means
what the model already sees as "nothing there".

The map is at the model's input resolution: each pixel holds the mean drop of the patches covering
it. Patch positions always include the last row and column, so every pixel is covered.
"""

from __future__ import annotations

import functools
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
    at 28 x 28 or 224 x 224, 7 x 7 at 8 x 8); either may be given instead."""
    side = min(height, width)
    if patch is None:
        patch = max(2, math.ceil(side / PATCHES_PER_SIDE))
    if stride is None:
        stride = max(1, patch // 2)
    if not 1 <= patch <= side:
        raise InvalidInput(f"occlusion patch must be 1 to {side} pixels for this model, got {patch}")
    if not 1 <= stride <= side:
        raise InvalidInput(f"occlusion stride must be 1 to {side} pixels for this model, got {stride}")
    patch = min(patch, side)
    return OcclusionGrid(patch, stride, _starts(height, patch, stride), _starts(width, patch, stride))


@functools.lru_cache(maxsize=16)
def patch_masks(grid: OcclusionGrid, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(copies, height, width) bool, True where each copy's patch lies, and how many patches cover
    each pixel (height, width): built once per grid and input size, so each request is two numpy calls."""
    masks = np.zeros((grid.copies, height, width), dtype=bool)
    p = grid.patch
    for index, (top, left) in enumerate(itertools.product(grid.tops, grid.lefts)):
        masks[index, top : top + p, left : left + p] = True
    masks.setflags(write=False)
    return masks, masks.sum(axis=0, dtype=np.float64)


def occluded_copies(row: np.ndarray, contract: ModelContract, grid: OcclusionGrid) -> np.ndarray:
    """(copies, *row.shape): one copy of the input row per patch, the patch set to the contract's fill."""
    masks, _ = patch_masks(grid, contract.height, contract.width)
    fill = contract.fill_input.astype(row.dtype)  # shaped to broadcast over one row
    spatial = masks[:, None] if contract.layout == "NCHW" else masks[:, :, :, None]
    return np.where(spatial, fill, row[None])


def occlusion_map(
    base: float, masked: np.ndarray, grid: OcclusionGrid, height: int, width: int
) -> np.ndarray:
    """(height, width) float32: per pixel, the mean of `base - masked[i]` over the patches covering it.

    `base` is the class's probability for the whole image, `masked` its probability for each copy
    (in `occluded_copies` order). Positive: covering that place lowers the class's probability.
    """
    masks, cover = patch_masks(grid, height, width)
    drops = base - np.asarray(masked, dtype=np.float64)
    total = np.tensordot(drops, masks, axes=1)  # the drops of the patches over each pixel, summed
    return (total / cover).astype(np.float32)
