"""The VGG-16 variant of the paper (Li et al. 2017) and its width scaling."""

import pytest
import torch
from torch import nn

from hetconv import HetConv2d
from models import vgg16


def test_structure_matches_the_paper_variant():
    model = vgg16(part=4)
    convs = [m for m in model.features if isinstance(m, (nn.Conv2d, HetConv2d))]
    assert len(convs) == 13
    assert isinstance(convs[0], nn.Conv2d) and (convs[0].in_channels, convs[0].out_channels) == (3, 64)
    assert all(isinstance(c, HetConv2d) and c.part == 4 for c in convs[1:])
    assert [c.out_channels for c in convs] == [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.features) == 13
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.features) == 5
    assert not any(isinstance(m, nn.Dropout) for m in model.modules())
    assert [type(m) for m in model.classifier] == [nn.Flatten, nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert (model.classifier[1].in_features, model.classifier[1].out_features) == (512, 512)
    assert model.classifier[-1].out_features == 10
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_a_tiny_width_keeps_every_layer_after_the_first_a_hetconv():
    model = vgg16(part=1, width=0.05)  # conv 2 is 3 -> 3 channels, like the first, yet must stay HetConv
    convs = [m for m in model.features if isinstance(m, (nn.Conv2d, HetConv2d))]
    assert type(convs[0]) is nn.Conv2d and all(isinstance(c, HetConv2d) for c in convs[1:])


def test_width_scales_every_channel_count():
    model = vgg16(part=4, width=0.25, num_classes=7)
    convs = [m for m in model.features if isinstance(m, (nn.Conv2d, HetConv2d))]
    assert [c.out_channels for c in convs] == [16, 16, 32, 32, 64, 64, 64, 128, 128, 128, 128, 128, 128]
    assert model.classifier[1].out_features == 128
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


@pytest.mark.parametrize("part,width,message", [
    (64, 0.25, "conv layer 2 of 13 (HetConv2d 16 -> 16 channels): part=64 must divide in_channels=16"),
    (64, 0.25, "the parts that split every HetConv layer are the divisors of 16 (of the paper's: 1, 2, 4, 8, 16)"),
    (3, 1.0, "conv layer 2 of 13 (HetConv2d 64 -> 64 channels): part=3 must divide in_channels=64"),
    (0, 1.0, "part must be >= 1, got 0"),
    (2.0, 1.0, "part must be an int, got 2.0 (float)"),
    (4, 0.0, "width must be a number > 0"),
    (4, 0.3, "HetConv2d 19 -> 19 channels"),  # 64 x 0.3 rounds to 19: no part > 1 fits
])
def test_impossible_part_and_width_fail_clearly(part, width, message):
    with pytest.raises(ValueError) as error:
        vgg16(part=part, width=width)
    assert message in str(error.value)
