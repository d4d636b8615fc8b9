"""Training-time augmentation on whole batches: random crop with zero padding, horizontal flip.

Both run on the batch tensor (no per-image Python loop), from an explicit generator, so a run is
reproducible and a resumed run draws exactly what the uninterrupted one would have.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from training.datasets import FASHION_MNIST_CLASSES, Dataset


@dataclass(frozen=True)
class Augmentation:
    crop_padding: int = 0  # shift each image by up to this many pixels (zero padding, then crop back)
    flip: bool = False  # mirror half of the images left-right

    @property
    def active(self) -> bool:
        return self.crop_padding > 0 or self.flip


def default_augmentation(dataset: Dataset) -> Augmentation:
    """What the dataset allows: nothing for the 8x8 digits (a shifted or mirrored digit is another
    glyph), no flip for IDX data other than Fashion-MNIST (it may be MNIST digits), both for clothes
    and for a user's photos."""
    if dataset.name == "digits":
        return Augmentation()
    side = min(dataset.height, dataset.width)
    padding = max(1, side // 14)  # 2 pixels for 28x28, 4 for 64x64
    if dataset.name.startswith("idx:"):
        return Augmentation(padding, flip=dataset.class_names == FASHION_MNIST_CLASSES)
    return Augmentation(padding, flip=True)


def augment(x: torch.Tensor, augmentation: Augmentation, generator: torch.Generator) -> torch.Tensor:
    """Returns an augmented copy of the (N, C, H, W) batch; the input is left as it is."""
    n, _, height, width = x.shape
    if augmentation.crop_padding > 0:
        p = augmentation.crop_padding
        padded = torch.nn.functional.pad(x, (p, p, p, p))
        dy = torch.randint(0, 2 * p + 1, (n, 1, 1), generator=generator)
        dx = torch.randint(0, 2 * p + 1, (n, 1, 1), generator=generator)
        rows = dy + torch.arange(height).view(1, height, 1)
        cols = dx + torch.arange(width).view(1, 1, width)
        # (N, H+2p, W+2p, C) indexed per image by its own window -> (N, H, W, C)
        x = padded.permute(0, 2, 3, 1)[torch.arange(n).view(n, 1, 1), rows, cols].permute(0, 3, 1, 2)
    if augmentation.flip:
        mirror = torch.rand(n, generator=generator) < 0.5
        x = torch.where(mirror.view(n, 1, 1, 1), x.flip(3), x)
    return x.contiguous()
