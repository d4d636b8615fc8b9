"""A request's images turned into model input rows: raw tensors checked (in bulk where they all fit),
encoded images opened header first, the size limits enforced before any pixel is decoded, then decoded
on the event loop (tiny images) or in the decode pool. An image that cannot be used gets its own error;
the others their rows."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import Executor

import numpy as np
from PIL import Image

from serving.core import defaults
from serving.core.errors import InvalidInput
from serving.core.model import ServedModel
from serving.core.preprocess import ImageError, all_finite, decode_batch, open_image, tensor_to_input
from serving.core.types import ImageInput, RawTensor

INLINE_DECODE_PIXELS = 4096  # a request whose images hold fewer pixels in all is decoded on the event loop


async def input_rows(
    model: ServedModel,
    images: Sequence[ImageInput],
    decode_pool: Executor,
    max_pixels: int = defaults.MAX_PIXELS,
    max_request_pixels: int = defaults.MAX_REQUEST_PIXELS,
) -> tuple[np.ndarray, dict[int, str]]:
    """Input rows for every image (in order) and {index: error} for those that cannot be used; an
    image over `max_pixels` is one of those, a request over `max_request_pixels` in all is refused."""
    if all(type(image) is RawTensor for image in images):
        rows = exact_tensors(model, images)  # type: ignore[arg-type]
        if rows is not None:
            return rows, {}
    contract = model.contract
    errors: dict[int, str] = {}
    rows = model.new_rows(len(images))
    opened: list[tuple[int, Image.Image]] = []
    pixels = 0
    for index, image in enumerate(images):
        try:
            if isinstance(image, bytes):
                # Only the header is read here: sizes are checked before any pixel is decoded.
                opened.append((index, open_image(image, max_pixels)))
                pixels += opened[-1][1].width * opened[-1][1].height
            elif isinstance(image, RawTensor):
                rows[index] = tensor_to_input(
                    image.shape, image.dtype, image.data, contract, model.input_dtype
                )
            else:
                errors[index] = "image holds neither encoded bytes nor a tensor"
        except ImageError as exc:
            errors[index] = str(exc)
    if pixels > max_request_pixels:
        for _, header in opened:
            header.close()
        raise InvalidInput(
            f"the request's images hold {pixels} pixels in all; the limit per request is "
            f"{max_request_pixels}: send fewer or smaller images per request"
        )
    if opened and pixels <= INLINE_DECODE_PIXELS:
        errors.update(decode_batch(opened, contract, rows))  # tiny images: a thread hop costs more
    elif opened:
        loop = asyncio.get_running_loop()
        errors.update(await loop.run_in_executor(decode_pool, decode_batch, opened, contract, rows))
    return rows, errors


def exact_tensors(model: ServedModel, tensors: Sequence[RawTensor]) -> np.ndarray | None:
    """The common case, checked in bulk: one join, one zero-copy view of the whole batch.

    None when any tensor needs a closer look (other shape, dtype or byte order, or a value that
    is not finite): the per-image path then names the images at fault.
    """
    if len(tensors) == 1:  # the commonest request: no generator, no join
        data = tensors[0].data
        if not model.accepts_tensor(tensors[0].shape, tensors[0].dtype, len(data)):
            return None
    elif all(model.accepts_tensor(t.shape, t.dtype, len(t.data)) for t in tensors):
        data = b"".join(t.data for t in tensors)
    else:
        return None
    rows = np.frombuffer(data, dtype=model.input_dtype).reshape(len(tensors), *model.contract.image_shape)
    return rows if all_finite(rows) else None
