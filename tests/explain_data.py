"""A synthetic dataset for testing explanations: where the evidence is, is known for every image.

28 x 28 greyscale images: a cluttered background (uniform noise, soft round blobs and bright specks, the
same for every class) and ONE small hard-edged object whose shape alone decides the class. The object
moves from image to image and its bounding box is recorded, so a heat map can be checked against it
(the pointing game). The clutter is as bright as the object, so "the brightest place" is not the object.

Also: Spearman rank correlation with average ranks for ties (numpy only), and the pointing-game score.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SIDE = 28
CLASS_NAMES = ("square", "ring", "plus", "cross")  # filled square, hollow square, +, x
SIZES = (7, 9)  # the object's side, pixels (odd, so + and x have a centre line)
NOISE = 70  # background: uniform 0..NOISE
BLOBS = (2, 4)  # soft Gaussian blobs per image: at least, at most
SPECKS = (4, 9)  # single bright pixels per image: at least, at most
GAP = 2  # clutter keeps this many pixels clear of the object's box


@dataclass(frozen=True)
class Shapes:
    images: np.ndarray  # uint8 (N, 1, SIDE, SIDE)
    labels: np.ndarray  # int64 (N,)
    boxes: np.ndarray  # int64 (N, 4): top, left, bottom, right (inclusive) of the object

    def __len__(self) -> int:
        return len(self.labels)


def glyph(label: int, size: int) -> np.ndarray:
    """The class's shape as a boolean size x size mask."""
    i, j = np.mgrid[:size, :size]
    mid = size // 2
    if label == 0:  # filled square
        return np.ones((size, size), dtype=bool)
    if label == 1:  # hollow square, a one-pixel outline
        return (i == 0) | (j == 0) | (i == size - 1) | (j == size - 1)
    if label == 2:  # plus
        return (i == mid) | (j == mid)
    if label == 3:  # diagonal cross
        return (i == j) | (i + j == size - 1)
    raise ValueError(f"no class {label}")


def far_from_box(y: float, x: float, box: tuple[int, int, int, int], margin: float) -> bool:
    top, left, bottom, right = box
    dy = max(top - y, 0.0, y - bottom)
    dx = max(left - x, 0.0, x - right)
    return max(dy, dx) > margin


def make_image(label: int, rng: np.random.Generator) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    image = rng.uniform(0, NOISE, (SIDE, SIDE))
    size = int(rng.choice(SIZES))
    top, left = (int(v) for v in rng.integers(0, SIDE - size + 1, 2))
    box = (top, left, top + size - 1, left + size - 1)
    yy, xx = np.mgrid[:SIDE, :SIDE]
    for _ in range(rng.integers(BLOBS[0], BLOBS[1] + 1)):
        sigma = rng.uniform(1.0, 1.8)
        while True:  # the blob's bright core (2 sigma) stays GAP pixels clear of the box
            cy, cx = rng.uniform(0, SIDE - 1, 2)
            if far_from_box(cy, cx, box, GAP + 2 * sigma):
                break
        peak = rng.uniform(170, 255)
        image = np.maximum(image, peak * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2)))
    for _ in range(rng.integers(SPECKS[0], SPECKS[1] + 1)):
        while True:
            cy, cx = (int(v) for v in rng.integers(0, SIDE, 2))
            if far_from_box(cy, cx, box, GAP):
                break
        image[cy, cx] = rng.uniform(170, 255)
    mask = glyph(label, size)
    image[top : top + size, left : left + size][mask] = rng.uniform(170, 255)
    return np.clip(np.round(image), 0, 255).astype(np.uint8), box


def make_shapes(count_per_class: int, seed: int) -> Shapes:
    """`count_per_class` images of each class, shuffled; the same seed gives the same images."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(len(CLASS_NAMES)), count_per_class))
    images, boxes = [], []
    for label in labels:
        image, box = make_image(int(label), rng)
        images.append(image)
        boxes.append(box)
    return Shapes(np.stack(images)[:, None], labels.astype(np.int64), np.asarray(boxes, dtype=np.int64))


def pointing_hits(maps: np.ndarray, boxes: np.ndarray, pad: int = 0) -> np.ndarray:
    """Per map (N, H, W): whether its maximum lies inside the box grown by `pad` pixels on each side.
    A map whose maximum is tied over several pixels hits only if they all lie inside (a flat map has no
    point, and taking the first of a tie would favour the top-left)."""
    hits = []
    for heat, (top, left, bottom, right) in zip(maps, boxes, strict=True):
        ys, xs = np.nonzero(heat == heat.max())
        inside = (ys >= top - pad) & (ys <= bottom + pad) & (xs >= left - pad) & (xs <= right + pad)
        hits.append(bool(inside.all()))
    return np.asarray(hits)


def peak_offsets(maps: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Per map: how far its peak (the mean of tied maxima) lies from the box's centre, in pixels along the
    worse axis. Reported beside the pointing game, which cannot see a misalignment of 2-3 pixels."""
    offsets = []
    for heat, (top, left, bottom, right) in zip(maps, boxes, strict=True):
        ys, xs = np.nonzero(heat == heat.max())
        offsets.append(max(abs(ys.mean() - (top + bottom) / 2), abs(xs.mean() - (left + right) / 2)))
    return np.asarray(offsets)


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1 of a flat array, tied values sharing their mean rank."""
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_values)) + 1]
    ends = np.r_[starts[1:], len(values)]
    mean_rank = (starts + ends - 1) / 2.0
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two maps (flattened); 0 where either is constant (no ranking)."""
    ra, rb = average_ranks(np.ravel(a).astype(np.float64)), average_ranks(np.ravel(b).astype(np.float64))
    ra -= ra.mean()
    rb -= rb.mean()
    norm = np.sqrt((ra**2).sum() * (rb**2).sum())
    return float((ra * rb).sum() / norm) if norm > 0 else 0.0
