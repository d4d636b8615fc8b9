"""Reference models for `serving bench`, with random weights (nothing to download):

  digits     the digits CNN (1x8x8, 10 classes): tiny, so serving overhead is the whole story
  resnet18   a ResNet-18-shaped network for 3x32x32 input (CIFAR-style stem): compute-bound on a CPU
  resnet50   a ResNet-50-sized network for 3x224x224 input (ImageNet stem, 1,000 classes): for GPUs

Each is exported like a trained model (metadata, dynamic batch axis) and checked against PyTorch.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from serving.core.contract import ColorMode, Fit, ModelContract, ResizeMode
from training.export import MAX_ABS_DIFF, MODEL_FILE, export_onnx, write_metadata
from training.model import ConvNet, ProbabilitiesModel


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        )
        self.shortcut = shortcut(in_ch, out_ch, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int) -> None:
        super().__init__()
        out_ch = width * self.expansion
        self.body = nn.Sequential(
            nn.Conv2d(in_ch, width, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, stride, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        )
        self.shortcut = shortcut(in_ch, out_ch, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


def shortcut(in_ch: int, out_ch: int, stride: int) -> nn.Module:
    if stride == 1 and in_ch == out_ch:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))


class ResNet(nn.Module):
    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        depths: tuple[int, ...],
        num_classes: int,
        small_input: bool,
    ) -> None:
        super().__init__()
        if small_input:  # 32x32: a 3x3 stem and no pooling, as ResNets for CIFAR do
            self.stem = nn.Sequential(
                nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True)
            )
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(3, 64, 7, 2, 3, bias=False),
                nn.BatchNorm2d(64),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, 2, 1),
            )
        layers, in_ch = [], 64
        for stage, depth in enumerate(depths):
            width = 64 * 2**stage
            for i in range(depth):
                layers.append(block(in_ch, width, 2 if i == 0 and stage > 0 else 1))
                in_ch = width * block.expansion
        self.layers = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_ch, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(self.stem(x)))


ARCHITECTURES: dict[str, tuple[Callable[[], nn.Module], ColorMode, int, int]] = {
    # name: (builder, color_mode, side, classes)
    "digits": (lambda: ConvNet(1, 8, 8, 10), "L", 8, 10),
    "resnet18": (lambda: ResNet(BasicBlock, (2, 2, 2, 2), 10, small_input=True), "RGB", 32, 10),
    "resnet50": (lambda: ResNet(Bottleneck, (3, 4, 6, 3), 1000, small_input=False), "RGB", 224, 1000),
}


def build_reference(
    arch: str, repository: Path, name: str | None = None, seed: int = 0, resize: ResizeMode = "stretch"
) -> Path:
    """Exports `arch` with random weights to `repository/name/1/model.onnx` (kept when already there).

    `resize` letterbox or crop writes that preprocessing into the contract (crop: the shorter side to
    8/7 of the input first, as 256 → 224 does), so the bench can compare their cost with stretch's.
    """
    if name is None and resize != "stretch":
        name = f"{arch}-{resize}"
    import onnxruntime as ort

    builder, color_mode, side, classes = ARCHITECTURES[arch]
    target = repository / (name or arch) / "1" / MODEL_FILE
    if target.exists():
        return target
    torch.manual_seed(seed)
    model = ProbabilitiesModel(builder()).eval()
    channels = 1 if color_mode == "L" else 3
    example = torch.rand(2, channels, side, side)
    target.parent.mkdir(parents=True)
    export_onnx(model, example, target)
    contract = ModelContract(
        labels=tuple(str(i) for i in range(classes)),
        fit=Fit(
            color_mode,
            side,
            side,
            resize=resize,
            resize_to=side * 8 // 7 if resize == "crop" else None,
            fill=(114.0,) if resize == "letterbox" else (0.0,),
        ),
        extra={"reference": arch},
    )
    write_metadata(target, contract.to_metadata())
    x = torch.rand(3, channels, side, side)
    with torch.no_grad():
        expected = model(x).numpy()
    got = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"]).run(
        None, {"image": x.numpy()}
    )[0]
    if not np.abs(expected - got).max() <= MAX_ABS_DIFF * 10:
        target.unlink()
        raise RuntimeError(f"{arch}: ONNX Runtime differs from PyTorch by {np.abs(expected - got).max():.2e}")
    return target
