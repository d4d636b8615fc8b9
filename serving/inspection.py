"""`python -m serving inspect MODEL.onnx`: what a graph says about itself, and a starting `model.json`.

Prints the graph's inputs and outputs (names, dtypes, shapes), its metadata, and a sidecar for the
user to edit. JSON has no comments, so the fields that could not be read from the graph are listed in
the sidecar's own `"_guessed"` key (keys starting with `_` are ignored by the server): check each,
then delete the list. With `--sidecar` only the JSON is printed, ready to redirect into `model.json`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import onnxruntime as ort

from serving.core.contract import ContractError, from_metadata, has_contract

# Metadata keys that published models use for their class names (PaddleOCR/PaddleClas: `character`).
LABEL_KEYS = ("labels", "classes", "class_names", "names", "character")


def add_inspect_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=Path, help="an ONNX file")
    parser.add_argument("--sidecar", action="store_true", help="print only the starting model.json")


def run_inspect(args: argparse.Namespace) -> int:
    try:
        session = ort.InferenceSession(str(args.model), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own types for a missing or corrupt file
        print(f"error: cannot load {args.model}: {exc}")
        return 2
    sidecar = starting_sidecar(session, producers(args.model))
    if args.sidecar:
        print(json.dumps(sidecar, indent=2))
        return 0
    print(describe(session))
    print("\nstarting model.json (edit it; `_guessed` lists what the graph does not say, check each):")
    print(json.dumps(sidecar, indent=2))
    return 0


def shape_text(shape: list) -> str:
    return "[" + ", ".join(str(d) if isinstance(d, int) else (d or "?") for d in shape) + "]"


def describe(session: ort.InferenceSession) -> str:
    lines = ["inputs:"]
    lines += [f"  {i.name}  {i.type}  {shape_text(i.shape)}" for i in session.get_inputs()]
    lines.append("outputs:")
    lines += [f"  {o.name}  {o.type}  {shape_text(o.shape)}" for o in session.get_outputs()]
    metadata = session.get_modelmeta().custom_metadata_map
    lines.append("metadata:" if metadata else "metadata: none")
    for key, value in sorted(metadata.items()):
        text = value if len(value) <= 200 else value[:200] + f"… ({len(value)} characters)"
        lines.append(f"  {key}: {text!r}")
    return "\n".join(lines)


def producers(path: Path) -> dict[str, str]:
    """Output name → the op that computes it, when the `onnx` package is there to read the graph."""
    try:
        import onnx
    except ImportError:
        return {}
    graph = onnx.load(str(path), load_external_data=False).graph
    return {out: node.op_type for node in graph.node for out in node.output}


def input_geometry(shape: list[Any]) -> tuple[str, int | None, int | None, int | None, list[str]]:
    """Layout, channels, height and width from the input's shape, and the fields it had to guess
    (a size the graph leaves symbolic, a layout with no 1- or 3-channel axis)."""
    guessed: list[str] = []
    dims = [d if isinstance(d, int) else None for d in shape[1:]]
    layout = "NCHW"
    if len(dims) == 3 and dims[0] not in (1, 3) and dims[2] in (1, 3):
        layout = "NHWC"
    if len(dims) != 3 or (dims[0] not in (1, 3) and dims[2] not in (1, 3)):
        guessed.append("layout")
    channels, height, width = (dims[0], dims[1], dims[2]) if layout == "NCHW" else (dims[2], dims[0], dims[1])
    if channels not in (1, 3):
        guessed.append("color_mode")
    if height is None or width is None:
        guessed += ["height", "width"]
    return layout, channels, height, width, guessed


def starting_sidecar(session: ort.InferenceSession, ops: dict[str, str]) -> dict[str, Any]:
    """A sidecar from what the graph says; every field it had to guess is named in `_guessed`."""
    metadata = session.get_modelmeta().custom_metadata_map
    if has_contract(metadata):
        try:
            return {**from_metadata(metadata).to_fields(), "_guessed": []}
        except ContractError:
            pass  # a broken contract: guess as for any other model
    model_input = session.get_inputs()[0]
    layout, channels, height, width, guessed = input_geometry(list(model_input.shape))
    uint8 = model_input.type == "tensor(uint8)"
    outputs = session.get_outputs()
    # The classes: an output computed by a softmax, else the last (N, classes) one (heads come last).
    candidates = [
        o for o in outputs if len(o.shape) == 2 and isinstance(o.shape[-1], int) and o.shape[-1] > 1
    ]
    softmaxed = [o for o in candidates if ops.get(o.name) in ("Softmax", "LogSoftmax")]
    output = (softmaxed or candidates or outputs)[-1]
    if len(outputs) > 1:
        guessed.append("output")
    op = ops.get(output.name)
    kind = {"Softmax": "probabilities", "LogSoftmax": "log-probabilities"}.get(op or "", "logits")
    if op not in ("Softmax", "LogSoftmax"):
        guessed.append("output_kind")
    classes = output.shape[-1] if output.shape and isinstance(output.shape[-1], int) else None
    labels, label_key = labels_from(metadata, classes)
    if label_key is None:
        guessed.append("labels")
    guessed += ["channel_order", "resize", "resample", "antialias"]
    if not uint8:
        guessed += ["scale", "mean", "std"]
    sidecar: dict[str, Any] = {
        "labels": labels,
        "color_mode": "L" if channels == 1 else "RGB",
        "channel_order": "RGB",
        "height": height or 224,
        "width": width or 224,
        "layout": layout,
        "resize": "stretch",
        "resample": "bilinear",
        "antialias": True,
        "scale": 1.0 if uint8 else 1 / 255,
        "mean": [0.0],
        "std": [1.0],
    }
    if len(outputs) > 1:
        sidecar["output"] = output.name
    sidecar["output_kind"] = kind
    sidecar["_guessed"] = guessed
    if label_key is not None:
        sidecar["_labels_from"] = f"metadata key {label_key!r}"
    return sidecar


def labels_from(metadata: dict[str, str], classes: int | None) -> tuple[list[str], str | None]:
    """Class names from a metadata key holding exactly one per class (a JSON list, or one per line)."""
    for key in LABEL_KEYS:
        value = metadata.get(key)
        if value is None:
            continue
        try:
            parsed = json.loads(value)
            names = [str(v) for v in parsed] if isinstance(parsed, list) else None
        except json.JSONDecodeError:
            names = [line for line in value.splitlines() if line.strip()]
        if names and (classes is None or len(names) == classes):
            return names, key
    return [str(i) for i in range(classes or 0)], None
