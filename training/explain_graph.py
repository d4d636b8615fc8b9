"""`explain.onnx`: the probabilities, the Grad-CAM of every class and each block's feature maps, from one
forward pass of a graph written at export, so a server can explain a prediction without autograd.

Grad-CAM (Selvaraju et al. 2017) over A, the last block's last ReLU output before its pooling:
alpha[c, k] = mean over A's positions of d y_c / d A_k (y_c: the class logit, before softmax),
map_c = ReLU(sum_k alpha[c, k] A_k), upsampled bilinearly (align_corners=False) to the input's H x W.

The gradient is graph arithmetic, not autograd. After A come MaxPool2d(2) -> Flatten -> Linear W1, b1 ->
ReLU -> Linear W2 (the dropouts are identities in eval), so d y / d pooled = (W2 ⊙ 1[z1 > 0]) @ W1 with
z1 = W1 pooled + b1, for every class at once. Max-pool's backward hands each pooled gradient to exactly one
position of A and nothing to the rows or columns floor-mode pooling drops, so the spatial sum of
d y_c / d A_k equals that of the pooled gradient: alpha is exact without unpooling, whatever the ties.
`verify_explain` checks this against PyTorch's own autograd (`autograd_grad_cam`) on real test images.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from torch import nn

from training.export import MAX_ABS_DIFF, OPSET, PARITY_BATCH_SIZES, VerificationError, write_metadata
from training.inspect_model import block_activations, block_descriptions, conv_blocks
from training.model import ConvNet, ProbabilitiesModel, calibrated_softmax
from training.report import shape_text
from training.train import to_tensor

EXPLAIN_INPUT = "image"
CAM_TOLERANCE = 1e-4  # times max(1, max |cam|): see verify_explain
CHECK_IMAGES = 256  # test images checked against autograd
BLOCK_IMAGES = 32  # of those, checked against block_activations too (one image per forward pass: slow)
# A hidden unit whose pre-activation is within KINK x (the sum of its terms' magnitudes) of 0 may switch
# sides between two float32 evaluations (measured: 2e-7 of it); MAX_KINK_FRACTION bounds the images left out.
KINK = 1e-5
MAX_KINK_FRACTION = 0.05
CAM_LAYER_KEY = "convserve.explain.cam_layer"
BLOCK_CAPTIONS_KEY = "convserve.explain.block_captions"


def output_names(net: ConvNet) -> list[str]:
    return ["probabilities", "cam"] + [f"block{n}" for n in range(1, len(conv_blocks(net)) + 1)]


class ExplainModel(nn.Module):
    """Pixels in [0, 1] (N, C, H, W) in; probabilities (N, K), cam (N, K, H, W), block1..blockB out.
    Eval only: the gradient below assumes the dropouts are identities and batch norm uses running stats.
    The probabilities take model.onnx's temperature; the cam stays over the raw logits (dividing them
    by T > 0 would only rescale every map, and the maps are normalised when drawn)."""

    def __init__(self, net: ConvNet, temperature: float = 1.0) -> None:
        super().__init__()
        kinds = [type(m) for m in net.classifier]
        if kinds != [nn.Flatten, nn.Dropout, nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]:
            raise ValueError(f"the explain graph's gradient is written for ConvNet's head, not {kinds}")
        self.net = net
        fc1, fc2 = net.classifier[2], net.classifier[5]
        assert isinstance(fc1, nn.Linear) and isinstance(fc2, nn.Linear)  # as the kinds say
        self.fc1, self.fc2 = fc1, fc2
        self.temperature = temperature
        self.eval()  # also puts `net` in eval mode: it is shared, not copied

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = self.net.normalize(x)
        blocks: list[torch.Tensor] = []
        for module in self.net.features:
            if isinstance(module, nn.MaxPool2d):
                blocks.append(h)  # the block's last ReLU output, what its pooling reads
            h = module(h)
        z1 = self.fc1(h.flatten(1))
        logits = self.fc2(F.relu(z1))
        a = blocks[-1]
        n, channels, a_h, a_w = a.shape
        # d y / d pooled = (W2 ⊙ 1[z1 > 0]) @ W1 is linear in W1, so summing W1 over the pooled positions
        # first gives the same spatial sum (N x K x C) without the N x K x F gradient itself.
        w1 = self.fc1.weight.view(self.fc1.out_features, channels, -1).sum(-1)
        masked = self.fc2.weight.unsqueeze(0) * (z1 > 0).to(z1.dtype).unsqueeze(1)  # N x K x hidden
        alpha = torch.matmul(masked, w1) / (a_h * a_w)  # N x K x C: the mean over A's a_h x a_w positions
        cam = F.relu(torch.matmul(alpha, a.flatten(2))).view(n, -1, a_h, a_w)
        cam = F.interpolate(cam, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)
        return (calibrated_softmax(logits, self.temperature), cam, *blocks)


def autograd_grad_cam(net: ConvNet, x: torch.Tensor, classes: Sequence[int] | None = None) -> np.ndarray:
    """Textbook Grad-CAM with PyTorch's autograd, the reference for the graph: a forward hook keeps A,
    `torch.autograd.grad` differentiates the logit through max-pool and the head.
    `classes`: one class per image, giving (N, H, W); None: every class, giving (N, K, H, W)."""
    net = copy.deepcopy(net).eval()
    for module in net.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False  # an in-place ReLU would hand autograd a tensor pooling overwrote
    captured: list[torch.Tensor] = []
    handle = conv_blocks(net)[-1][-1].register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        with torch.enable_grad():
            x = x.detach().clone().requires_grad_(True)  # a graph to differentiate even with frozen weights
            logits = net(x)
            a = captured[0]
            if classes is None:
                targets = [logits[:, c].sum() for c in range(logits.shape[1])]
            else:
                index = torch.as_tensor(np.asarray(classes), dtype=torch.long).view(-1, 1)
                targets = [logits.gather(1, index).sum()]  # images are independent: the sum's gradient
            maps = []
            for target in targets:
                (grad,) = torch.autograd.grad(target, a, retain_graph=True)
                alpha = grad.mean(dim=(2, 3), keepdim=True)
                maps.append(F.relu((alpha * a).sum(dim=1)))
    finally:
        handle.remove()
    cam = F.interpolate(torch.stack(maps, 1), size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)
    cams = cam.detach().numpy()
    return cams if classes is None else cams[:, 0]


def at_kink(net: ConvNet, x: torch.Tensor) -> np.ndarray:
    """Per image: whether a hidden unit sits at its ReLU's kink, where the gradient, and so Grad-CAM,
    jumps. There ONNX Runtime and PyTorch may round to different sides of 0 and both be right: the CAM
    comparisons leave such images out."""
    fc1 = net.classifier[2]
    assert isinstance(fc1, nn.Linear)
    with torch.no_grad():
        flat = net.eval().features(net.normalize(x)).flatten(1)
        z1 = fc1(flat)
        magnitude = flat.abs() @ fc1.weight.abs().T + fc1.bias.abs()
    return (z1.abs() <= KINK * magnitude).any(dim=1).numpy()


def block_shapes(net: ConvNet, height: int, width: int) -> list[tuple[int, ...]]:
    channels = net.normalize.mean.shape[1]
    with torch.no_grad():
        outputs = ExplainModel(net)(torch.zeros(1, channels, height, width))
    return [tuple(block.shape[1:]) for block in outputs[2:]]


def explain_metadata(net: ConvNet, height: int, width: int) -> dict[str, str]:
    """The cam layer in words and the run report's caption of each block picture, shape included
    (e.g. "block 1: Conv2d 1→32, 3×3, padding 1 → BatchNorm2d 32 → ReLU → 32×8×8")."""
    shapes = block_shapes(net, height, width)
    last = conv_blocks(net)[-1][-1]
    name = next(name for name, module in net.named_modules() if module is last)
    captions = [
        f"block {n}: {text} → {shape_text(shape)}"
        for n, (text, shape) in enumerate(zip(block_descriptions(net), shapes, strict=True), start=1)
    ]
    return {
        CAM_LAYER_KEY: f"block {len(shapes)}: last ReLU before pooling ({name}), {shape_text(shapes[-1])}",
        BLOCK_CAPTIONS_KEY: json.dumps(captions, ensure_ascii=False),
    }


def export_explain(
    net: ConvNet,
    example: torch.Tensor,
    path: Path,
    metadata: dict[str, str] | None = None,
    temperature: float = 1.0,
) -> None:
    """Writes explain.onnx (input `image`, dynamic batch axis `batch`) with `metadata` (the model's
    contract) and the explain keys in its `metadata_props`; `temperature`: model.onnx's."""
    model = ExplainModel(net, temperature)
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.onnx.export(
        model,
        (example,),
        dynamo=True,
        input_names=[EXPLAIN_INPUT],
        output_names=output_names(net),
        dynamic_shapes={"x": {0: batch}},
        opset_version=OPSET,
        external_data=False,
    )
    assert program is not None  # dynamo=True always returns the ONNXProgram
    program.save(str(path), external_data=False)
    height, width = example.shape[-2:]
    write_metadata(path, {**(metadata or {}), **explain_metadata(net, int(height), int(width))})


