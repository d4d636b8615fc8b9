"""The data plane alone, in process, with real models: dataclasses in, dataclasses or domain errors out."""

from __future__ import annotations

import asyncio
import io
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from serving.core.batch_settings import BatchingConfig
from serving.core.budget import InputBudget
from serving.core.dataplane import DataPlane, Limits
from serving.core.errors import DeadlineExceeded, InvalidInput, Overloaded, ServingError
from serving.core.runtime import RuntimeOptions
from serving.core.types import ClassifyRequest, RawTensor
from serving.models.local import open_local
from tests.conftest import bomb_png, encode


def run(coroutine):
    return asyncio.run(coroutine)


@pytest.fixture(scope="module")
def digits(model_repo: Path):
    local = open_local(model_repo / "digits" / "1", RuntimeOptions(device="cpu"))
    (model,) = local.registry.ready()
    yield local, model
    asyncio.run(local.close())


def reference(model_repo: Path, rows: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(model_repo / "digits" / "1" / "model.onnx"))
    return session.run(None, {"image": rows.astype(np.float32)})[0]


def test_tensors_in_either_byte_order_give_the_same_answer(digits, digit_samples, model_repo) -> None:
    local, _ = digits
    rows = digit_samples[0][:4].astype(np.float32) / np.float32(255)
    little = [RawTensor([1, 8, 8], "<f4", r.astype("<f4").tobytes()) for r in rows]
    big = [RawTensor([1, 8, 8], ">f4", r.astype(">f4").tobytes()) for r in rows]
    native = [RawTensor([1, 8, 8], "float32", r.tobytes()) for r in rows]
    results = [
        run(local.dataplane.classify(ClassifyRequest(images, top_k=10))) for images in (little, big, native)
    ]
    expected = reference(model_repo, rows)
    for result in results:
        assert not result.errors
        np.testing.assert_array_equal(result.indices[:, 0], expected.argmax(1))
        np.testing.assert_allclose(result.probabilities[:, 0], expected.max(1), rtol=1e-6)
    np.testing.assert_array_equal(results[0].probabilities, results[1].probabilities)


def test_non_finite_tensors_are_refused_by_index(digits) -> None:
    local, _ = digits
    good = np.full((1, 8, 8), 0.5, np.float32)
    bad = [good.copy(), good.copy(), good.copy()]
    bad[0][0, 3, 3], bad[1][0, 0, 0], bad[2][0, 7, 7] = np.nan, np.inf, -np.inf
    images = [RawTensor([1, 8, 8], "float32", a.tobytes()) for a in (good, bad[0], good, bad[1], bad[2])]
    result = run(local.dataplane.classify(ClassifyRequest(images)))
    assert sorted(result.errors) == [1, 3, 4]
    assert all("NaN or infinite" in message for message in result.errors.values())
    assert np.isfinite(result.probabilities).all() and len(result.probabilities) == 2
    with pytest.raises(InvalidInput, match="image 0: tensor holds NaN or infinite values"):
        run(local.dataplane.classify(ClassifyRequest(images[1:2])))
    big_endian_nan = RawTensor([1, 8, 8], ">f4", bad[0].astype(">f4").tobytes())
    with pytest.raises(InvalidInput, match="NaN"):
        run(local.dataplane.classify(ClassifyRequest([big_endian_nan])))


def test_an_expired_request_is_counted_wherever_it_waited(digits, digit_samples) -> None:
    local, model = digits
    before = model.stats.expired, model.stats.items
    png = encode(digit_samples[0][0])
    with pytest.raises(DeadlineExceeded, match="decoded"):
        run(local.dataplane.classify(ClassifyRequest([png] * 3, deadline=time.monotonic() - 1)))
    assert (model.stats.expired, model.stats.items) == (before[0] + 1, before[1])  # the model never saw it


def test_input_memory_is_bounded_in_bytes(digits) -> None:
    local, model = digits
    assert model.row_nbytes == 256
    budget = InputBudget(1000)  # three digit rows fit, a fourth does not
    dataplane = DataPlane(local.registry, local.pool, budget=budget)
    tensor = RawTensor([1, 8, 8], "float32", np.zeros(64, np.float32).tobytes())
    with pytest.raises(InvalidInput, match="send fewer images"):
        run(dataplane.classify(ClassifyRequest([tensor] * 4)))
    held = budget.reserve(512)
    rejected = model.stats.rejected
    with pytest.raises(Overloaded, match="input budget full"):
        run(dataplane.classify(ClassifyRequest([tensor] * 2)))
    assert model.stats.rejected == rejected + 1
    held.release()
    assert len(run(dataplane.classify(ClassifyRequest([tensor] * 3))).indices) == 3
    assert budget.used == 0  # every request gave its bytes back


