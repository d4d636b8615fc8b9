"""The model contract: what an ONNX file tells a server about its input and output.

Written into `metadata_props` by `training export`, read back by the server.
A model exported elsewhere carries no such metadata and is described by a sidecar JSON file
(`model.json` beside `model.onnx`) holding the same fields. Both are read by one parser, so a key
means the same in both; unknown keys and impossible combinations are refused naming the key.
Pure Python plus numpy and Pillow: training imports this module, so it must never import
onnxruntime, grpc or torch.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from serving.core.resize import RESAMPLES, SAMPLED, Resample

if TYPE_CHECKING:
    from PIL import Image

PREFIX = "convserve."
SIDECAR_NAME = "model.json"
# The preprocessing certificate beside model.onnx (written by training/fixtures.py, checked at load by
# serving/core/certificate.py; format in docs/guides/calibration.md).
FIXTURES_DIR = "fixtures"
FIXTURES_MANIFEST = "manifest.json"
FIXTURES_FORMAT = 1

ColorMode = Literal["L", "RGB"]
ChannelOrder = Literal["RGB", "BGR"]
Layout = Literal["NCHW", "NHWC"]
OutputKind = Literal["probabilities", "logits", "log-probabilities"]
ResizeMode = Literal["stretch", "letterbox", "fit_height", "crop"]
Align = Literal["centre", "top-left"]
Rounding = Literal["round", "floor", "ceil"]

COLOR_CHANNELS: dict[str, int] = {"L": 1, "RGB": 3}
OUTPUT_KINDS = ("probabilities", "logits", "log-probabilities")
RESIZE_MODES = ("stretch", "letterbox", "fit_height", "crop")
ALIGNS = ("centre", "top-left")
ROUNDINGS = ("round", "floor", "ceil")
# What export measured calibrating and choosing the abstain score (training/calibration.py).
CALIBRATION_KEYS = (
    "temperature",
    "ece_before",
    "ece_after",
    "abstain_score",
    "abstain_auroc_msp",
    "abstain_auroc_energy",
)
# Informational metadata our own exports write; the server reads nothing from them.
INFO_KEYS = ("dataset", "precision", "reference", *CALIBRATION_KEYS)


class ContractError(ValueError):
    """The metadata or sidecar file does not describe a usable model."""


def _one_of(key: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ContractError(f"{key} must be one of {', '.join(allowed)}; got {value!r}")


@dataclass(frozen=True)
class Fit:
    """How an image becomes the model's pixels: colour, channel order, geometry and resampling.

    resize: `stretch` to height x width; `letterbox`: scale to fit inside, keep the aspect ratio and pad
    with `fill` (placed by `align`); `fit_height`: scale to the height, width by the same factor (at most
    the input width: wider images are squeezed), pad the right with `fill` (CRNN/PaddleOCR text lines);
    `crop`: scale the shorter side to `resize_to`, then take the centre height x width (torchvision's
    Resize + CenterCrop). `rounding` rounds the scaled side that is not given exactly. `antialias`: Pillow's
    resize (the filter widens as it shrinks); without it, OpenCV's `cv2.resize`, reproduced exactly.
    `fill` is in pixel units (0-255), in the model's channel order; it may be fractional (127.5).
    """

    color_mode: ColorMode
    height: int
    width: int
    channel_order: ChannelOrder = "RGB"
    resize: ResizeMode = "stretch"
    resize_to: int | None = None
    fill: tuple[float, ...] = (0.0,)
    align: Align = "centre"
    rounding: Rounding = "round"
    resample: Resample = "bilinear"
    antialias: bool = True

    def __post_init__(self) -> None:
        _one_of("color_mode", self.color_mode, tuple(COLOR_CHANNELS))
        _one_of("channel_order", self.channel_order, ("RGB", "BGR"))
        _one_of("resize", self.resize, RESIZE_MODES)
        _one_of("align", self.align, ALIGNS)
        _one_of("rounding", self.rounding, ROUNDINGS)
        _one_of("resample", self.resample, RESAMPLES)
        if not isinstance(self.antialias, bool):
            raise ContractError(f"antialias must be true or false; got {self.antialias!r}")
        if self.height < 1 or self.width < 1:
            raise ContractError(f"input size must be positive, got {self.height}x{self.width}")
        if len(self.fill) not in (1, self.channels):
            raise ContractError(f"fill needs 1 or {self.channels} values, got {len(self.fill)}")
        if any(not 0 <= f <= 255 for f in self.fill):
            raise ContractError(f"fill is in pixel units, 0-255; got {list(self.fill)}")
        self._check_combinations()

    def _check_combinations(self) -> None:
        if self.channel_order == "BGR" and self.color_mode == "L":
            raise ContractError("channel_order BGR needs color_mode RGB")
        if self.resize == "crop":
            if self.resize_to is None:
                raise ContractError("resize crop needs resize_to (the shorter side before the centre crop)")
            if self.resize_to < max(self.height, self.width):
                raise ContractError(
                    f"resize_to {self.resize_to} is smaller than the {self.height}x{self.width} crop"
                )
        elif self.resize_to is not None:
            raise ContractError(f"resize_to applies only to resize crop, not {self.resize}")
        if not self.antialias and self.resample not in SAMPLED:
            raise ContractError(
                f"resample {self.resample} without antialias is not reproduced; "
                f"use one of {', '.join(SAMPLED)}"
            )

    @property
    def channels(self) -> int:
        return COLOR_CHANNELS[self.color_mode]


FIT_FIELDS = tuple(f.name for f in dataclasses.fields(Fit))


@dataclass(frozen=True)
class ModelContract:
    """Everything a server needs to turn an image into the model's input and read its output: the image's
    `Fit` to the model's pixels, then the pixels' scaling and normalisation, and the output."""

    labels: tuple[str, ...]
    fit: Fit
    layout: Layout = "NCHW"
    # input = (pixel * scale - mean) / std, per channel: mean and std are in the units of pixel * scale
    # (0-1 with scale 1/255, 0-255 with scale 1). Our exports keep mean/std inside the graph.
    scale: float = 1.0 / 255.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    output_kind: OutputKind = "probabilities"
    output: str | None = None  # the output holding the classes; None: the graph's first
    # Answers whose abstain score is below this are marked abstain (None: never); see FIELD_MEANINGS.
    abstain_threshold: float | None = None
    # The output holding each image's abstain score; None: the score is the top probability.
    score_output: str | None = None
    extra: dict[str, str] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        _one_of("layout", self.layout, ("NCHW", "NHWC"))
        _one_of("output_kind", self.output_kind, OUTPUT_KINDS)
        if not self.scale > 0:
            raise ContractError(f"scale must be positive, got {self.scale}")
        channels = self.channels
        for name, values in (("mean", self.mean), ("std", self.std)):
            if len(values) not in (1, channels):
                raise ContractError(f"{name} needs 1 or {channels} values, got {len(values)}")
        if any(s == 0 for s in self.std):
            raise ContractError("std must not contain 0")
        threshold = self.abstain_threshold
        if threshold is not None and self.score_output is None and not 0.0 <= threshold <= 1.0:
            raise ContractError(
                f"abstain_threshold is a probability, 0-1, without a score_output; got {threshold}"
            )
        if threshold is not None and not math.isfinite(threshold):
            raise ContractError(f"abstain_threshold must be a finite number; got {threshold}")
        if self.score_output is not None and self.score_output == self.output:
            raise ContractError(f"score_output {self.score_output!r} is the classes' output")
        top = 255.0 * self.scale
        if any(not -1e-9 <= m <= top * (1 + 1e-9) for m in self.mean):
            raise ContractError(
                f"mean {list(self.mean)} lies outside the scaled pixel range [0, {top:g}]: give mean in the "
                f"units of pixel x scale (0-1 for scale 1/255, 0-255 for scale 1)"
            )

    # The input's colour and size, which its shape is made of, read through the contract.
    @property
    def color_mode(self) -> ColorMode:
        return self.fit.color_mode

    @property
    def height(self) -> int:
        return self.fit.height

    @property
    def width(self) -> int:
        return self.fit.width

    @property
    def channels(self) -> int:
        return self.fit.channels

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """One image's input shape, without the batch axis."""
        if self.layout == "NCHW":
            return (self.channels, self.height, self.width)
        return (self.height, self.width, self.channels)

    @property
    def has_normalisation(self) -> bool:
        return any(m != 0.0 for m in self.mean) or any(s != 1.0 for s in self.std)

    @property
    def raw_pixels(self) -> bool:
        """The input is the pixel values themselves (scale 1, no mean or std): what a uint8 model takes."""
        return self.scale == 1.0 and not self.has_normalisation

    @cached_property
    def channel_axis_shape(self) -> tuple[int, int, int]:
        """Reshapes per-channel values to broadcast over one input row in the model's layout."""
        return (-1, 1, 1) if self.layout == "NCHW" else (1, 1, -1)

    @cached_property
    def normalisation(self) -> tuple[np.ndarray, np.ndarray]:
        """mean and std as float32, shaped to broadcast over one input row (normalised images only)."""
        shape = self.channel_axis_shape
        return (
            np.asarray(self.mean, dtype=np.float32).reshape(shape),
            np.asarray(self.std, dtype=np.float32).reshape(shape),
        )

    @cached_property
    def fill_input(self) -> np.ndarray:
        """The padding's input values, computed as a pixel's would be, shaped like `normalisation`."""
        fill = np.broadcast_to(np.asarray(self.fit.fill, dtype=np.float64), (self.channels,))
        value: np.ndarray
        if self.raw_pixels:
            value = fill.round()
        else:
            value = fill.astype(np.float32) * np.float32(self.scale)
            if self.has_normalisation:
                mean = np.broadcast_to(np.asarray(self.mean, dtype=np.float32), (self.channels,))
                std = np.broadcast_to(np.asarray(self.std, dtype=np.float32), (self.channels,))
                value = (value - mean) / std
        return value.reshape(self.channel_axis_shape)

    def to_fields(self) -> dict[str, Any]:
        """Every field as a sidecar (`model.json`) holds it, in `FIELDS` order; unset optional ones out."""
        values = ((key, getattr(self.fit if key in FIT_FIELDS else self, key)) for key in FIELDS)
        return {
            key: list(value) if isinstance(value, tuple) else value
            for key, value in values
            if value is not None
        }

    def to_metadata(self) -> dict[str, str]:
        """The `metadata_props` of an exported ONNX file: the sidecar's fields, as strings."""
        fields = self.to_fields()
        metadata = {PREFIX + "input_size": f"{fields.pop('height')}x{fields.pop('width')}"}
        for key, value in fields.items():
            metadata[PREFIX + key] = value if isinstance(value, str) else json.dumps(value)
        metadata.update({PREFIX + k: v for k, v in self.extra.items()})
        return metadata