@dataclass(frozen=True)
class ExplainCheck:
    """Largest differences found by `verify_explain`, over every batch size and image it ran."""

    batch_sizes: tuple[int, ...]  # ONNX Runtime vs the PyTorch ExplainModel at these batch sizes
    images: int  # test images checked against autograd (the first BLOCK_IMAGES against block_activations)
    kinks: int  # of those, left out of the cam comparisons: a hidden unit at its ReLU's kink (at_kink)
    probabilities: float  # vs PyTorch's softmax model (what model.onnx is verified against)
    cam: float  # vs autograd_grad_cam, every class
    cam_module: float  # vs the PyTorch ExplainModel
    cam_scale: float  # max |cam| seen: the cam limit is CAM_TOLERANCE * max(1, cam_scale)
    activations: float  # vs block_activations and the PyTorch ExplainModel
    block_scale: float  # max |block| seen: the blocks' limit is MAX_ABS_DIFF * max(1, block_scale)

    @property
    def cam_limit(self) -> float:
        return CAM_TOLERANCE * max(1.0, self.cam_scale)

    @property
    def block_limit(self) -> float:
        return MAX_ABS_DIFF * max(1.0, self.block_scale)

    def summary(self) -> str:
        return (
            f"explain.onnx on {self.images} test images, batch {'/'.join(map(str, self.batch_sizes))}: "
            f"max |cam - autograd Grad-CAM| {self.cam:.1e} (limit {self.cam_limit:.0e}; "
            f"{self.kinks} at a ReLU kink left out), "
            f"blocks {self.activations:.1e} (limit {self.block_limit:.0e}), "
            f"probabilities {self.probabilities:.1e}"
        )


