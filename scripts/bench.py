"""How fast HetConv trains, layer by layer and as the whole model, beside the dense convolution.

    python scripts/bench.py [--device auto] [--parts 1,2,4,8,16,32,64] [--compile-parts auto]
                            [--compile reduce-overhead] [--impl auto] [--batch N] [--repeats 7] [--skip-layers]
                            [--out results]
    (also: make bench)

Layer level: for every distinct HetConv shape of VGG-16 (at --batch, by default configs/' 128), forward +
backward time of HetConv2d computed grouped (impl="grouped"), of its 1x1 branch alone, and of the naive
implementation (impl="dense": one dense conv over the assembled weight, zeros and all), against the dense
3x3 conv it replaces (the P=1 reference), beside the FLOP ratio R(P) = 1/P + (1 - 1/P)/9; on CUDA as CUDA
graph replays, which time the GPU's work alone.
Model level: training throughput with train.py's own step (same precision, memory format, optimizer,
and batches drawn and augmented as train.py draws them, composed from configs/), inference throughput
and peak memory, each part in a process of its own, eager and, for --compile-parts, compiled (auto:
every part on CUDA, where the default recipe compiles, so that the report projects the sweep as it
trains there; 1, 4 and 64 on the CPU, which trains eager), all timed in turns (speed-ups over P=1
and compiled-over-eager gains are medians of per-turn ratios); on
the CPU, also where the training step's time goes, op by op, and how fast the step could be at most
if HetConv's layers ran at their FLOP-proportional share of the dense layers' time. The model runs
its layers as --impl says (trainer.hetconv; auto: dense on CUDA, grouped on the CPU). Median of
repeats (a layer's ratios are medians of per-repeat ratios, and on the CPU its row is timed in
turns); the spread (max - min) / median says how noisy each figure is. Writes
results/bench-<device>.md, or bench-<device>-<impl>.md for an --impl other than auto, and with -batch<N> added
for a --batch other than the recipe's (trainer.batch_size in configs/).
"""

import argparse
import contextlib
import functools
import itertools
import multiprocessing
import re
import resource
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
from torch import nn
from torch.profiler import profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's hetconv, whichever one a venv installed

from hetconv import HetConv2d  # noqa: E402
from hetconv.data import Split, memory_format  # noqa: E402
from hetconv.flops import count_flops, paper_ratio  # noqa: E402
from hetconv.layer import IMPLS, resolved_impl  # noqa: E402
from hetconv.provenance import count, device_name, git_commit, library_versions, now  # noqa: E402
from hetconv.report import (RESULTS_DIR, markdown_table, output_folder, positive_int, typed_command,  # noqa: E402
                            write_report)
from hetconv.settings import check_settings, train_config  # noqa: E402
from hetconv.training import (COMPILE_MODES, DEVICES, autocast, build_training, compile_mode,  # noqa: E402
                              configure_backend, execution, precision, select_device, train_step)
from models import vgg16  # noqa: E402
from models.vgg import PAPER_PARTS, conv_channels, conv_sides  # noqa: E402

CIFAR10_TRAIN, CIFAR10_TEST = 50_000, 10_000
LAYER_TARGET = 1.5    # a HetConv layer should take at most 1.5x its FLOP-proportional share of the dense conv
MODEL_TARGETS = {4: 2.3, 64: 4.0}  # training-throughput speed-up over P=1 asked for (issue "Speed")
TARGETS_BATCH = 128  # the batch those speed-ups are asked at: a smaller one leaves more to the per-step overheads
# A layer's forward + backward, or a whole step, takes a few milliseconds or less on a big GPU, less than the
# jitter of Python's kernel launches: on CUDA each timing covers 20 calls in a row.
CUDA_CALLS = 20
# Where a training step's time goes, by profiled op; "other" is drawing, augmenting and converting the batch,
# the loss, the classifier, the optimizer, the sum of HetConv's two branches, the mask and memory management.
CATEGORIES = ("3x3 convs", "1x1 convs", "first conv", "BatchNorm", "ReLU", "max pool", "other")
PROFILED_STEPS = 5  # the breakdown is the median over this many profiled steps
MODEL_TIMINGS = ("train", "infer")  # what the model level times: train.py's training step, and inference
# --compile-parts auto on the CPU: the default recipe trains eager there, and three parts show what compiling
# would gain for a third of the compile time of all seven.
CPU_COMPILE_PARTS = (1, 4, 64)


