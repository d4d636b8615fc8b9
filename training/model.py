"""The CNN: blocks of convolution -> ReLU -> pooling, then fully connected layers and softmax.

Depth adapts to the input: a pooling block is added while the feature map can still halve to at least
2x2, at most 4 (8x8 digits get 2 blocks, 28x28 Fashion-MNIST 3, 32x32 and larger images 4). Every block
after the first may stack `block_convs` convolutions before its pooling (more depth where the maps are
small and cheap); the first, at full resolution, keeps one.
"""

from __future__ import annotations

import torch
from torch import nn

WIDTHS = (32, 64, 128, 128)


def pooling_blocks(height: int, width: int) -> int:
    blocks, side = 0, min(height, width)
    while side // 2 >= 2 and blocks < len(WIDTHS):
        side //= 2
        blocks += 1
    return max(blocks, 1)


class Normalize(nn.Module):
    """(x - mean) / std inside the graph, so a server only scales pixels to [0, 1]."""

    mean: torch.Tensor  # registered buffers (nn.Module.__getattr__ cannot say which attribute is a tensor)
    std: torch.Tensor

    def __init__(self, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class ConvNet(nn.Module):
    """Returns logits; `ProbabilitiesModel` adds the softmax for export."""

    def __init__(
        self,
        channels: int,
        height: int,
        width: int,
        num_classes: int,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        block_convs: int = 1,
    ) -> None:
        super().__init__()
        if block_convs < 1:
            raise ValueError(f"block_convs must be at least 1, not {block_convs}")
        self.normalize = Normalize(mean or [0.0] * channels, std or [1.0] * channels)
        layers: list[nn.Module] = []
        in_ch = channels
        # One flat Sequential (conv, BN, ReLU, ..., pool): the state-dict keys of one-conv runs stay
        # those of every earlier checkpoint.
        for block, out_ch in enumerate(WIDTHS[: pooling_blocks(height, width)]):
            for _ in range(1 if block == 0 else block_convs):
                layers += [
                    nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1, bias=False),
                    nn.BatchNorm2d(out_ch),
                    nn.ReLU(inplace=True),
                ]
                in_ch = out_ch
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        with torch.no_grad():
            flat = self.features(torch.zeros(1, channels, height, width)).numel()
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(0.25),
            nn.Linear(flat, 128),
            nn.ReLU(inplace=True),
            nn.Dropout(0.25),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(self.normalize(x)))


class ProbabilitiesModel(nn.Module):
    """The exported graph: pixels scaled to [0, 1] in, class probabilities out; with a temperature T
    (training/calibration.py), softmax(logits / T). T = 1 leaves the division out of the graph."""

    def __init__(self, net: nn.Module, temperature: float = 1.0) -> None:
        super().__init__()
        self.net = net
        self.temperature = temperature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return calibrated_softmax(self.net(x), self.temperature)


class EnergyScoredModel(nn.Module):
    """ProbabilitiesModel's graph with a second output, `score`: each image's energy score
    T·logsumexp(logits / T), when export chose it as the abstain score (the probabilities cannot
    give it back: they lose the logits' scale)."""

    def __init__(self, net: nn.Module, temperature: float = 1.0) -> None:
        super().__init__()
        self.net = net
        self.temperature = temperature

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.net(x)
        return calibrated_softmax(logits, self.temperature), calibrated_energy(logits, self.temperature)


def calibrated_softmax(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(logits / T), written once for model.onnx and explain.onnx so both graphs compute the
    very same probabilities."""
    if temperature != 1.0:
        logits = logits / temperature
    return torch.softmax(logits, dim=1)


def calibrated_energy(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """The negative free energy T·logsumexp(logits / T), one per image (Liu et al., NeurIPS 2020)."""
    if temperature == 1.0:
        return torch.logsumexp(logits, dim=1)
    return temperature * torch.logsumexp(logits / temperature, dim=1)