def verify_explain(path: Path, net: ConvNet, images: np.ndarray, temperature: float = 1.0) -> ExplainCheck:
    """Refuses the graph (VerificationError) unless the checker passes and, in ONNX Runtime, all outputs
    match the PyTorch ExplainModel at PARITY_BATCH_SIZES; on the first CHECK_IMAGES test images, the cam
    of every class matches `autograd_grad_cam` and the probabilities the softmax model; on the first
    BLOCK_IMAGES, the blocks match `block_activations` (what the run report draws).

    Probabilities within MAX_ABS_DIFF (1e-5). The cam within CAM_TOLERANCE (1e-4) x max(1, max |cam|):
    its values are sums of C products of unbounded logit gradients and activations, so float32 rounding
    grows with them, and the relative bound is what stays meaningful when the maps are large; maps of at
    most 1 get the plain absolute 1e-4. The blocks, unbounded ReLU outputs too, within MAX_ABS_DIFF x
    max(1, max |block|) for the same reason (PyTorch's float32 kernels round differently from one CPU to
    another: the explain-quality test's model came to 1.0e-5 on one machine after passing on others).
    Grad-CAM jumps where a hidden unit's pre-activation crosses 0: images with one that close
    (`at_kink`) are left out of the cam comparisons, and the graph is refused if they are more than
    MAX_KINK_FRACTION of the images."""
    onnx.checker.check_model(str(path), full_check=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    if names != output_names(net):
        raise VerificationError(f"explain.onnx outputs {names}, expected {output_names(net)}")
    explain = ExplainModel(net, temperature).eval()
    softmax = ProbabilitiesModel(net, temperature).eval()
    diffs = {"probabilities": 0.0, "cam": 0.0, "cam_module": 0.0, "activations": 0.0}
    scale = block_scale = 0.0

    def note(key: str, expected: np.ndarray, got: np.ndarray) -> None:
        nonlocal block_scale
        if expected.size:
            diffs[key] = max(diffs[key], float(np.abs(expected - got).max()))
            if key == "activations":
                block_scale = max(block_scale, float(np.abs(expected).max()))

    for size in PARITY_BATCH_SIZES:
        x = to_tensor(np.resize(images, (size, *images.shape[1:])))  # repeats images when there are fewer
        got = session.run(None, {EXPLAIN_INPUT: x.numpy()})
        with torch.no_grad():
            expected = [t.numpy() for t in explain(x)]
        note("probabilities", expected[0], got[0])
        smooth = ~at_kink(net, x)
        note("cam_module", expected[1][smooth], got[1][smooth])
        for want, have in zip(expected[2:], got[2:], strict=True):
            note("activations", want, have)
        scale = max(scale, float(np.abs(expected[1]).max()))
    sample, kinks = images[:CHECK_IMAGES], 0
    for start in range(0, len(sample), 64):
        x = to_tensor(sample[start : start + 64])
        got = session.run(None, {EXPLAIN_INPUT: x.numpy()})
        with torch.no_grad():
            note("probabilities", softmax(x).numpy(), got[0])
        reference, smooth = autograd_grad_cam(net, x), ~at_kink(net, x)
        note("cam", reference[smooth], got[1][smooth])
        kinks += int((~smooth).sum())
        scale = max(scale, float(np.abs(reference).max()))
        for i, image in enumerate(x[: max(0, BLOCK_IMAGES - start)]):
            for activation in block_activations(net, image):
                note("activations", activation.maps, got[1 + activation.block][i])
    check = ExplainCheck(
        PARITY_BATCH_SIZES, len(sample), kinks, cam_scale=scale, block_scale=block_scale, **diffs
    )
    failures = [
        f"max |diff| of {what} {value:.2e} (limit {limit:.0e})"
        for what, value, limit in (
            ("probabilities", check.probabilities, MAX_ABS_DIFF),
            ("cam vs autograd", check.cam, check.cam_limit),
            ("cam vs PyTorch", check.cam_module, check.cam_limit),
            ("blocks", check.activations, check.block_limit),
        )
        if not value <= limit  # a NaN fails too
    ]
    if kinks > MAX_KINK_FRACTION * len(sample):
        failures.append(f"{kinks} of {len(sample)} images at a ReLU kink (at most {MAX_KINK_FRACTION:.0%})")
    if failures:
        raise VerificationError("explain.onnx does not match PyTorch: " + "; ".join(failures))
    return check
