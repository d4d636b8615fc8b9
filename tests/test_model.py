"""The CNN's shapes adapt to the input size; the exported wrapper gives probabilities."""

from __future__ import annotations

import pytest
import torch

from training.inspect_model import block_activations, block_descriptions, conv_blocks
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


def test_one_convolution_blocks_keep_the_state_dict_of_earlier_runs() -> None:
    """Run folders written before `block_convs` existed load into the default network."""
    convs = [k for k in ConvNet(1, 28, 28, 10).state_dict() if k.endswith(".weight") and "features" in k]
    assert convs == [f"features.{i}.weight" for i in (0, 1, 4, 5, 8, 9)]  # conv, BN per block; pool at 3, 7


@pytest.mark.parametrize("block_convs", [1, 2, 3])
def test_blocks_after_the_first_stack_block_convs_convolutions(block_convs: int) -> None:
    net = ConvNet(1, 28, 28, 10, block_convs=block_convs).eval()
    blocks = conv_blocks(net)
    widths = [[m.out_channels for m in block if isinstance(m, torch.nn.Conv2d)] for block in blocks]
    assert widths == [[32], [64] * block_convs, [128] * block_convs]
    x = torch.rand(3, 1, 28, 28)
    # The block's last ReLU feeds the pooling; its maps are what the report shows for the block.
    expected, y = [], net.normalize(x[:1])
    with torch.no_grad():
        for layer in net.features:
            if isinstance(layer, torch.nn.MaxPool2d):
                expected.append(y[0].clone())
            y = layer(y)
    activations = block_activations(net, x[0])
    assert [a.maps.shape for a in activations] == [(32, 28, 28), (64, 14, 14), (128, 7, 7)]
    for activation, maps in zip(activations, expected, strict=True):
        assert torch.equal(torch.from_numpy(activation.maps), maps)
    assert block_descriptions(net)[1].count("Conv2d") == block_convs
    assert net(x).shape == (3, 10)


def test_block_convs_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        ConvNet(1, 28, 28, 10, block_convs=0)
