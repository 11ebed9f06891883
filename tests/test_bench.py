"""scripts/bench.py runs end to end and writes its report (figures are not checked: no timing in tests)."""

import argparse
import contextlib
import multiprocessing
import re

import pytest
import torch
from conftest import script
from torch.profiler import profile

from hetconv.settings import train_config
from hetconv.training import build_optimizer, train_step
from models import vgg16
from scripts import bench
from scripts.bench import (CATEGORIES, MODEL_TIMINGS, bench_models, breakdown_section, compile_section, conv_weight,
                           gains, in_turns, layer_rows, main, median_breakdown, model_row, model_section,
                           parse_compile_parts, step_breakdown, sweep_projection, workers)


def test_bench_writes_a_report_with_every_section(tmp_path):
    result = script("scripts/bench.py", "--parts", "1,8", "--repeats", "1", "--device", "cpu", "--impl", "dense",
                    "--batch", "8", "--compile-parts", "none", "--out", str(tmp_path))
    report = (tmp_path / "bench-cpu-dense-batch8.md").read_text()  # an --impl or --batch not the recipe's names it
    assert report in result.stdout
    assert "Made by `python scripts/bench.py --parts 1,8 --repeats 1 --device cpu --impl dense --batch 8 " \
           "--compile-parts none --out" in report
    assert "Batch 8 (inference too)" in report
    assert "HetConv layers computed dense (trainer.hetconv=dense)" in report
    assert "## Whole model: training step of train.py" in report
    # P=8's model row: FLOPs reduction, train img/s, speed-up, inference img/s, speed-up, peak MB, both spreads
    assert re.search(r"\| 8 \| 4\.40x \| \d+ \| [\d.]+x \| \d+ \| [\d.]+x \| \d+ \| \d+% \| \d+% \|", report)
    # the default recipe computes HetConv grouped on the CPU: a dense report does not project it
    assert "one job at a time on this device), eager: " in report and "default recipe's step" not in report
    assert "## torch.compile" not in report
    assert "## Where the training step's time goes" in report
    # P=8's breakdown row: step ms, the 7 categories, HetConv convs / P=1 (R), ceiling, measured
    assert re.search(r"\| 8 \| \d+ \| (\d+ \| ){7}[\d.]+ \(0\.222\) \| [\d.]+x \| [\d.]+x \|", report)
    assert "| 64->64 @32x32 |" in report and "| 512->512 @2x2 |" in report  # all 8 distinct HetConv shapes
    assert "of 8 cells with P > 1 are within 1.5x" in report
    # a row: shape, dense ms, P=1 and P=8 cells, the 1x1 branch against the dense conv, naive, spread
    assert re.search(r"\| 64->64 @32x32 \| [\d.]+ \| ([\d.]+ \([\d.]+x\) \| ){2}[\d.]+ \| [\d.]+ \| \d+% \|", report)


def test_repeats_are_taken_in_turns():
    order = []

    def timer(key, seconds):
        def one_timing():
            order.append(key)
            return seconds.pop(0)
        return one_timing

    times = in_turns({"dense": timer("dense", [1.0, 3.0, 2.0]), 4: timer(4, [0.5, 1.5, 1.0])}, repeats=3)
    assert order == ["dense", 4] * 3
    assert times == {"dense": [1.0, 3.0, 2.0], 4: [0.5, 1.5, 1.0]}


def test_a_drift_that_hits_a_whole_turn_cancels_in_the_layer_ratios():
    # the machine runs 3x slower in the second turn and 2x in the third; the layers' ratios do not move
    drift = [1.0, 3.0, 2.0]
    times = {"dense": [0.010 * d for d in drift], "pointwise": [0.002 * d for d in drift],
             ("ours", 4): [0.005 * d for d in drift], ("naive", 4): [0.011 * d for d in drift]}
    (row,) = layer_rows("64->64 @32x32", [4], times)
    assert row["dense_ms"] == pytest.approx(20.0)  # the median dense time, drift and all
    assert (row["ours"], row["pointwise"], row["naive"]) == pytest.approx((0.5, 0.2, 1.1))
    assert row["spread"] == pytest.approx(0.0)
    times["naive", 4][1] *= 1.5  # noise within one turn shows: naive ratios 1.1, 1.65, 1.1
    assert layer_rows("64->64 @32x32", [4], times)[0]["spread"] == pytest.approx(0.5)


