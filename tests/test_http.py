"""The HTTP edge end to end: unmodified `tritonclient.http` and the real `curl` binary against a real server
process serving the real digits model; answers checked against in-process ONNX Runtime and against the
gRPC edges for the same bytes."""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from serving.client.grpc_client import ClassifierClient, make_request
from serving.tools.launch import LaunchedServer
from tests.conftest import encode, start_server

pytestmark = pytest.mark.slow
MODEL = "digits"
TENSOR = "image"
CURL = shutil.which("curl")


@pytest.fixture(scope="module")
def server(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LaunchedServer]:
    launched = start_server(model_repo, tmp_path_factory.mktemp("http"), "--max-delay-ms", "2", http=True)
    yield launched
    assert launched.stop() == 0
    assert "Traceback" not in launched.log()


@pytest.fixture(scope="module")
def client(server: LaunchedServer) -> Iterator[triton.InferenceServerClient]:
    c = triton.InferenceServerClient(server.http_address)
    yield c
    c.close()


def as_rows(pixels: np.ndarray) -> np.ndarray:
    return pixels.astype(np.float32) * np.float32(1 / 255)


def tensor_input(rows: np.ndarray, binary: bool) -> triton.InferInput:
    tensor = triton.InferInput(TENSOR, list(rows.shape), "FP32")
    tensor.set_data_from_numpy(rows, binary_data=binary)
    return tensor


def bytes_input(images: list[bytes]) -> triton.InferInput:
    tensor = triton.InferInput("image_bytes", [len(images), 1], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=np.object_).reshape(-1, 1), binary_data=True)
    return tensor


def curl(*args: str) -> tuple[int, dict]:
    """Runs curl; returns (HTTP status, JSON body)."""
    assert CURL, "curl is needed for these tests"
    done = subprocess.run(
        [CURL, "-sS", "-o", "-", "-w", "\n%{http_code}", *args], capture_output=True, timeout=60, check=True
    )
    body, _, status = done.stdout.decode().rpartition("\n")
    return int(status), json.loads(body) if body else {}


def test_health_metadata_and_config(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL) and client.is_model_ready(MODEL, "1")
    assert not client.is_model_ready(MODEL, "7")
    metadata = client.get_server_metadata()
    assert metadata["name"] == "convserve"
    assert metadata["version"] == importlib.metadata.version("convserve")
    assert {"classification", "statistics", "model_configuration", "model_repository"} <= set(
        metadata["extensions"]
    )
    model = client.get_model_metadata(MODEL)
    assert model["platform"] == "onnxruntime_onnx" and model["versions"] == ["1"]
    assert {t["name"]: (t["datatype"], t["shape"]) for t in model["inputs"]} == {
        TENSOR: ("FP32", [-1, 1, 8, 8]),
        "image_bytes": ("BYTES", [-1, 1]),
    }
    assert client.get_model_metadata(MODEL, "1") == model
    config = client.get_model_config(MODEL)
    assert config["name"] == MODEL and config["max_batch_size"] >= 1  # numbers, as Triton writes them
    expected = {"name": TENSOR, "data_type": "TYPE_FP32", "dims": [1, 8, 8], "optional": True}
    assert expected.items() <= config["input"][0].items()
    assert config["output"][0]["dims"] == [10]


def test_the_config_is_the_grpc_model_config(server: LaunchedServer, client) -> None:
    from google.protobuf import json_format

    with triton_grpc.InferenceServerClient(server.address) as grpc_client:
        grpc_config = grpc_client.get_model_config(MODEL).config
    rest = client.get_model_config(MODEL)
    assert json_format.ParseDict(rest, type(grpc_config)()) == grpc_config


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_fp32_tensors_equal_onnx_runtime(client, model_repo: Path, digit_samples, binary: bool) -> None:
    import onnxruntime as ort

    pixels, _ = digit_samples
    rows = as_rows(pixels[:6])
    answer = client.infer(
        MODEL,
        [tensor_input(rows, binary)],
        outputs=[triton.InferRequestedOutput("probabilities", binary_data=binary)],
        request_id="req-7",
    )
    got = answer.as_numpy("probabilities")
    session = ort.InferenceSession(str(model_repo / MODEL / "1" / "model.onnx"))
    expected = session.run(None, {session.get_inputs()[0].name: rows})[0]
    assert got.dtype == np.float32 and got.shape == (6, 10)
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)
    assert answer.get_response()["id"] == "req-7"
    assert answer.get_response()["model_version"] == "1"


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_requests(client, digit_samples, algorithm: str) -> None:
    pixels, _ = digit_samples
    rows = as_rows(pixels[:3])
    plain = client.infer(MODEL, [tensor_input(rows, True)]).as_numpy("probabilities")
    packed = client.infer(MODEL, [tensor_input(rows, True)], request_compression_algorithm=algorithm)
    np.testing.assert_array_equal(packed.as_numpy("probabilities"), plain)


