"""The model repository on disk: `MODELS/<name>/<version>/model.onnx`."""

from __future__ import annotations

from pathlib import Path

from serving.core.model import MODEL_FILE


def discover(root: Path) -> dict[str, dict[int, Path]]:
    """{name: {version: path to model.onnx}} for every `root/<name>/<int>/model.onnx`."""
    found: dict[str, dict[int, Path]] = {}
    for model_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        versions = {
            int(v.name): v / MODEL_FILE
            for v in model_dir.iterdir()
            if v.is_dir() and v.name.isdigit() and int(v.name) > 0 and (v / MODEL_FILE).is_file()
        }
        if versions:
            found[model_dir.name] = dict(sorted(versions.items()))
    return found