def test_a_compiled_parts_gain_over_eager_is_the_median_of_per_turn_ratios():
    drift = [1.0, 3.0, 2.0]  # eager and compiled are timed in the same turns: the drift cancels
    eager = {(4, "train"): [0.6 * d for d in drift], (4, "infer"): [0.2 * d for d in drift]}
    compiled = {(4, "train"): [0.4 * d for d in drift], (4, "infer"): [0.25 * d for d in drift]}
    assert gains(4, compiled, eager) == pytest.approx({"train_gain": 1.5, "infer_gain": 0.8, "gain_spread": 0.0})
    assert gains(4, compiled, {}) == {}  # eager did not time P=4


class ScriptedWorker:
    """A part's benchmark process, its timings scripted: P=4 steps in half P=1's time, compiled in half eager's."""

    def __init__(self, part: int, overrides: list[str]):
        self.part, self.compiled = part, "trainer.compile=true" in overrides

    def ask(self, request: str):
        if request == "summary":
            return {"peak_mb": 1.0, "profiled": not self.compiled, "device_name": "cpu", "paper_flops": 1.0,
                    "batch": 8, "epochs": 1}
        if request == "breakdown":
            return dict.fromkeys(CATEGORIES, 1.0)
        return {"train": 1.0, "infer": 0.4}[request] / (2 if self.part == 4 else 1) / (2 if self.compiled else 1)


@contextlib.contextmanager
def scripted_workers(spawn, jobs: dict):
    yield {key: ScriptedWorker(part, overrides) for key, (part, overrides) in jobs.items()}


def test_every_setup_gets_its_rows_and_a_non_eager_one_its_gains_over_eager(monkeypatch):
    monkeypatch.setattr(bench, "workers", scripted_workers)
    rows = bench_models({"eager": ([1, 4], ["trainer.compile=false"]), "twin": ([4], ["trainer.compile=true"])},
                        repeats=2)
    assert [r["part"] for r in rows["eager"]] == [1, 4] and [r["part"] for r in rows["twin"]] == [4]
    assert rows["twin"][0]["train_gain"] == rows["twin"][0]["infer_gain"] == 2.0  # eager time / compiled time
    assert rows["twin"][0]["train_speedup"] is None  # no P=1 in its setup
    assert "train_gain" not in rows["eager"][1] and rows["eager"][1]["train_speedup"] == 2.0
    assert rows["eager"][1]["train_ips"] == 16.0 and rows["eager"][1]["infer_ips"] == 40.0  # batch 8 / seconds
    assert rows["eager"][1]["breakdown"] is not None and rows["twin"][0]["breakdown"] is None  # profiled: with P=1


def test_a_drift_that_hits_a_whole_turn_cancels_in_the_model_speedups():
    # every part is timed once per turn; the machine runs 3x slower in the second turn and 2x in the third
    drift = [1.0, 3.0, 2.0]
    times = {(1, "train"): [1.0 * d for d in drift], (4, "train"): [0.5 * d for d in drift],
             (1, "infer"): [0.2 * d for d in drift], (4, "infer"): [0.125 * d for d in drift]}
    row = model_row(4, times, {"peak_mb": 1.0, "batch": 128})
    assert (row["train_speedup"], row["infer_speedup"]) == pytest.approx((2.0, 1.6))
    assert row["train_ips"] == pytest.approx(128 / 1.0)  # the median time, drift and all
    assert row["spread"] == pytest.approx(1.0) and row["peak_mb"] == 1.0  # (3 - 1) / 2: the drift shows here
    assert row["speedup_spread"] == pytest.approx(0.0)  # and not here
    alone = model_row(4, {k: v for k, v in times.items() if k[0] == 4}, {"batch": 128})  # no P=1
    assert alone["train_speedup"] is None and alone["speedup_spread"] is None