def seconds_per_call(fn, device: torch.device, calls: int = 1) -> float:
    """One timing of `calls` calls of fn in a row, per call (CUDA events on CUDA)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / calls
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - started) / calls


def median_and_spread(times: list[float]) -> tuple[float, float]:
    median = statistics.median(times)
    return median, (max(times) - min(times)) / median


def per_turn_ratio(numerators: list[float], denominators: list[float]) -> tuple[float, float]:
    """Median and spread of the ratios of timings taken in the same turns: a drift of the machine cancels in them."""
    return median_and_spread([n / d for n, d in zip(numerators, denominators)])


def in_turns(timers: dict, repeats: int) -> dict[object, list[float]]:
    """{key: its `repeats` timings}, taken in rounds that time every timer once (a timer returns one timing),
    so that a drift of the machine's speed hits them alike and cancels in their ratios."""
    times = {key: [] for key in timers}
    for _ in range(repeats):
        for key, timer in timers.items():
            times[key].append(timer())
    return times


def warmed_up(fn, calls: int) -> None:
    for _ in range(calls):
        fn()


def layer_shapes() -> list[tuple[int, int, int]]:
    """Distinct (in, out, side) of VGG-16's HetConv layers (all but the first conv)."""
    return list(dict.fromkeys((i, o, s) for (i, o), s in list(zip(conv_channels(), conv_sides()))[1:]))


def fwd_bwd(module: nn.Module, x: torch.Tensor, amp: bool):
    grad = None

    def step():
        nonlocal grad
        module.zero_grad(set_to_none=True)
        x.grad = None
        with autocast(x.device, amp):
            y = module(x)
        grad = torch.randn_like(y) if grad is None else grad
        y.backward(grad)

    return step


def cuda_graphed(step):
    """step captured in a CUDA graph, returned as the graph's replay. At the training batch a layer's kernels on a
    big GPU take less time than Python takes to launch them; replaying the graph times the GPU's work alone.
    (trainer.compile=reduce-overhead removes the launches in training too, and fuses elementwise ops besides.)"""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture: cudnn.benchmark picks its algorithms here
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def bench_layers(device, cfg, parts, repeats) -> list[dict]:
    layout = memory_format(cfg.trainer.channels_last)

    def timer(module: nn.Module, x: torch.Tensor):
        step = fwd_bwd(module.to(device, memory_format=layout), x, cfg.trainer.amp)
        if device.type == "cuda":
            # All of a graph's timings at once, then the graph is freed: with a row's graphs all kept to be
            # replayed in turns, an H200 hit an illegal memory access. Replays hardly drift (spreads of 1%).
            replay = cuda_graphed(step)
            warmed_up(replay, 2)
            return iter([seconds_per_call(replay, device, CUDA_CALLS) for _ in range(repeats)]).__next__
        warmed_up(step, 2)
        return lambda: seconds_per_call(step, device)

    rows = []
    for in_ch, out_ch, side in layer_shapes():
        x = torch.randn(cfg.trainer.batch_size, in_ch, side, side, device=device).contiguous(memory_format=layout)
        x.requires_grad_()
        timers = {"dense": timer(nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False), x),
                  # the 1x1 branch that every P > 1 runs in full, whatever its grouped 3x3 conv costs
                  "pointwise": timer(nn.Conv2d(in_ch, out_ch, 1, bias=False), x)}
        for part in parts:
            timers["ours", part] = timer(HetConv2d(in_ch, out_ch, part, impl="grouped"), x)
            timers["naive", part] = timer(HetConv2d(in_ch, out_ch, part, impl="dense"), x)
        rows += layer_rows(f"{in_ch}->{out_ch} @{side}x{side}", parts, in_turns(timers, repeats))
        print(f"layer {rows[-1]['shape']}: dense {rows[-1]['dense_ms']:.3f} ms, HetConv / dense "
              + ", ".join(f"{r['ours']:.2f} at P={r['part']}" for r in rows[-len(parts):]), file=sys.stderr)
    return rows


