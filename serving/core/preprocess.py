"""Encoded images and raw tensors to model input rows.

Decoding (Pillow) is the expensive part and runs in a thread pool, off the event loop. The pixel
count is checked from the header before any pixel is decoded, so a decompression bomb costs nothing.
Raw tensors are read in the byte order their dtype names and refused when they hold NaN or ±inf.
"""

from __future__ import annotations

import functools
import io
import re
import warnings
from collections.abc import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from serving.core.contract import ModelContract
from serving.core.defaults import MAX_PIXELS
from serving.core.errors import InvalidInput, shown
from serving.core.pixels import Placed, fit_pixels

# Pillow warns about damaged files (corrupt EXIF, truncated chunks, …) in words a client controls:
# the image's own error says what matters, so these never reach the log. A bomb warning is an error.
warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
warnings.filterwarnings("error", category=Image.DecompressionBombWarning)

# numpy dtype names a tensor may carry: a byte order mark (< > = |) is optional.
_DTYPE_NAME = re.compile(
    r"^[<>=|]?(float16|float32|float64|uint8|int8|uint16|int16|int32|int64|[fiu][1248])$"
)


class ImageError(InvalidInput):
    """One image cannot be used; the message says why."""


def pixels_to_input(
    pixels: np.ndarray | Placed, contract: ModelContract, out: np.ndarray | None = None
) -> np.ndarray:
    """uint8 pixels to one input row: scaled, normalised, in the model's layout and dtype.

    Placed pixels smaller than the input (letterbox, fit_height) go to their place and the rest of the
    row gets the fill, normalised as a pixel would be. A uint8 model gets the pixels as they are.
    """
    placed = pixels if isinstance(pixels, Placed) else Placed(pixels)
    pixels = placed.pixels
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if out is None:
        out = np.empty(contract.image_shape, dtype=np.float32)
    height, width = pixels.shape[:2]
    target = out
    if (height, width) != (contract.height, contract.width):
        out[...] = contract.fill_input.astype(out.dtype)
        rows, cols = slice(placed.top, placed.top + height), slice(placed.left, placed.left + width)
        target = out[:, rows, cols] if contract.layout == "NCHW" else out[rows, cols, :]
    if contract.layout == "NCHW":
        pixels = pixels.transpose(2, 0, 1)
    if contract.raw_pixels:
        np.copyto(target, pixels, casting="unsafe")
        return out
    np.multiply(pixels, np.float32(contract.scale), out=target, casting="unsafe")
    if contract.has_normalisation:
        mean, std = contract.normalisation
        target -= mean
        target /= std
    return out


def image_to_input(image: Image.Image, contract: ModelContract, out: np.ndarray | None = None) -> np.ndarray:
    return pixels_to_input(fit_pixels(image, contract.fit), contract, out)