@pytest.mark.parametrize("batch", [128, 8])
def test_the_speed_up_goals_are_judged_only_at_the_batch_they_are_set_at(batch):
    times = {(part, kind): [seconds] for part, seconds in ((1, 1.0), (4, 0.4), (64, 0.3)) for kind in MODEL_TIMINGS}
    rows = [model_row(part, times, {"peak_mb": 1.0, "batch": batch, "epochs": 1, "paper_flops": 1e8 / part})
            for part in (1, 4, 64)]
    section = model_section(rows, set())
    verdicts = ["Training speed-up at P=4: 2.50x; goal 2.3x: met.",
                "Training speed-up at P=64: 3.33x; goal 4.0x: NOT met."]
    judged = [verdict in section for verdict in verdicts]
    if batch == 128:
        assert all(judged) and "not judged" not in section
    else:
        assert not any(judged) and "The speed-up goals are set at batch 128: not judged at batch 8." in section


def test_a_part_whose_process_died_is_named_with_its_exit_code():
    spawn = multiprocessing.get_context("spawn")
    with workers(spawn, {4: (4, ["trainer.device=cpu", "trainer.batch_size=8"])}) as up:
        up[4].process.kill()  # as the kernel's OOM killer would
        up[4].process.join()
        with pytest.raises(RuntimeError, match=r"the process benchmarking P=4 died \(exit code -9\); out of memory\?"):
            up[4].ask("train")


def test_an_error_in_a_parts_process_is_raised_naming_the_part():
    with pytest.raises(RuntimeError, match=r"(?s)benchmarking P=3 \(trainer.device=cpu\) failed.*part=3 must divide"):
        bench_models({"eager": ([3], ["trainer.device=cpu"])}, repeats=1)


def small_training_step(part: int):
    torch.manual_seed(0)
    model = vgg16(part, width=0.25)
    optimizer = build_optimizer(model, train_config().optim)
    images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    return model, lambda: train_step(model, optimizer, images, labels, amp=False)


@pytest.mark.parametrize("part", [1, 4])
def test_step_breakdown_sorts_each_convolution_into_its_category(part):
    model, step = small_training_step(part)
    ms = step_breakdown(step, list(model.features[0].weight.shape))
    assert list(ms) == list(CATEGORIES)
    assert all(ms[c] > 0 for c in ("3x3 convs", "first conv", "BatchNorm", "ReLU", "max pool", "other"))
    assert (ms["1x1 convs"] > 0) == (part > 1)  # P=1 has no 1x1 kernels


def test_the_breakdown_is_each_categorys_median_over_the_profiled_steps():
    steps = [dict.fromkeys(CATEGORIES, 1.0), dict.fromkeys(CATEGORIES, 9.0), dict.fromkeys(CATEGORIES, 2.0)]
    steps[1]["BatchNorm"] = 0.5  # a category takes its own median, not the one of the median step
    assert median_breakdown(steps) == {**dict.fromkeys(CATEGORIES, 2.0), "BatchNorm": 1.0}


def test_every_profiled_convolution_is_traced_to_one_of_the_models_weights():
    model, step = small_training_step(4)
    weights = [list(p.shape) for p in model.parameters() if p.dim() == 4]
    with profile(record_shapes=True) as profiler:
        step()
    found = [conv_weight(e.key, e.input_shapes) for e in profiler.key_averages(group_by_input_shape=True)]
    found = [w for w in found if w is not None]
    assert any(w[-1] == 1 for w in found) and all(w in weights for w in found)


def test_the_compiled_sweep_is_projected_only_when_every_part_was_compiled():
    row = lambda part, ips, speedup=None: {"part": part, "train_ips": ips, "infer_ips": 2 * ips,  # noqa: E731
                                           "train_speedup": speedup, "spread": 0.1, "epochs": 330, "batch": 128,
                                           "train_gain": 2.5, "infer_gain": 2.25, "gain_spread": 0.05}
    eager = [row(1, 100), row(4, 150)]
    text = compile_section([row(1, 300, 1.0), row(4, 360, 1.2)], eager, "reduce-overhead", recipe_modes={None})
    # the gains are the rows' per-turn medians, not the ratio of the medians (2.40x)
    assert "| 4 | 150 | 360 | 2.50x | 1.20x | 300 | 720 | 2.25x | 10% | 5% |" in text
    assert "one job at a time on this device), compiled (reduce-overhead):" in text
    assert "Projected" not in compile_section([row(1, 300, 1.0)], eager, "reduce-overhead", {None})
    other_mode = compile_section([row(1, 300, 1.0)], eager, "max-autotune", {None})
    assert "on the CPU it compiles as the default mode" not in other_mode
    # on CUDA the default recipe trains reduce-overhead: that projection is the default recipe's
    on_cuda = compile_section([row(1, 300, 1.0), row(4, 360, 1.2)], eager, "reduce-overhead",
                              recipe_modes={"reduce-overhead"})
    assert "compiled (reduce-overhead), the default recipe's step here:" in on_cuda