def layer_rows(shape: str, parts: list[int], times: dict[object, list[float]]) -> list[dict]:
    """One row per part from a shape's timings in turns: each ratio to the dense conv is the median of the
    per-turn ratios, and the spread is that of the row's ratios, which a drift of the machine cancels in."""
    def against_dense(key) -> tuple[float, float]:
        return per_turn_ratio(times[key], times["dense"])

    dense_ms = statistics.median(times["dense"]) * 1e3
    pointwise, pointwise_spread = against_dense("pointwise")
    rows = []
    for part in parts:
        (ours, spread), (naive, naive_spread) = against_dense(("ours", part)), against_dense(("naive", part))
        rows.append({"shape": shape, "part": part, "dense_ms": dense_ms,
                     "ours": ours, "naive": naive, "pointwise": pointwise, "flop_ratio": paper_ratio(part),
                     "spread": max(spread, naive_spread, pointwise_spread)})
    return rows


def conv_weight(name: str, input_shapes: list) -> list[int] | None:
    """The weight's shape if this profiled op is a convolution, forward or backward; else None."""
    if name.startswith("aten::") and ("convolution" in name or "conv2d" in name):
        return input_shapes[2 if "backward" in name else 1]  # convolution_backward(grad, input, weight, ...)
    return None


def op_category(name: str, input_shapes: list, first_conv_weight: list[int]) -> str:
    """The CATEGORIES entry of one profiled op; a convolution is told apart by its weight's shape."""
    weight = conv_weight(name, input_shapes)
    if weight is not None:
        if weight == first_conv_weight:
            return "first conv"
        return "1x1 convs" if weight[-1] == 1 else "3x3 convs"
    for category, words in (("BatchNorm", ("batch_norm",)), ("ReLU", ("relu", "threshold", "clamp_min")),
                            ("max pool", ("max_pool",))):
        if any(word in name for word in words):
            return category
    return "other"


def enclosing_category(event, first_conv_weight: list[int]) -> str:
    """The category of the innermost op, this one or one that encloses it, that has one: a weight-gradient
    copy inside a convolution's backward is the convolution's, the zero fill in max pool's backward is pooling's."""
    while event is not None:
        category = op_category(event.name, event.input_shapes, first_conv_weight)
        if category != "other":
            return category
        event = event.cpu_parent
    return "other"


def step_breakdown(step, first_conv_weight: list[int]) -> dict[str, float]:
    """Milliseconds in each of CATEGORIES in one profiled step (a step under the profiler is a little slower than
    without): the self time of every op, charged to its enclosing category."""
    with profile(record_shapes=True) as profiler:
        step()
    ms = dict.fromkeys(CATEGORIES, 0.0)
    for event in profiler.events():
        ms[enclosing_category(event, first_conv_weight)] += event.self_cpu_time_total / 1e3
    return ms


def median_breakdown(steps: list[dict[str, float]]) -> dict[str, float]:
    """Each category's median over the profiled steps."""
    return {category: statistics.median(ms[category] for ms in steps) for category in CATEGORIES}


class ModelBench:
    """One part's model with train.py's training step and with inference, built as training builds it (from
    configs/ and the overrides) and warmed up, ready to be timed one timing at a time."""

    def __init__(self, part: int, overrides: list[str]):
        self.cfg = cfg = train_config(*overrides, f"model.part={part}")
        self.device, self.compile_as, impl = execution(cfg.trainer)
        device = self.device
        # Random images in CIFAR-10's training-set shape, drawn and augmented batch by batch as train.py does.
        split = Split(torch.randint(0, 256, (CIFAR10_TRAIN, 3, 32, 32), dtype=torch.uint8, device=device),
                      torch.randint(0, 10, (CIFAR10_TRAIN,), device=device))
        setup = build_training(cfg, split, device, impl, self.compile_as)
        self.model = setup.model
        batch_stream = itertools.chain.from_iterable(setup.batches.epoch() for _ in itertools.count())
        # Inference as evaluate() runs it, unaugmented, but at the training batch: at trainer.eval_batch_size every
        # process would keep a second, larger set of activations (ten processes on the CPU outgrew 24 GB of RAM).
        images = split.images[:cfg.trainer.batch_size]

        def train():
            batch, labels = next(batch_stream)
            train_step(setup.forward_model, setup.optimizer, setup.preprocess(batch), labels, cfg.trainer.amp)

        @torch.no_grad()
        def infer():
            with autocast(device, cfg.trainer.amp):
                setup.forward_model(setup.preprocess(images))

        self.steps = {"train": train, "infer": infer}
        self.calls = CUDA_CALLS if device.type == "cuda" else 1
        # The profiler names eager ops only; on CUDA it would need kernel-level attribution, which this script lacks.
        self.profiled = device.type == "cpu" and not self.compile_as
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for kind in MODEL_TIMINGS:
            self.model.train(kind == "train")
            warmed_up(self.steps[kind], 3)

    def timing(self, kind: str) -> float:
        """One timing of the training step ("train") or of inference ("infer"), in seconds per call."""
        self.model.train(kind == "train")
        return seconds_per_call(self.steps[kind], self.device, self.calls)

    def breakdown(self) -> dict[str, float]:
        """Where one training step's time goes, op by op (where self.profiled)."""
        self.model.train()
        return step_breakdown(self.steps["train"], list(self.model.features[0].weight.shape))

    def summary(self) -> dict:
        """Peak memory, whether the step can be profiled, paper FLOPs and the recipe's batch and epochs."""
        rss_unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is in bytes on macOS, KiB on Linux
        peak_mb = (torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda"
                   else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * rss_unit) / 2**20
        return {"peak_mb": peak_mb, "profiled": self.profiled, "device_name": device_name(self.device),
                "paper_flops": count_flops(self.model, "paper"),
                "batch": self.cfg.trainer.batch_size, "epochs": self.cfg.trainer.epochs}


