"""The data plane's requests and results: plain dataclasses and numpy arrays, no protobuf.

Every protocol edge converts its own messages to these and back; the in-process tools use them
directly.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True, slots=True)
class RawTensor:
    """One image already in the model's input layout and value space: shape without the batch axis,
    a numpy dtype name (little-endian unless it starts with '>'), C-order bytes."""

    shape: Sequence[int]
    dtype: str
    data: bytes


# An image as sent: encoded file bytes (PNG, JPEG, …), a raw tensor, or None when it holds neither.
ImageInput = bytes | RawTensor | None


@dataclass(frozen=True, slots=True)
class RawBatch:
    """A whole batch in one buffer: shape (N, *image shape), a numpy dtype name (little-endian unless
    it starts with '>'), C-order bytes. What tensor protocols such as the Open Inference Protocol send."""

    shape: Sequence[int]
    dtype: str
    data: bytes


@dataclass(slots=True)
class ClassifyRequest:
    images: Sequence[ImageInput]
    model: str = ""  # empty: the server's only model
    version: int = 0  # 0: the newest ready version
    top_k: int | None = None  # None: the server's default
    deadline: float | None = None  # on time.monotonic()'s clock


@dataclass(slots=True)
class PredictRequest:
    """Full probability rows for every image; the request fails as a whole if any image is unusable.

    `input_name` names the input in error messages ("input 'x' image 3: …").
    """

    inputs: Sequence[ImageInput] | RawBatch
    model: str = ""
    version: int = 0
    deadline: float | None = None
    input_name: str = "images"


@dataclass(slots=True)
class PredictResult:
    model: str
    version: int
    labels: Sequence[str]
    probabilities: np.ndarray  # (images, classes), float32


@dataclass(frozen=True, slots=True)
class Prediction:
    index: int
    label: str
    probability: float


@dataclass(slots=True)
class ClassifyResult:
    """Top-k of every usable image, and the reason for every unusable one.

    `indices` and `probabilities` hold one row per usable image, in request order; `errors` maps the
    request index of each unusable image to why.
    """

    model: str
    version: int
    labels: Sequence[str]
    indices: np.ndarray  # (usable images, k) class indices, most probable first
    probabilities: np.ndarray  # (usable images, k)
    count: int  # images in the request
    errors: dict[int, str] = field(default_factory=dict)

    def per_image(self) -> Iterator[tuple[list[Prediction], str | None]]:
        """(predictions, None) or ([], error) for each image of the request, in order."""
        row = 0
        index_rows, value_rows = self.indices.tolist(), self.probabilities.tolist()
        for image in range(self.count):
            if image in self.errors:
                yield [], self.errors[image]
                continue
            yield (
                [
                    Prediction(i, self.labels[i], p)
                    for i, p in zip(index_rows[row], value_rows[row], strict=True)
                ],
                None,
            )
            row += 1
