"""HetConv2d: the heterogeneous-kernel convolution of Singh et al., CVPR 2019.

Each of the layer's filters sees in_channels/part input channels through 3x3 kernels and the other
in_channels - in_channels/part through 1x1 kernels. We compute it as a 3x3 convolution with
groups=part plus a 1x1 convolution whose weights on each filter's own group are structurally zero.
With contiguous groups, filter n has its 3x3 kernels on input block n // (out_channels/part); the
paper's "shifted" placement is the same layer up to one channel permutation (`shift_permutation`).
The same layer can also run as one dense 3x3 convolution over its assembled weight (`impl="dense"`),
which does the FLOPs of the standard layer but is the faster kernel where grouped convolutions are
slow (scripts/bench.py measures both).
"""

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

# How HetConv2d computes its output: "grouped", a grouped 3x3 conv plus a 1x1 conv (the paper's FLOPs, plus the
# 1x1's masked block diagonal); "dense", one 3x3 conv over the assembled weight; "auto", dense on CUDA, where
# cuDNN's grouped kernels run slower than its dense ones, and grouped elsewhere (scripts/bench.py times both).
IMPLS = ("auto", "grouped", "dense")


def _check_positive_int(name: str, value, context: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r} ({type(value).__name__}); {context}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}; {context}")


def check_impl(impl, name: str = "impl") -> None:
    if impl not in IMPLS:
        raise ValueError(f"{name} must be one of {', '.join(IMPLS)}, got {impl!r}")


def resolved_impl(impl: str, device: torch.device) -> str:
    """impl as "grouped" or "dense" on this device."""
    if impl != "auto":
        return impl
    return "dense" if device.type == "cuda" else "grouped"


def check_hetconv_args(in_channels: int, out_channels: int, part: int, stride: int = 1) -> None:
    """Raise ValueError naming the bad argument, its value and the channel counts."""
    context = f"HetConv2d(in_channels={in_channels!r}, out_channels={out_channels!r}, part={part!r})"
    for name, value in (("in_channels", in_channels), ("out_channels", out_channels),
                        ("part", part), ("stride", stride)):
        _check_positive_int(name, value, context)
    for name, channels in (("in_channels", in_channels), ("out_channels", out_channels)):
        if channels % part:
            raise ValueError(
                f"part={part} must divide {name}={channels} (in_channels={in_channels}, "
                f"out_channels={out_channels}); choose a part that divides both")