def serve(conn, part: int, overrides: list[str]) -> None:
    """A worker process: builds the part's ModelBench, then answers "train" and "infer" with one timing each,
    "breakdown" with one profiled step and "summary" with the rest; an error goes back to the parent, which
    raises it."""
    try:
        bench = ModelBench(part, overrides)
        conn.send("ready")
        for request in iter(conn.recv, "summary"):
            conn.send(bench.breakdown() if request == "breakdown" else bench.timing(request))
        conn.send(bench.summary())
    except Exception:  # noqa: BLE001 - whatever it is, the parent raises it
        conn.send(RuntimeError(f"benchmarking P={part} ({' '.join(overrides)}) failed:\n{traceback.format_exc()}"))


class Worker:
    """The parent's end of a `serve` process."""

    def __init__(self, spawn, part: int, overrides: list[str]):
        self.part = part
        self.conn, their_end = spawn.Pipe()
        self.process = spawn.Process(target=serve, args=(their_end, part, overrides), daemon=True)
        self.process.start()
        self.reply()  # built and warmed up

    def ask(self, request: str):
        try:
            self.conn.send(request)
        except BrokenPipeError:  # the process is gone: reply() says how it ended
            pass
        return self.reply()

    def reply(self):
        try:
            answer = self.conn.recv()
        except EOFError:
            self.process.join()
            raise RuntimeError(f"the process benchmarking P={self.part} died (exit code {self.process.exitcode}); "
                               "out of memory?") from None
        if isinstance(answer, Exception):
            raise answer
        return answer


@contextlib.contextmanager
def workers(spawn, jobs: dict):
    """{key: the Worker of jobs[key], a (part, overrides) pair}, each process up until the block ends."""
    started = {}
    try:
        for key, (part, overrides) in jobs.items():
            started[key] = Worker(spawn, part, overrides)
        yield started
    finally:
        for worker in started.values():
            worker.process.kill()
            worker.process.join()


def bench_models(setups: dict[str, tuple[list[int], list[str]]], repeats: int) -> dict[str, list[dict]]:
    """Every setup's rows: {"eager": (parts, overrides), "compiled": ...} -> {"eager": [a row per part], ...}.
    Each (setup, part) has a process of its own, so that its peak memory is its own; all stay up and are timed
    in turns, so that a drift of the machine hits them alike and cancels in the ratios: the speed-ups over the
    setup's P=1 and, for every setup but "eager", a part's gain over its "eager" twin, medians of per-turn
    ratios. Then, eager on the CPU and with P=1 among the setup's parts (every ceiling is relative to P=1's
    step), each part's step is profiled alone (`profiled_alone`)."""
    spawn = multiprocessing.get_context("spawn")
    jobs = {(setup, part): (part, overrides) for setup, (parts, overrides) in setups.items() for part in parts}
    with workers(spawn, jobs) as up:
        times = in_turns({(*key, kind): functools.partial(worker.ask, kind)
                          for key, worker in up.items() for kind in MODEL_TIMINGS}, repeats)
        summaries = {key: worker.ask("summary") for key, worker in up.items()}
    by_setup = {setup: {(part, kind): t for (s, part, kind), t in times.items() if s == setup} for setup in setups}
    rows = {setup: [] for setup in setups}
    for setup, (parts, overrides) in setups.items():
        for part in parts:
            summary = summaries[setup, part]
            profiled = summary.pop("profiled") and 1 in parts
            summary["breakdown"] = profiled_alone(spawn, part, overrides) if profiled else None
            row = model_row(part, by_setup[setup], summary)
            if setup != "eager":
                row.update(gains(part, by_setup[setup], by_setup.get("eager", {})))
            rows[setup].append(row)
            print(f"model P={part} {' '.join(overrides)}: {row['train_ips']:.0f} img/s training, "
                  f"{row['infer_ips']:.0f} img/s inference", file=sys.stderr)
    return rows