def test_png_and_jpeg_bytes_equal_the_grpc_answers(server: LaunchedServer, client, digit_samples) -> None:
    pixels, _ = digit_samples
    images = [encode(p, "PNG") for p in pixels[:3]] + [encode(p, "JPEG") for p in pixels[3:6]]
    over_http = client.infer(MODEL, [bytes_input(images)]).as_numpy("probabilities")
    with triton_grpc.InferenceServerClient(server.address) as grpc_client:
        tensor = triton_grpc.InferInput("image_bytes", [len(images), 1], "BYTES")
        tensor.set_data_from_numpy(np.array(images, dtype=np.object_).reshape(-1, 1))
        over_grpc = grpc_client.infer(MODEL, [tensor]).as_numpy("probabilities")
    np.testing.assert_array_equal(over_http, over_grpc)
    with ClassifierClient(server.address, timeout=30) as v1:
        top = v1.classify(images, model=MODEL, top_k=1)
    assert [r.top.index for r in top] == over_http.argmax(axis=1).tolist()


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_class_count_gives_value_index_label(client, digit_samples, binary: bool) -> None:
    pixels, _ = digit_samples
    rows = as_rows(pixels[:4])
    output = triton.InferRequestedOutput("probabilities", binary_data=binary, class_count=3)
    top = client.infer(MODEL, [tensor_input(rows, binary)], outputs=[output]).as_numpy("probabilities")
    full = client.infer(MODEL, [tensor_input(rows, binary)]).as_numpy("probabilities")
    assert top.shape == (4, 3)
    for row, probabilities in zip(top, full, strict=True):
        parsed = [(e.decode() if isinstance(e, bytes) else e).split(":") for e in row]
        indices = [int(index) for _, index, _ in parsed]
        assert indices == np.argsort(-probabilities, kind="stable")[:3].tolist()
        assert all(label == index for _, index, label in parsed)  # the digits' labels are "0".."9"
        assert [float(v) for v, _, _ in parsed] == pytest.approx(probabilities[indices], abs=1e-6)


def test_statistics_count_http_requests(client, digit_samples) -> None:
    pixels, _ = digit_samples
    before = client.get_inference_statistics(MODEL)["model_stats"][0]
    for _ in range(3):
        client.infer(MODEL, [tensor_input(as_rows(pixels[:2]), True)])
    with pytest.raises(InferenceServerException):
        client.infer(MODEL, [bytes_input([b"not an image"])])
    after = client.get_inference_statistics(MODEL)["model_stats"][0]
    success = after["inference_stats"]["success"]["count"] - before["inference_stats"]["success"].get(
        "count", 0
    )
    failed = after["inference_stats"]["fail"]["count"] - before["inference_stats"]["fail"].get("count", 0)
    assert (success, failed) == (3, 1)
    assert after["inference_count"] - before["inference_count"] == 6
    assert isinstance(after["last_inference"], int) and after["last_inference"] > 0
    assert client.get_inference_statistics()["model_stats"][0]["name"] == MODEL


def test_errors_a_user_can_read(client, digit_samples) -> None:
    pixels, _ = digit_samples
    with pytest.raises(InferenceServerException) as missing:
        client.get_model_metadata("no-such-model")
    assert missing.value.status() == "404" and "no-such-model" in missing.value.message()
    with pytest.raises(InferenceServerException) as broken:
        client.infer(MODEL, [bytes_input([encode(pixels[0], "PNG"), b"\x89PNG broken"])])
    assert broken.value.status() == "400" and "'image_bytes' image 1" in broken.value.message()
    wrong = triton.InferInput(TENSOR, [1, 1, 8, 8], "INT32")
    wrong.set_data_from_numpy(np.zeros((1, 1, 8, 8), np.int32))
    with pytest.raises(InferenceServerException) as dtype:
        client.infer(MODEL, [wrong])
    assert dtype.value.status() == "400" and "must be FP32" in dtype.value.message()
    with pytest.raises(InferenceServerException) as version:
        client.get_model_metadata(MODEL, "x1")
    assert version.value.status() == "400" and "positive integer" in version.value.message()
    with pytest.raises(InferenceServerException) as load:
        client.load_model(MODEL)
    assert load.value.status() == "400" and "--model-control" in load.value.message()
    index = client.get_model_repository_index()
    assert index == [{"name": MODEL, "version": "1", "state": "READY", "reason": ""}]


