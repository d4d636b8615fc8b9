"""Encoded images and raw tensors to model input rows.

Decoding (Pillow) is the expensive part and runs in a thread pool, off the event loop. The pixel
count is checked from the header before any pixel is decoded, so a decompression bomb costs nothing.
"""

from __future__ import annotations

import functools
import io
import warnings
from collections.abc import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from serving.contract import ModelContract, fit_image

DEFAULT_MAX_PIXELS = 50_000_000


class ImageError(ValueError):
    """One image cannot be used; the message says why."""


def pixels_to_input(pixels: np.ndarray, contract: ModelContract, out: np.ndarray | None = None) -> np.ndarray:
    """uint8 pixels, (H, W) or (H, W, C), to one input row: scaled, normalised, in the model's layout."""
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if contract.layout == "NCHW":
        pixels = pixels.transpose(2, 0, 1)
    if out is None:
        out = np.empty(contract.image_shape, dtype=np.float32)
    np.multiply(pixels, np.float32(contract.scale), out=out, casting="unsafe")
    if contract.has_normalisation:
        shape = (-1, 1, 1) if contract.layout == "NCHW" else (1, 1, -1)
        out -= np.asarray(contract.mean, dtype=np.float32).reshape(shape)
        out /= np.asarray(contract.std, dtype=np.float32).reshape(shape)
    return out


def image_to_input(image: Image.Image, contract: ModelContract, out: np.ndarray | None = None) -> np.ndarray:
    fitted = fit_image(image, contract.color_mode, contract.height, contract.width)
    return pixels_to_input(np.asarray(fitted, dtype=np.uint8), contract, out)


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Opens encoded bytes, reading only the header; refuses images of more than max_pixels."""
    if not data:
        raise ImageError("empty image data")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"image refused before decoding: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise ImageError("not an image in any format this server reads") from exc
    except (OSError, ValueError, SyntaxError) as exc:
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
        if image.format == "JPEG":
            # Let libjpeg decode at a reduced scale when the target is much smaller: far less work.
            image.draft(contract.color_mode, (contract.width, contract.height))
        return image_to_input(image, contract, out)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageError(f"cannot decode {image.format or 'image'} data: {exc}") from exc
    finally:
        image.close()


def decode_to_input(
    data: bytes, contract: ModelContract, max_pixels: int = DEFAULT_MAX_PIXELS, out: np.ndarray | None = None
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
    """A raw tensor (one image, the model's layout and dtype) as an input row, without copying."""
    expected = contract.image_shape
    if tuple(shape) != expected:
        raise ImageError(f"tensor shape {list(shape)} does not match the model's input {list(expected)}")
    got = little_endian(dtype)
    if got != input_dtype:
        raise ImageError(f"tensor dtype {got.name} does not match the model's input dtype {input_dtype.name}")
    needed = contract.channels * contract.height * contract.width * got.itemsize
    if len(data) != needed:
        raise ImageError(
            f"tensor data holds {len(data)} bytes; shape {list(shape)} of {got.name} needs {needed}"
        )
    return np.frombuffer(data, dtype=got).reshape(expected)


@functools.lru_cache(maxsize=64)
def little_endian(dtype: str) -> np.dtype:
    """The wire's dtype name as a little-endian numpy dtype (parsed once per name)."""
    try:
        return np.dtype(dtype).newbyteorder("<")
    except TypeError as exc:
        raise ImageError(f"unknown tensor dtype {dtype!r}") from exc
