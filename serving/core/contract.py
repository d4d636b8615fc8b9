"""The model contract: what an ONNX file tells a server about its input and output.

Written into `metadata_props` by `training export`, read back by the server.
A model exported elsewhere carries no such metadata and is described by a sidecar JSON file
(`model.json` beside `model.onnx`) holding the same fields. Pure Python plus Pillow: training imports
this module, so it must never import onnxruntime, grpc or torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:
    from PIL import Image

PREFIX = "convserve."
SIDECAR_NAME = "model.json"

ColorMode = Literal["L", "RGB"]
Layout = Literal["NCHW", "NHWC"]
OutputKind = Literal["probabilities", "logits"]

COLOR_CHANNELS: dict[str, int] = {"L": 1, "RGB": 3}


class ContractError(ValueError):
    """The metadata or sidecar file does not describe a usable model."""


@dataclass(frozen=True)
class ModelContract:
    """Everything a server needs to turn an image into the model's input and read its output."""

    labels: tuple[str, ...]
    color_mode: ColorMode
    height: int
    width: int
    layout: Layout = "NCHW"
    # input = (pixel * scale - mean) / std, per channel; our exports keep mean/std inside the graph.
    scale: float = 1.0 / 255.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    output_kind: OutputKind = "probabilities"
    extra: dict[str, str] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.color_mode not in COLOR_CHANNELS:
            raise ContractError(
                f"color_mode must be one of {sorted(COLOR_CHANNELS)}, got {self.color_mode!r}"
            )
        if self.layout not in ("NCHW", "NHWC"):
            raise ContractError(f"layout must be NCHW or NHWC, got {self.layout!r}")
        if self.output_kind not in ("probabilities", "logits"):
            raise ContractError(f"output_kind must be probabilities or logits, got {self.output_kind!r}")
        if self.height < 1 or self.width < 1:
            raise ContractError(f"input size must be positive, got {self.height}x{self.width}")
        if not self.scale > 0:
            raise ContractError(f"scale must be positive, got {self.scale}")
        channels = self.channels
        for name, values in (("mean", self.mean), ("std", self.std)):
            if len(values) not in (1, channels):
                raise ContractError(f"{name} needs 1 or {channels} values, got {len(values)}")
        if any(s == 0 for s in self.std):
            raise ContractError("std must not contain 0")

    @property
    def channels(self) -> int:
        return COLOR_CHANNELS[self.color_mode]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """One image's input shape, without the batch axis."""
        if self.layout == "NCHW":
            return (self.channels, self.height, self.width)
        return (self.height, self.width, self.channels)

    @property
    def has_normalisation(self) -> bool:
        return any(m != 0.0 for m in self.mean) or any(s != 1.0 for s in self.std)

    def to_metadata(self) -> dict[str, str]:
        """The `metadata_props` entries written into an exported ONNX file."""
        return {
            PREFIX + "labels": json.dumps(list(self.labels)),
            PREFIX + "color_mode": self.color_mode,
            PREFIX + "input_size": f"{self.height}x{self.width}",
            PREFIX + "layout": self.layout,
            PREFIX + "scale": repr(self.scale),
            PREFIX + "mean": json.dumps(list(self.mean)),
            PREFIX + "std": json.dumps(list(self.std)),
            PREFIX + "output_kind": self.output_kind,
            **{PREFIX + k: v for k, v in self.extra.items()},
        }


def has_contract(metadata: dict[str, str]) -> bool:
    return PREFIX + "color_mode" in metadata