def test_curl_raw_image_and_multipart_with_a_broken_file(
    server: LaunchedServer, digit_samples, tmp_path: Path
) -> None:
    pixels, _ = digit_samples
    good_png, good_jpeg = tmp_path / "a.png", tmp_path / "b.jpg"
    good_png.write_bytes(encode(pixels[0], "PNG"))
    good_jpeg.write_bytes(encode(pixels[1], "JPEG"))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    url = f"{server.http_url}/v1/models/{MODEL}:classify?top_k=3"
    status, raw = curl("--data-binary", f"@{good_png}", url)
    assert status == 200 and raw["model"] == MODEL and raw["version"] == 1
    assert len(raw["results"]) == 1 and len(raw["results"][0]["label"]) == 3
    with ClassifierClient(server.address, timeout=30) as v1:
        request = make_request([good_png.read_bytes(), good_jpeg.read_bytes()], MODEL, 0, 3)
        expected = v1.classify_request(request)
    assert raw["results"][0]["class_index"] == list(expected.results[0].class_index)
    assert raw["results"][0]["probability"] == pytest.approx(list(expected.results[0].probability), abs=1e-6)

    versioned = f"{server.http_url}/v1/models/{MODEL}/versions/1:classify?top_k=3"
    status, form = curl(
        "-F", f"image=@{good_png}", "-F", f"image=@{broken}", "-F", f"image=@{good_jpeg}", versioned
    )
    assert status == 200 and len(form["results"]) == 3
    first, bad, third = form["results"]
    assert first["class_index"] == list(expected.results[0].class_index)
    assert third["class_index"] == list(expected.results[1].class_index)
    assert "label" not in bad and bad["error"]["code"] == 3 and bad["error"]["message"].startswith("image 1:")

    status, only_broken = curl("--data-binary", f"@{broken}", url)
    assert status == 400 and "image 0" in only_broken["error"]


def test_openapi_and_docs_page_describe_every_route(server: LaunchedServer) -> None:
    import httpx

    from serving.http_server import build_app

    document = httpx.get(f"{server.http_url}/openapi.json", timeout=10).json()
    assert document["openapi"].startswith("3.")
    paths = set(document["paths"])
    for route in build_app_routes(build_app):
        assert route in paths, route
    inference = document["components"]["schemas"]["inference_request"]
    assert inference["required"] == ["inputs"]  # the spec's schema, under the spec's name
    page = httpx.get(f"{server.http_url}/docs", timeout=10)
    assert page.status_code == 200 and "swagger-ui-bundle.js" in page.text and "https://" not in page.text
    script = httpx.get(f"{server.http_url}/docs/static/swagger-ui-bundle.js", timeout=10)
    assert script.status_code == 200 and len(script.content) > 100_000


def build_app_routes(build_app) -> list[str]:
    """Every path the app serves, from the app itself (a stand-in edge: routes are built, not called)."""
    from starlette.routing import Route

    app = build_app(_Edge())
    return [r.path for r in app.routes if isinstance(r, Route)]


class _Edge:
    def __getattr__(self, name: str):
        if name == "route":
            return lambda handler, **_: handler
        return None


def test_a_batch_shared_by_an_http_request_and_a_grpc_call(server_factory, tmp_path: Path) -> None:
    """An 8-row gRPC request keeps a slow model (a stride-1 convolution: tens of milliseconds per image)
    busy; one HTTP and one gRPC request of one row each, sent meanwhile, wait for it and then run
    together: a batch of 2 can only be one of each."""
    import httpx

    from tests.conftest import build_conv_model

    repo = tmp_path / "slow-models"
    build_conv_model(repo / "slow" / "1" / "model.onnx", side=320, channels=32, stride=1)
    server = server_factory(
        repo, "--max-batch-size", "8", "--max-delay-ms", "5000", "--inline-below-ms", "0", http=True
    )
    rng = np.random.default_rng(0)
    big = rng.random((8, 3, 320, 320), dtype=np.float32)
    one = rng.random((1, 3, 320, 320), dtype=np.float32)
    tensor = {"name": "image", "shape": [1, 3, 320, 320], "datatype": "FP32"}
    body = json.dumps({"inputs": [{**tensor, "parameters": {"binary_data_size": one.nbytes}}]}).encode()

    async def round_trip() -> None:
        async with httpx.AsyncClient(base_url=server.http_url, timeout=60) as http:
            with triton_grpc.InferenceServerClient(server.address) as grpc_client:

                def grpc_infer(rows: np.ndarray) -> np.ndarray:
                    tensor = triton_grpc.InferInput("image", list(rows.shape), "FP32")
                    tensor.set_data_from_numpy(rows)
                    return grpc_client.infer("slow", [tensor]).as_numpy("probabilities")

                busy = asyncio.create_task(asyncio.to_thread(grpc_infer, big))
                await asyncio.sleep(0.05)
                over_http = http.post(
                    "/v2/models/slow/infer",
                    content=body + one.tobytes(),
                    headers={"Inference-Header-Content-Length": str(len(body))},
                )
                answers = await asyncio.gather(busy, over_http, asyncio.to_thread(grpc_infer, one))
                assert answers[1].status_code == 200 and answers[2].shape == (1, 10)

    for _ in range(5):
        asyncio.run(round_trip())
        with ClassifierClient(server.address, timeout=30) as v1:
            sizes = dict(v1.get_model("slow").stats.batch_sizes)
        if sizes.get(2):
            break
    assert sizes.get(2, 0) >= 1, sizes
    assert set(sizes) <= {1, 2, 8}
