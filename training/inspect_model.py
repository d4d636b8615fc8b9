"""What a trained network is made of and what it computes: its layer table, its first-layer filters
and the activation maps of its convolution blocks, all read from the real model on real input."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from training.model import ConvNet


@dataclass(frozen=True)
class LayerRow:
    name: str  # the module's path in the model, e.g. features.0
    kind: str  # what it does, e.g. "Conv2d 1→32, 3×3, padding 1"
    output_shape: tuple[int, ...]  # one image's output, without the batch axis
    parameters: int  # trainable parameters of this layer alone


def describe(module: nn.Module) -> str:
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return f"Conv2d {module.in_channels}→{module.out_channels}, {kh}×{kw}, padding {module.padding[0]}"
    if isinstance(module, nn.BatchNorm2d):
        return f"BatchNorm2d {module.num_features}"
    if isinstance(module, nn.MaxPool2d):
        return f"MaxPool2d {module.kernel_size}×{module.kernel_size}"
    if isinstance(module, nn.Linear):
        return f"Linear {module.in_features}→{module.out_features}"
    if isinstance(module, nn.Dropout):
        return f"Dropout p={module.p}"
    return type(module).__name__


def layer_table(model: nn.Module, example: torch.Tensor) -> list[LayerRow]:
    """One row per leaf module in the order the forward pass runs them, shapes from `example`."""
    rows: list[LayerRow] = []
    leaves = [(name, m) for name, m in model.named_modules() if not list(m.children()) and name]

    def hook_for(name: str):
        def hook(module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
            params = sum(p.numel() for p in module.parameters(recurse=False) if p.requires_grad)
            rows.append(LayerRow(name, describe(module), tuple(output.shape[1:]), params))

        return hook

    handles = [module.register_forward_hook(hook_for(name)) for name, module in leaves]
    try:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            model(example[:1])
        model.train(was_training)
    finally:
        for handle in handles:
            handle.remove()
    return rows


def first_layer_filters(model: ConvNet) -> np.ndarray:
    """The first convolution's weights, (filters, input channels, kh, kw)."""
    conv = next(m for m in model.features if isinstance(m, nn.Conv2d))
    return conv.weight.detach().cpu().numpy().copy()


@dataclass(frozen=True)
class BlockActivation:
    block: int  # 1-based
    maps: np.ndarray  # (channels, h, w): the block's last ReLU output for one image, before pooling


def conv_blocks(model: ConvNet) -> list[list[nn.Module]]:
    """The layers of each pooling block (convolutions, batch norms, ReLUs), its pooling left out."""
    blocks: list[list[nn.Module]] = [[]]
    for module in model.features:
        if isinstance(module, nn.MaxPool2d):
            blocks.append([])
        else:
            blocks[-1].append(module)
    return [block for block in blocks if block]


def block_activations(model: ConvNet, image: torch.Tensor) -> list[BlockActivation]:
    """Each block's feature maps after its last ReLU (what the pooling reads), for one image (C, H, W)."""
    captured: list[np.ndarray] = []
    # The ReLU works in place and pooling reads it next: copy the maps as the ReLU hands them on.
    handles = [
        block[-1].register_forward_hook(
            lambda _m, _i, out: captured.append(out[0].detach().cpu().numpy().copy())
        )
        for block in conv_blocks(model)
    ]
    try:
        model.eval()
        with torch.no_grad():
            model(image.unsqueeze(0))
    finally:
        for handle in handles:
            handle.remove()
    return [BlockActivation(i + 1, maps) for i, maps in enumerate(captured)]


def block_descriptions(model: ConvNet) -> list[str]:
    """'Conv2d 1→32, 3×3, padding 1 → BatchNorm2d 32 → ReLU' for each block."""
    return [" → ".join(describe(module) for module in block) for block in conv_blocks(model)]
