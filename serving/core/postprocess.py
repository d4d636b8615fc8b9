"""Softmax and top-k, vectorised over a whole batch (never a Python loop over images)."""

from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, stable for large logits."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    np.exp(shifted, out=shifted)
    shifted /= shifted.sum(axis=1, keepdims=True)
    return shifted


def top_k(probabilities: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and values of the k largest entries of each row, largest first; k is capped at the row length.

    Ties keep the lower class index first, so results are deterministic.
    """
    classes = probabilities.shape[1]
    k = min(k, classes)
    if k < classes and classes > 64:
        # Partition first: O(C) per row instead of a full sort when there are many classes.
        candidates = np.argpartition(-probabilities, k - 1, axis=1)[:, :k]
        rows = np.arange(len(probabilities))[:, None]
        order = np.lexsort((candidates, -probabilities[rows, candidates]), axis=1)
        indices = candidates[rows, order]
    else:
        indices = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    # Plain fancy indexing: take_along_axis costs more than the sort itself on a handful of rows.
    return indices, probabilities[np.arange(len(probabilities))[:, None], indices]


def abstain(
    probabilities: np.ndarray, threshold: float | None, scores: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Each row's abstain score (the model's score output where it has one, else its max softmax
    probability) and whether it is below `threshold` (the contract's abstain_threshold; None: never
    abstain). Compared in float32, as export set it."""
    if scores is None:
        scores = probabilities.max(axis=1)
    scores = scores.astype(np.float32, copy=False)
    if threshold is None:
        return scores, np.zeros(len(scores), dtype=bool)
    return scores, scores < np.float32(threshold)