def open_image(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Opens encoded bytes, reading only the header; refuses images of more than max_pixels."""
    if not data:
        raise ImageError("empty image data")
    try:
        image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"image refused before decoding: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise ImageError("not an image in any format this server reads") from exc
    except Exception as exc:  # Pillow's plugins raise many kinds on a corrupt header
        raise ImageError(f"cannot read image header: {exc}") from exc
    width, height = image.size
    if width * height > max_pixels:
        raise ImageError(
            f"image of {width}x{height} = {width * height} pixels is over the limit of {max_pixels}; "
            "refused before decoding"
        )
    return image


def decode_opened(image: Image.Image, contract: ModelContract, out: np.ndarray | None = None) -> np.ndarray:
    """Decodes an image opened by `open_image` into one input row, and closes it."""
    try:
        return image_to_input(image, contract, out)
    except Exception as exc:  # a corrupt body surfaces as OSError, ValueError, SyntaxError, struct.error…
        raise ImageError(f"cannot decode {image.format or 'image'} data: {exc}") from exc
    finally:
        image.close()


def decode_to_input(
    data: bytes, contract: ModelContract, max_pixels: int = MAX_PIXELS, out: np.ndarray | None = None
) -> np.ndarray:
    return decode_opened(open_image(data, max_pixels), contract, out)


def decode_batch(
    opened: Sequence[tuple[int, Image.Image]], contract: ModelContract, out: np.ndarray
) -> dict[int, str]:
    """Decodes (row, opened image) pairs straight into rows of `out`; returns {row: error} for failures."""
    errors: dict[int, str] = {}
    for row, image in opened:
        try:
            decode_opened(image, contract, out[row])
        except ImageError as exc:
            errors[row] = str(exc)
    return errors


def tensor_to_input(
    shape: Sequence[int], dtype: str, data: bytes, contract: ModelContract, input_dtype: np.dtype
) -> np.ndarray:
    """A raw tensor (one image, the model's layout and dtype, either byte order) as an input row."""
    expected = contract.image_shape
    if tuple(shape) != expected:
        raise ImageError(
            f"tensor shape {shown(list(shape))} does not match the model's input {list(expected)}"
        )
    row = _native_array(shape, dtype, data, input_dtype, "tensor ")
    if not all_finite(row):
        raise ImageError("tensor holds NaN or infinite values")
    return row


def batch_to_input(
    shape: Sequence[int], dtype: str, data: bytes, contract: ModelContract, input_dtype: np.dtype
) -> np.ndarray:
    """A whole raw batch (N, *image shape; either byte order) as input rows: zero copy when native.

    Errors name what is wrong; a batch holding NaN or ±inf is refused naming the first such image.
    """
    expected = contract.image_shape
    if len(shape) != 1 + len(expected) or tuple(shape[1:]) != expected or shape[0] < 1:
        raise ImageError(
            f"shape {shown(list(shape))} does not match the model's input "
            f"[N, {', '.join(map(str, expected))}]"
        )
    rows = _native_array(shape, dtype, data, input_dtype, "")
    if not all_finite(rows):
        bad = int(np.flatnonzero(~np.isfinite(rows.reshape(len(rows), -1)).all(axis=1))[0])
        raise ImageError(f"image {bad} holds NaN or infinite values")
    return rows


def _native_array(
    shape: Sequence[int], dtype: str, data: bytes, input_dtype: np.dtype, what: str
) -> np.ndarray:
    """Wire bytes of a checked shape as an array of the model's dtype: zero copy in native byte order.
    `what` starts the error messages ("tensor " for one image, "" for a whole batch)."""
    got = wire_dtype(dtype)
    if got.newbyteorder("=") != input_dtype:
        raise ImageError(f"{what}dtype {got.name} does not match the model's input dtype {input_dtype.name}")
    needed = int(np.prod(shape)) * got.itemsize
    if len(data) != needed:
        raise ImageError(
            f"{what}data holds {len(data)} bytes; shape {shown(list(shape))} of {got.name} needs {needed}"
        )
    values = np.frombuffer(data, dtype=got).reshape(tuple(shape))
    if not got.isnative:
        values = values.astype(input_dtype)  # the other byte order: one swapped copy
    return values


def all_finite(values: np.ndarray) -> bool:
    """True when no value is NaN or ±inf. (A sum-first shortcut needs `np.errstate` against overflow
    warnings, which costs more than this whole check on the small tensors that come one by one.)"""
    if values.dtype.kind != "f":
        return True
    return bool(np.isfinite(values).all())


@functools.lru_cache(maxsize=64)
def wire_dtype(dtype: str) -> np.dtype:
    """The wire's dtype name as a numpy dtype: little-endian unless it says '>' (parsed once per name)."""
    if not _DTYPE_NAME.match(dtype):
        raise ImageError(f"unknown tensor dtype {shown(dtype)}")
    parsed = np.dtype(dtype.lstrip("<>=|"))
    return parsed.newbyteorder(">" if dtype.startswith(">") else "<")
