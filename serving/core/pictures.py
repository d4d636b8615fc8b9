"""Grids of small pictures (filters, activation maps, misclassified images) drawn pixel-exactly, and
heat maps laid over an image.

Shared by the run report (training) and the server's explanations, so a served image's activation
maps are drawn exactly as the report draws a test image's. Pillow and numpy only.

Every tile is a 2-D array of values in [0, 1] (or H x W x 3 for colour), enlarged by an integer
factor with nearest-neighbour repetition and written as round(value * 255): what the PNG holds is
exactly the scaled data, nothing smoothed or re-coloured, so a test can read the numbers back.

Layout: a caption strip of CAPTION_HEIGHT pixels on top, then tiles left to right, top to bottom,
MARGIN pixels from the edges and GAP pixels apart, on white; optional text lines under each tile
(LINE_HEIGHT each; such cells are at least LABEL_CELL_WIDTH wide).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

CAPTION_HEIGHT = 22
MARGIN = 4
GAP = 3
LINE_HEIGHT = 15
LABEL_CELL_WIDTH = 120  # tiles with text lines under them are at least this wide
TILE_TARGET_PX = 40  # tiles are enlarged to at least this many pixels a side
BACKGROUND = 255


def scale_filters(weights: np.ndarray) -> np.ndarray:
    """Each filter on its own to [0, 1]: (w - min) / (max - min) over all its input channels, so the
    most negative weight is black and the most positive white, and an RGB filter keeps its colour
    balance. A constant filter becomes mid-grey."""
    flat = weights.reshape(len(weights), -1).astype(np.float64)
    low, high = flat.min(axis=1, keepdims=True), flat.max(axis=1, keepdims=True)
    span = high - low
    scaled = np.where(span > 0, (flat - low) / np.where(span > 0, span, 1.0), 0.5)
    return scaled.reshape(weights.shape)


def scale_maps(maps: np.ndarray) -> np.ndarray:
    """Each activation map (after ReLU, so >= 0) divided by its own maximum: the strongest response of
    that channel is white, none is black; a channel that never fired stays black."""
    flat = maps.reshape(len(maps), -1).astype(np.float64)
    top = flat.max(axis=1, keepdims=True)
    return (flat / np.where(top > 0, top, 1.0)).reshape(maps.shape)


def zoom_for(height: int, width: int) -> int:
    return max(1, math.ceil(TILE_TARGET_PX / min(height, width)))


def columns_for(count: int) -> int:
    """8 columns for up to 32 tiles, wider rows for more (16 for 128)."""
    return max(1, min(count, max(8, math.ceil(math.sqrt(2 * count)))))


DEJAVU_PATHS = ("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",)


@functools.cache
def font(size: int = 13) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """DejaVu Sans (Pillow's own default font has no × or →): matplotlib's copy where training has it
    installed, the system's in a serving image, else Pillow's default."""
    paths = list(DEJAVU_PATHS)
    try:
        from matplotlib import font_manager

        paths.insert(0, font_manager.findfont("DejaVu Sans"))
    except ImportError:  # serving installs no matplotlib
        pass
    for path in paths:
        try:
            return ImageFont.truetype(path, size)
        except OSError:
            continue
    try:
        return ImageFont.load_default(size)
    except TypeError:  # Pillow before 10.1 has one size
        return ImageFont.load_default()


def to_pixels(tile: np.ndarray, zoom: int) -> np.ndarray:
    """[0, 1] values -> uint8 RGB, each value a zoom x zoom block."""
    pixels = np.rint(np.clip(tile, 0.0, 1.0) * 255).astype(np.uint8)
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[:, :, None], 3, axis=2)
    return pixels.repeat(zoom, axis=0).repeat(zoom, axis=1)


def grid_image(
    tiles: Sequence[np.ndarray] | np.ndarray,
    caption: str,
    *,
    zoom: int | None = None,
    columns: int | None = None,
    labels: Sequence[Sequence[str]] | None = None,
) -> Image.Image:
    """All tiles (same shape) on one image with the caption on top and `labels` lines under each."""
    count = len(tiles)
    height, width = tiles[0].shape[:2]
    zoom = zoom or zoom_for(height, width)
    columns = columns or columns_for(count)
    rows = max(1, math.ceil(count / columns))
    lines = max((len(t) for t in labels), default=0) if labels else 0
    cell_w = width * zoom
    cell_h = height * zoom + lines * LINE_HEIGHT
    if labels:  # room for the label lines; longer ones are cut (see fit_text)
        cell_w = max(cell_w, LABEL_CELL_WIDTH)
    text_font = font()
    caption_w = int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(caption, font=text_font))
    canvas_w = max(2 * MARGIN + columns * cell_w + (columns - 1) * GAP, caption_w + 2 * MARGIN)
    canvas_h = CAPTION_HEIGHT + 2 * MARGIN + rows * cell_h + (rows - 1) * GAP
    canvas = np.full((canvas_h, canvas_w, 3), BACKGROUND, dtype=np.uint8)
    for index, tile in enumerate(tiles):
        y, x = tile_origin(index, columns, cell_h, cell_w)
        canvas[y : y + height * zoom, x : x + width * zoom] = to_pixels(tile, zoom)
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    draw.text((MARGIN, 4), caption, fill=(20, 20, 20), font=text_font)
    if labels:
        small = font(11)
        for index, tile_labels in enumerate(labels):
            y, x = tile_origin(index, columns, cell_h, cell_w)
            for line, text in enumerate(tile_labels):
                position = (x, y + height * zoom + line * LINE_HEIGHT + 1)
                draw.text(position, fit_text(draw, text, small, cell_w), fill=(20, 20, 20), font=small)
    return image


def fit_text(
    draw: ImageDraw.ImageDraw, text: str, text_font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: int
) -> str:
    """The text, cut with an ellipsis where it would run into the next cell."""
    if draw.textlength(text, font=text_font) <= width:
        return text
    while text and draw.textlength(text + "…", font=text_font) > width:
        text = text[:-1]
    return text + "…"


def tile_origin(index: int, columns: int, cell_h: int, cell_w: int) -> tuple[int, int]:
    """Top-left pixel (y, x) of tile `index`."""
    row, column = divmod(index, columns)
    return CAPTION_HEIGHT + MARGIN + row * (cell_h + GAP), MARGIN + column * (cell_w + GAP)


def filter_tiles(weights: np.ndarray) -> list[np.ndarray]:
    """One tile per filter: colour for 3 input channels, else one grey tile per filter and channel
    (filter by filter, channel by channel)."""
    scaled = scale_filters(weights)
    if weights.shape[1] == 3:
        return [f.transpose(1, 2, 0) for f in scaled]
    return [channel for f in scaled for channel in f]


def save(image: Image.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return path


# A heat colour scale from transparent-ish dark blue through red to yellow: readable over grey images.
HEAT_STOPS = np.array(
    [[0.0, 0, 0, 128], [0.35, 0, 90, 255], [0.6, 255, 40, 0], [0.85, 255, 200, 0], [1.0, 255, 255, 160]]
)


def heat_colours(values: np.ndarray) -> np.ndarray:
    """[0, 1] values (H, W) to uint8 RGB (H, W, 3) along HEAT_STOPS."""
    v = np.clip(values, 0.0, 1.0)
    channels = [np.interp(v, HEAT_STOPS[:, 0], HEAT_STOPS[:, c]) for c in (1, 2, 3)]
    return np.rint(np.stack(channels, axis=-1)).astype(np.uint8)


def overlay(pixels: np.ndarray, heat: np.ndarray, opacity: float = 0.5) -> np.ndarray:
    """uint8 RGB (H, W, 3): `heat` (H, W, any range; scaled by its own maximum, negatives as 0) laid
    over `pixels` (H, W, C uint8, the model's input as the server built it) with the given opacity."""
    base = pixels if pixels.ndim == 3 else pixels[:, :, None]
    if base.shape[2] == 1:
        base = np.repeat(base, 3, axis=2)
    top = float(heat.max())
    scaled = np.clip(heat, 0.0, None) / top if top > 0 else np.zeros_like(heat)
    mixed = (1 - opacity) * base.astype(np.float64) + opacity * heat_colours(scaled)
    return np.rint(mixed).astype(np.uint8)
