"""HetConv2d is exactly the paper's layer, and its structural zeros cannot be brought back."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hetconv import HetConv2d, shift_permutation
from hetconv.layer import resolved_impl

SHAPES = [  # in, out, part, stride, spatial (odd sizes included)
    (8, 8, 2, 1, 7),
    (8, 12, 4, 2, 9),
    (6, 6, 6, 1, 5),     # part == in_channels: one 3x3 kernel per filter
    (12, 6, 3, 2, 6),
    (4, 8, 1, 1, 5),     # part 1: a standard convolution
    (16, 16, 16, 2, 11),
]


def reference_hetconv(x, kernels3x3, kernels1x1, part, stride):
    """The paper's definition, one filter and one input channel at a time, in float64.

    Filter n convolves input channel i with the 3x3 kernel kernels3x3[n, i] when
    (i - n) mod part == 0 (the shifted placement) and with the 1x1 weight kernels1x1[n, i] otherwise.
    """
    out_channels, in_channels = kernels3x3.shape[:2]
    padded = F.pad(x, (1, 1, 1, 1))
    height = (x.shape[2] - 1) // stride + 1
    width = (x.shape[3] - 1) // stride + 1
    y = torch.zeros(x.shape[0], out_channels, height, width, dtype=torch.float64)
    for n in range(out_channels):
        for i in range(in_channels):
            if (i - n) % part == 0:
                for u in range(3):
                    for v in range(3):
                        window = padded[:, i, u:u + stride * (height - 1) + 1:stride,
                                        v:v + stride * (width - 1) + 1:stride]
                        y[:, n] += kernels3x3[n, i, u, v] * window
            else:
                y[:, n] += kernels1x1[n, i] * x[:, i, ::stride, ::stride]
    return y


def load_paper_weights(layer, kernels3x3, kernels1x1, bias):
    """Write weights given in the paper's shifted layout into our layer, channel by channel."""
    out_perm = shift_permutation(layer.out_channels, layer.part)
    in_perm = shift_permutation(layer.in_channels, layer.part)
    in_per_group = layer.in_channels // layer.part
    with torch.no_grad():
        layer.bias[out_perm] = bias
        for n in range(layer.out_channels):
            for i in range(layer.in_channels):
                ours_n, ours_i = out_perm[n], in_perm[i]
                if (i - n) % layer.part == 0:
                    layer.weight3x3[ours_n, ours_i % in_per_group] = kernels3x3[n, i]
                else:
                    layer.weight1x1[ours_n, ours_i, 0, 0] = kernels1x1[n, i]


