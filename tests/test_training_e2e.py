"""Train on digits, export, and check the ONNX file with ONNX Runtime: parity, metadata, dynamic batch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from serving.core.contract import from_metadata
from training.export import (
    ExportReport,
    ParityCheck,
    VerificationError,
    check_report,
    export_run,
    next_version,
)


def test_training_run_folder(digits_run: Path) -> None:
    metrics = json.loads((digits_run / "metrics.json").read_text())
    assert metrics["test_accuracy"] >= 0.95  # 12 epochs here; the full run reaches 98%+
    assert len(metrics["history"]) == 12
    assert sum(map(sum, metrics["confusion_matrix"])) == metrics["sizes"]["test"]
    assert set(metrics["per_class_test_accuracy"]) == {str(i) for i in range(10)}
    for name in ("checkpoint.pt", "curves.png", "confusion.png", "run.json", "test_split.npz"):
        assert (digits_run / name).stat().st_size > 0


def test_export_is_verified_and_carries_the_contract(model_repo: Path, digit_samples) -> None:
    path = model_repo / "digits" / "1" / "model.onnx"
    proto = onnx.load(str(path))
    contract = from_metadata({p.key: p.value for p in proto.metadata_props})
    assert contract.labels == tuple(str(i) for i in range(10))
    assert (contract.color_mode, contract.height, contract.width, contract.layout) == ("L", 8, 8, "NCHW")
    assert contract.output_kind == "probabilities" and contract.scale == pytest.approx(1 / 255)
    # Every preprocessing field is written, so the file says exactly how our own pixels were made.
    assert {"convserve.resize", "convserve.channel_order", "convserve.resample", "convserve.antialias"} <= {
        p.key for p in proto.metadata_props
    }
    fit = contract.fit
    preprocessing = (fit.resize, fit.channel_order, fit.resample, fit.antialias)
    assert preprocessing == ("stretch", "RGB", "bilinear", True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] not in (1, None) and isinstance(
        session.get_inputs()[0].shape[0], str
    )
    images, labels = digit_samples
    x = images.astype(np.float32) / 255
    for size in (1, 3, 100):
        out = session.run(None, {"image": x[:size]})[0]
        assert out.shape == (size, 10)
        np.testing.assert_allclose(out.sum(1), 1, atol=1e-5)
    accuracy = (session.run(None, {"image": x})[0].argmax(1) == labels).mean()
    assert accuracy >= 0.95


def test_export_report_figures(digits_run: Path, tmp_path: Path) -> None:
    report = export_run(digits_run, tmp_path, "digits", version=7)
    assert report.path == tmp_path / "digits" / "7" / "model.onnx"
    assert [p.name for p in (tmp_path / "digits").iterdir()] == ["7"]  # staged, renamed, nothing left
    assert [p.batch_size for p in report.parity] == [1, 7, 64]
    assert all(p.max_abs_diff <= 1e-5 and p.top1_identical for p in report.parity)
    assert report.onnx_test_accuracy == report.torch_test_accuracy
    assert next_version(tmp_path / "digits") == 8
    with pytest.raises(FileExistsError):
        export_run(digits_run, tmp_path, "digits", version=7)


def test_verification_refuses_a_mismatch() -> None:
    report = ExportReport(Path("m.onnx"), 1, [ParityCheck(7, 3e-4, True)], 0.98, 0.97)
    with pytest.raises(VerificationError, match=r"batch 7: max \|diff\| 3.00e-04.*test accuracy"):
        check_report(report)