# key -> its type in a sidecar; metadata holds the same as strings (JSON for lists, numbers and booleans).
FIELDS: dict[str, type | tuple[type, ...]] = {
    "labels": list,
    "color_mode": str,
    "channel_order": str,
    "height": int,
    "width": int,
    "layout": str,
    "resize": str,
    "resize_to": int,
    "fill": (list, int, float),
    "align": str,
    "rounding": str,
    "resample": str,
    "antialias": bool,
    "scale": (int, float),
    "mean": (list, int, float),
    "std": (list, int, float),
    "output": str,
    "output_kind": str,
    "abstain_threshold": (int, float),
    "score_output": str,
}
REQUIRED = ("color_mode", "height", "width")
# What each field means, for the generated reference page (docs/reference/model-json.md); one per key.
FIELD_MEANINGS: dict[str, str] = {
    "labels": "class names, one per output column (default: class indices)",
    "color_mode": "greyscale or colour; alpha is dropped, 16-bit scaled to 8",
    "channel_order": "the channel order the model takes (OpenCV- and Caffe-trained models: `BGR`)",
    "height": 'the model\'s input height (`input_size: "HxW"` in metadata)',
    "width": 'the model\'s input width (`input_size: "HxW"` in metadata)',
    "layout": "axis order of the input",
    "resize": "`stretch`: to height×width, ignoring the aspect ratio. `letterbox`: scale to fit inside, keep "
    "the ratio, pad with `fill`, placed by `align`. `fit_height`: scale to the height, the width by the "
    "same factor (at most `width`: wider images are squeezed), pad the right with `fill` (CRNN / "
    "PaddleOCR text lines). `crop`: scale the shorter side to `resize_to`, then take the centre "
    "height×width (offset `(size − crop) // 2`; an image more elongated than 32:1 is refused, "
    "`INVALID_ARGUMENT`, rather than scaled up to millions of pixels)",
    "resize_to": "`crop` only: the shorter side before the crop (256 for a 224 crop); at least the crop",
    "fill": "padding colour in **pixel units (0–255)**, 1 or C numbers, in the model's channel order; "
    "fractional values are exact (127.5 pads with 0 after `(x/255 − 0.5)/0.5`)",
    "align": "where `letterbox` places the image",
    "rounding": "how the scaled side that is not given exactly is rounded (torchvision's Resize: `floor`; "
    "PaddleOCR: `ceil`; PaddleClas: `round`, Python's round-half-even)",
    "resample": "the resampling filter",
    "antialias": "`true`: Pillow's resize (its filter widens as it shrinks; what torchvision does on PIL "
    "images). `false`: OpenCV's `cv2.resize` (fixed taps, no antialiasing), reproduced bit for bit in "
    "numpy for `nearest`, `bilinear` (INTER_LINEAR) and `lanczos` (INTER_LANCZOS4); `bicubic` without "
    "antialias is refused",
    "scale": "input = (pixel × `scale` − `mean`) / `std`, per channel",
    "mean": "1 or C numbers, **in the units of pixel × scale**: 0–1 with `scale` 1/255 (torchvision), "
    "0–255 with `scale` 1 (Caffe); a mean outside that range is refused",
    "std": "1 or C numbers, in the units of pixel × scale, as `mean`; none may be 0",
    "output": "which output holds the classes, for graphs with several (default: the first)",
    "output_kind": "softmax is applied to logits, exp to log-probabilities",
    "abstain_threshold": "an answer whose abstain score is below this is marked `abstain: true` (default: "
    "none, never); the score is the top probability (max softmax probability, so 0–1), or the "
    "`score_output`'s value when one is named; `training export` writes the one keeping 99 % of "
    "validation images (docs/guides/calibration.md)",
    "score_output": "a graph output holding one abstain score per image, higher meaning more like the "
    "training data (shape `[batch]` or `[batch, 1]`); `training export` names `score`, the energy score, "
    "when it separates better than the top probability (default: none, the top probability is the score)",
}