def shift_permutation(channels: int, part: int) -> torch.Tensor:
    """perm[c] = position, in our contiguous-group layout, of channel c of the paper's layout.

    The paper gives filter n a 3x3 kernel on input channel i when (i - n) mod part == 0; the map
    c -> (c mod part) * (channels/part) + c // part sends both n and i to group (c mod part).
    """
    c = torch.arange(channels)
    return (c % part) * (channels // part) + c // part


def pointwise_mask(in_channels: int, out_channels: int, part: int) -> torch.Tensor:
    """True where a filter has a 1x1 kernel: on every input group but the filter's own."""
    filter_group = torch.arange(out_channels) // (out_channels // part)
    channel_group = torch.arange(in_channels) // (in_channels // part)
    return (filter_group[:, None] != channel_group[None, :])[:, :, None, None]


def _zero_masked_weights_after_load(module: "HetConv2d", incompatible_keys) -> None:
    # After load_state_dict(..., assign=True) the layer's weight1x1 is the caller's tensor: it is zeroed there too.
    if module.weight1x1 is not None:
        filled = int(torch.count_nonzero(module.weight1x1.detach()[~module.mask1x1]))
        if filled:  # weights trained without the mask, say: the layer they came from is not this one
            warnings.warn(f"{module.__class__.__name__}({module.extra_repr()}): the loaded weight1x1 has {filled} "
                          "nonzero weights on the structural zeros (each filter's own input group), which HetConv "
                          "does not have; they are set to zero, so the layer computes another function than the "
                          "one they were trained in", stacklevel=2)
    module._zero_masked_weights()


class HetConv2d(nn.Module):
    """HetConv layer: grouped 3x3 convolution + 1x1 convolution off each filter's own group.

    part=1 is a standard 3x3 convolution (there are no 1x1 kernels, so no pointwise weight).
    The 1x1 weights the paper does not have are excluded in `forward` itself, kept at zero in the
    stored tensor at initialisation and after every `load_state_dict`, and receive exactly zero
    gradient: no optimizer, training loop or loaded checkpoint can bring them into play.
    """

    def __init__(self, in_channels: int, out_channels: int, part: int, stride: int = 1,
                 bias: bool = False, impl: str = "auto"):
        super().__init__()
        check_hetconv_args(in_channels, out_channels, part, stride)
        check_impl(impl)
        self.in_channels, self.out_channels, self.part, self.stride = in_channels, out_channels, part, stride
        self.impl = impl
        self.weight3x3 = nn.Parameter(torch.empty(out_channels, in_channels // part, 3, 3))
        if part > 1:
            self.weight1x1 = nn.Parameter(torch.empty(out_channels, in_channels, 1, 1))
            self.register_buffer("mask1x1", pointwise_mask(in_channels, out_channels, part), persistent=False)
        else:
            self.register_parameter("weight1x1", None)
            self.register_buffer("mask1x1", None)
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.register_load_state_dict_post_hook(_zero_masked_weights_after_load)
        self.reset_parameters()

    @property
    def fan_in(self) -> int:
        """Weights per filter: in/part 3x3 kernels and in - in/part 1x1 kernels."""
        kept = self.in_channels // self.part
        return 9 * kept + (self.in_channels - kept)

    @property
    def num_structural_zeros(self) -> int:
        """Stored 1x1 weights that are not part of the layer (the masked block diagonal)."""
        return 0 if self.mask1x1 is None else int((~self.mask1x1).sum())

    def reset_parameters(self) -> None:
        # nn.Conv2d's default scheme, over the layer's effective fan-in: part=1 is initialised
        # exactly like a standard convolution.
        bound = 1 / math.sqrt(self.fan_in)
        for weight in (self.weight3x3, self.weight1x1, self.bias):
            if weight is not None:
                nn.init.uniform_(weight, -bound, bound)
        self._zero_masked_weights()

    @torch.no_grad()
    def _zero_masked_weights(self) -> None:
        if self.weight1x1 is not None:
            self.weight1x1.masked_fill_(~self.mask1x1, 0)

    def pointwise_weight(self) -> torch.Tensor | None:
        """The 1x1 weights with the structural zeros in place (zero gradient flows to them)."""
        if self.weight1x1 is None:
            return None
        return torch.where(self.mask1x1, self.weight1x1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if resolved_impl(self.impl, x.device) == "dense":
            return F.conv2d(x, self.dense_weight(), self.bias, self.stride, 1)
        y = F.conv2d(x, self.weight3x3, self.bias, self.stride, 1, 1, self.part)
        if self.weight1x1 is None:
            return y
        return y.add_(F.conv2d(x, self.pointwise_weight(), None, self.stride))

    def dense_weight(self) -> torch.Tensor:
        """The layer as one (out, in, 3, 3) kernel: 3x3 blocks on the diagonal, 1x1 at the centre.

        Differentiable: each stored weight gets the gradient it gets in the grouped form. The 3x3 blocks
        overwrite the 1x1 weights' block diagonal, the structural zeros, which therefore neither reach
        the output nor get a gradient."""
        if self.weight1x1 is None:
            return self.weight3x3
        part, out_group, in_group = self.part, self.out_channels // self.part, self.in_channels // self.part
        weight = F.pad(self.weight1x1, (1, 1, 1, 1))
        blocks = weight.view(part, out_group, part, in_group, 3, 3).diagonal(dim1=0, dim2=2)
        blocks.copy_(self.weight3x3.view(part, out_group, in_group, 3, 3).movedim(0, -1))
        return weight

    @torch.no_grad()
    def to_dense(self, shifted: bool = False) -> nn.Conv2d:
        """A standard 3x3 nn.Conv2d computing the same function, structural zeros in its weight.

        shifted=True returns the layer in the paper's channel order: the conv acts on inputs and
        produces outputs ordered as in the paper, where filter n's 3x3 kernels sit on the input
        channels i with (i - n) mod part == 0.
        """
        weight, bias = self.dense_weight(), self.bias
        if shifted:
            out_perm = shift_permutation(self.out_channels, self.part)
            weight = weight[out_perm][:, shift_permutation(self.in_channels, self.part)]
            bias = None if bias is None else bias[out_perm]
        conv = nn.Conv2d(self.in_channels, self.out_channels, 3, self.stride, 1, bias=bias is not None)
        conv = conv.to(device=weight.device, dtype=weight.dtype)
        conv.weight.copy_(weight)
        if bias is not None:
            conv.bias.copy_(bias)
        return conv

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, part={self.part}, stride={self.stride}, "
                f"bias={self.bias is not None}, impl={self.impl!r}")
