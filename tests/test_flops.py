"""Cost accounting: the paper's FLOPs column and parameter counts, and what fvcore sees executed."""

import math
import warnings

import pytest
import torch

from hetconv import HetConv2d
from hetconv.flops import count_flops, count_params, describe_flops, paper_ratio, truncate_millions
from hetconv.report import RESULTS_DIR, already_written, csv_text, load_published
from models import vgg16
from models.vgg import PAPER_PARTS, conv_channels, conv_sides

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    from fvcore.nn import FlopCountAnalysis

PUBLISHED = load_published()


@pytest.mark.parametrize("part", PAPER_PARTS)
def test_paper_flops_equal_the_published_column(part):
    assert truncate_millions(count_flops(vgg16(part), "paper")) == PUBLISHED[part]["flops_m"]


@pytest.mark.parametrize("part", PAPER_PARTS)
def test_effective_params_equal_the_reference_counts(part):
    effective, stored = count_params(vgg16(part))
    assert round(effective / 1e6, 3) == PUBLISHED[part]["params_m"]
    masked = sum(out * (inp // part) for inp, out in conv_channels()[1:]) if part > 1 else 0
    assert stored - effective == masked


def expected_executed_flops(part: int, width: float = 1.0) -> int:
    """Independent count of what the model runs: grouped 3x3 + whole 1x1 conv, BN at 2 ops/element."""
    total = 0
    for index, ((inp, out), side) in enumerate(zip(conv_channels(width), conv_sides())):
        pixels = side * side * out
        grouped_part = 1 if index == 0 else part
        total += pixels * 9 * inp // grouped_part
        if index > 0 and part > 1:
            total += pixels * inp   # the 1x1 conv, masked block diagonal included
        total += 2 * pixels         # BatchNorm2d, eval mode
    hidden = round(512 * width)
    return total + conv_channels(width)[-1][1] * hidden + 2 * hidden + hidden * 10


@pytest.mark.parametrize("part,width", [(1, 1.0), (2, 1.0), (4, 1.0), (64, 1.0), (4, 0.25)])
def test_executed_flops_are_what_fvcore_measures_on_the_running_module(part, width):
    model = vgg16(part, width=width).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        measured = FlopCountAnalysis(model, torch.zeros(1, 3, 32, 32))
        measured.unsupported_ops_warnings(False)
        fvcore_total = measured.total()
    assert count_flops(model, "executed") == fvcore_total == expected_executed_flops(part, width)


def test_a_literal_count_of_non_zero_weights_is_not_the_papers_convention():
    """What the README says of the convention: it prices a HetConv layer's one operation per output at R(P) too, so a
    literal count (every non-zero weight's multiply-add, plus one per output) misses the published column."""
    part, total = 2, 512 * 512 + 512 * 10  # the linear layers' multiply-adds
    for index, ((inp, out), side) in enumerate(zip(conv_channels(), conv_sides())):
        non_zero = 9 * inp if index == 0 else 9 * (inp // part) + inp - inp // part  # per filter
        total += side * side * out * (non_zero + 1)
    assert truncate_millions(total) == 175.32 != PUBLISHED[part]["flops_m"] == 175.23


@pytest.mark.parametrize("part", [2, 4, 8, 16])
def test_paper_convention_prices_a_single_layer_by_the_papers_ratio(part):
    layer = torch.nn.Sequential(HetConv2d(16, 32, part))
    side, standard = 32, 32 * 32 * 32 * (9 * 16 + 1)
    ratio = 1 / part + (1 - 1 / part) / 9  # R(P) as the paper writes it
    assert count_flops(layer, "paper", (16, side, side)) == pytest.approx(standard * ratio, rel=1e-12)
    assert paper_ratio(part) == pytest.approx(ratio)  # bench.py's FLOP ratio
    layer[0].mask1x1.fill_(True)  # the unmasked layer of some re-implementations: its block diagonal is priced too
    assert count_flops(layer, "paper", (16, side, side)) == pytest.approx(standard * (1 / part + 1 / 9), rel=1e-12)


def test_paper_convention_prices_a_standard_conv_at_its_multiply_adds_plus_one_per_output():
    conv = torch.nn.Conv2d(16, 32, 3, padding=1, bias=False)
    assert count_flops(conv, "paper", (16, 32, 32)) == 32 * 32 * 32 * (9 * 16 + 1)


@pytest.mark.parametrize("part", [1, 4, 64])
def test_run_as_one_dense_conv_the_paper_count_is_unchanged_and_the_executed_count_is_dense(part):
    grouped, dense = vgg16(part, impl="grouped"), vgg16(part, impl="dense")
    assert count_flops(dense, "paper") == pytest.approx(count_flops(grouped, "paper"), rel=1e-12)
    assert count_flops(dense, "executed") == expected_executed_flops(1)


def test_counting_keeps_the_models_mode():
    model = vgg16(4, width=0.25).train()
    count_flops(model, "executed")
    assert model.training
    count_flops(model.eval(), "executed")  # eval.py counts the model it evaluates
    assert not model.training
    model.train().features[1].eval()  # a frozen BatchNorm in a training model stays frozen
    count_flops(model, "executed")
    assert [m.training for m in model.modules()] == [m is not model.features[1] for m in model.modules()]
    with pytest.raises(ValueError, match="convention must be one of"):
        count_flops(model, "macs")


def test_truncation_is_not_rounding():
    assert truncate_millions(175_239_999.9) == 175.23
    assert truncate_millions(313_740_288) == 313.74
    assert truncate_millions(256_030_000) == 256.03  # not 256.02: 256.03 * 100 is 25602.999... in floating point


def test_the_printed_flops_are_truncated_as_the_paper_prints_them():
    costs = {"flops": 6_989_999.0, "executed_flops": 7_627_264.0}
    assert describe_flops(costs) == "FLOPs 6.98M (paper convention), 7.62M executed"


@pytest.mark.parametrize("convention", ["paper", "executed"])
def test_a_model_is_counted_in_its_own_dtype(convention):
    layer = torch.nn.Sequential(HetConv2d(16, 32, 4))
    expected = count_flops(layer, convention, (16, 8, 8))
    assert count_flops(layer.double(), convention, (16, 8, 8)) == expected


def test_committed_flops_table_is_current():
    from scripts.flops_table import flops_rows, render_markdown

    regenerated = flops_rows()
    assert already_written({RESULTS_DIR / "flops.csv": csv_text(regenerated),
                            RESULTS_DIR / "flops.md": render_markdown(regenerated, "python scripts/flops_table.py")})
    assert all(math.isclose(row["flops_diff_m"], 0) for row in regenerated)


def test_make_flops_rewrites_the_report_only_when_a_count_or_its_text_changes(tmp_path):
    from scripts import flops_table

    def edit_and_rerun(name, old, new) -> str:
        (tmp_path / name).write_text((tmp_path / name).read_text().replace(old, new, 1))
        flops_table.main(["--out", str(tmp_path)])
        return (tmp_path / "flops.md").read_text()

    flops_table.main(["--out", str(tmp_path)])
    counts = (tmp_path / "flops.csv").read_text()
    assert "commit 0ld" in edit_and_rerun("flops.md", "commit ", "commit 0ld")  # made earlier: left, with its commit
    assert "commit 0ld" not in edit_and_rerun("flops.csv", "175.23", "175.24")  # a count changed: made again
    assert (tmp_path / "flops.csv").read_text() == counts
    assert "rounded" not in edit_and_rerun("flops.md", "truncated", "rounded")  # its text changed: made again
    assert "Counted" in edit_and_rerun("flops.md", "Counted", "Measured")  # above the table too
