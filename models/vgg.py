"""The CIFAR-10 VGG-16 of Li et al. 2017 ("Pruning Filters for Efficient ConvNets"), as HetConv uses it."""

from torch import nn

from hetconv import HetConv2d

# Conv widths in order, "M" = 2x2 max pool. 13 convs, five pools: 32x32 input -> 1x1 x 512.
VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def conv_channels(width: float = 1.0) -> list[tuple[int, int]]:
    """(in, out) channels of the 13 convs at this width, in order."""
    if not width > 0:
        raise ValueError(f"width must be > 0, got {width!r}")
    pairs, in_channels = [], 3
    for v in VGG16_LAYOUT:
        if v != "M":
            out_channels = max(1, round(v * width))
            pairs.append((in_channels, out_channels))
            in_channels = out_channels
    return pairs


def check_part_fits(part: int, width: float = 1.0) -> None:
    """Reject a part that does not divide the channel counts of every HetConv layer, before building."""
    if isinstance(part, bool) or not isinstance(part, int) or part < 1:
        raise ValueError(f"part must be an int >= 1, got {part!r}")
    pairs = conv_channels(width)
    for index, (in_channels, out_channels) in enumerate(pairs[1:], start=2):
        if in_channels % part or out_channels % part:
            narrowest = min(min(p) for p in pairs[1:])
            raise ValueError(
                f"vgg16(part={part}, width={width}): conv layer {index} of 13 (HetConv2d "
                f"{in_channels} -> {out_channels} channels) cannot be split into {part} parts; "
                f"part must divide both channel counts of every HetConv layer. At width={width} the "
                f"narrowest layer has {narrowest} channels: use a part that divides {narrowest}, "
                f"or a larger width.")


class VGG(nn.Module):
    def __init__(self, part: int = 1, num_classes: int = 10, width: float = 1.0):
        super().__init__()
        check_part_fits(part, width)
        self.part, self.width = part, width
        pairs = iter(conv_channels(width))
        layers = []
        for v in VGG16_LAYOUT:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            in_channels, out_channels = next(pairs)
            # The first conv sees only the 3 colour channels and stays a standard convolution.
            conv = (nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False) if in_channels == 3
                    else HetConv2d(in_channels, out_channels, part))
            layers += [conv, nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        hidden = max(1, round(512 * width))
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(out_channels, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


def vgg16(part: int = 1, num_classes: int = 10, width: float = 1.0) -> VGG:
    """VGG-16 whose 12 convs after the first are HetConv2d(part); width scales every channel count."""
    return VGG(part, num_classes, width)
