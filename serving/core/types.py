"""The data plane's requests and results: plain dataclasses and numpy arrays, no protobuf.

Every protocol edge converts its own messages to these and back; the in-process tools use them
directly.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from serving.core.receipt import Receipt


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
    receipt: Receipt | None = None  # where the server's time went (the edge reads it back)


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
    receipt: Receipt | None = None  # where the server's time went (the edge reads it back)


@dataclass(slots=True)
class PredictResult:
    model: str
    version: int
    labels: Sequence[str]
    probabilities: np.ndarray  # (images, classes), float32
    scores: np.ndarray | None = None  # (images,) the abstain score: score output or max probability
    abstain: np.ndarray | None = None  # (images,) bool: score below the model's abstain_threshold


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
    # One per usable image, as `indices`: the abstain score, and whether it is below the model's
    # abstain_threshold (an image unlike the training data, or one the model is unsure of).
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))
    abstain: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))

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


@dataclass(slots=True)
class ExplainRequest:
    """Why the model answers what it does for each image: heat maps at the model's input resolution.

    `methods`: "cam" (Grad-CAM from the version's explain graph) and/or "occlusion" (any model); empty
    asks for the version's default (cam where it has an explain graph, else occlusion). `target`: the
    class to explain for every image; None explains each image's own top-1.
    """

    images: Sequence[ImageInput]
    model: str = ""
    version: int = 0
    methods: Sequence[str] = ()
    target: int | None = None
    top_k: int | None = None
    deadline: float | None = None
    activations: bool = False  # each conv block's maps (explain graph only)
    activation_grids: bool = False  # … and each block as one PNG grid, drawn as the run report draws it
    patch: int | None = None  # occlusion patch side in input pixels; None: chosen from the input size
    stride: int | None = None
    receipt: Receipt | None = None  # where the server's time went (the edge reads it back)


@dataclass(slots=True)
class BlockMaps:
    """One conv block's activation maps for one image: (channels, height, width) after its last ReLU."""

    block: int  # 1-based
    maps: np.ndarray
    caption: str
    grid_png: bytes = b""


@dataclass(slots=True)
class ImageExplanation:
    predictions: list[Prediction]  # the top-k, as Classify gives it
    target: int  # the class explained
    target_label: str
    maps: dict[str, np.ndarray]  # method -> (height, width) float32 at the model's input resolution
    model_input: np.ndarray  # (height, width, channels) uint8: the image as the model saw it
    blocks: list[BlockMaps] = field(default_factory=list)
    score: float = 0.0  # the abstain score and flag, as Classify gives them
    abstain: bool = False


@dataclass(slots=True)
class OcclusionSettings:
    patch: int
    stride: int
    copies: int  # masked copies per image


@dataclass(slots=True)
class ExplainResult:
    """One explanation per usable image, in request order; `errors` maps the others to why."""

    model: str
    version: int
    labels: Sequence[str]
    methods: tuple[str, ...]
    count: int  # images in the request
    explanations: list[ImageExplanation]
    errors: dict[int, str] = field(default_factory=dict)
    occlusion: OcclusionSettings | None = None

    def per_image(self) -> Iterator[tuple[ImageExplanation | None, str | None]]:
        """(explanation, None) or (None, error) for each image of the request, in order."""
        usable = iter(self.explanations)
        for image in range(self.count):
            if image in self.errors:
                yield None, self.errors[image]
            else:
                yield next(usable), None