def from_metadata(metadata: dict[str, str]) -> ModelContract:
    """Reads a contract back from an ONNX file's `metadata_props`."""
    try:
        height, width = (int(v) for v in metadata[PREFIX + "input_size"].split("x"))
        known = {"labels", "color_mode", "input_size", "layout", "scale", "mean", "std", "output_kind"}
        extra = {
            k[len(PREFIX) :]: v
            for k, v in metadata.items()
            if k.startswith(PREFIX) and k[len(PREFIX) :] not in known
        }
        return ModelContract(
            labels=tuple(json.loads(metadata[PREFIX + "labels"])),
            color_mode=metadata[PREFIX + "color_mode"],  # type: ignore[arg-type]
            height=height,
            width=width,
            layout=metadata.get(PREFIX + "layout", "NCHW"),  # type: ignore[arg-type]
            scale=float(metadata.get(PREFIX + "scale", 1.0 / 255.0)),
            mean=tuple(json.loads(metadata.get(PREFIX + "mean", "[0.0]"))),
            std=tuple(json.loads(metadata.get(PREFIX + "std", "[1.0]"))),
            output_kind=metadata.get(PREFIX + "output_kind", "probabilities"),  # type: ignore[arg-type]
            extra=extra,
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise ContractError(f"bad convserve metadata: {exc}") from exc


def from_sidecar(path: Path, num_classes: int) -> ModelContract:
    """Reads a sidecar file; labels default to the class indices when it gives none."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ContractError(f"cannot read sidecar {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ContractError(f"sidecar {path} must hold a JSON object")
    unknown = set(data) - {
        "labels",
        "color_mode",
        "height",
        "width",
        "layout",
        "scale",
        "mean",
        "std",
        "output_kind",
    }
    if unknown:
        raise ContractError(f"sidecar {path} has unknown keys: {sorted(unknown)}")
    try:
        labels = data.get("labels") or [str(i) for i in range(num_classes)]
        return ModelContract(
            labels=tuple(str(label) for label in labels),
            color_mode=data["color_mode"],
            height=int(data["height"]),
            width=int(data["width"]),
            layout=data.get("layout", "NCHW"),
            scale=float(data.get("scale", 1.0 / 255.0)),
            mean=tuple(float(v) for v in data.get("mean", [0.0])),
            std=tuple(float(v) for v in data.get("std", [1.0])),
            output_kind=data.get("output_kind", "probabilities"),
        )
    except KeyError as exc:
        raise ContractError(f"sidecar {path} is missing {exc}") from exc
    except (TypeError, ValueError) as exc:
        raise ContractError(f"sidecar {path}: {exc}") from exc


def image_pixels(image: Image.Image, color_mode: ColorMode, height: int, width: int) -> np.ndarray:
    """The one way from an opened image file to a model's pixels: uint8, (H, W) or (H, W, C).

    Training's folder loader and the server both call this, so the same file gives bit-identical
    model input in both. A JPEG at least twice the target size in each direction is decoded at a
    reduced scale (libjpeg's DCT scaling, a power of two that still covers the target); the colour
    conversion stays Pillow's, as for every other format.
    """
    if image.format == "JPEG" and image.width >= 2 * width and image.height >= 2 * height:
        image.draft(image.mode, (width, height))
    return np.asarray(fit_image(image, color_mode, height, width), dtype=np.uint8)


def fit_image(image: Image.Image, color_mode: ColorMode, height: int, width: int) -> Image.Image:
    """Converts any Pillow image to the model's colour mode and size.

    Training (folder datasets) and serving both call this, so a model sees at serving time exactly the
    pixels it was trained on. Alpha is dropped (colour kept); 16- and 32-bit greyscale is scaled to 8 bits
    (when its values use more than 8 bits).
    """
    from PIL import Image

    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        # 16-bit data using more than 8 bits spans 0..65535; values that fit in 8 bits are kept as they are.
        top = 65535.0 if arr.max(initial=0) > 255 else 255.0
        image = Image.fromarray(np.clip(arr * (255.0 / top), 0, 255).round().astype(np.uint8), mode="L")
    elif image.mode == "P" or image.mode == "PA":
        image = image.convert("RGBA")
    if image.mode != color_mode:
        image = image.convert(color_mode)
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    return image