@pytest.mark.parametrize("impl", ["grouped", "dense"])
@pytest.mark.parametrize("in_channels,out_channels,part,stride,size", SHAPES)
def test_layer_equals_paper_definition_through_the_permutation(in_channels, out_channels, part, stride, size, impl):
    torch.manual_seed(0)
    layer = HetConv2d(in_channels, out_channels, part, stride=stride, bias=True, impl=impl).double()
    kernels3x3 = torch.randn(out_channels, in_channels, 3, 3, dtype=torch.float64)
    kernels1x1 = torch.randn(out_channels, in_channels, dtype=torch.float64)
    bias = torch.randn(out_channels, dtype=torch.float64)
    load_paper_weights(layer, kernels3x3, kernels1x1, bias)
    x_paper = torch.randn(2, in_channels, size, size, dtype=torch.float64)
    expected = reference_hetconv(x_paper, kernels3x3, kernels1x1, part, stride) + bias[:, None, None]

    # Our layout holds paper channel c at position perm[c], for inputs and outputs alike.
    in_perm = shift_permutation(in_channels, part)
    out_perm = shift_permutation(out_channels, part)
    x_ours = torch.empty_like(x_paper)
    x_ours[:, in_perm] = x_paper
    torch.testing.assert_close(layer(x_ours)[:, out_perm], expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer.to_dense(shifted=True)(x_paper), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("in_channels,out_channels,part,stride,size", SHAPES)
def test_to_dense_computes_the_same_function(in_channels, out_channels, part, stride, size):
    torch.manual_seed(1)
    layer = HetConv2d(in_channels, out_channels, part, stride=stride, bias=True).double()
    dense = layer.to_dense()
    assert isinstance(dense, torch.nn.Conv2d) and dense.kernel_size == (3, 3) and dense.groups == 1
    x = torch.randn(3, in_channels, size, size, dtype=torch.float64)
    torch.testing.assert_close(dense(x), layer(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("in_channels,out_channels,part,stride,size", SHAPES)
def test_both_impls_give_every_weight_the_same_gradient(in_channels, out_channels, part, stride, size, channels_last):
    torch.manual_seed(4)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    grouped = HetConv2d(in_channels, out_channels, part, stride=stride, bias=True, impl="grouped").double()
    dense = HetConv2d(in_channels, out_channels, part, stride=stride, bias=True, impl="dense").double()
    dense.load_state_dict(grouped.state_dict())
    x = torch.randn(3, in_channels, size, size, dtype=torch.float64).contiguous(memory_format=layout)
    for layer in (grouped, dense):
        layer.to(memory_format=layout)(x).sin().sum().backward()
    for (name, a), b in zip(grouped.named_parameters(), dense.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-10, atol=1e-10, msg=name)
    if part > 1:
        assert torch.count_nonzero(dense.weight1x1.grad[~dense.mask1x1]) == 0  # none reaches the structural zeros


def test_auto_resolves_to_dense_on_cuda_and_grouped_elsewhere_and_an_unknown_impl_is_refused():
    assert resolved_impl("auto", torch.device("cuda")) == "dense"
    assert resolved_impl("auto", torch.device("cpu")) == "grouped"
    assert resolved_impl("auto", torch.device("mps")) == "grouped"  # every device but CUDA
    assert resolved_impl("grouped", torch.device("cuda")) == "grouped"
    with pytest.raises(ValueError, match="impl must be one of auto, grouped, dense, got 'fast'"):
        HetConv2d(8, 8, 2, impl="fast")


def test_dense_weight_has_the_paper_pattern_of_zeros():
    layer = HetConv2d(8, 12, 4)
    weight = layer.to_dense(shifted=True).weight
    for n in range(12):
        for i in range(8):
            ring = weight[n, i].clone()
            ring[1, 1] = 0
            assert bool(ring.any()) == ((i - n) % 4 == 0)  # 3x3 kernel exactly on the shifted positions
            assert weight[n, i, 1, 1] != 0                  # a 1x1 or a 3x3 kernel everywhere
    assert int((weight != 0).sum()) == 12 * (8 // 4) * 9 + 12 * (8 - 8 // 4)


def test_part_one_is_a_standard_convolution():
    layer = HetConv2d(4, 6, 1)
    assert layer.weight1x1 is None and layer.num_structural_zeros == 0
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(layer(x), F.conv2d(x, layer.weight3x3, padding=1))


def test_initialisation_is_nn_conv2d_s_over_the_layer_s_fan_in():
    torch.manual_seed(0)
    standard = nn.Conv2d(16, 32, 3, padding=1)
    torch.manual_seed(0)
    layer = HetConv2d(16, 32, 1, bias=True)
    torch.testing.assert_close((layer.weight3x3, layer.bias), (standard.weight, standard.bias))
    layer = HetConv2d(64, 64, 4)  # a filter holds 16 3x3 kernels and 48 1x1 ones
    bound = 1 / math.sqrt(16 * 9 + 48)
    for weights in (layer.weight3x3, layer.weight1x1[layer.mask1x1]):  # uniform on [-bound, bound]
        assert 0.99 * bound < weights.abs().max() <= bound


def masked_entries(layer):
    return layer.weight1x1[~layer.mask1x1]


@pytest.mark.parametrize("make_optimizer", [
    lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.9, weight_decay=5e-4, nesterov=True),
    lambda p: torch.optim.Adam(p, lr=0.1, weight_decay=5e-4),
    lambda p: torch.optim.AdamW(p, lr=0.1, weight_decay=0.1),
], ids=["sgd-momentum-wd", "adam-l2", "adamw"])
@pytest.mark.parametrize("impl", ["grouped", "dense"])
def test_structural_zeros_survive_optimizer_steps(make_optimizer, impl):
    torch.manual_seed(2)
    layer = HetConv2d(8, 8, 4, impl=impl)
    optimizer = make_optimizer(layer.parameters())
    kept_before = layer.weight1x1[layer.mask1x1].clone()
    for _ in range(5):
        loss = layer(torch.randn(4, 8, 6, 6)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        assert torch.count_nonzero(layer.weight1x1.grad[~layer.mask1x1]) == 0
        optimizer.step()
    assert torch.count_nonzero(masked_entries(layer)) == 0
    assert not torch.equal(layer.weight1x1[layer.mask1x1], kept_before)  # the real 1x1 weights did train
    assert int((layer.to_dense().weight[:, :, 1, 1] != 0).sum()) == 8 * 8


@pytest.mark.parametrize("impl", ["grouped", "dense"])
def test_loaded_state_dict_cannot_fill_the_masked_block(impl):
    torch.manual_seed(3)
    layer = HetConv2d(8, 8, 2, impl=impl)
    x = torch.randn(2, 8, 5, 5)
    expected = layer(x)
    state = layer.state_dict()
    state["weight1x1"] = state["weight1x1"] + 10.0 * (~layer.mask1x1)  # garbage on the masked block only
    assert "mask1x1" not in state  # the structure is the layer's, not the checkpoint's

    fresh = HetConv2d(8, 8, 2, impl=impl)
    with pytest.warns(UserWarning, match="the loaded weight1x1 has 32 nonzero weights on the structural zeros"):
        fresh.load_state_dict(state)  # 2 groups of 4 filters x 4 channels
    assert torch.count_nonzero(masked_entries(fresh)) == 0
    torch.testing.assert_close(fresh(x), expected)


def test_loading_a_hetconv_layers_own_weights_does_not_warn():
    source, fresh = HetConv2d(8, 8, 2), HetConv2d(8, 8, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the warning is for weights with the structural zeros filled only
        fresh.load_state_dict(source.state_dict())
    torch.testing.assert_close(fresh.weight1x1, source.weight1x1)


@pytest.mark.parametrize("impl", ["grouped", "dense"])
def test_masked_weights_do_not_reach_the_output_even_if_written_directly(impl):
    layer = HetConv2d(8, 8, 4, impl=impl)
    x = torch.randn(2, 8, 5, 5)
    expected = layer(x)
    with torch.no_grad():
        layer.weight1x1[~layer.mask1x1] = float("nan")
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("kwargs,message", [
    (dict(in_channels=8, out_channels=8, part=0), "part must be >= 1, got 0"),
    (dict(in_channels=8, out_channels=8, part=-2), "part must be >= 1, got -2"),
    (dict(in_channels=8, out_channels=8, part=3), "part=3 must divide in_channels=8"),
    (dict(in_channels=8, out_channels=12, part=8), "part=8 must divide out_channels=12"),
    (dict(in_channels=8, out_channels=8, part=2.0), "part must be an int, got 2.0 (float)"),
    (dict(in_channels=8, out_channels=8, part=True), "part must be an int, got True (bool)"),
    (dict(in_channels="8", out_channels=8, part=2), "in_channels must be an int, got '8' (str)"),
    (dict(in_channels=8, out_channels=8, part=2, stride=0), "stride must be >= 1, got 0"),
])
def test_bad_arguments_name_the_argument_value_and_channels(kwargs, message):
    with pytest.raises(ValueError) as error:
        HetConv2d(**kwargs)
    assert message in str(error.value)
    assert "in_channels" in str(error.value) and "out_channels" in str(error.value)


def test_shift_permutation_is_the_documented_map():
    assert shift_permutation(8, 4).tolist() == [0, 2, 4, 6, 1, 3, 5, 7]
    assert sorted(shift_permutation(12, 3).tolist()) == list(range(12))
    assert shift_permutation(5, 1).tolist() == list(range(5))


def test_a_model_with_hetconv_layers_can_be_saved_whole(tmp_path):
    model = torch.nn.Sequential(HetConv2d(8, 8, 2), torch.nn.ReLU())
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    x = torch.randn(1, 8, 5, 5)
    torch.testing.assert_close(loaded(x), model(x))
