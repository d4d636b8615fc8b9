"""The contract's preprocessing fields: resampling (OpenCV's reproduced), geometry, fill, channel order,
output selection, output kinds, uint8 inputs, and the refusals that name the key."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from serving.core.batch_settings import BatchingConfig
from serving.core.contract import ContractError, Fit, ModelContract, from_metadata, from_sidecar
from serving.core.model import load_model
from serving.core.pixels import fit_pixels, plan
from serving.core.preprocess import image_to_input
from serving.core.resize import resize_sampled
from serving.core.runtime import ModelLoadError, RuntimeOptions
from tests.conftest import ROOT

CV2_FLAGS = {"nearest": cv2.INTER_NEAREST, "bilinear": cv2.INTER_LINEAR, "lanczos": cv2.INTER_LANCZOS4}


def random_image(rng: np.random.Generator, channels: int) -> np.ndarray:
    h, w = (int(v) for v in rng.integers(1, 90, 2))
    image = rng.integers(0, 256, (h, w, channels) if channels > 1 else (h, w), dtype=np.uint8)
    return cv2.GaussianBlur(image, (5, 5), 1.5) if rng.random() < 0.5 else image


@pytest.mark.parametrize("resample", ["nearest", "bilinear"])
def test_sampled_resize_is_opencvs_bit_for_bit(resample: str) -> None:
    rng = np.random.default_rng(0)
    for trial in range(120):
        image = random_image(rng, 3 if trial % 2 else 1)
        h, w = image.shape[:2]
        dh, dw = (
            (max(1, h // 2), max(1, w // 2)) if trial % 7 == 0 else (int(v) for v in rng.integers(1, 120, 2))
        )
        expected = cv2.resize(image, (dw, dh), interpolation=CV2_FLAGS[resample])
        np.testing.assert_array_equal(
            resize_sampled(image, dw, dh, resample), expected, err_msg=f"{image.shape}"
        )


def test_sampled_lanczos_matches_opencv() -> None:
    """OpenCV's 8-tap Lanczos: its float coefficients round to the same 11-bit weights but for rare ties."""
    rng = np.random.default_rng(1)
    exact = total = 0
    for trial in range(120):
        image = random_image(rng, 3 if trial % 2 else 1)
        dh, dw = (int(v) for v in rng.integers(1, 120, 2))
        expected = cv2.resize(image, (dw, dh), interpolation=cv2.INTER_LANCZOS4).astype(int)
        got = resize_sampled(image, dw, dh, "lanczos").astype(int)
        assert np.abs(got - expected).max() <= 1
        exact += int((got == expected).sum())
        total += expected.size
    assert exact / total > 0.9999


def test_antialias_is_pillows_resize() -> None:
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (90, 70, 3), dtype=np.uint8))
    fit = Fit("RGB", 20, 30, resample="lanczos")
    expected = np.asarray(image.resize((30, 20), Image.Resampling.LANCZOS))
    np.testing.assert_array_equal(fit_pixels(image, fit).pixels, expected)


def test_geometry_of_each_resize_mode() -> None:
    # torchvision: shorter side to 256 (the other truncated), centre 224.
    crop = plan(500, 375, Fit("RGB", 224, 224, resize="crop", resize_to=256, rounding="floor"))
    assert (crop.width, crop.height, crop.crop) == (341, 256, (58, 16, 282, 240))
    assert plan(500, 375, Fit("RGB", 224, 224, resize="crop", resize_to=256)).width == 341  # 341.33
    assert plan(375, 500, Fit("RGB", 224, 224, resize="crop", resize_to=256)).height == 341
    # letterbox: fit inside, keep the ratio, centred or at the top left.
    box = plan(400, 100, Fit("RGB", 64, 64, resize="letterbox"))
    assert (box.width, box.height, box.top, box.left) == (64, 16, 24, 0)
    corner = plan(400, 100, Fit("RGB", 64, 64, resize="letterbox", align="top-left"))
    assert (corner.top, corner.left) == (0, 0)
    # fit_height: the height fills, the width rounds up and is capped (wider lines are squeezed).
    assert plan(100, 30, Fit("RGB", 48, 192, resize="fit_height", rounding="ceil")).width == 160
    assert plan(101, 30, Fit("RGB", 48, 192, resize="fit_height", rounding="ceil")).width == 162  # 161.6
    assert plan(1000, 30, Fit("RGB", 48, 192, resize="fit_height")).width == 192


def test_an_elongated_image_is_refused_by_crop_not_blown_up() -> None:
    from serving.core.preprocess import ImageError, decode_to_input

    contract = ModelContract(labels=("a",), fit=Fit("RGB", 32, 32, resize="crop", resize_to=36))
    data = io.BytesIO()
    Image.new("RGB", (1, 5000)).save(data, "PNG")
    with pytest.raises(ImageError, match="too elongated for a centre crop"):
        decode_to_input(data.getvalue(), contract)