def profiled_alone(spawn, part: int, overrides: list[str]) -> dict[str, float]:
    """The part's step breakdown, in a process of its own with no other part's up. Under the profiler, with the
    seven parts' processes of an earlier bench up, this machine ran the memory-bound ops (BatchNorm, ReLU) 2-10x
    slower than alone (unprofiled steps were not slowed), and P=1's breakdown sets every part's ceiling."""
    with workers(spawn, {part: (part, overrides)}) as alone:
        return median_breakdown([alone[part].ask("breakdown") for _ in range(PROFILED_STEPS)])


def model_row(part: int, times: dict[tuple, list[float]], summary: dict) -> dict:
    """A part's throughputs (medians) and their spread, and its speed-ups over P=1, medians of per-turn ratios,
    and their spread (None without P=1): the drift of the machine shows in the first spread, not in the second."""
    row = {"part": part, **summary}
    spreads, speedup_spreads = [], []
    for kind in MODEL_TIMINGS:
        seconds, spread = median_and_spread(times[part, kind])
        row[f"{kind}_ips"] = summary["batch"] / seconds
        spreads.append(spread)
        row[f"{kind}_speedup"] = None
        if (1, kind) in times:
            row[f"{kind}_speedup"], speedup_spread = per_turn_ratio(times[1, kind], times[part, kind])
            speedup_spreads.append(speedup_spread)
    row["spread"], row["speedup_spread"] = max(spreads), max(speedup_spreads, default=None)
    return row


def gains(part: int, times: dict[tuple, list[float]], eager: dict[tuple, list[float]]) -> dict:
    """A part's training and inference gains over its eager twin, medians of per-turn ratios, and their spread
    (empty where eager did not time the part)."""
    if (part, "train") not in eager:
        return {}
    row, spreads = {}, []
    for kind in MODEL_TIMINGS:
        row[f"{kind}_gain"], spread = per_turn_ratio(eager[part, kind], times[part, kind])
        spreads.append(spread)
    return {**row, "gain_spread": max(spreads)}


def row_of(rows: list[dict], part: int) -> dict | None:
    """The row of that part; None when it was not measured."""
    return next((r for r in rows if r["part"] == part), None)


def model_section(rows: list[dict], recipe_modes: set) -> str:
    base = row_of(rows, 1)  # every speed-up's reference

    def speedup(r: dict, kind: str) -> str:
        return f"{r[kind + '_speedup']:.2f}x" if base else "-"

    text = ("\n## Whole model: training step of train.py\n\n"
            "Each part runs in a process of its own; the parts are timed in turns, and a speed-up is the median of "
            "the per-turn ratios to P=1, so that a drift of the machine cancels in it: *spread* is that of the "
            "step times, drift and all, *speed-up spread* that of the ratios. The FLOPs are the paper's "
            "convention, what the layer needs whichever form computes it.\n\n") + markdown_table(
        ["P", "paper FLOPs, P=1 / P", "train img/s", "speed-up", "inference img/s", "speed-up", "peak memory MB",
         "spread", "speed-up spread"],
        [[r["part"], f"{base['paper_flops'] / r['paper_flops']:.2f}x" if base else "-", f"{r['train_ips']:.0f}",
          speedup(r, "train"), f"{r['infer_ips']:.0f}", speedup(r, "infer"), f"{r['peak_mb']:.0f}",
          f"{r['spread']:.0%}", "-" if r["speedup_spread"] is None else f"{r['speedup_spread']:.0%}"] for r in rows])
    if rows[0]["batch"] != TARGETS_BATCH:
        text += f"\n- The speed-up goals are set at batch {TARGETS_BATCH}: not judged at batch {rows[0]['batch']}."
    for part, goal in MODEL_TARGETS.items():
        row = row_of(rows, part)
        if base and row and rows[0]["batch"] == TARGETS_BATCH:
            got = row["train_speedup"]
            text += f"\n- Training speed-up at P={part}: {got:.2f}x; goal {goal}x: {'met' if got >= goal else 'NOT met'}."
    return text + sweep_projection(rows, None, recipe_modes) + "\n"


