"""End to end: a real server process on 127.0.0.1, a real exported ONNX file, real encoded images."""

from __future__ import annotations

import io
import json
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from protos.convserve.v1 import convserve_pb2 as pb
from protos.convserve.v1 import convserve_pb2_grpc as pb_grpc
from serving.client import ClassifierClient, make_request
from tests.conftest import bomb_png, build_conv_model, encode

pytestmark = pytest.mark.slow


def in_process(model_repo: Path, pixels: np.ndarray) -> np.ndarray:
    """The reference: ONNX Runtime in this process on the same file, pixels scaled as the contract says."""
    session = ort.InferenceSession(
        str(model_repo / "digits" / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    return session.run(None, {"image": pixels.astype(np.float32) / np.float32(255)})[0]


CHANNELS: list[grpc.Channel] = []  # a channel that is garbage-collected cancels its calls: keep them


@pytest.fixture(scope="module", autouse=True)
def close_channels():
    yield
    for opened in CHANNELS:
        opened.close()
    CHANNELS.clear()


def channel(address: str) -> grpc.Channel:
    CHANNELS.append(grpc.insecure_channel(address))
    return CHANNELS[-1]


def raw_stub(address: str) -> pb_grpc.ClassifierStub:
    return pb_grpc.ClassifierStub(channel(address))


def expect_status(call, code: grpc.StatusCode, fragment: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == code, info.value.details()
    assert fragment in info.value.details(), info.value.details()


def test_png_and_jpeg_match_onnxruntime_in_process(digits_server, model_repo, digit_samples) -> None:
    images, labels = digit_samples
    expected = in_process(model_repo, images[:40])
    with ClassifierClient(digits_server.address) as client:
        results = client.classify([encode(p) for p in images[:40]], model="digits", top_k=10)
        for result, probabilities in zip(results, expected, strict=True):
            assert [p.index for p in result.predictions] == list(np.argsort(-probabilities, kind="stable"))
            np.testing.assert_allclose(
                [p.probability for p in result.predictions],
                np.sort(probabilities)[::-1],
                rtol=1e-5,
                atol=1e-6,
            )
            assert result.predictions[0].label == str(result.predictions[0].index)
        accuracy = np.mean([r.top.index == y for r, y in zip(results, labels[:40], strict=True)])
        assert accuracy >= 0.9
        # JPEG is lossy: compare with ONNX Runtime on the pixels Pillow decodes from the same bytes.
        jpegs = [encode(p, "JPEG") for p in images[:8]]
        decoded = np.stack([np.asarray(Image.open(io.BytesIO(j)).convert("L"))[None] for j in jpegs])
        reference = in_process(model_repo, decoded)
        for result, probabilities in zip(client.classify(jpegs, top_k=3), reference, strict=True):
            assert [p.index for p in result.predictions] == list(
                np.argsort(-probabilities, kind="stable")[:3]
            )
            np.testing.assert_allclose(result.predictions[0].probability, probabilities.max(), rtol=1e-5)


def test_every_image_mode_and_format_is_accepted(digits_server, digit_samples) -> None:
    pixels = digit_samples[0][0]
    variants = [
        encode(pixels, fmt, mode)
        for fmt, mode in [
            ("PNG", "LA"),
            ("PNG", "RGBA"),
            ("PNG", "P"),
            ("GIF", "L"),
            ("BMP", "RGB"),
            ("TIFF", "CMYK"),
            ("WEBP", "RGB"),
            ("PNG", "I;16"),
        ]
    ]
    with ClassifierClient(digits_server.address) as client:
        results = client.classify(variants, top_k=1)
        base = client.classify([encode(pixels)], top_k=1)[0].top.index
    assert all(r.ok for r in results), [r.error for r in results]
    assert sum(r.top.index == base for r in results) >= 7  # lossy WebP may differ on a hard digit


def test_raw_tensors_match_encoded_images(digits_server, model_repo, digit_samples) -> None:
    images = digit_samples[0][:16]
    tensors = [(p.astype(np.float32) / np.float32(255)) for p in images]
    expected = in_process(model_repo, images)
    with ClassifierClient(digits_server.address) as client:
        results = client.classify(tensors, top_k=1)
        wrong_shape = client.classify([tensors[0], np.zeros((1, 9, 8), np.float32)], top_k=1)
        wrong_dtype = client.classify([tensors[0], np.zeros((1, 8, 8), np.float64)], top_k=1)
    for result, probabilities in zip(results, expected, strict=True):
        assert result.top.index == probabilities.argmax()
        np.testing.assert_allclose(result.top.probability, probabilities.max(), rtol=1e-5)
    assert wrong_shape[0].ok and "does not match the model's input [1, 8, 8]" in wrong_shape[1].error
    assert wrong_dtype[0].ok and "dtype float64 does not match" in wrong_dtype[1].error


def test_64_concurrent_clients_each_get_their_own_answer(server_factory, model_repo, digit_samples) -> None:
    # The model runs in the batcher's worker thread (--inline-below-ms 0), so that calls arriving
    # while a batch runs are merged into the next: what this test proves is that every caller gets
    # its own rows back from a merged batch. (Run inline, as it is by default for a model this fast,
    # a gRPC server hands the batcher about one call per loop tick, and a lone call runs at once.)
    digits_server = server_factory(model_repo, "--inline-below-ms", "0")
    images = digit_samples[0][:64]
    expected = in_process(model_repo, images)
    start = threading.Barrier(64)
    with ClassifierClient(digits_server.address) as client:
        before = client.get_model("digits").stats

    def one_client(i: int) -> tuple[int, float]:
        with ClassifierClient(digits_server.address) as client:
            client.wait_ready()
            start.wait()
            got = []
            for _ in range(5):
                top = client.classify([encode(images[i])], model="digits", top_k=1)[0].top
                got.append((top.index, top.probability))
            assert len(set(got)) == 1
            return got[0]

    with ThreadPoolExecutor(64) as pool:
        answers = list(pool.map(one_client, range(64)))
    for (index, probability), reference in zip(answers, expected, strict=True):
        assert index == reference.argmax()
        assert probability == pytest.approx(reference.max(), rel=1e-5)
    with ClassifierClient(digits_server.address) as client:
        stats = client.get_model("digits").stats
    assert stats.requests - before.requests == 320
    assert stats.items - before.items == 320
    # This test's batches only: the server is shared, so its cumulative histogram is not.
    formed = {size: n - before.batch_sizes.get(size, 0) for size, n in stats.batch_sizes.items()}
    assert sum(size * n for size, n in formed.items()) == 320
    assert max(size for size, n in formed.items() if n > 0) > 1, (
        f"no batch larger than 1 was formed: {formed}"
    )
    assert stats.batches - before.batches < 320


def test_63_good_images_and_one_corrupt(digits_server, digit_samples) -> None:
    images = [encode(p) for p in digit_samples[0][:64]]
    images[17] = images[17][:40]  # a truncated PNG
    with ClassifierClient(digits_server.address) as client:
        results = client.classify(images, top_k=2)
        alone = client.classify(images[:17] + images[18:], top_k=2)
    assert len(results) == 64
    assert [i for i, r in enumerate(results) if not r.ok] == [17]
    assert results[17].error.startswith("image 17: ")
    good = results[:17] + results[18:]
    assert [r.predictions for r in good] == [r.predictions for r in alone]


def test_invalid_arguments_are_named(digits_server, digit_samples) -> None:
    stub = raw_stub(digits_server.address)
    png = encode(digit_samples[0][0])
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    expect_status(
        lambda: stub.Classify(make_request([b"not an image"], "digits")), invalid, "image 0: not an image"
    )
    expect_status(
        lambda: stub.Classify(make_request([png], "digits", top_k=0)), invalid, "top_k must be at least 1"
    )
    expect_status(lambda: stub.Classify(make_request([], "digits")), invalid, "no images")
    expect_status(
        lambda: stub.Classify(make_request([png] * 257, "digits")), invalid, "257 images; the limit is 256"
    )
    expect_status(
        lambda: stub.Classify(make_request([np.zeros((8, 8, 1), np.float32)], "digits")),
        invalid,
        "tensor shape [8, 8, 1] does not match",
    )
    expect_status(
        lambda: stub.Classify(pb.ClassifyRequest(model="digits", images=[pb.Image()])),
        invalid,
        "neither encoded bytes nor a tensor",
    )
    big = grpc.StatusCode.RESOURCE_EXHAUSTED  # gRPC's own code for a message over the size limit
    expect_status(lambda: stub.Classify(make_request([b"\0" * (65 * 1024 * 1024)], "digits")), big, "")


def test_unknown_model_or_version_is_not_found(digits_server, digit_samples) -> None:
    stub = raw_stub(digits_server.address)
    png = encode(digit_samples[0][0])
    expect_status(
        lambda: stub.Classify(make_request([png], "cats")), grpc.StatusCode.NOT_FOUND, "unknown model 'cats'"
    )
    expect_status(
        lambda: stub.Classify(make_request([png], "digits", version=9)),
        grpc.StatusCode.NOT_FOUND,
        "no version 9",
    )
    expect_status(
        lambda: stub.GetModel(pb.GetModelRequest(name="cats")), grpc.StatusCode.NOT_FOUND, "unknown"
    )


def test_top_k_beyond_the_classes_returns_them_all(digits_server, digit_samples) -> None:
    with ClassifierClient(digits_server.address) as client:
        result = client.classify([encode(digit_samples[0][0])], top_k=1000)[0]
    assert sorted(p.index for p in result.predictions) == list(range(10))
    assert sum(p.probability for p in result.predictions) == pytest.approx(1, abs=1e-4)


def test_decompression_bomb_is_refused_before_decoding(digits_server, digit_samples) -> None:
    bomb = bomb_png(30_000)
    assert len(bomb) < 2_000_000
    with ClassifierClient(digits_server.address) as client:
        results = client.classify([bomb, encode(digit_samples[0][0])], top_k=1)
    assert "900000000 pixels" in results[0].error and "refused before decoding" in results[0].error
    assert results[1].ok


def test_models_health_and_reflection(digits_server) -> None:
    with ClassifierClient(digits_server.address) as client:
        assert client.health() == "SERVING"
        assert client.health("convserve.v1.Classifier") == "SERVING"
        (info,) = client.list_models()
    assert (info.name, info.version, list(info.versions)) == ("digits", 1, [1])
    assert (
        list(info.input.shape) == [1, 8, 8] and info.input.color_mode == "L" and info.input.dtype == "float32"
    )
    assert list(info.labels) == [str(i) for i in range(10)] and info.output_kind == "probabilities"
    assert info.batching.max_batch_size == 32 and info.provider == "CPUExecutionProvider"
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(channel(digits_server.address))
    (answer,) = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for s in answer.list_services_response.service}
    assert {"convserve.v1.Classifier", "grpc.health.v1.Health"} <= names


def test_stream_answers_each_request_with_its_id(digits_server, digit_samples) -> None:
    images = [encode(p) for p in digit_samples[0][:30]]

    def requests():
        for i in range(10):
            yield make_request(images[i * 3 : i * 3 + 3], "digits", top_k=1, request_id=f"r{i}")
        yield make_request(images[:1], "nope", request_id="bad")

    with ClassifierClient(digits_server.address) as client:
        responses = {r.id: r for r in client.stream(requests())}
        single = client.classify(images, top_k=1)
    assert set(responses) == {f"r{i}" for i in range(10)} | {"bad"}
    assert responses["bad"].error.code == grpc.StatusCode.NOT_FOUND.value[0]
    for i in range(10):
        got = [r.class_index[0] for r in responses[f"r{i}"].results]
        assert got == [r.top.index for r in single[i * 3 : i * 3 + 3]]


class NhwcLogits(torch.nn.Module):
    """Someone else's model: NHWC input in [0, 255] normalised by the sidecar, logits out."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.fc = torch.nn.Linear(4 * 10 * 10, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x.permute(0, 3, 1, 2))).flatten(1))


def test_foreign_model_is_served_through_a_sidecar(tmp_path, server_factory) -> None:
    version_dir = tmp_path / "models" / "foreign" / "3"
    version_dir.mkdir(parents=True)
    path = version_dir / "model.onnx"
    batch = torch.export.Dim("batch", min=1, max=1024)
    torch.onnx.export(
        NhwcLogits().eval(),
        (torch.rand(2, 12, 12, 3),),
        str(path),
        dynamo=True,
        dynamic_shapes={"x": {0: batch}},
        external_data=False,
    )
    sidecar = {
        "color_mode": "RGB",
        "height": 12,
        "width": 12,
        "layout": "NHWC",
        "scale": 1.0,
        "mean": [120.0, 110.0, 100.0],
        "std": [60.0, 50.0, 40.0],
        "output_kind": "logits",
        "labels": ["a", "b", "c", "d", "e"],
    }
    (version_dir / "model.json").write_text(json.dumps(sidecar))
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (6, 12, 12, 3), dtype=np.uint8)
    x = (pixels.astype(np.float32) - np.float32([120, 110, 100])) / np.float32([60, 50, 40])
    logits = ort.InferenceSession(str(path)).run(
        None, {ort.InferenceSession(str(path)).get_inputs()[0].name: x}
    )[0]
    expected = np.exp(logits - logits.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)

    server = server_factory(tmp_path / "models")
    with ClassifierClient(server.address) as client:
        results = client.classify([encode(p) for p in pixels], model="foreign", top_k=5)
        info = client.get_model("foreign")
    assert info.version == 3 and info.output_kind == "logits" and list(info.input.shape) == [12, 12, 3]
    for result, probabilities in zip(results, expected, strict=True):
        assert [p.label for p in result.predictions] == [
            sidecar["labels"][i] for i in np.argsort(-probabilities)
        ]
        np.testing.assert_allclose(
            sorted(p.probability for p in result.predictions), np.sort(probabilities), rtol=1e-4, atol=1e-6
        )


def test_queue_overflow_is_resource_exhausted(model_repo, digit_samples, server_factory) -> None:
    # Worker-thread batches (no inline runs), so the queue really fills while the model works.
    server = server_factory(
        model_repo, "--max-queue-size", "64", "--max-batch-size", "1", "--inline-below-ms", "0"
    )
    stub = raw_stub(server.address)
    request = make_request([encode(p) for p in digit_samples[0][:64]], "digits")
    outcomes: list[tuple[grpc.StatusCode, str]] = []

    def call() -> None:
        try:
            stub.Classify(request, timeout=30)
            outcomes.append((grpc.StatusCode.OK, ""))
        except grpc.RpcError as exc:
            outcomes.append((exc.code(), exc.details()))

    threads = [threading.Thread(target=call) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes = [code for code, _ in outcomes]
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes and grpc.StatusCode.OK in codes
    assert set(codes) == {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.OK}
    assert all("overloaded" in details for code, details in outcomes if code != grpc.StatusCode.OK)
    with ClassifierClient(server.address) as client:
        assert client.get_model("digits").stats.rejected == codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED)


def seconds_per_row(model: Path, side: int) -> float:
    """The model's warm time for one row on one thread, measured here: the machine decides, not a guess."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    row = np.zeros((1, 3, side, side), np.float32)
    session.run(None, {"image": row})
    start = time.perf_counter()
    for _ in range(10):
        session.run(None, {"image": row})
    return (time.perf_counter() - start) / 10


def test_deadline_exceeded_drops_the_rows_before_the_model(tmp_path, server_factory) -> None:
    # One session on one thread, one row per batch, every batch in a worker thread. Eight busy calls hold
    # at least two seconds of model time (sized from the row time measured on this machine), so a call
    # queued behind them cannot make its 300 ms deadline, and 300 ms leaves it time to arrive when loaded.
    model = build_conv_model(tmp_path / "models" / "heavy" / "1" / "model.onnx", channels=64, stride=1)
    rows = min(48, math.ceil(2.0 / seconds_per_row(model, 320) / 8))
    flags = ("--max-batch-size", "1", "--inline-below-ms", "0", "--intra-op-threads", "1")
    flags += ("--input-budget-mb", "1024")  # eight calls of up to 48 rows of 1.2 MB are admitted
    server = server_factory(tmp_path / "models", *flags)
    stub = raw_stub(server.address)
    tensor = np.random.default_rng(0).random((3, 320, 320), dtype=np.float32)
    busy = make_request([tensor] * rows, "heavy")
    late = make_request([tensor], "heavy")
    stats = lambda: stub.GetModel(pb.GetModelRequest(name="heavy")).stats  # noqa: E731
    before = stats()
    with ThreadPoolExecutor(8) as pool:
        first = [pool.submit(stub.Classify, busy, timeout=120) for _ in range(8)]
        while stats().submitted - before.submitted < 8:  # the busy calls are queued
            time.sleep(0.005)
        expect_status(lambda: stub.Classify(late, timeout=0.3), grpc.StatusCode.DEADLINE_EXCEEDED, "")
        assert all(len(call.result().results) == rows for call in first)
    deadline = time.monotonic() + 10
    while (after := stats()).dropped_rows == before.dropped_rows or after.expired == before.expired:
        if time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert after.submitted - before.submitted == 9, "the late call reached the batcher"
    assert after.expired - before.expired == 1
    assert after.dropped_rows - before.dropped_rows == 1  # the late call's row was dropped ...
    assert after.items - before.items == 8 * rows  # ... and the model never saw it


def test_sigterm_finishes_calls_in_flight_then_refuses(digit_samples, server_factory, tmp_path) -> None:
    # A model of about 2 ms a row, one row a batch: the 24 calls' 1,536 rows take seconds, so they are
    # still in flight when the signal comes however late this loaded host lets the check run (with
    # the digits model, 6,144 rows once all finished first).
    repo = tmp_path / "slow-models"
    build_conv_model(repo / "slow" / "1" / "model.onnx", side=64, channels=32, stride=1, depth=4)
    server = server_factory(repo, "--max-batch-size", "1", "--max-queue-size", "8192", "--grace-s", "30")
    images, _ = digit_samples
    request = make_request([encode(p) for p in images[:64]], "slow", top_k=1)
    stub = raw_stub(server.address)
    expected = [r.class_index[0] for r in stub.Classify(request).results]
    watch = health_pb2_grpc.HealthStub(channel(server.address)).Watch(
        health_pb2.HealthCheckRequest(), timeout=60
    )
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    info = raw_stub(server.address).GetModel
    before = info(pb.GetModelRequest(name="slow")).stats.submitted
    with ThreadPoolExecutor(24) as pool:
        calls = [pool.submit(stub.Classify, request, timeout=60) for _ in range(24)]
        # Every call has reached the batcher: all 24 are admitted when the signal comes.
        while info(pb.GetModelRequest(name="slow")).stats.submitted - before < 24:
            time.sleep(0.01)
        assert not all(c.done() for c in calls), "the calls finished before the signal: make them heavier"
        server.process.send_signal(15)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()
        responses = [c.result() for c in calls]
    assert all([r.class_index[0] for r in response.results] == expected for response in responses)
    assert server.process.wait(30) == 0
    assert "shutting down" in server.log() and "stopped" in server.log()
    with pytest.raises(grpc.RpcError) as info:
        stub.Classify(request, timeout=2)
    assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def test_open_stream_ends_unavailable_on_sigterm(model_repo, digit_samples, server_factory) -> None:
    """An open stream is answered up to the signal, then ended with UNAVAILABLE well before the grace
    period: a scoring job resends what was not answered elsewhere."""
    server = server_factory(model_repo, "--grace-s", "20")
    png = encode(digit_samples[0][0])
    answered, ended = threading.Event(), threading.Event()

    def requests():
        yield make_request([png], "digits", request_id="before")
        assert answered.wait(10)
        server.process.send_signal(15)
        ended.wait(15)

    responses = {}
    started = time.monotonic()
    with ClassifierClient(server.address) as client, pytest.raises(grpc.RpcError) as info:
        try:
            for response in client.stream(requests(), timeout=30):
                responses[response.id] = response
                answered.set()
        finally:
            ended.set()
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in info.value.details()
    assert not responses["before"].HasField("error") and len(responses["before"].results) == 1
    assert server.process.wait(30) == 0
    assert time.monotonic() - started < 10
