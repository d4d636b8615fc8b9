"""The abstain flag: noise is flagged far more often than held-out digits, and the flag and the score
reach clients over every protocol of a real server process (convserve.v1 gRPC, its REST JSON, the Open
Inference Protocol over gRPC with tritonclient and over REST)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from serving.client.grpc_client import ClassifierClient
from serving.tools.launch import LaunchedServer
from tests.conftest import encode, start_server
from training.train import to_tensor

MODEL = "digits"


def threshold_of(model_repo: Path) -> float:
    props = onnx.load(str(model_repo / MODEL / "1" / "model.onnx")).metadata_props
    return float(next(p.value for p in props if p.key == "convserve.abstain_threshold"))


def scores(model_repo: Path, images: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(
        str(model_repo / MODEL / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    return session.run(None, {"image": to_tensor(images).numpy()})[0].max(axis=1)


def noise(count: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(count, 1, 8, 8), dtype=np.uint8)


@pytest.fixture(scope="module")
def server(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LaunchedServer]:
    launched = start_server(model_repo, tmp_path_factory.mktemp("abstain"), "--max-delay-ms", "2", http=True)
    yield launched
    launched.stop()
    assert "Traceback" not in launched.log()


def test_noise_is_flagged_far_more_often_than_held_out_digits(
    model_repo: Path, digit_samples: tuple[np.ndarray, np.ndarray], server: LaunchedServer
) -> None:
    threshold = threshold_of(model_repo)
    images, _ = digit_samples
    pictures = noise(200)
    with ClassifierClient(server.address) as client:
        digits = [
            r
            for start in range(0, len(images), 200)
            for r in client.classify([encode(image) for image in images[start : start + 200]], MODEL)
        ]
        noisy = client.classify([encode(image) for image in pictures[:200]], MODEL)
    digit_rate = np.mean([r.abstain for r in digits])
    noise_rate = np.mean([r.abstain for r in noisy])
    print(
        f"threshold {threshold:.4f}: held-out digits flagged {digit_rate:.1%}, uniform noise {noise_rate:.1%}"
    )
    assert digit_rate <= 0.05  # the threshold keeps 99 % of validation images
    assert noise_rate >= 3 * max(digit_rate, 0.01)
    # The score is the top probability, and the flag is exactly score < threshold.
    for result in [*digits, *noisy]:
        assert result.score == pytest.approx(result.top.probability, abs=1e-7)
        assert result.abstain == (np.float32(result.score) < np.float32(threshold))


def test_the_flag_reaches_every_protocol(
    model_repo: Path, digit_samples: tuple[np.ndarray, np.ndarray], server: LaunchedServer
) -> None:
    tritonclient = pytest.importorskip("tritonclient.grpc")
    threshold = threshold_of(model_repo)
    candidates = noise(300)
    unsure = candidates[scores(model_repo, candidates).argmin()]  # the least confident noise image
    images, _ = digit_samples
    sure = images[scores(model_repo, images).argmax()]
    assert scores(model_repo, unsure[None])[0] < threshold <= scores(model_repo, sure[None])[0]
    files = [encode(unsure), encode(sure)]
    expected = [True, False]

    with ClassifierClient(server.address) as client:  # convserve.v1 over gRPC
        assert [r.abstain for r in client.classify(files, MODEL)] == expected

    rest = httpx.post(  # convserve.v1 over REST: ClassifyResponse as JSON
        f"{server.http_url}/v1/models/{MODEL}:classify", files=[("image", f) for f in files], timeout=30
    )
    assert rest.status_code == 200, rest.text
    results = rest.json()["results"]
    assert [r["abstain"] for r in results] == expected  # written even when false
    assert all(r["score"] == pytest.approx(r["probability"][0], abs=1e-6) for r in results)

    with tritonclient.InferenceServerClient(server.address) as triton:  # Open Inference Protocol, gRPC
        data = tritonclient.InferInput("image_bytes", [2, 1], "BYTES")
        data.set_data_from_numpy(np.array([[f] for f in files], dtype=object))
        answer = triton.infer(MODEL, [data]).get_response()
        parameters = answer.parameters
        assert json.loads(parameters["abstain"].string_param) == expected
        assert len(json.loads(parameters["score"].string_param)) == 2

    body = {  # Open Inference Protocol, REST: a raw FP32 tensor in JSON
        "inputs": [
            {
                "name": "image",
                "datatype": "FP32",
                "shape": [2, 1, 8, 8],
                "data": to_tensor(np.stack([unsure, sure])).numpy().ravel().tolist(),
            }
        ]
    }
    v2 = httpx.post(f"{server.http_url}/v2/models/{MODEL}/infer", json=body, timeout=30)
    assert v2.status_code == 200, v2.text
    answer = v2.json()
    assert "parameters" not in answer["outputs"][0]  # perf_analyzer reads those as binary data's
    assert json.loads(answer["parameters"]["abstain"]) == expected
