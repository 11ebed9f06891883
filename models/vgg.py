"""The CIFAR-10 VGG-16 of Li et al. 2017 ("Pruning Filters for Efficient ConvNets"), as HetConv uses it."""

import math

from torch import nn

from hetconv import HetConv2d
from hetconv.layer import check_hetconv_args

# Conv widths in order, "M" = 2x2 max pool. 13 convs, five pools: 32x32 input -> 1x1 x 512.
VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
HIDDEN = 512  # the classifier's hidden features
PAPER_PARTS = (1, 2, 4, 8, 16, 32, 64)  # the P values of the paper's VGG-16 / CIFAR-10 table


def scaled(channels: int, width: float) -> int:
    return max(1, round(channels * width))


def conv_channels(width: float = 1.0) -> list[tuple[int, int]]:
    """(in, out) channels of the 13 convs at this width, in order."""
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not width > 0:
        raise ValueError(f"width must be a number > 0, got {width!r}")
    pairs, in_channels = [], 3
    for v in VGG16_LAYOUT:
        if v != "M":
            out_channels = scaled(v, width)
            pairs.append((in_channels, out_channels))
            in_channels = out_channels
    return pairs


def conv_sides(image_size: int = 32) -> list[int]:
    """Output side of each of the 13 convs (each pool halves it)."""
    sides, side = [], image_size
    for v in VGG16_LAYOUT:
        if v == "M":
            side //= 2
        else:
            sides.append(side)
    return sides


def check_part_fits(part: int, width: float = 1.0) -> None:
    """Reject a part that does not split every HetConv layer (convs 2-13) at this width, before building."""
    hetconv_layers = conv_channels(width)[1:]
    for index, (in_channels, out_channels) in enumerate(hetconv_layers, start=2):
        try:
            check_hetconv_args(in_channels, out_channels, part)
        except ValueError as error:
            common = math.gcd(*(c for pair in hetconv_layers for c in pair))
            fitting = [p for p in PAPER_PARTS if common % p == 0]
            raise ValueError(
                f"vgg16(part={part!r}, width={width}): conv layer {index} of 13 (HetConv2d {in_channels} -> "
                f"{out_channels} channels): {error}. At width={width} the parts that split every HetConv "
                f"layer are the divisors of {common} (of the paper's: {', '.join(map(str, fitting))}); "
                f"or choose another width.") from None


class VGG(nn.Module):
    def __init__(self, part: int = 1, num_classes: int = 10, width: float = 1.0, impl: str = "auto"):
        super().__init__()
        check_part_fits(part, width)
        channels = conv_channels(width)
        pairs = iter(enumerate(channels))
        layers = []
        for v in VGG16_LAYOUT:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            index, (in_channels, out_channels) = next(pairs)
            # The first conv sees only the 3 colour channels and stays a standard convolution.
            conv = (nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False) if index == 0
                    else HetConv2d(in_channels, out_channels, part, impl=impl))
            layers += [conv, nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        hidden = scaled(HIDDEN, width)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels[-1][1], hidden),  # the last conv's channels, pooled to 1x1
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


def vgg16(part: int = 1, num_classes: int = 10, width: float = 1.0, impl: str = "auto") -> VGG:
    """VGG-16 whose 12 convs after the first are HetConv2d(part, impl=impl); width scales every channel count."""
    return VGG(part, num_classes, width, impl)
