"""The abstain flag: noise is flagged far more often than held-out digits, and the flag and the score
reach clients over every protocol of a real server process (convserve.v1 gRPC, its REST JSON, the Open
Inference Protocol over gRPC with tritonclient and over REST).

The session's digits export chooses its score itself (`--abstain-score auto`: the energy score for that
run, a second graph output); a second export made with `--abstain-score msp` serves the top probability.
"""

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
from training.export import export_run
from training.train import to_tensor

MODEL = "digits"


def metadata_of(model_repo: Path, version: int = 1) -> dict[str, str]:
    props = onnx.load(str(model_repo / MODEL / str(version) / "model.onnx")).metadata_props
    return {p.key: p.value for p in props}


def threshold_of(model_repo: Path, version: int = 1) -> float:
    return float(metadata_of(model_repo, version)["convserve.abstain_threshold"])


def scores(model_repo: Path, images: np.ndarray, version: int = 1) -> np.ndarray:
    """The graph's own abstain scores: its `score` output where it has one, else the top probability."""
    session = ort.InferenceSession(
        str(model_repo / MODEL / str(version) / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    outputs = session.run(None, {"image": to_tensor(images).numpy()})
    return outputs[1] if len(outputs) == 2 else outputs[0].max(axis=1)


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
    # The score is the graph's energy output, image by image, and the flag is exactly score < threshold.
    assert metadata_of(model_repo)["convserve.score_output"] == "score"
    expected = scores(model_repo, np.concatenate([images, pictures[:200]]))
    served = np.array([r.score for r in [*digits, *noisy]], dtype=np.float32)
    np.testing.assert_allclose(served, expected, rtol=1e-5)
    assert not np.allclose(served, [r.top.probability for r in [*digits, *noisy]], atol=1e-3)
    for result in [*digits, *noisy]:
        assert result.abstain == (np.float32(result.score) < np.float32(threshold))


def test_an_msp_export_serves_the_top_probability_as_its_score(
    digits_run: Path, digit_samples: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    export_run(digits_run, tmp_path, MODEL, 1, explain=False, abstain_score="msp")
    meta = metadata_of(tmp_path)
    assert meta["convserve.abstain_score"] == "msp" and "convserve.score_output" not in meta
    threshold = threshold_of(tmp_path)
    assert 0 < threshold < 1
    images, _ = digit_samples
    launched = start_server(tmp_path, tmp_path / "logs", "--max-delay-ms", "2")
    try:
        with ClassifierClient(launched.address) as client:
            results = client.classify([encode(image) for image in [*images[:20], *noise(20)]], MODEL)
    finally:
        launched.stop()
    assert "Traceback" not in launched.log()
    for result in results:
        assert result.score == pytest.approx(result.top.probability, abs=1e-7)
        assert result.abstain == (np.float32(result.score) < np.float32(threshold))
    assert any(r.abstain for r in results[20:])


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
    want = scores(model_repo, np.stack([unsure, sure]))
    assert [r["score"] for r in results] == pytest.approx(want.tolist(), rel=1e-5)

    with tritonclient.InferenceServerClient(server.address) as triton:  # Open Inference Protocol, gRPC
        data = tritonclient.InferInput("image_bytes", [2, 1], "BYTES")
        data.set_data_from_numpy(np.array([[f] for f in files], dtype=object))
        answer = triton.infer(MODEL, [data]).get_response()
        parameters = answer.parameters
        assert json.loads(parameters["abstain"].string_param) == expected
        assert json.loads(parameters["score"].string_param) == pytest.approx(want.tolist(), rel=1e-5)

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
    assert json.loads(answer["parameters"]["score"]) == pytest.approx(want.tolist(), rel=1e-5)
    assert [o["name"] for o in answer["outputs"]] == ["probabilities"]  # the score is not a class output
