"""Explanations of a prediction: the explain graph's class activation maps, occlusion through the
batcher, and the model's input as the server built it.

`explain.onnx` (written by `training export` beside `model.onnx`, same weights) answers one call with
the probabilities, every class's Grad-CAM at the input resolution and each conv block's activation
maps. Its outputs are packed into one row per image so the generic dynamic batcher can batch it like
any model; `ExplainGraph.unpack` splits them again. Requests that want no block maps go through a
second batcher whose call copies out only the probabilities and the maps. Occlusion needs no extra
graph: its masked copies are ordinary input rows, run by the model's own batcher at low priority
(`serving.core.occlusion`).
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from serving.core import pictures
from serving.core.contract import ModelContract
from serving.core.runtime import ModelLoadError, ModelRuntime, RuntimeOptions

EXPLAIN_FILE = "explain.onnx"
CAM, OCCLUSION = "cam", "occlusion"
METHODS = (CAM, OCCLUSION)
CAPTIONS_KEY = "convserve.explain.block_captions"
_BLOCK = re.compile(r"^block(\d+)$")


@dataclass(frozen=True)
class ExplainOutputs:
    """The explain graph's answer for some rows."""

    probabilities: np.ndarray  # (n, classes)
    cam: np.ndarray  # (n, classes, height, width)
    blocks: list[np.ndarray]  # per block (n, channels, h, w)


class ExplainGraph:
    """One version's explain graph: checked against the model at load, run through its own batcher."""

    def __init__(self, path: Path, options: RuntimeOptions, contract: ModelContract, input_dtype: np.dtype):
        self.runtime = runtime = ModelRuntime(path, options)
        # The explain graph is float32 even beside a float16 model (export writes it from the float
        # network): the model's rows are converted for it, exactly, since float16 values are float32's.
        if runtime.input_dtype.kind != "f" or runtime.input_shape[1:] != list(contract.image_shape):
            raise ModelLoadError(
                f"{path.name}: input {runtime.input_shape} {runtime.input_dtype} does not fit the "
                f"model's {list(contract.image_shape)} {input_dtype}"
            )
        shapes = dict(self.runtime.outputs)
        blocks = sorted((int(m.group(1)), name) for name in shapes if (m := _BLOCK.match(name)))
        self.names = ["probabilities", "cam", *(name for _, name in blocks)]
        missing = [name for name in ("probabilities", "cam") if name not in shapes]
        if missing or not blocks:
            raise ModelLoadError(
                f"{path.name}: outputs {sorted(shapes)}; an explain graph has probabilities, cam, block1, …"
            )
        self.shapes = []
        for name in self.names:
            shape = shapes[name][1:]
            if not all(isinstance(d, int) for d in shape):
                raise ModelLoadError(f"{path.name}: output {name} has a dynamic shape {shapes[name]}")
            self.shapes.append(tuple(shape))
        _, height, width = self.shapes[1]
        if self.shapes[0] != (len(contract.labels),) or (height, width) != (contract.height, contract.width):
            raise ModelLoadError(
                f"{path.name}: probabilities {self.shapes[0]} and cam {self.shapes[1]} do not fit "
                f"{len(contract.labels)} classes at {contract.height}x{contract.width}"
            )
        self.sizes = [int(np.prod(shape)) for shape in self.shapes]
        self.offsets = np.cumsum([0, *self.sizes]).tolist()
        captions = json.loads(self.runtime.metadata.get(CAPTIONS_KEY, "[]"))
        self.captions = [str(c) for c in captions] if isinstance(captions, list) else []

    @property
    def block_count(self) -> int:
        return len(self.names) - 2

    def run_packed(self, batch: np.ndarray, blocks: bool = True) -> np.ndarray:
        """A batch function: the outputs for the rows, one float32 row per image; without `blocks`
        only probabilities and cam (the block maps are not copied out)."""
        names = self.names if blocks else self.names[:2]
        rows = batch.astype(self.runtime.input_dtype, copy=False)
        flat = [
            o.reshape(len(batch), -1).astype(np.float32, copy=False)
            for o in self.runtime.run_outputs(rows, names)
        ]
        return np.concatenate(flat, axis=1)

    def run_cam(self, batch: np.ndarray) -> np.ndarray:
        return self.run_packed(batch, blocks=False)

    def unpack(self, packed: np.ndarray) -> ExplainOutputs:
        """The outputs of `run_packed` (or `run_cam`: then no block maps) for the rows."""
        ends = self.offsets[1:] if packed.shape[1] == self.offsets[-1] else self.offsets[1:3]
        parts = [
            packed[:, start:end].reshape(len(packed), *shape)
            for start, end, shape in zip(self.offsets, ends, self.shapes, strict=False)
        ]
        return ExplainOutputs(parts[0], parts[1], parts[2:])

    def caption(self, block: int, maps: np.ndarray) -> str:
        """The run report's caption for a block's picture (written into the graph at export)."""
        if block <= len(self.captions):
            return self.captions[block - 1]
        return f"block {block} → {' × '.join(str(d) for d in maps.shape)}"


def input_pixels(row: np.ndarray, contract: ModelContract) -> np.ndarray:
    """One input row back to what the model saw, as uint8 (height, width, channels) in RGB order:
    scaling and normalisation undone, padding and crop kept."""
    x = row.astype(np.float32)
    if contract.layout == "NCHW":
        x = x.transpose(1, 2, 0)
    if not contract.raw_pixels:
        if contract.has_normalisation:
            mean, std = (a.reshape(-1) for a in contract.normalisation)
            x = x * std + mean
        x = x / np.float32(contract.scale)
    pixels = np.clip(np.rint(x), 0, 255).astype(np.uint8)
    if contract.fit.channel_order == "BGR":
        pixels = pixels[:, :, ::-1]
    return np.ascontiguousarray(pixels)


def grid_png(maps: np.ndarray, caption: str) -> bytes:
    """A block's maps as one PNG grid, drawn by the run report's own code."""
    image = pictures.grid_image(list(pictures.scale_maps(maps)), caption)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()
