"""ONNX export into the model repository, with the model contract and an enforced verification.

`MODELS/<name>/<version>/model.onnx`: dynamic batch axis, normalisation and softmax inside the graph,
`metadata_props` carrying the contract (labels, colour mode, size, scale, output kind). The export is
refused (and its folder removed) unless the checker passes and ONNX Runtime matches PyTorch.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from serving.core.contract import ModelContract
from training.model import ProbabilitiesModel
from training.train import TEST_SPLIT, load_run, to_tensor

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
PARITY_BATCH_SIZES = (1, 7, 64)
MAX_ABS_DIFF = 1e-5
OPSET = 18


class VerificationError(RuntimeError):
    """The exported graph does not reproduce the PyTorch model."""


@dataclass(frozen=True)
class ParityCheck:
    batch_size: int
    max_abs_diff: float
    top1_identical: bool


@dataclass(frozen=True)
class ExportReport:
    path: Path
    version: int
    parity: list[ParityCheck]
    torch_test_accuracy: float
    onnx_test_accuracy: float


def next_version(model_dir: Path) -> int:
    versions = [int(p.name) for p in model_dir.glob("*") if p.is_dir() and p.name.isdigit()]
    return max(versions, default=0) + 1


def export_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    """Writes the graph with a dynamic batch axis named `batch`."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.onnx.export(
        model,
        (example,),
        dynamo=True,
        input_names=["image"],
        output_names=["probabilities"],
        dynamic_shapes={"x": {0: batch}},
        opset_version=OPSET,
        external_data=False,
    )
    program.save(str(path), external_data=False)


def write_metadata(path: Path, metadata: dict[str, str]) -> None:
    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    for key, value in sorted(metadata.items()):
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(path))


def verify(path: Path, model: torch.nn.Module, images: np.ndarray, labels: np.ndarray) -> ExportReport:
    """Checker, then ONNX Runtime vs PyTorch at several batch sizes, then test accuracy on both."""
    onnx.checker.check_model(str(path), full_check=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name

    def run_both(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = to_tensor(batch)
        with torch.no_grad():
            expected = model(x).numpy()
        return expected, session.run(None, {input_name: x.numpy()})[0]

    parity = []
    for size in PARITY_BATCH_SIZES:
        batch = np.resize(images, (size, *images.shape[1:]))  # repeats test images when there are fewer
        expected, got = run_both(batch)
        parity.append(
            ParityCheck(
                size, float(np.abs(expected - got).max()), bool((expected.argmax(1) == got.argmax(1)).all())
            )
        )
    torch_correct = onnx_correct = 0
    for start in range(0, len(images), 256):
        expected, got = run_both(images[start : start + 256])
        truth = labels[start : start + 256]
        torch_correct += int((expected.argmax(1) == truth).sum())
        onnx_correct += int((got.argmax(1) == truth).sum())
    version = int(path.parent.name) if path.parent.name.isdigit() else 0
    return ExportReport(path, version, parity, torch_correct / len(labels), onnx_correct / len(labels))


def check_report(report: ExportReport) -> None:
    failures = [
        f"batch {p.batch_size}: max |diff| {p.max_abs_diff:.2e} (limit {MAX_ABS_DIFF:.0e}), top-1 identical "
        f"{p.top1_identical}"
        for p in report.parity
        if p.max_abs_diff > MAX_ABS_DIFF or not p.top1_identical
    ]
    if report.onnx_test_accuracy != report.torch_test_accuracy:
        failures.append(
            f"test accuracy {report.onnx_test_accuracy} (ONNX) != {report.torch_test_accuracy} (PyTorch)"
        )
    if failures:
        raise VerificationError("ONNX export does not match PyTorch: " + "; ".join(failures))


def export_run(run_dir: Path, repository: Path, name: str, version: int | None = None) -> ExportReport:
    """Exports a finished run into `repository/name/version/model.onnx` and verifies it."""
    info, net = load_run(run_dir)
    model = ProbabilitiesModel(net).eval()
    version = version if version is not None else next_version(repository / name)
    target_dir = repository / name / str(version)
    if target_dir.exists():
        raise FileExistsError(f"{target_dir} already exists: choose another --version or none for the next")
    test = np.load(run_dir / TEST_SPLIT)
    images, labels = test["images"], test["labels"]
    contract = ModelContract(
        labels=tuple(info.class_names),
        color_mode=info.color_mode,  # type: ignore[arg-type]
        height=info.height,
        width=info.width,
        layout="NCHW",
        scale=1.0 / 255.0,
        output_kind="probabilities",
        extra={"dataset": info.dataset},
    )
    target_dir.mkdir(parents=True)
    path = target_dir / MODEL_FILE
    try:
        export_onnx(model, to_tensor(images[:2]), path)
        write_metadata(path, contract.to_metadata())
        report = verify(path, model, images, labels)
        check_report(report)
    except BaseException:
        shutil.rmtree(target_dir, ignore_errors=True)
        raise
    return report