def sweep_projection(rows: list[dict], compile_as: str | None, recipe_modes: set) -> str:
    """The sweep's hours at these rows' speeds, stepped eager (compile_as None) or compiled. recipe_modes holds the
    mode (None: eager) the default recipe trains with on this device, if these rows compute HetConv in its form:
    the line then says that it projects the default recipe."""
    epochs, batch = rows[0]["epochs"], rows[0]["batch"]
    trained = CIFAR10_TRAIN // batch * batch  # the last partial batch is dropped
    hours = sum(epochs * (trained / r["train_ips"] + CIFAR10_TEST / r["infer_ips"]) for r in rows) / 3600
    how = "eager" if compile_as is None else f"compiled ({compile_as})"
    if compile_as in recipe_modes:
        how += ", the default recipe's step here"
    return (f"\n- Projected time of the sweep over P = {', '.join(str(r['part']) for r in rows)} ({epochs} epochs "
            f"each, as the recipe on record, of {trained:,} training images in batches of {batch} and "
            f"{CIFAR10_TEST:,} test images, one job at a time on this device), {how}: {hours:.1f} hours.")


def breakdown_section(rows: list[dict]) -> str:
    """Milliseconds per profiled step by category, and the FLOP-proportional ceiling of the speed-up: the
    step with every HetConv layer's convolutions at R(P) of P=1's and everything else as at P=1."""
    base = row_of(rows, 1)
    if base is None or base["breakdown"] is None:
        return ""
    base_total, base_convs = sum(base["breakdown"].values()), base["breakdown"]["3x3 convs"]
    body = []
    for r in rows:
        ms = r["breakdown"]
        convs = ms["3x3 convs"] + ms["1x1 convs"]
        ceiling = base_total / (base_total - base_convs * (1 - paper_ratio(r["part"])))
        body.append([r["part"], f"{sum(ms.values()):.0f}"] + [f"{ms[c]:.0f}" for c in CATEGORIES]
                    + [f"{convs / base_convs:.2f} ({paper_ratio(r['part']):.3f})", f"{ceiling:.2f}x",
                       f"{r['train_speedup']:.2f}x"])
    return ("\n## Where the training step's time goes\n\n"
            f"Milliseconds per step under the profiler, by op (self time, median over {PROFILED_STEPS} steps, each "
            "part profiled alone). "
            "*3x3 convs* and *1x1 convs* are the convolutions of the 12 HetConv layers; *HetConv convs / P=1* "
            "is their time against P=1's, beside the FLOP ratio R(P). *Ceiling* is the speed-up over P=1 if those "
            "convolutions took exactly R(P) of P=1's time and everything else stayed as at P=1; *measured* is the "
            "unprofiled speed-up above.\n\n"
            + markdown_table(["P", "step ms"] + list(CATEGORIES) + ["HetConv convs / P=1 (R)", "ceiling",
                                                                   "measured"], body))


def compile_section(compiled: list[dict], eager: list[dict], setting: str, recipe_modes: set) -> str:
    eager_by_part = {r["part"]: r for r in eager}
    base = row_of(compiled, 1)
    text = (f"\n## torch.compile (trainer.compile={setting}) against eager\n\n"
            "Timed in the same turns as the eager parts above: a *gain* is the median of the per-turn ratios eager "
            "time / compiled time of the same part, *gain spread* that of the ratios, *spread* that of the compiled "
            "step times."
            + (" reduce-overhead adds CUDA graphs on CUDA only; on the CPU it compiles as the default mode."
               if setting == "reduce-overhead" else "") + "\n\n"
            + markdown_table(
                ["P", "eager train img/s", "compiled train img/s", "gain", "speed-up over compiled P=1",
                 "eager inference img/s", "compiled inference img/s", "gain", "spread", "gain spread"],
                [[r["part"], f"{eager_by_part[r['part']]['train_ips']:.0f}", f"{r['train_ips']:.0f}",
                  f"{r['train_gain']:.2f}x", f"{r['train_speedup']:.2f}x" if base else "-",
                  f"{eager_by_part[r['part']]['infer_ips']:.0f}", f"{r['infer_ips']:.0f}", f"{r['infer_gain']:.2f}x",
                  f"{r['spread']:.0%}", f"{r['gain_spread']:.0%}"] for r in compiled if r["part"] in eager_by_part]))
    if {r["part"] for r in compiled} == set(eager_by_part):
        text += sweep_projection(compiled, setting, recipe_modes) + "\n"
    return text


