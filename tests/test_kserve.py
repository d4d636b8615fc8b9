"""The Open Inference Protocol, end to end: unmodified tritonclient (sync, streaming and asyncio) against
a real server process serving the real digits model. Results are checked against in-process ONNX
Runtime and against what `convserve.v1` returns for the same bytes."""

from __future__ import annotations

import asyncio
import importlib.metadata
import os
import queue
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from serving.client.grpc_client import ClassifierClient
from serving.tools.launch import LaunchedServer
from tests.conftest import encode, start_server

try:
    import tritonclient.grpc as triton
    import tritonclient.grpc.aio as triton_aio
    from tritonclient.utils import InferenceServerException
except ImportError:  # pragma: no cover - the dev extra installs it
    if os.environ.get("CI"):
        raise
    pytest.skip("tritonclient[grpc] is not installed (the dev extra installs it)", allow_module_level=True)

pytestmark = pytest.mark.slow
MODEL = "digits"
TENSOR = "image"  # the digits model's own input (training/export.py)


@pytest.fixture(scope="module")
def server(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LaunchedServer]:
    launched = start_server(model_repo, tmp_path_factory.mktemp("kserve"), "--max-delay-ms", "2")
    yield launched
    launched.stop()
    assert "Traceback" not in launched.log()


@pytest.fixture(scope="module")
def client(server: LaunchedServer) -> Iterator[triton.InferenceServerClient]:
    with triton.InferenceServerClient(server.address) as c:
        yield c


def as_rows(pixels: np.ndarray) -> np.ndarray:
    """The model's input for uint8 pixels, exactly as the server computes it (contract scale 1/255)."""
    return pixels.astype(np.float32) * np.float32(1 / 255)


def tensor_input(rows: np.ndarray, datatype: str = "FP32", name: str = TENSOR) -> triton.InferInput:
    tensor = triton.InferInput(name, list(rows.shape), datatype)
    tensor.set_data_from_numpy(rows)
    return tensor


def bytes_input(images: list[bytes]) -> triton.InferInput:
    tensor = triton.InferInput("image_bytes", [len(images), 1], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=np.object_).reshape(-1, 1))
    return tensor


def test_health_and_metadata(server: LaunchedServer, client: triton.InferenceServerClient) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(server.address) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check
        answer = check(health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService"), timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL)
    server_metadata = client.get_server_metadata()
    assert {"classification", "statistics", "model_configuration"} <= set(server_metadata.extensions)
    assert server_metadata.version == importlib.metadata.version("convserve")  # the package's, once
    metadata = client.get_model_metadata(MODEL)
    assert metadata.platform == "onnxruntime_onnx" and metadata.versions == ["1"]
    inputs = {t.name: (t.datatype, list(t.shape)) for t in metadata.inputs}
    assert inputs == {TENSOR: ("FP32", [-1, 1, 8, 8]), "image_bytes": ("BYTES", [-1, 1])}
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [
        ("probabilities", "FP32", [-1, 10])
    ]
    config = client.get_model_config(MODEL).config
    assert config.name == MODEL and config.platform == "onnxruntime_onnx" and config.max_batch_size >= 1
    assert [list(i.dims) for i in config.input] == [[1, 8, 8], [1]]
    assert [list(o.dims) for o in config.output] == [[10]]
    assert config.HasField("dynamic_batching")


def test_tensor_infer_matches_onnx_runtime(
    client: triton.InferenceServerClient, model_repo: Path, digit_samples
) -> None:
    import onnxruntime as ort

    rows = as_rows(digit_samples[0][:24])
    result = client.infer(MODEL, [tensor_input(rows)])
    got = result.as_numpy("probabilities")
    session = ort.InferenceSession(str(model_repo / MODEL / "1" / "model.onnx"))
    expected = session.run(None, {TENSOR: rows})[0]
    assert got.shape == (24, 10) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)
    assert (got.argmax(1) == digit_samples[1][:24]).mean() > 0.8


def test_image_bytes_equal_convserve_v1(server: LaunchedServer, client, digit_samples) -> None:
    pixels = digit_samples[0][:6]
    images = [encode(p, "PNG") for p in pixels[:3]] + [encode(p, "JPEG") for p in pixels[3:]]
    got = client.infer(MODEL, [bytes_input(images)]).as_numpy("probabilities")
    with ClassifierClient(server.address) as v1:
        expected = v1.classify(images, MODEL, top_k=10)
    for row, image in zip(got, expected, strict=True):
        assert [p.index for p in image.predictions] == list(np.argsort(-row, kind="stable"))
        np.testing.assert_allclose(sorted(row, reverse=True), [p.probability for p in image.predictions])


