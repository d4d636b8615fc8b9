"""The preprocessing certificate: an unmodified export loads READY; a fixture one pixel off (what a
server decoding differently would produce) makes the version UNAVAILABLE with the reason, unless the
server is started with --allow-preprocessing-drift, which serves it and says so in GetModel, the Open
Inference Protocol's model configuration and a metric. Real server processes, real exported files."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from serving.client.grpc_client import ClassifierClient
from serving.core.batch_settings import BatchingConfig
from serving.core.model import load_model
from serving.core.runtime import ModelLoadError, RuntimeOptions

MODEL = "digits"


@pytest.fixture
def copied(model_repo: Path, tmp_path: Path) -> Path:
    repo = tmp_path / "models"
    shutil.copytree(model_repo, repo)
    return repo


def nudge_one_pixel(path: Path, by: int = 3) -> None:
    """Re-encodes a PNG fixture with one pixel `by` levels brighter (or darker where it cannot be)."""
    pixels = np.array(Image.open(path))
    y, x = np.unravel_index(np.argmin(np.abs(pixels.astype(int) - 128)), pixels.shape[:2])
    pixels[y, x] = pixels[y, x] + by if pixels[y, x] <= 255 - by else pixels[y, x] - by
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    path.write_bytes(buffer.getvalue())


def load(repo: Path, allow: bool = False):
    return load_model(
        MODEL,
        1,
        repo / MODEL / "1" / "model.onnx",
        RuntimeOptions(device="cpu", intra_op_threads=1, allow_preprocessing_drift=allow),
        BatchingConfig(),
    )


def test_export_writes_fixtures_the_server_reproduces(model_repo: Path, server_factory) -> None:
    manifest = json.loads((model_repo / MODEL / "1" / "fixtures" / "manifest.json").read_text())
    files = [entry["file"] for entry in manifest["fixtures"]]
    assert files == ["1.png", "2.jpg", "3.png", "4.jpg"]
    # The foreign-size fixtures are RGB and not 8x8: the certificate covers the resize and the conversion.
    with Image.open(model_repo / MODEL / "1" / "fixtures" / "3.png") as image:
        assert image.mode == "RGB" and image.size != (8, 8)
    server = server_factory(model_repo)
    with ClassifierClient(server.address) as client:
        info = client.get_model(MODEL)
    assert info.state == "READY"
    assert info.preprocessing == "passed: 4 fixtures"
    assert info.abstain_threshold > 0  # an energy score here (tests/test_abstain.py): not a probability
    assert {"temperature", "ece_before", "ece_after", "abstain_score"} <= set(info.metadata)
    assert info.metadata["abstain_score"] == "energy"


def test_a_fixture_one_pixel_off_refuses_the_version(copied: Path, server_factory) -> None:
    nudge_one_pixel(copied / MODEL / "1" / "fixtures" / "1.png")
    server = server_factory(copied)
    with ClassifierClient(server.address) as client:
        info = client.get_model(MODEL)
    assert info.state == "UNAVAILABLE"
    assert "preprocessing differs from training: fixture 1.png, max |Δpixel| = 3/255" in info.reason
    assert "Traceback" not in server.log()


def test_allowed_drift_serves_and_says_so(copied: Path, server_factory) -> None:
    nudge_one_pixel(copied / MODEL / "1" / "fixtures" / "1.png")
    server = server_factory(copied, "--allow-preprocessing-drift", metrics=True, http=True)
    with ClassifierClient(server.address) as client:
        info = client.get_model(MODEL)
    assert info.state == "READY"
    assert info.preprocessing.startswith("drift: fixture 1.png, max |Δpixel| = 3/255")
    metrics = httpx.get(f"http://{server.metrics_address}/metrics", timeout=10).text
    assert 'convserve_preprocessing_drift{model="digits",version="1"} 1.0' in metrics
    config = httpx.get(f"{server.http_url}/v2/models/{MODEL}/config", timeout=10).json()
    assert config["parameters"]["preprocessing"]["string_value"].startswith("drift: fixture 1.png")
    assert "served anyway" in server.log()


def test_probabilities_off_by_more_than_1e_5_refuse_the_version(copied: Path) -> None:
    path = copied / MODEL / "1" / "fixtures" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["fixtures"][1]["probabilities"][0] += 2e-5
    path.write_text(json.dumps(manifest))
    with pytest.raises(ModelLoadError, match=r"fixture 2\.jpg, max \|Δprobability\| = 2\.0\de-05"):
        load(copied)


def test_a_malformed_manifest_is_refused_with_a_clear_reason(copied: Path) -> None:
    path = copied / MODEL / "1" / "fixtures" / "manifest.json"
    path.write_text(json.dumps({"format": 1, "fixtures": [{"file": "../model.onnx"}]}))
    with pytest.raises(ModelLoadError, match="each fixture needs file, input_sha256"):
        load(copied)
    path.write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"cannot read fixtures/manifest\.json"):
        load(copied, allow=True)  # allowing drift does not excuse an unreadable certificate


def test_a_version_without_fixtures_loads_and_says_none(copied: Path) -> None:
    shutil.rmtree(copied / MODEL / "1" / "fixtures")
    model = load(copied)
    assert model.preprocessing == "none"