def test_a_request_of_many_huge_images_is_refused_before_decoding(digits) -> None:
    local, _ = digits
    bombs = [bomb_png(7000)] * 16  # each under the per-image limit, 784 million pixels in all
    started = time.process_time()
    with pytest.raises(InvalidInput, match="784000000 pixels in all; the limit per request is"):
        run(local.dataplane.classify(ClassifyRequest(bombs)))
    assert time.process_time() - started < 2  # headers only: decoding them would take many seconds


def test_each_instance_owns_a_session_and_they_run_concurrently(conv_repo: Path) -> None:
    options = RuntimeOptions(device="cpu", intra_op_threads=1, instances=2)
    local = open_local(conv_repo / "conv320", options, BatchingConfig(max_batch_size=2, max_delay_s=0.001))
    (model,) = local.registry.ready()
    runtime = model.runtime
    assert runtime.peak_concurrent == 1 and runtime.session_calls == [2, 2]  # warm-up: sizes 1 and 2, each
    rows = np.random.default_rng(0).random((1, 3, 320, 320), dtype=np.float32)
    tensor = RawTensor([3, 320, 320], "float32", rows.tobytes())

    async def load() -> None:
        await asyncio.gather(*(local.dataplane.classify(ClassifyRequest([tensor] * 2)) for _ in range(24)))
        await local.close()

    run(load())
    assert runtime.peak_concurrent == 2
    assert all(calls > 2 for calls in runtime.session_calls), runtime.session_calls


def test_warm_up_covers_every_batch_size_a_run_can_take(conv_repo: Path) -> None:
    from serving.core.runtime import ModelRuntime

    runtime = ModelRuntime(conv_repo / "conv320" / "1" / "model.onnx", RuntimeOptions(device="cpu"))
    assert runtime.warm_up_sizes(32) == [1, 32]
    runtime.on_cuda = True  # the CUDA provider pads to buckets: each one that can occur is warmed
    assert runtime.warm_up_sizes(32) == [1, 2, 4, 8, 16, 32]
    assert runtime.warm_up_sizes(48) == [1, 2, 4, 8, 16, 32, 64]
    assert runtime.warm_up_sizes(300) == [1, 2, 4, 8, 16, 32, 64, 128, 256, *range(257, 301)]


# -- the decode path, generated -------------------------------------------------------------------


def sample_files() -> list[bytes]:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
    files = []
    for fmt, mode in (
        ("PNG", "RGB"),
        ("JPEG", "L"),
        ("GIF", "P"),
        ("BMP", "RGB"),
        ("TIFF", "RGBA"),
        ("WEBP", "RGB"),
    ):
        buffer = io.BytesIO()
        Image.fromarray(pixels).convert(mode).save(buffer, format=fmt)
        files.append(buffer.getvalue())
    return files


FILES = sample_files()


@st.composite
def damaged_files(draw: st.DrawFn) -> bytes:
    """A real image file of some format, cut short, with bytes overwritten or inserted."""
    data = bytearray(draw(st.sampled_from(FILES)))
    for _ in range(draw(st.integers(0, 6))):
        position = draw(st.integers(0, len(data) - 1))
        action = draw(st.sampled_from(["set", "insert", "cut"]))
        if action == "set":
            data[position] = draw(st.integers(0, 255))
        elif action == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=8))
        else:
            del data[position:]
            if not data:
                break
    return bytes(data)


def test_generated_damaged_images_get_an_error_or_a_result_never_a_crash(digits) -> None:
    local, _ = digits
    outcomes = {"ok": 0, "image error": 0, "request error": 0}
    limits = Limits(max_pixels=1_000_000)
    dataplane = DataPlane(local.registry, ThreadPoolExecutor(1), limits)

    @settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(images=st.lists(st.one_of(damaged_files(), st.binary(max_size=64)), min_size=1, max_size=4))
    def one(images: list[bytes]) -> None:
        try:
            result = run(dataplane.classify(ClassifyRequest(images)))
        except ServingError as exc:
            assert isinstance(exc, InvalidInput), exc
            outcomes["request error"] += 1
            return
        outcomes["ok"] += 1
        outcomes["image error"] += bool(result.errors)
        assert len(result.indices) + len(result.errors) == len(images)
        assert np.isfinite(result.probabilities).all()

    one()
    assert all(outcomes.values()), outcomes
