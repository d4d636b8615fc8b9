"""The command lines as a user types them: classify, health, environment configuration, training."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from serving.client import ClassifierClient
from tests.conftest import ROOT, encode

pytestmark = pytest.mark.slow


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def test_classify_prints_a_table_and_json(digits_server, digit_samples, tmp_path: Path) -> None:
    images, labels = digit_samples
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        paths[-1].write_bytes(encode(images[i]))
    (tmp_path / "bad.png").write_bytes(b"nope")
    args = [str(p) for p in paths] + [str(tmp_path / "bad.png"), "--server", digits_server.address]
    table = run("serving", "classify", *args, "--top-k", "2")
    assert table.returncode == 0, table.stderr
    assert table.stdout.count("rank  class  label") == 3 and "error: image 3: not an image" in table.stdout
    as_json = json.loads(run("serving", "classify", *args, "--json").stdout)
    assert [len(r["top_k"]) for r in as_json] == [5, 5, 5, 0]
    assert [r["top_k"][0]["index"] for r in as_json[:3]] == [int(y) for y in labels[:3]]
    missing = run("serving", "classify", str(tmp_path / "none.png"), "--server", digits_server.address)
    assert missing.returncode == 2 and "No such file" in missing.stderr


def test_health_command(digits_server) -> None:
    healthy = run("serving", "health", "--server", digits_server.address)
    assert healthy.returncode == 0 and healthy.stdout.strip() == "SERVING"


def test_flags_come_from_the_environment(model_repo, server_factory) -> None:
    server = server_factory(
        model_repo, env={"CONVSERVE_MAX_BATCH_SIZE": "7", "CONVSERVE_MAX_QUEUE_SIZE": "99"}
    )
    with ClassifierClient(server.address) as client:
        batching = client.get_model("digits").batching
    assert (batching.max_batch_size, batching.max_queue_size) == (7, 99)
    assert "max_batch_size=7" in server.log()  # the whole config is printed at start-up


def test_train_and_export_a_folder_dataset(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for name, value in (("dark", 30), ("light", 220)):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(12):
            pixels = np.clip(rng.normal(value, 20, (20, 24, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / "data" / name / f"{i}.jpg")
    out = tmp_path / "run"
    trained = run(
        "training",
        "train",
        "--dataset",
        f"folder:{tmp_path / 'data'}",
        "--out",
        str(out),
        "--epochs",
        "3",
        "--size",
        "16",
    )
    assert trained.returncode == 0, trained.stderr
    assert json.loads((out / "metrics.json").read_text())["test_accuracy"] == 1.0
    exported = run(
        "training", "export", str(out), "--repository", str(tmp_path / "models"), "--name", "shade"
    )
    assert exported.returncode == 0, exported.stderr
    assert "batch  64: max |onnxruntime - torch|" in exported.stdout
    assert (tmp_path / "models" / "shade" / "1" / "model.onnx").exists()
    empty = run(
        "training", "train", "--dataset", f"folder:{tmp_path / 'nothing'}", "--out", str(tmp_path / "x")
    )
    assert empty.returncode == 2 and "does not exist" in empty.stderr


@pytest.mark.parametrize("package", ["serving", "training"])
def test_version_is_the_installed_package_s(package: str) -> None:
    import importlib.metadata

    done = subprocess.run(
        [sys.executable, "-m", package, "--version"], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"convserve {importlib.metadata.version('convserve')}"
