"""Resampling an image to a size, the two ways published models were trained with.

* Antialiased (Pillow's `Image.resize`, also what torchvision does on PIL images): the filter widens
  with the reduction, so every source pixel counts.
* Not antialiased (OpenCV's `cv2.resize`, what most models trained on OpenCV pipelines saw): the
  filter keeps its width, taps sit at fixed offsets around each destination pixel's source position.
  `resize_sampled` reproduces OpenCV's 8-bit fixed-point arithmetic (11-bit coefficients, the same
  rounding), so it gives OpenCV's exact pixels without importing OpenCV. Tests check it against
  `cv2.resize` bit for bit.

Pure numpy + Pillow: training imports this module too.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from PIL import Image

Resample = Literal["nearest", "bilinear", "bicubic", "lanczos"]
RESAMPLES: tuple[str, ...] = ("nearest", "bilinear", "bicubic", "lanczos")

PILLOW_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}

COEF_BITS = 11  # OpenCV's INTER_RESIZE_COEF_BITS
COEF_ONE = 1 << COEF_BITS
# Filters reproduced exactly without antialiasing. OpenCV's 8-bit bicubic mixes float and fixed-point
# passes by SIMD width, so it is not offered: a contract asking for it is refused.
TAPS = {"bilinear": 2, "lanczos": 8}
SAMPLED: tuple[str, ...] = ("nearest", "bilinear", "lanczos")


def resize_image(image: Image.Image, width: int, height: int, resample: Resample) -> Image.Image:
    """Pillow's antialiased resize."""
    return image.resize((width, height), PILLOW_FILTERS[resample])


def resize_sampled(pixels: np.ndarray, width: int, height: int, resample: Resample) -> np.ndarray:
    """OpenCV's `cv2.resize` of uint8 pixels, (H, W) or (H, W, C), exactly."""
    src_h, src_w = pixels.shape[:2]
    if (src_w, src_h) == (width, height):
        return pixels
    squeeze = pixels.ndim == 2
    if squeeze:
        pixels = pixels[:, :, None]
    scale_x = 1.0 / (width / src_w)  # as OpenCV computes it: the inverse of the inverse scale
    scale_y = 1.0 / (height / src_h)
    if resample == "nearest":
        xs = np.minimum(np.floor(np.arange(width) * scale_x).astype(np.intp), src_w - 1)
        ys = np.minimum(np.floor(np.arange(height) * scale_y).astype(np.intp), src_h - 1)
        out = pixels[ys[:, None], xs[None, :]]
    elif resample == "bilinear" and scale_x == 2.0 and scale_y == 2.0:
        # OpenCV swaps in its area resize for an exact halving: the mean of each 2x2 block, rounded.
        block = pixels[: height * 2, : width * 2].astype(np.uint16)
        total = block[0::2, 0::2] + block[0::2, 1::2] + block[1::2, 0::2] + block[1::2, 1::2]
        out = ((total + 2) >> 2).astype(np.uint8)
    else:
        x_index, x_coef = _taps(src_w, width, scale_x, resample, clamp_edges=True)
        y_index, y_coef = _taps(src_h, height, scale_y, resample, clamp_edges=False)
        channels = pixels.shape[2]
        # The horizontal pass first (OpenCV's vertical pass rounds the horizontal sums), on only the
        # source rows some output row reads, transposed so each tap gathers whole rows of memory.
        needed, y_index = np.unique(y_index, return_inverse=True)
        y_index = y_index.reshape(height, -1)
        columns = np.ascontiguousarray(pixels[needed].transpose(1, 0, 2)).reshape(src_w, -1)
        rows = _weighted(columns, x_index, x_coef, np.float32)  # (width, needed * C), whole numbers
        rows = np.ascontiguousarray(rows.reshape(width, len(needed), channels).transpose(1, 0, 2))
        rows = rows.reshape(len(needed), -1)
        if resample == "bilinear":
            # OpenCV's 8-bit linear vertical pass drops 4 bits first, then 16, then rounds the last 2.
            shifted = rows.astype(np.int64) >> 4
            top = (y_coef[:, 0, None] * shifted[y_index[:, 0]]) >> 16
            bottom = (y_coef[:, 1, None] * shifted[y_index[:, 1]]) >> 16
            total = (top + bottom + 2) >> 2
        else:
            # (sum + 2^21) >> 22 in float64: whole numbers below 2^53, and a power of two divides exactly.
            total = _weighted(rows, y_index, y_coef, np.float64)
            total = np.floor((total + (1 << (2 * COEF_BITS - 1))) * (1.0 / (1 << (2 * COEF_BITS))))
        out = np.clip(total, 0, 255).astype(np.uint8).reshape(height, width, channels)
    return out[:, :, 0] if squeeze else out


