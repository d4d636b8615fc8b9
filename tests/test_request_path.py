"""Unit tests of the request path's pieces: providers and buckets, preprocessing, softmax and top-k."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from serving.core.contract import Fit, ModelContract
from serving.core.postprocess import softmax, top_k
from serving.core.preprocess import ImageError, decode_to_input, open_image, pixels_to_input, tensor_to_input
from serving.core.runtime import (
    ModelRuntime,
    RuntimeOptions,
    bucket_size,
    choose_providers,
    pad_rows,
    parse_device,
)

GREY = ModelContract(labels=tuple("abc"), fit=Fit("L", 4, 6))


def test_provider_choice_and_fallback() -> None:
    with_cuda = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    providers, reason = choose_providers("cuda:1", with_cuda)
    assert providers[0][0] == "CUDAExecutionProvider" and providers[0][1]["device_id"] == 1
    assert providers[-1] == "CPUExecutionProvider" and reason == "CUDA device 1"
    assert choose_providers("auto", with_cuda)[0][0][0] == "CUDAExecutionProvider"
    assert choose_providers("cpu", with_cuda) == (["CPUExecutionProvider"], "CPU (asked for)")
    providers, reason = choose_providers("cuda", ["CPUExecutionProvider"])
    assert providers == ["CPUExecutionProvider"] and "not available" in reason
    for bad in ("gpu", "cuda:x", "cpu:1"):
        with pytest.raises(ValueError):
            parse_device(bad)


def test_buckets_and_padding() -> None:
    buckets = (1, 2, 4, 8, 16)
    assert [bucket_size(n, buckets) for n in (1, 2, 3, 5, 8, 9, 16, 17)] == [1, 2, 4, 8, 8, 16, 16, 17]
    batch = np.arange(12, dtype=np.float32).reshape(3, 4)
    padded = pad_rows(batch, 4)
    assert padded.shape == (4, 4) and not padded[3].any()
    np.testing.assert_array_equal(padded[:3], batch)
    assert pad_rows(batch, 3) is batch


def test_runtime_drops_padding_rows_on_cuda(model_repo) -> None:
    runtime = ModelRuntime(model_repo / "digits" / "1" / "model.onnx", RuntimeOptions(device="cpu"))
    batch = np.random.default_rng(0).random((5, 1, 8, 8), dtype=np.float32)
    plain = runtime.run(batch)
    runtime.on_cuda = True  # exercise the bucketing path on the CPU session: 5 rows run as 8
    padded = runtime.run(batch)
    assert padded.shape == (5, 10)
    np.testing.assert_allclose(padded, plain, rtol=1e-5, atol=1e-6)


def test_pixels_to_input_scales_normalises_and_lays_out() -> None:
    rgb = ModelContract(
        labels=("x",),
        fit=Fit("RGB", 2, 3),
        layout="NHWC",
        scale=1.0,
        mean=(10.0, 20.0, 30.0),
        std=(2.0, 4.0, 5.0),
    )
    pixels = np.full((2, 3, 3), 50, dtype=np.uint8)
    out = pixels_to_input(pixels, rgb)
    assert out.shape == (2, 3, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out[0, 0], [20.0, 7.5, 4.0])
    nchw = pixels_to_input(np.full((4, 6), 255, dtype=np.uint8), GREY)
    assert nchw.shape == (1, 4, 6) and np.allclose(nchw, 1.0)


def test_decode_checks_pixels_before_decoding() -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (100, 100)).save(buffer, format="PNG")
    with pytest.raises(ImageError, match="10000 pixels is over the limit of 9999"):
        open_image(buffer.getvalue(), max_pixels=9999)
    row = decode_to_input(buffer.getvalue(), GREY)
    assert row.shape == (1, 4, 6) and not row.any()
    for bad, message in ((b"", "empty"), (b"hello", "not an image")):
        with pytest.raises(ImageError, match=message):
            decode_to_input(bad, GREY)


def test_tensor_validation() -> None:
    data = np.ones((1, 4, 6), np.float32)
    view = tensor_to_input([1, 4, 6], "float32", data.tobytes(), GREY, np.dtype(np.float32))
    np.testing.assert_array_equal(view, data)
    with pytest.raises(ImageError, match="shape"):
        tensor_to_input([4, 6], "float32", data.tobytes(), GREY, np.dtype(np.float32))
    with pytest.raises(ImageError, match="unknown tensor dtype"):
        tensor_to_input([1, 4, 6], "floaty", data.tobytes(), GREY, np.dtype(np.float32))
    with pytest.raises(ImageError, match="holds 95 bytes"):
        tensor_to_input([1, 4, 6], "float32", data.tobytes()[:95], GREY, np.dtype(np.float32))


def test_softmax_and_top_k() -> None:
    logits = np.array([[1000.0, 1000.0, 0.0], [1.0, 2.0, 3.0]], dtype=np.float32)
    probabilities = softmax(logits.copy())
    np.testing.assert_allclose(probabilities.sum(1), 1, rtol=1e-6)
    np.testing.assert_allclose(probabilities[0], [0.5, 0.5, 0], atol=1e-6)
    indices, values = top_k(probabilities, 2)
    assert indices.tolist() == [[0, 1], [2, 1]]  # ties keep the lower index first
    assert top_k(probabilities, 99)[0].shape == (2, 3)
    wide = np.random.default_rng(0).random((4, 1000)).astype(np.float32)
    indices, values = top_k(wide, 5)
    np.testing.assert_array_equal(indices, np.argsort(-wide, axis=1)[:, :5])
    assert (np.diff(values, axis=1) <= 0).all()
