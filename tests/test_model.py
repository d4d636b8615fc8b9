"""The CNN's shapes adapt to the input size; the exported wrapper gives probabilities."""

from __future__ import annotations

import pytest
import torch

from training.model import ConvNet, ProbabilitiesModel, pooling_blocks


@pytest.mark.parametrize(("size", "blocks"), [(8, 2), (28, 3), (32, 4), (64, 4), (224, 4), (4, 1)])
def test_pooling_blocks_follow_the_input_size(size: int, blocks: int) -> None:
    assert pooling_blocks(size, size) == blocks


@pytest.mark.parametrize(("channels", "height", "width"), [(1, 8, 8), (1, 28, 28), (3, 32, 32), (3, 64, 48)])
def test_forward_shapes(channels: int, height: int, width: int) -> None:
    net = ConvNet(channels, height, width, num_classes=7).eval()
    x = torch.rand(5, channels, height, width)
    assert net(x).shape == (5, 7)
    probabilities = ProbabilitiesModel(net)(x)
    assert torch.allclose(probabilities.sum(1), torch.ones(5))
    assert (probabilities >= 0).all()


def test_normalisation_is_inside_the_network() -> None:
    net = ConvNet(1, 8, 8, 3, mean=[0.5], std=[0.25]).eval()
    x = torch.rand(2, 1, 8, 8)
    assert torch.allclose(net.normalize(x), (x - 0.5) / 0.25)
