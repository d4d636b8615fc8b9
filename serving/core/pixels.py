"""The one way from an opened image file to a model's pixels, for training and serving alike.

colour mode → geometry (stretch, letterbox, fit_height or crop; see `contract.Fit`) → resampling
(Pillow's antialiased resize, or OpenCV's exactly) → channel order. The result is uint8 pixels and
where they sit in the model's input; the padding around them (letterbox, fit_height) is filled when
the pixels become the input row (`preprocess.pixels_to_input`), in the model's units, so a fill of
127.5 pixels is exact. Pure numpy + Pillow: training imports this module through the contract.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from serving.core.contract import ColorMode, Fit
from serving.core.resize import resize_image, resize_sampled

ROUND: dict[str, Callable[[float], int]] = {"round": round, "floor": math.floor, "ceil": math.ceil}
# `crop` scales the shorter side up to resize_to: a 1x5000 image would become 256x1,280,000 pixels.
MAX_CROP_ASPECT = 32


@dataclass(frozen=True)
class Placed:
    """uint8 pixels, (h, w) or (h, w, C) in the model's channel order, at (top, left) of the input."""

    pixels: np.ndarray
    top: int = 0
    left: int = 0


@dataclass(frozen=True)
class Plan:
    """The resized size, the crop taken from it (None: all of it) and where it goes in the input."""

    width: int
    height: int
    crop: tuple[int, int, int, int] | None  # left, top, right, bottom
    top: int = 0
    left: int = 0


def plan(src_width: int, src_height: int, fit: Fit) -> Plan:
    """The geometry for a source size: pure arithmetic, the same rounding the models' authors used."""
    rounding = ROUND[fit.rounding]
    if fit.resize == "stretch":
        return Plan(fit.width, fit.height, None)
    if fit.resize == "crop":
        assert fit.resize_to is not None
        short = min(src_width, src_height)
        if max(src_width, src_height) > MAX_CROP_ASPECT * short:
            raise ValueError(
                f"a {src_width}x{src_height} image is too elongated for a centre crop "
                f"(more than {MAX_CROP_ASPECT}:1)"
            )
        factor = fit.resize_to / short
        # The shorter side becomes resize_to exactly; the longer one is rounded as the recipe says.
        width = fit.resize_to if src_width == short else max(fit.resize_to, int(rounding(src_width * factor)))
        height = (
            fit.resize_to if src_height == short else max(fit.resize_to, int(rounding(src_height * factor)))
        )
        left, top = (width - fit.width) // 2, (height - fit.height) // 2
        return Plan(width, height, (left, top, left + fit.width, top + fit.height))
    if fit.resize == "fit_height":
        width = min(fit.width, max(1, int(rounding(fit.height * (src_width / src_height)))))
        return Plan(width, fit.height, None)
    factor = min(fit.width / src_width, fit.height / src_height)
    width = min(fit.width, max(1, int(rounding(src_width * factor))))
    height = min(fit.height, max(1, int(rounding(src_height * factor))))
    if fit.align == "top-left":
        return Plan(width, height, None)
    return Plan(width, height, None, (fit.height - height) // 2, (fit.width - width) // 2)


def fit_pixels(image: Image.Image, fit: Fit) -> Placed:
    """An opened image to the model's pixels. A JPEG at least twice the resized size in each direction
    is decoded at a reduced scale (libjpeg's DCT scaling) when the resize antialiases: that resize looks
    at every pixel, so a reduced decode changes little and saves most of the time. Without antialias
    (OpenCV's sampling) the full decode is kept: the taps must read the very pixels the authors' did.
    """
    geometry = plan(image.width, image.height, fit)
    wide, tall = image.width >= 2 * geometry.width, image.height >= 2 * geometry.height
    if fit.antialias and image.format == "JPEG" and wide and tall:
        image.draft(image.mode, (geometry.width, geometry.height))
    image = to_mode(image, fit.color_mode)
    if fit.antialias:
        if image.size != (geometry.width, geometry.height):
            image = resize_image(image, geometry.width, geometry.height, fit.resample)
        pixels = np.asarray(image, dtype=np.uint8)
    else:
        source = np.asarray(image, dtype=np.uint8)
        pixels = resize_sampled(source, geometry.width, geometry.height, fit.resample)
    if geometry.crop is not None:
        left, top, right, bottom = geometry.crop
        pixels = pixels[top:bottom, left:right]
    if fit.channel_order == "BGR":
        pixels = pixels[:, :, ::-1]
    return Placed(pixels, geometry.top, geometry.left)


def to_mode(image: Image.Image, color_mode: ColorMode) -> Image.Image:
    """Any Pillow image in the model's colour mode. Alpha is dropped (colour kept); 16- and 32-bit
    greyscale is scaled to 8 bits (when its values use more than 8 bits)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        # 16-bit data using more than 8 bits spans 0..65535; values that fit in 8 bits are kept as they are.
        top = 65535.0 if arr.max(initial=0) > 255 else 255.0
        image = Image.fromarray(np.clip(arr * (255.0 / top), 0, 255).round().astype(np.uint8), mode="L")
    elif image.mode == "P" or image.mode == "PA":
        image = image.convert("RGBA")
    if image.mode != color_mode:
        image = image.convert(color_mode)
    return image