def test_letterbox_fill_and_channel_order_reach_the_input() -> None:
    pixels = np.zeros((10, 40, 3), dtype=np.uint8)
    pixels[..., 0] = 200  # red
    contract = ModelContract(
        labels=("a",),
        fit=Fit("RGB", 20, 20, channel_order="BGR", resize="letterbox", fill=(127.5,), resample="nearest"),
        scale=1 / 255,
        mean=(0.5,),
        std=(0.5,),
    )
    row = image_to_input(Image.fromarray(pixels), contract)
    assert row.shape == (3, 20, 20)
    # 40x10 into 20x20: 20x5 in rows 7..11, the rest is the fill, normalised: (127.5/255 - 0.5)/0.5 = 0.
    np.testing.assert_allclose(row[:, :7], 0, atol=1e-6)
    np.testing.assert_allclose(row[:, 12:], 0, atol=1e-6)
    red = (200 * np.float32(1 / 255) - 0.5) / 0.5
    np.testing.assert_allclose(row[2, 7:12], red, rtol=1e-6)  # red is the last channel in BGR
    np.testing.assert_allclose(row[0, 7:12], -1.0)


def test_metadata_round_trip_keeps_every_field() -> None:
    contract = ModelContract(
        labels=("x", "y"),
        fit=Fit(
            "RGB",
            224,
            224,
            channel_order="BGR",
            resize="crop",
            resize_to=256,
            rounding="floor",
            resample="bicubic",
            antialias=True,
        ),
        scale=1.0,
        mean=(103.9, 116.8, 123.7),
        output="prob",
        output_kind="log-probabilities",
        extra={"precision": "fp16"},
    )
    metadata = contract.to_metadata()
    for key in ("channel_order", "resize", "resize_to", "fill", "align", "rounding", "resample", "antialias"):
        assert f"convserve.{key}" in metadata
    assert from_metadata(metadata) == contract
    assert from_metadata(metadata).extra == {"precision": "fp16"}


BASE = {"color_mode": "RGB", "height": 8, "width": 8}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"colour": "RGB"}, "unknown keys: \\['colour'\\]"),
        ({"color_mode": "L", "channel_order": "BGR"}, "channel_order BGR needs color_mode RGB"),
        ({"resize": "crop"}, "resize_to"),
        ({"resize": "crop", "resize_to": 6}, "resize_to 6 is smaller"),
        ({"resize_to": 10}, "resize_to applies only to resize crop"),
        ({"resample": "bicubic", "antialias": False}, "bicubic without antialias"),
        ({"mean": [123.7, 116.3, 103.5]}, "mean .* outside the scaled pixel range"),
        ({"fill": [300]}, "fill is in pixel units"),
        ({"antialias": "no"}, "antialias must be true or false"),
        ({"resize": "pad"}, "resize must be one of"),
        ({"output_kind": "log_softmax"}, "output_kind must be one of"),
        ({"height": "8"}, "height must be an integer"),
    ],
)
def test_impossible_sidecars_are_refused_naming_the_key(tmp_path: Path, extra: dict, message: str) -> None:
    path = tmp_path / "model.json"
    path.write_text(json.dumps({**BASE, **extra}))
    with pytest.raises(ContractError, match=message):
        from_sidecar(path, 2)


def test_unknown_metadata_key_is_refused() -> None:
    metadata = ModelContract(labels=("a",), fit=Fit("L", 4, 4)).to_metadata()
    with pytest.raises(ContractError, match=r"unknown metadata key 'convserve\.colour'"):
        from_metadata({**metadata, "convserve.colour": "L"})


def test_comment_keys_are_ignored(tmp_path: Path) -> None:
    path = tmp_path / "model.json"
    path.write_text(json.dumps({**BASE, "_guessed": ["resize"], "_note": "from inspect"}))
    assert from_sidecar(path, 2).labels == ("0", "1")


