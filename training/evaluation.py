"""A model on a split: loss, accuracy and confusion, from pixels scaled exactly as the server scales them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from training.datasets import Split

# The server multiplies pixels by the contract's float32 scale; the same product here keeps training's
# input bit-identical to what the server feeds (a division by 255 differs in the last bit for half the
# values).
PIXEL_SCALE = float(np.float32(1.0 / 255.0))


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 pixels to float in [0, 1]: exactly as the server scales them before the graph."""
    return torch.from_numpy(images).float().mul_(PIXEL_SCALE)


@dataclass(frozen=True)
class Evaluation:
    loss: float
    accuracy: float
    confusion: np.ndarray  # (classes, classes): rows are true classes

    @property
    def per_class_accuracy(self) -> list[float]:
        totals = self.confusion.sum(axis=1)
        return [float(c / t) if t else 0.0 for c, t in zip(np.diag(self.confusion), totals, strict=True)]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    split: Split,
    num_classes: int,
    batch_size: int = 512,
    device: torch.device | None = None,
) -> Evaluation:
    model.eval()
    device = device or torch.device("cpu")
    loss_sum, confusion = 0.0, np.zeros((num_classes, num_classes), dtype=np.int64)
    for start in range(0, len(split), batch_size):
        x = to_tensor(split.images[start : start + batch_size]).to(device, memory_format=torch.channels_last)
        y = torch.from_numpy(split.labels[start : start + batch_size]).to(device)
        logits = model(x)
        loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").item()
        np.add.at(confusion, (y.cpu().numpy(), logits.argmax(1).cpu().numpy()), 1)
    accuracy = float(np.trace(confusion) / max(len(split), 1))
    return Evaluation(loss_sum / max(len(split), 1), accuracy, confusion)