def has_contract(metadata: dict[str, str]) -> bool:
    return PREFIX + "color_mode" in metadata


def from_metadata(metadata: dict[str, str]) -> ModelContract:
    """Reads a contract back from an ONNX file's `metadata_props`."""
    fields: dict[str, Any] = {}
    extra: dict[str, str] = {}
    for key, text in metadata.items():
        if not key.startswith(PREFIX):
            continue
        name = key[len(PREFIX) :]
        if name in INFO_KEYS:
            extra[name] = text
        elif name == "input_size":
            try:
                fields["height"], fields["width"] = (int(v) for v in text.split("x"))
            except ValueError:
                raise ContractError(f"metadata key {key}: expected HxW, got {text!r}") from None
        elif name not in FIELDS or name in ("height", "width"):
            raise ContractError(f"unknown metadata key {key!r}")
        elif FIELDS[name] is str:
            fields[name] = text
        else:
            try:
                fields[name] = json.loads(text)
            except json.JSONDecodeError:
                raise ContractError(f"metadata key {key}: not JSON: {text[:80]!r}") from None
    if "labels" not in fields:
        raise ContractError(f"metadata has no {PREFIX}labels")
    return build(fields, "metadata", 0, extra, PREFIX)


def from_sidecar(path: Path, num_classes: int) -> ModelContract:
    """Reads a sidecar file; labels default to the class indices when it gives none.

    Keys starting with `_` are comments (`inspect` writes `_guessed`) and are ignored.
    """
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ContractError(f"cannot read sidecar {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ContractError(f"sidecar {path} must hold a JSON object")
    unknown = sorted(k for k in data if k not in FIELDS and not k.startswith("_"))
    if unknown:
        raise ContractError(f"sidecar {path} has unknown keys: {unknown}")
    fields = {k: v for k, v in data.items() if not k.startswith("_")}
    return build(fields, f"sidecar {path}", num_classes, {})


def build(
    fields: dict[str, Any], where: str, num_classes: int, extra: dict[str, str], key_prefix: str = ""
) -> ModelContract:
    """A contract from parsed fields; every message starts with `where` (the file) and names the key."""
    for key in REQUIRED:
        if key not in fields:
            raise ContractError(f"{where}: {key_prefix}{key} is missing")
    for key, value in fields.items():
        expected = FIELDS[key]
        kinds = expected if isinstance(expected, tuple) else (expected,)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise ContractError(f"{where}: {key_prefix}{key} must be {_type_name(kinds)}, got {value!r}")
    try:
        labels = fields.get("labels") or [str(i) for i in range(num_classes)]
        # What the fields leave out takes the dataclass's defaults: written once, there.
        given = {key: value for key, value in fields.items() if key != "labels"}
        for key in ("mean", "std", "fill"):
            if key in given:
                given[key] = _numbers(key, given[key])
        for key in ("scale", "abstain_threshold"):
            if key in given:
                given[key] = float(given[key])
        fit = Fit(**{key: given.pop(key) for key in FIT_FIELDS if key in given})
        return ModelContract(labels=tuple(str(label) for label in labels), fit=fit, extra=extra, **given)
    except ContractError as exc:
        raise ContractError(f"{where}: {exc}") from None


def _numbers(key: str, value: Any) -> tuple[float, ...]:
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        raise ContractError(f"{key} must hold numbers, got {value!r}")
    return tuple(float(v) for v in values)


def _type_name(kinds: tuple[type, ...]) -> str:
    names = {list: "a list", str: "a string", int: "an integer", float: "a number", bool: "true or false"}
    return " or ".join(dict.fromkeys(names[k] for k in kinds))


def image_pixels(image: Image.Image, color_mode: ColorMode, height: int, width: int) -> np.ndarray:
    """Training's entry: an opened image file to uint8 pixels, stretched (our own models' recipe).

    The same function as the server's (`serving.core.pixels.fit_pixels`), so the same file gives
    bit-identical model input in both.
    """
    from serving.core.pixels import fit_pixels

    return fit_pixels(image, Fit(color_mode, height, width)).pixels


def fit_image(image: Image.Image, color_mode: ColorMode, height: int, width: int) -> Image.Image:
    """Converts any Pillow image to the model's colour mode and size (stretched, bilinear)."""
    from PIL import Image

    from serving.core.pixels import to_mode

    image = to_mode(image, color_mode)
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    return image