def layer_section(rows: list[dict]) -> str:
    parts = sorted({r["part"] for r in rows})
    cells = {(r["shape"], r["part"]): r for r in rows}
    body = []
    for shape in dict.fromkeys(r["shape"] for r in rows):
        line = [cells[(shape, p)] for p in parts]
        body.append([shape, f"{line[0]['dense_ms']:.3f}"]
                    + [f"{r['ours']:.2f} ({r['ours'] / r['flop_ratio']:.2f}x)" for r in line]
                    + [f"{line[0]['pointwise']:.2f}", f"{max(r['naive'] for r in line):.2f}",
                       f"{max(r['spread'] for r in line):.0%}"])
    hetero = [r for r in rows if r["part"] > 1]
    within = [r for r in hetero if r["ours"] <= LAYER_TARGET * r["flop_ratio"]]
    return ("\n## Layer by layer: forward + backward, HetConv2d against the dense 3x3 conv\n\n"
            "Each cell: time of HetConv2d computed grouped (impl=grouped) / time of the dense conv, then that ratio /"
            f" R(P), the layer's time against its FLOP-proportional share (goal: at most {LAYER_TARGET}x). The 1x1 "
            "column is a dense 1x1 conv alone (1/9 of the dense 3x3's FLOPs) against the dense 3x3 conv: HetConv runs"
            " that branch in full at every P > 1 besides its grouped 3x3 conv, so no cell of its row can be much "
            "below it. The naive column is HetConv2d computed as one dense conv over its assembled weight, zeros and "
            "all (impl=dense, which trainer.hetconv=auto runs on CUDA), at its worst P. Each ratio is the median of "
            "per-repeat ratios, and the spread is the largest of the row's ratios' spreads. On the CPU a row's layers"
            " are timed in turns, so that a drift of the machine cancels in the ratios. On CUDA every timing replays "
            "a CUDA graph of the forward and backward: the GPU's work, without Python's launch overhead.\n\n"
            + markdown_table(["shape (in->out @ side)", "dense ms"] + [f"P={p} (R={paper_ratio(p):.3f})" for p in parts]
                             + [f"1x1 / dense (R={1 / 9:.3f})", "naive / dense", "spread"], body)
            + f"\n{len(within)} of {len(hetero)} cells with P > 1 are within {LAYER_TARGET}x of their "
              "FLOP-proportional share.\n")


def render(device_label: str, setup: str, layer_rows, model_rows, compile_rows, compile_setting: str,
           recipe_modes: set, command: str) -> str:
    versions, batch = library_versions(), model_rows[0]["batch"]
    return (f"# Speed of HetConv on {device_label}\n\n"
            f"Made by `{command}` on {now()}, commit {git_commit()}, torch {versions['torch']}. Batch {batch} "
            "(inference too), "
            f"{setup}, optimizer as in configs/. Median of repeats; *spread* = (max - min) / median over the "
            "repeats of a figure: how far to trust it.\n"
            + model_section(model_rows, recipe_modes)
            + breakdown_section(model_rows)
            + (compile_section(compile_rows, model_rows, compile_setting, recipe_modes) if compile_rows else "")
            + (layer_section(layer_rows) if layer_rows else ""))


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def parse_parts(parser: argparse.ArgumentParser, text: str) -> list[int]:
    try:
        parts = [int(p) for p in text.split(",")]
    except ValueError:
        parser.error(f"parts must be comma-separated integers such as 1,4,64, got {text!r}")
    if len(set(parts)) < len(parts):
        parser.error(f"parts must each be given once, got {text!r}")
    for part in parts:
        try:
            vgg16(part)
        except ValueError as error:
            parser.error(str(error))
    return parts


