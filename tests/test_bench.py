"""The benchmark command runs end to end and writes its report; speed itself is never asserted here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from training.reference import build_reference

pytestmark = pytest.mark.slow


def test_reference_models_export_with_the_contract(tmp_path: Path) -> None:
    path = build_reference("resnet18", tmp_path)
    assert path == tmp_path / "resnet18" / "1" / "model.onnx"
    import onnxruntime as ort

    session = ort.InferenceSession(str(path))
    assert session.get_inputs()[0].shape[1:] == [3, 32, 32]
    assert session.get_modelmeta().custom_metadata_map["convserve.reference"] == "resnet18"
    assert build_reference("resnet18", tmp_path) == path  # kept, not rebuilt


def test_bench_writes_a_report_with_ratios(model_repo: Path, tmp_path: Path) -> None:
    out, raw = tmp_path / "RESULTS.md", tmp_path / "results.json"
    scenarios = ["--scenario", "unary c1 png", "--scenario", "unary c1 tensor", "--scenario", "echo c1"]
    scenarios += ["--scenario", "kserve c1 png", "--scenario", "kserve c1 tensor"]
    files = ["--out", str(out), "--json", str(raw)]
    command = [sys.executable, "-m", "serving", "bench", "--models", str(model_repo), "--model", "digits"]
    command += ["--duration", "0.3", "--rounds", "2", *scenarios, *files]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(raw.read_text())
    (summary,) = report["results"]
    assert set(summary["limit"]) == {"1", "4", "16", "32"}
    assert set(summary["scenarios"]) == {
        "unary c1 png",
        "unary c1 tensor",
        "echo c1",
        "kserve c1 png",
        "kserve c1 tensor",
    }
    for name, scenario in summary["scenarios"].items():
        assert scenario["images_per_s"] > 0 and scenario["errors"] == 0, name
        assert scenario["p50_ms"] <= scenario["p99_ms"]
    assert summary["scenarios"]["unary c1 png"]["mean_batch"] == 1.0
    assert summary["scenarios"]["unary c1 png"]["ratio_to_limit"] > 0
    text = out.read_text()
    assert "Command: `python -m serving bench" in text and "| unary c1 tensor |" in text
    assert "c1 png p50 ≤ in-process batch-1 + 1 ms" in text


def test_bench_runs_the_http_scenarios_beside_grpc(model_repo: Path, tmp_path: Path) -> None:
    """Every HTTP form (binary tensor data with tensors and PNGs, JSON tensors, curl's :classify) from the
    same load generator, against the server's HTTP port, with no failed request; the report compares
    them with the gRPC Open Inference Protocol path."""
    out, raw = tmp_path / "HTTP.md", tmp_path / "http.json"
    names = ["kserve c1 tensor", "http c1 tensor", "http c1 png", "http-json c1 tensor"]
    names += ["http-classify c1 png", "kserve c64 tensor", "http c64 tensor", "http-json c64 tensor"]
    command = [sys.executable, "-m", "serving", "bench", "--models", str(model_repo), "--model", "digits"]
    command += ["--duration", "0.3", "--rounds", "1", "--out", str(out), "--json", str(raw)]
    for name in names:
        command += ["--scenario", name]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    (summary,) = json.loads(raw.read_text())["results"]
    assert set(summary["scenarios"]) == set(names)
    for name, scenario in summary["scenarios"].items():
        assert scenario["images_per_s"] > 0 and scenario["errors"] == 0, name
    assert summary["scenarios"]["http c1 tensor"]["mean_batch"] == 1.0  # the server counted them
    text = out.read_text()
    assert "| digits: http c64 tensor ≥ 0.9× kserve c64 tensor (gRPC) |" in text
    assert "| digits: http-json c64 tensor / http c64 tensor (recorded) | – |" in text
    assert "http c1 tensor p50 ≤ kserve c1 tensor p50 + 0.5 ms" in text


def test_bench_explain_writes_the_cost_and_priority_figures(model_repo: Path, tmp_path: Path) -> None:
    out = tmp_path / "EXPLAIN.md"
    command = [sys.executable, "-m", "serving", "bench", "--explain", "--models", str(model_repo)]
    command += ["--model", "digits", "--duration", "0.2", "--rounds", "1", "--out", str(out)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    text = out.read_text()
    assert "Command: `python -m serving bench --explain" in text
    for row in (
        "| digits | classify c1 |",
        "| digits | explain cam c1 |",
        "| digits | classify c16 + 2 occlusion |",
    ):
        assert row in text, text
    assert "| digits | occlusion per image | " in text and "for 49 copies" in text
    assert "| digits | explain cam / classify, c1 p50 |" in text
