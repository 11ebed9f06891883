"""FLOPs, counted by fvcore on a trace of the model itself, and parameters, counted on its tensors.

Two FLOPs conventions, each from an fvcore trace of a single input (a 32x32 image) in eval mode:

- ``paper``: the convention of the HetConv paper's VGG-16 table. A standard convolution costs its
  multiply-adds plus one operation per output; a HetConv layer costs R(P) = 1/P + (1 - 1/P)/9 of
  the standard 3x3 convolution it replaces, the share of its weights that are not structural zeros;
  the two linear layers count their multiply-adds; BatchNorm, ReLU and pooling are free.
- ``executed``: what the implementation runs, as fvcore counts it by default (one multiply-add
  = 1): the grouped 3x3 convolution, the whole 1x1 convolution including its masked block
  diagonal, and BatchNorm at 2 operations per element (eval mode). ReLU and pooling, which fvcore's
  default handles skip, are not counted, nor are the masking and the sum of the two branches,
  weight- and activation-sized elementwise ops.
  A layer run as one dense convolution (impl="dense", or "auto" on CUDA) executes, and counts
  as, the standard convolution.
"""

import math
import warnings

import torch
from torch import nn

with warnings.catch_warnings():  # fvcore uses torch.jit, deprecated in current torch but working
    warnings.simplefilter("ignore", FutureWarning)
    from fvcore.nn import FlopCountAnalysis
    from fvcore.nn.jit_handles import get_shape

from hetconv.layer import HetConv2d

CONVENTIONS = ("paper", "executed")


def paper_ratio(part: int) -> float:
    """R(P): the fraction of a standard 3x3 convolution's FLOPs that a HetConv layer costs in the paper."""
    return 1 / part + (1 - 1 / part) / 9


def _paper_convolution(model: nn.Module):
    """fvcore handle for aten::_convolution in the paper's convention.

    "Ignoring zeros": each weight a HetConv layer uses, 3x3 or 1x1, carries an equal share of the cost of
    the standard layer, whose 9 M N weights cost (9M + 1) per output. The weights are read off the layer
    itself, its 3x3 weights and its 1x1 mask, so the paper's layer costs R(P) = 1/P + (1 - 1/P)/9 of the
    standard one, and a layer built otherwise (its mask left open, say) is not priced as the paper's. Its
    grouped 3x3 convolution carries its 3x3 weights and its 1x1 convolution the 1x1 weights; run as one
    dense convolution (impl="dense", or "auto" on CUDA), that carries both.
    The layer is found through the module scope fvcore records on every traced op.
    """
    hetconvs = {name: m for name, m in model.named_modules() if isinstance(m, HetConv2d)}

    def handle(inputs, outputs) -> float:
        n_outputs = math.prod(get_shape(outputs[0]))
        kernel = get_shape(inputs[1])  # (out, in/groups, kh, kw)
        layer = hetconvs.get(outputs[0].node().scopeName().split("/")[-1])
        if layer is None:
            return n_outputs * (math.prod(kernel[1:]) + 1)
        per_weight = n_outputs * (9 * layer.in_channels + 1) / (9 * layer.in_channels * layer.out_channels)
        weights3x3 = layer.weight3x3.numel()
        weights1x1 = 0 if layer.weight1x1 is None else layer.weight1x1.numel() - layer.num_structural_zeros
        if kernel[-1] == 1:
            return per_weight * weights1x1
        if kernel[1] == layer.in_channels // layer.part:
            return per_weight * weights3x3
        return per_weight * (weights3x3 + weights1x1)

    return handle


def _not_counted(inputs, outputs) -> int:
    # A zero-count handle: fvcore's set_op_handle(op, None) does not remove a built-in handle.
    return 0


def count_flops(model: nn.Module, convention: str = "paper", input_shape: tuple[int, ...] = (3, 32, 32)) -> float:
    """FLOPs of one forward pass on one input, in the given convention (see the module docstring)."""
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    parameter = next(model.parameters(), torch.zeros(()))
    image = torch.zeros(1, *input_shape, device=parameter.device, dtype=parameter.dtype)
    modes = {module: module.training for module in model.modules()}  # each its own: a frozen BatchNorm stays so
    model.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            analysis = FlopCountAnalysis(model, image)
            analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            if convention == "paper":
                analysis.set_op_handle(**{"aten::_convolution": _paper_convolution(model),
                                          "aten::batch_norm": _not_counted})
            return float(analysis.total())
    finally:
        for module, training in modes.items():
            module.training = training


def count_params(model: nn.Module) -> tuple[int, int]:
    """(effective, stored) parameters: stored counts every element, effective leaves out the
    structural zeros of HetConv layers (the 1x1 weights on each filter's own group)."""
    stored = sum(p.numel() for p in model.parameters())
    zeros = sum(m.num_structural_zeros for m in model.modules() if isinstance(m, HetConv2d))
    return stored - zeros, stored


def model_costs(model: nn.Module) -> dict[str, float]:
    """What a run records of a model's cost: FLOPs in both conventions, effective and stored parameters."""
    params, stored_params = count_params(model)
    return {"flops": count_flops(model, "paper"), "executed_flops": count_flops(model, "executed"),
            "params": params, "stored_params": stored_params}


def truncate_millions(count: float) -> float:
    """Millions truncated (not rounded) to 0.01M, as the paper prints FLOPs."""
    return math.floor(count / 1e6 * 100 + 1e-9) / 100


def describe_flops(costs: dict[str, float]) -> str:
    """A model_costs' FLOPs as train.log and eval.py print them, truncated as the paper prints them."""
    return (f"FLOPs {truncate_millions(costs['flops']):.2f}M (paper convention), "
            f"{truncate_millions(costs['executed_flops']):.2f}M executed")