def test_classification_extension(client: triton.InferenceServerClient, digit_samples) -> None:
    rows = as_rows(digit_samples[0][:4])
    probabilities = client.infer(MODEL, [tensor_input(rows)]).as_numpy("probabilities")
    output = triton.InferRequestedOutput("probabilities", class_count=5)
    classes = client.infer(MODEL, [tensor_input(rows)], outputs=[output]).as_numpy("probabilities")
    assert classes.shape == (4, 5)
    for row, entries in zip(probabilities, classes, strict=True):
        parsed = [e.decode().split(":") for e in entries]
        assert [int(index) for _, index, _ in parsed] == list(np.argsort(-row, kind="stable")[:5])
        assert [label for *_, label in parsed] == [index for _, index, _ in parsed]  # labels are digits
        assert [value for value, *_ in parsed] == [f"{row[int(i)]:f}" for _, i, _ in parsed]
        assert all(len(value.split(".")[1]) == 6 for value, *_ in parsed)  # std::to_string's six decimals
    many = triton.InferRequestedOutput("probabilities", class_count=50)
    assert client.infer(MODEL, [tensor_input(rows)], outputs=[many]).as_numpy("probabilities").shape == (
        4,
        10,
    )


def test_stream(server: LaunchedServer, digit_samples) -> None:
    results: queue.Queue = queue.Queue()
    rows = as_rows(digit_samples[0][:8])
    with triton.InferenceServerClient(server.address) as c:
        c.start_stream(callback=lambda result, error: results.put((result, error)))
        for i in range(8):
            c.async_stream_infer(MODEL, [tensor_input(rows[i : i + 1])], request_id=str(i))
        c.async_stream_infer(MODEL, [tensor_input(rows[:1].astype(np.float64), "FP64")], request_id="bad")
        answers = [results.get(timeout=30) for _ in range(9)]
        c.stop_stream()
    errors = [error for _, error in answers if error is not None]
    assert len(errors) == 1 and "FP32" in errors[0].message()
    ids = sorted(result.get_response().id for result, error in answers if error is None)
    assert ids == sorted(str(i) for i in range(8))


def test_asyncio_client_and_statistics(server: LaunchedServer, digit_samples) -> None:
    rows = as_rows(digit_samples[0][:16])

    async def run() -> tuple[list[np.ndarray], object]:
        async with triton_aio.InferenceServerClient(server.address) as c:
            assert await c.is_server_live() and await c.is_model_ready(MODEL)
            assert (await c.get_model_metadata(MODEL)).name == MODEL
            inputs = [[tensor_input(rows[i : i + 4])] for i in range(0, 16, 4)]
            answers = await asyncio.gather(*(c.infer(MODEL, x) for x in inputs))
            return [a.as_numpy("probabilities") for a in answers], await c.get_inference_statistics(MODEL)

    outputs, statistics = asyncio.run(run())
    assert np.concatenate(outputs).shape == (16, 10)
    stats = statistics.model_stats[0]
    assert stats.name == MODEL and stats.version == "1"
    assert stats.inference_stats.success.count >= 4 and stats.inference_stats.success.ns > 0
    assert stats.inference_stats.queue.count >= 4 and stats.inference_stats.compute_infer.ns > 0
    assert stats.execution_count >= 1 and stats.inference_count >= 16
    assert sum(b.compute_infer.count for b in stats.batch_stats) == stats.execution_count


def error_of(call) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as caught:
        call()
    return caught.value


def test_errors_a_tritonclient_user_can_read(client: triton.InferenceServerClient, digit_samples) -> None:
    rows = as_rows(digit_samples[0][:2])
    unknown = error_of(lambda: client.infer("nope", [tensor_input(rows)]))
    assert unknown.status() == "StatusCode.NOT_FOUND" and "nope" in unknown.message()
    shape = error_of(lambda: client.infer(MODEL, [tensor_input(rows.reshape(2, 1, 4, 16))]))
    assert shape.status() == "StatusCode.INVALID_ARGUMENT" and "[N, 1, 8, 8]" in shape.message()
    dtype = error_of(lambda: client.infer(MODEL, [tensor_input(rows.astype(np.float64), "FP64")]))
    assert dtype.status() == "StatusCode.INVALID_ARGUMENT" and "FP32" in dtype.message()
    nan = rows.copy()
    nan[1, 0, 3, 3] = np.nan
    finite = error_of(lambda: client.infer(MODEL, [tensor_input(nan)]))
    assert finite.status() == "StatusCode.INVALID_ARGUMENT" and "image 1" in finite.message()
    images = [encode(digit_samples[0][0]), b"not an image at all", encode(digit_samples[0][1])]
    broken = error_of(lambda: client.infer(MODEL, [bytes_input(images)]))
    assert broken.status() == "StatusCode.INVALID_ARGUMENT"
    assert "'image_bytes' image 1" in broken.message()
    name = error_of(lambda: client.infer(MODEL, [tensor_input(rows, name="pixels")]))
    assert name.status() == "StatusCode.INVALID_ARGUMENT" and "'pixels'" in name.message()
    output = error_of(
        lambda: client.infer(MODEL, [tensor_input(rows)], outputs=[triton.InferRequestedOutput("x")])
    )
    assert output.status() == "StatusCode.INVALID_ARGUMENT", output.message()
    assert client.is_server_live()  # and the server's log has no traceback (the fixture checks)