def test_compile_parts_auto_compiles_every_part_where_the_default_recipe_compiles():
    parser, parts = argparse.ArgumentParser(), [1, 2, 4, 64]
    assert parse_compile_parts(parser, "auto", parts, torch.device("cuda")) == parts
    assert parse_compile_parts(parser, "auto", parts, torch.device("cpu")) == [1, 4, 64]
    assert parse_compile_parts(parser, "none", parts, torch.device("cpu")) == []
    assert parse_compile_parts(parser, "2,64", parts, torch.device("cpu")) == [2, 64]


def test_bad_parts_or_repeats_fail_before_any_timing(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("scripts.bench.bench_models", lambda *a: pytest.fail("timed before checking the arguments"))
    with pytest.raises(SystemExit):
        main(["--device", "cpu", "--compile-parts", "1,four", "--out", str(tmp_path)])
    assert "parts must be comma-separated integers such as 1,4,64, got '1,four'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--device", "cpu", "--parts", "1,4", "--compile-parts", "4,64", "--out", str(tmp_path)])
    assert "--compile-parts 64 not among --parts" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--device", "cpu", "--parts", "1,4,4", "--out", str(tmp_path)])
    assert "parts must each be given once, got '1,4,4'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--device", "cpu", "--repeats", "0", "--out", str(tmp_path)])
    assert "argument --repeats: expected a whole number >= 1, got '0'" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # train.py's own checks, before any timing
        main(["--device", "cpu", "--batch", "1", "--out", str(tmp_path)])
    assert "trainer.batch_size must be an int >= 2, got 1" in capsys.readouterr().err
    for device in ("gpu", "cpu,cuda"):  # a comma, which Hydra would have read as a sweep, with a traceback
        with pytest.raises(SystemExit):
            main(["--device", device, "--out", str(tmp_path)])
        assert f"argument --device: invalid choice: '{device}' (choose from" in capsys.readouterr().err


def test_the_sweep_projection_adds_every_parts_training_and_test_epochs():
    # 49,920 training images (the last partial batch dropped) in 30 minutes, and 10,000 test images in 30 minutes
    row = {"epochs": 2, "batch": 128, "train_ips": 49_920 / 1800, "infer_ips": 10_000 / 1800}
    projection = sweep_projection([{**row, "part": 1}, {**row, "part": 4}], None, set())
    assert projection.endswith("(2 epochs each, as the recipe on record, of 49,920 training images in batches of 128 "
                               "and 10,000 test images, one job at a time on this device), eager: 4.0 hours.")
    # the batch is the config's or --batch: at 1000 no partial batch is left to drop
    assert "of 50,000 training images in batches of 1000" in sweep_projection([{**row, "part": 1, "batch": 1000}],
                                                                              None, set())


def test_the_ceiling_puts_the_hetconv_convolutions_at_their_flop_share():
    def row(part, convs):
        return {"part": part, "train_speedup": 1.0, "breakdown": {**dict.fromkeys(CATEGORIES, 0.0),
                                                                 "3x3 convs": convs, "other": 200.0}}
    # P=1: 800 ms of convolutions and 200 of the rest; at P=4 the convolutions would take 800 / 3: 1000 / 466.7
    section = breakdown_section([row(1, 800.0), row(4, 400.0)])
    assert "| 4 | 600 | 400 | 0 | 0 | 0 | 0 | 0 | 200 | 0.50 (0.333) | 2.14x | 1.00x |" in section