def two_output_model(path: Path, input_type: int = 1) -> Path:
    """A real ONNX graph with two outputs: pooled features (N, 3) first, log-probabilities (N, 4) last."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes = []
    source = "image"
    if input_type == TensorProto.UINT8:
        nodes.append(helper.make_node("Cast", ["image"], ["image_f"], to=TensorProto.FLOAT))
        nodes.append(helper.make_node("Div", ["image_f", "k255"], ["scaled"]))
        source = "scaled"
    nodes += [
        helper.make_node("GlobalAveragePool", [source], ["g"]),
        helper.make_node("Flatten", ["g"], ["features"]),
        helper.make_node("Gemm", ["features", "w", "b"], ["logits"]),
        helper.make_node("LogSoftmax", ["logits"], ["log_probs"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "two-outputs",
        [helper.make_tensor_value_info("image", input_type, ["N", 3, 8, 8])],
        [
            helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", 3]),
            helper.make_tensor_value_info("log_probs", TensorProto.FLOAT, ["N", 4]),
        ],
        [
            numpy_helper.from_array(rng.normal(0, 3, (3, 4)).astype(np.float32), "w"),
            numpy_helper.from_array(np.zeros(4, np.float32), "b"),
            numpy_helper.from_array(np.array(255, np.float32), "k255"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def served(path: Path, sidecar: dict):
    (path.parent / "model.json").write_text(json.dumps(sidecar))
    return load_model("two", 1, path, RuntimeOptions(device="cpu", intra_op_threads=1), BatchingConfig())


def test_output_by_name_and_log_probabilities(tmp_path: Path) -> None:
    import onnxruntime as ort

    path = two_output_model(tmp_path / "two" / "1" / "model.onnx")
    model = served(path, {**BASE, "output": "log_probs", "output_kind": "log-probabilities"})
    assert model.contract.labels == ("0", "1", "2", "3")
    batch = np.random.default_rng(3).random((5, 3, 8, 8), dtype=np.float32)
    expected = np.exp(ort.InferenceSession(str(path)).run(["log_probs"], {"image": batch})[0])
    np.testing.assert_allclose(model.predict(batch), expected, rtol=1e-6)
    np.testing.assert_allclose(model.predict(batch).sum(axis=1), 1, rtol=1e-5)


def test_refused_contract_makes_the_version_unavailable_naming_model_and_key(tmp_path: Path) -> None:
    path = two_output_model(tmp_path / "two" / "1" / "model.onnx")
    with pytest.raises(
        ModelLoadError, match=r"cannot serve two version 1: output: .*no output named 'probs'"
    ):
        served(path, {**BASE, "output": "probs"})
    with pytest.raises(
        ModelLoadError, match=r"cannot serve two version 1: .*unknown keys: \['resize_mode'\]"
    ):
        served(path, {**BASE, "resize_mode": "crop"})
    with pytest.raises(ModelLoadError, match="4 labels for 3 outputs"):  # the first output is not the classes
        served(path, {**BASE, "labels": ["a", "b", "c", "d"]})


def test_uint8_model_gets_raw_pixels(tmp_path: Path) -> None:
    from onnx import TensorProto

    path = two_output_model(tmp_path / "two" / "1" / "model.onnx", TensorProto.UINT8)
    with pytest.raises(ModelLoadError, match="uint8 input takes the pixels as they are"):
        served(path, {**BASE, "output": "log_probs"})  # scale defaults to 1/255
    model = served(path, {**BASE, "output": "log_probs", "output_kind": "log-probabilities", "scale": 1})
    image = Image.fromarray(np.random.default_rng(4).integers(0, 256, (8, 8, 3), dtype=np.uint8))
    row = model.new_rows(1)
    image_to_input(image, model.contract, row[0])
    assert row.dtype == np.uint8
    np.testing.assert_array_equal(row[0], np.asarray(image).transpose(2, 0, 1))


def inspect(path: Path, *flags: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "serving", "inspect", str(path), *flags],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_inspect_prints_the_graph_and_a_starting_sidecar(tmp_path: Path) -> None:
    path = two_output_model(tmp_path / "two" / "1" / "model.onnx")
    text = inspect(path)
    assert "image  tensor(float)  [N, 3, 8, 8]" in text
    assert "features  tensor(float)  [N, 3]" in text and "log_probs  tensor(float)  [N, 4]" in text
    sidecar = json.loads(inspect(path, "--sidecar"))
    assert sidecar["output"] == "log_probs" and sidecar["output_kind"] == "log-probabilities"
    assert (sidecar["height"], sidecar["width"], sidecar["layout"]) == (8, 8, "NCHW")
    assert {"output", "labels", "resize", "mean", "std"} <= set(sidecar["_guessed"])
    assert "output_kind" not in sidecar["_guessed"]  # read from the graph: a LogSoftmax computes it
    # The starting sidecar, as printed, serves the model.
    model = served(path, sidecar)
    assert model.contract.output == "log_probs" and model.num_classes == 4


def test_inspect_reads_our_own_contract(tmp_path: Path) -> None:
    from tests.conftest import build_conv_model

    path = build_conv_model(tmp_path / "conv" / "1" / "model.onnx", side=16)
    sidecar = json.loads(inspect(path, "--sidecar"))
    assert sidecar["_guessed"] == [] and sidecar["height"] == 16 and sidecar["labels"][0] == "c0"


def test_bench_compares_each_resize_mode_with_stretch() -> None:
    from serving.tools.bench import resize_targets

    def summary(model: str, cpu: float) -> dict:
        return {
            "model": model,
            "scenarios": {"unary c64 png": {"cpu_ms_per_image": cpu, "images_per_s": 100.0}},
        }

    rows = resize_targets(
        [summary("resnet18", 10.0), summary("resnet18-letterbox", 10.5), summary("resnet18-crop", 12.0)]
    )
    assert [(target.split(":")[0], held) for target, held, _ in rows] == [
        ("resnet18-letterbox", True),
        ("resnet18-crop", False),
    ]


def test_bench_images_of_another_size_reach_the_resize() -> None:
    from protos.convserve.v1 import convserve_pb2 as pb
    from serving.tools.loadgen import make_images

    info = pb.ModelInfo(input=pb.InputSpec(color_mode="RGB", height=32, width=32, layout="NCHW"))
    (image,) = make_images(info, "png", count=1, size=(48, 40))
    assert Image.open(io.BytesIO(image.encoded)).size == (48, 40)