def parse_compile_parts(parser: argparse.ArgumentParser, text: str, parts: list[int], device: torch.device) -> list[int]:
    """--compile-parts: a list, none, or auto: every part where the default recipe compiles (CUDA), so that the
    report projects the sweep as it trains, and on the CPU, which trains eager, those of CPU_COMPILE_PARTS."""
    if text == "none":
        return []
    if text != "auto":
        chosen = parse_parts(parser, text)
        if outside := [str(p) for p in chosen if p not in parts]:
            parser.error(f"--compile-parts {','.join(outside)} not among --parts: a compiled part's gain is measured "
                         "against the same part eager; add them to --parts")
        return chosen
    return parts if compile_mode("auto", device) else [p for p in parts if p in CPU_COMPILE_PARTS]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=DEVICES)
    parser.add_argument("--parts", default=",".join(map(str, PAPER_PARTS)))
    parser.add_argument("--compile-parts", default="auto",
                        help="also time torch.compile for these parts (slow to compile), or none; auto: every part on "
                             "CUDA, where the default recipe compiles, and those of 1,4,64 on the CPU")
    parser.add_argument("--compile", default="reduce-overhead", choices=COMPILE_MODES,
                        help="the trainer.compile setting timed for --compile-parts (on the CPU reduce-overhead is "
                             "the default mode: CUDA graphs need CUDA)")
    parser.add_argument("--impl", default="auto", choices=IMPLS,
                        help="how the model's HetConv layers compute (trainer.hetconv): auto is dense on CUDA, "
                             "grouped on the CPU")
    parser.add_argument("--batch", type=positive_int,
                        help="training batch, layers' and inference's too (default: the recipe's trainer.batch_size)")
    parser.add_argument("--repeats", type=positive_int, default=7)
    parser.add_argument("--skip-layers", action="store_true", help="model level only")
    parser.add_argument("--out", type=output_folder, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    parts = parse_parts(parser, args.parts)
    overrides = [f"trainer.device={args.device}", f"trainer.hetconv={args.impl}"]
    if args.batch is not None:
        overrides.append(f"trainer.batch_size={args.batch}")
    cfg = train_config(*overrides)
    try:  # what train.py would refuse (a batch of one, say), before any timing
        device = select_device(args.device, key="--device")
        check_settings(cfg)
        if cfg.trainer.batch_size > CIFAR10_TRAIN:
            raise ValueError(f"--batch {cfg.trainer.batch_size} is more than CIFAR-10's {CIFAR10_TRAIN:,} training "
                             "images")
    except ValueError as error:
        parser.error(str(error))
    configure_backend(device)
    recipe_batch = cfg.trainer.batch_size == train_config().trainer.batch_size
    compile_parts = parse_compile_parts(parser, args.compile_parts, parts, device)  # a typo fails before any timing
    setups = {"eager": (parts, [*overrides, "trainer.compile=false"])}
    if compile_parts:
        setups["compiled"] = (compile_parts, [*overrides, f"trainer.compile={args.compile}"])
    rows = bench_models(setups, args.repeats)
    model_rows, compile_rows = rows["eager"], rows.get("compiled", [])
    layer_rows = [] if args.skip_layers else bench_layers(device, cfg, parts, args.repeats)
    label = device_name(device)
    setup = (f"{precision(device, cfg.trainer.amp)}, {'channels_last' if cfg.trainer.channels_last else 'NCHW'}, "
             f"{count(torch.get_num_threads(), 'CPU thread')}, "
             f"HetConv layers computed {resolved_impl(args.impl, device)} (trainer.hetconv={args.impl})")
    command = typed_command("scripts/bench.py", argv)
    # The step the default recipe (trainer.compile and trainer.hetconv auto) trains with, if this report times its form
    # at its batch.
    default_form = resolved_impl(args.impl, device) == resolved_impl("auto", device) and recipe_batch
    recipe_modes = {compile_mode("auto", device)} if default_form else set()
    report = render(label, setup, layer_rows, model_rows, compile_rows, args.compile, recipe_modes, command)
    suffix = ("" if args.impl == "auto" else f"-{args.impl}") + (
        "" if recipe_batch else f"-batch{cfg.trainer.batch_size}")
    path = args.out / f"bench-{'cpu' if device.type == 'cpu' else slug(label)}{suffix}.md"
    write_report({path: report})
    print(report)
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
