"""explain.onnx, run in ONNX Runtime: its Grad-CAM equals PyTorch autograd's, its block maps are what the run
report draws, its probabilities are model.onnx's; on the digits export and on a 3-block 28x28 model."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from training.explain_graph import (
    BLOCK_CAPTIONS_KEY,
    CAM_LAYER_KEY,
    CAM_TOLERANCE,
    at_kink,
    autograd_grad_cam,
    export_explain,
    verify_explain,
)
from training.export import EXPLAIN_FILE, MODEL_FILE, VerificationError, export_run
from training.inspect_model import block_activations, block_descriptions
from training.model import ConvNet
from training.report import shape_text
from training.train import TEST_SPLIT, load_run, to_tensor


def limit(cam: np.ndarray) -> float:
    return CAM_TOLERANCE * max(1.0, float(np.abs(cam).max()))


def run(path: Path, images: np.ndarray) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {"image": to_tensor(images).numpy()}), strict=True))


@pytest.fixture(scope="module")
def digits(digits_run: Path, model_repo: Path) -> dict:
    """The digits export's explain.onnx outputs for the run's held-out test images."""
    _, net = load_run(digits_run)
    images = np.load(digits_run / TEST_SPLIT)["images"]
    path = model_repo / "digits" / "1" / EXPLAIN_FILE
    return {"net": net, "images": images, "path": path, "out": run(path, images)}


def test_cam_equals_autograd_grad_cam_for_top1_and_every_class(digits: dict) -> None:
    net, images, out = digits["net"], digits["images"], digits["out"]
    cam, top1 = out["cam"], out["probabilities"].argmax(1)
    x = to_tensor(images)
    # Left out: images with a hidden unit at its ReLU's kink, where Grad-CAM jumps and rounding picks a side.
    smooth = ~at_kink(net, x)
    assert smooth.mean() > 0.99
    every = autograd_grad_cam(net, x)
    assert cam.shape == every.shape == (len(images), 10, 8, 8)
    assert np.abs(cam - every)[smooth].max() <= limit(every)
    chosen = autograd_grad_cam(net, x, classes=top1)
    assert np.abs(cam[np.arange(len(images)), top1] - chosen)[smooth].max() <= limit(chosen)
    assert np.abs(chosen).max() > 0.05  # not a comparison of empty maps


def test_blocks_are_what_the_report_draws(digits: dict) -> None:
    net, images, out = digits["net"], digits["images"], digits["out"]
    for i in range(0, len(images), 9):
        for activation in block_activations(net, to_tensor(images[i])):
            assert np.abs(out[f"block{activation.block}"][i] - activation.maps).max() <= 1e-5


def test_probabilities_are_model_onnx_s(digits: dict) -> None:
    expected = run(digits["path"].with_name(MODEL_FILE), digits["images"])["probabilities"]
    assert np.abs(digits["out"]["probabilities"] - expected).max() <= 1e-6


def test_cam_depends_on_the_class_and_the_image(digits: dict) -> None:
    out = digits["out"]
    cam, ranked = out["cam"], np.argsort(-out["probabilities"], axis=1)
    rows = np.arange(len(cam))
    first, second = cam[rows, ranked[:, 0]], cam[rows, ranked[:, 1]]
    scale = np.abs(first).max(axis=(1, 2))
    assert (scale > 0).mean() > 0.95  # the predicted class's evidence is somewhere for nearly every image
    assert (np.abs(first - second).max(axis=(1, 2)) > 0.1 * scale).mean() > 0.9
    # Two images of the same predicted class do not share one map.
    for c in range(10):
        same = np.flatnonzero(ranked[:, 0] == c)[:2]
        assert len(same) == 2
        assert np.abs(cam[same[0], c] - cam[same[1], c]).max() > 0.01


def test_metadata_is_the_contract_plus_the_explain_keys(digits: dict) -> None:
    net = digits["net"]
    explain = {p.key: p.value for p in onnx.load(str(digits["path"])).metadata_props}
    model = {p.key: p.value for p in onnx.load(str(digits["path"].with_name(MODEL_FILE))).metadata_props}
    assert set(explain) - set(model) == {CAM_LAYER_KEY, BLOCK_CAPTIONS_KEY}
    assert {k: explain[k] for k in model} == model
    assert explain[CAM_LAYER_KEY] == "block 2: last ReLU before pooling (features.6), 64×4×4"
    shapes = [a.maps.shape for a in block_activations(net, to_tensor(digits["images"][0]))]
    assert json.loads(explain[BLOCK_CAPTIONS_KEY]) == [
        f"block {n}: {text} → {shape_text(shape)}"
        for n, (text, shape) in enumerate(zip(block_descriptions(net), shapes, strict=True), start=1)
    ]
    outputs = {
        o.name: o.shape
        for o in ort.InferenceSession(str(digits["path"]), providers=["CPUExecutionProvider"]).get_outputs()
    }
    assert outputs == {
        "probabilities": ["batch", 10],
        "cam": ["batch", 10, 8, 8],
        "block1": ["batch", 32, 8, 8],
        "block2": ["batch", 64, 4, 4],
    }


def test_a_graph_of_other_weights_is_refused(digits: dict, tmp_path: Path) -> None:
    other = copy.deepcopy(digits["net"])
    with torch.no_grad():
        other.classifier[5].weight.mul_(1.01)
    with pytest.raises(VerificationError, match="cam"):
        verify_explain(digits["path"], other, digits["images"][:64])


def test_explain_off_writes_no_explain_graph(digits_run: Path, tmp_path: Path) -> None:
    report = export_run(digits_run, tmp_path, "digits", explain=False)
    assert report.explain is None
    # No explain.onnx; the preprocessing certificate's fixtures/ comes with every export.
    assert sorted(p.name for p in report.path.parent.iterdir()) == ["fixtures", MODEL_FILE]


def random_28x28() -> ConvNet:
    """3 blocks, 2 convolutions in each after the first; random weights, batch norm in eval with random
    running statistics, the head scaled up so the maps are of order 1. (Random features hardly vary
    between images: nearly every image gets the same class, which this shape check does not need.)"""
    torch.manual_seed(0)
    net = ConvNet(1, 28, 28, 10, mean=[0.3], std=[0.3], block_convs=2)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
                m.running_mean.normal_(0, 0.3)
                m.running_var.uniform_(0.5, 2.0)
        net.classifier[2].weight.mul_(30)
        net.classifier[5].weight.normal_(0, 30 / 128**0.5)
    return net.eval()


def test_a_28x28_three_block_model_verifies(digits: dict, tmp_path: Path) -> None:
    # Real handwriting at 28x28: the digits test images, upsampled.
    images = (
        F.interpolate(
            torch.from_numpy(digits["images"][:192]).float(),
            size=(28, 28),
            mode="bilinear",
            align_corners=False,
        )
        .round()
        .clamp(0, 255)
        .to(torch.uint8)
        .numpy()
    )
    net = random_28x28()
    path = tmp_path / EXPLAIN_FILE
    export_explain(net, to_tensor(images[:2]), path)
    check = verify_explain(path, net, images)
    assert check.cam <= check.cam_limit and check.activations <= 1e-5 and check.probabilities <= 1e-5
    assert check.kinks <= 0.05 * check.images
    assert check.cam_scale > 1  # maps of real size, so 1e-4 x max |cam| is a tight bound
    out = run(path, images[:64])
    assert [(k, v.shape) for k, v in out.items()] == [
        ("probabilities", (64, 10)),
        ("cam", (64, 10, 28, 28)),
        ("block1", (64, 32, 28, 28)),
        ("block2", (64, 64, 14, 14)),
        ("block3", (64, 128, 7, 7)),
    ]
    top1, smooth = out["probabilities"].argmax(1), ~at_kink(net, to_tensor(images[:64]))
    chosen = autograd_grad_cam(net, to_tensor(images[:64]), classes=top1)
    assert np.abs(out["cam"][np.arange(64), top1] - chosen)[smooth].max() <= limit(chosen)
    metadata = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert metadata[CAM_LAYER_KEY] == "block 3: last ReLU before pooling (features.16), 128×7×7"
    assert len(json.loads(metadata[BLOCK_CAPTIONS_KEY])) == 3
