"""The preprocessing certificate: real image files exported beside the model with what training made
of them, so the server can prove at load that it turns them into the same input and probabilities.

`fixtures/` in the version folder holds the files and `manifest.json` (format in
docs/guides/calibration.md; the server's side is serving/core/certificate.py): for each file, the
SHA-256 of the exact input row training made (float32, C order, little-endian, the model's layout),
that row itself as `<file>.npy` (so a mismatch can say by how much) and model.onnx's probabilities.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from PIL import Image

from serving.core.contract import FIXTURES_DIR, FIXTURES_FORMAT, FIXTURES_MANIFEST
from training.datasets import image_file_pixels
from training.train import to_tensor


def fixture_images(images: np.ndarray, color_mode: str) -> dict[str, bytes]:
    """Four encoded files from test images (C, H, W uint8): PNG and JPEG at the model's size and colour
    mode, and PNG and JPEG at a foreign size (3:2 larger, odd sides) in the other colour mode, so the
    resize and the colour conversion are exercised too."""
    files: dict[str, bytes] = {}
    other = "RGB" if color_mode == "L" else "L"
    for number, (image, fmt, foreign) in enumerate(
        [
            (images[0], "PNG", False),
            (images[1], "JPEG", False),
            (images[2], "PNG", True),
            (images[3], "JPEG", True),
        ],
        start=1,
    ):
        picture = Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0))
        if foreign:
            height, width = image.shape[1:]
            picture = picture.convert(other).resize(
                (width * 3 // 2 + 1, height * 2 + 1), Image.Resampling.BICUBIC
            )
        else:
            picture = picture.convert(color_mode)
        buffer = io.BytesIO()
        picture.save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        files[f"{number}.{'png' if fmt == 'PNG' else 'jpg'}"] = buffer.getvalue()
    return files


def input_sha256(row: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(row, dtype="<f4").tobytes()).hexdigest()


def write_fixtures(
    version_dir: Path, model_path: Path, images: np.ndarray, color_mode: str, height: int, width: int
) -> list[str]:
    """Writes `version_dir/fixtures/` from test images; returns the file names. Training's own decoding
    (`image_file_pixels`, as for a folder dataset) makes each input row; model.onnx as exported (any
    precision) makes the probabilities."""
    folder = version_dir / FIXTURES_DIR
    folder.mkdir()
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    spec = session.get_inputs()[0]
    dtype = np.float16 if spec.type == "tensor(float16)" else np.float32
    entries: list[dict[str, Any]] = []
    for name, data in fixture_images(images, color_mode).items():
        (folder / name).write_bytes(data)
        row = to_tensor(image_file_pixels(folder / name, color_mode, height, width)).numpy()  # type: ignore[arg-type]
        np.save(folder / f"{name}.npy", row)
        probabilities = session.run(None, {spec.name: row[None].astype(dtype)})[0][0].astype(np.float32)
        entries.append(
            {
                "file": name,
                "input_sha256": input_sha256(row),
                "input": f"{name}.npy",
                "probabilities": [float(p) for p in probabilities],
            }
        )
    manifest = {"format": FIXTURES_FORMAT, "fixtures": entries}
    (folder / FIXTURES_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return [entry["file"] for entry in entries]