def _weighted(source: np.ndarray, index: np.ndarray, coef: np.ndarray, dtype: type) -> np.ndarray:
    """sum_k coef[i, k] * source[index[i, k]] for every output i, exactly (whole numbers in `dtype`).

    One batched matrix product over the gathered rows. It is exact: every product and partial sum is
    an integer well inside the float's mantissa (horizontal sums < 2^24 in float32: 255 x 2048 x the
    filter's absolute sum; vertical ones < 2^53 in float64).
    """
    gathered = source[index].astype(dtype, copy=False)  # (out, taps, n)
    return np.matmul(coef.astype(dtype)[:, None, :], gathered)[:, 0, :]


def _taps(
    src: int, dst: int, scale: float, resample: Resample, clamp_edges: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Source indices (clamped: the edge pixel repeats) and fixed-point weights, (dst, taps) each.

    OpenCV's linear filter moves a horizontal position beyond the edge onto the edge pixel with weight
    one, but keeps a vertical one's weights (both taps then read the edge row): `clamp_edges` says which.
    """
    taps = TAPS[resample]
    centre = np.float32((np.arange(dst, dtype=np.float64) + 0.5) * scale - 0.5)
    first = np.floor(centre).astype(np.int64)
    frac = (centre - first.astype(np.float32)).astype(np.float32)
    if resample == "bilinear":
        low = first < 0
        high = first >= src - 1
        if clamp_edges:
            frac[low | high] = 0
            first = np.where(low, 0, np.where(high, src - 1, first))
        weights = np.stack([np.float32(1) - frac, frac], axis=1)
    else:
        weights = _lanczos4(frac)
    offsets = np.arange(taps) - (taps // 2 - 1)
    index = np.clip(first[:, None] + offsets[None, :], 0, src - 1)
    coef = np.rint(weights.astype(np.float32) * np.float32(COEF_ONE)).astype(np.int64)
    return index.astype(np.intp), coef


def _lanczos4(x: np.ndarray) -> np.ndarray:
    """OpenCV's interpolateLanczos4: the 8-tap Lanczos window, normalised to sum 1 in float32."""
    s45 = 0.70710678118654752440084436210485
    cs = np.array([[1, 0], [-s45, -s45], [0, 1], [s45, -s45], [-1, 0], [s45, s45], [0, -1], [-s45, s45]])
    x = x.astype(np.float32)
    y0 = -(x.astype(np.float64) + 3) * math.pi * 0.25
    s0, c0 = np.sin(y0), np.cos(y0)
    coeffs = np.empty((len(x), 8), dtype=np.float32)
    for i in range(8):
        y_ = (x + np.float32(3 - i)).astype(np.float32)
        y = -y_.astype(np.float64) * math.pi * 0.25
        with np.errstate(divide="ignore", invalid="ignore"):
            value = ((cs[i, 0] * s0 + cs[i, 1] * c0) / (y * y)).astype(np.float32)
        coeffs[:, i] = np.where(np.abs(y_) >= np.float32(1e-6), value, np.float32(1e30))
    total = np.zeros(len(x), dtype=np.float32)
    for i in range(8):  # summed in order, in float32, as OpenCV does
        total = (total + coeffs[:, i]).astype(np.float32)
    return (coeffs * (np.float32(1) / total)[:, None]).astype(np.float32)
