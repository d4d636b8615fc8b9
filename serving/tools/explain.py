"""`python -m serving explain IMAGE... --out DIR`: why the served model answers what it does, as files.

For each image (in DIR itself for one image, else in DIR/<n>_<file stem>/):
  input.png          the image as the model saw it (after resize, letterbox or crop), enlarged
  cam.png            the class activation map over it (where the version has an explain graph)
  occlusion.png      the occlusion map over it
  cam.npy, occlusion.npy   the maps themselves, float32 at the model's input resolution
  block1.png, …      each conv block's activation maps, drawn by the run report's own code
  explanation.json   top-k, the class explained, the methods, the occlusion settings
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from protos.convserve.v1 import convserve_pb2 as pb
from serving.client import ClassifierClient, Connection, tensor_to_array
from serving.core.pictures import overlay

DISPLAY_PX = 224  # pictures are enlarged (whole pixels, nearest) to about this size


def enlarge(pixels: np.ndarray) -> Image.Image:
    """uint8 (H, W, C) shown with every input pixel as a zoom x zoom block."""
    zoom = max(1, DISPLAY_PX // max(pixels.shape[:2]))
    big = pixels.repeat(zoom, axis=0).repeat(zoom, axis=1)
    return Image.fromarray(big[:, :, 0] if big.shape[2] == 1 else big)


def folder_for(out: Path, index: int, path: str, count: int) -> Path:
    if count == 1:
        return out
    return out / f"{index:02d}_{re.sub(r'[^A-Za-z0-9_.-]+', '_', Path(path).stem)}"


def write_explanation(folder: Path, image: pb.ImageExplanation, response: pb.ExplainResponse) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    pixels = tensor_to_array(image.model_input)
    written = [folder / "input.png"]
    enlarge(pixels).save(written[-1])
    for heat in image.maps:
        values = tensor_to_array(heat.map)
        written.append(folder / f"{heat.method}.npy")
        np.save(written[-1], values)
        written.append(folder / f"{heat.method}.png")
        enlarge(overlay(pixels, values)).save(written[-1])
    for block in image.blocks:
        if block.grid_png:
            written.append(folder / f"block{block.block}.png")
            written[-1].write_bytes(block.grid_png)
    summary = {
        "model": response.model,
        "version": response.version,
        "methods": list(response.methods),
        "class_index": image.class_index,
        "label": image.label,
        "top_k": [
            {"index": i, "label": label, "probability": p}
            for i, label, p in zip(
                image.result.class_index, image.result.label, image.result.probability, strict=True
            )
        ],
        "occlusion": {"patch": response.occlusion.patch, "stride": response.occlusion.stride}
        if response.HasField("occlusion")
        else None,
        "blocks": [block.caption for block in image.blocks],
    }
    written.append(folder / "explanation.json")
    written[-1].write_text(json.dumps(summary, indent=2) + "\n")
    return written


def explain_files(
    paths: Sequence[str],
    out: Path,
    server: str,
    model: str,
    version: int,
    methods: Sequence[str],
    class_index: int | None,
    timeout: float,
    connection: Connection | None = None,
) -> tuple[str, int]:
    """Writes the files; returns the lines to print and how many images failed."""
    with ClassifierClient(server, timeout=timeout, connection=connection) as client:
        if not methods:  # every method the version offers
            methods = list(client.get_model(model, version).explain_methods)
        response = client.explain(
            [Path(p) for p in paths],
            model,
            version,
            methods=methods,
            class_index=class_index,
            activation_grids="cam" in methods,
        )
    lines, failed = [], 0
    for index, (path, image) in enumerate(zip(paths, response.images, strict=True)):
        if image.result.HasField("error"):
            lines.append(f"{path}: error: {image.result.error.message}")
            failed += 1
            continue
        folder = folder_for(out, index, path, len(paths))
        written = write_explanation(folder, image, response)
        top = image.result
        lines.append(
            f"{path}: {top.label[0]} ({top.probability[0]:.4f}); explained class {image.label}; "
            f"{len(written)} files in {folder}"
        )
    return "\n".join(lines), failed
