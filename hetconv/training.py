"""The pieces of a training run that train.py, eval.py and scripts/bench.py share.

One training step, one evaluation, the optimizer and schedule built from the config, and the device
set-up. bench.py times exactly `train_step`, so its throughput is the throughput of train.py.
"""

import contextlib
import ctypes
import difflib
import logging
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from torch import nn

from hetconv.data import DatasetError, Split, to_inputs
from hetconv.layer import check_impl
from hetconv.provenance import REPO_ROOT

log = logging.getLogger(__name__)


def select_device(name: str, key: str = "trainer.device") -> torch.device:
    """'auto' (CUDA when available, else CPU), 'cpu' or 'cuda'; errors name the setting `key`."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if os.environ.get("CUDA_VISIBLE_DEVICES") == "":
            log.warning("CUDA_VISIBLE_DEVICES is empty, so this job trains on the CPU. With "
                        "hydra/launcher=submitit_local, set hydra.launcher.gpus_per_node to the host's GPUs.")
        return torch.device("cpu")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"{key} must be auto, cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{key}=cuda but torch sees no CUDA device: use {key}=cpu or auto, "
                         "or check the GPU driver and the CUDA build of torch (torch.version.cuda="
                         f"{torch.version.cuda})")
    return torch.device(name)


# The true/false settings. Hydra reads `off` or `no` as a string, which Python would take for true.
FLAGS = ("data.download", "data.flip", "data.normalize", "optim.nesterov", "trainer.amp", "trainer.channels_last")


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_flags(cfg, keys: tuple[str, ...]) -> None:
    for key in keys:
        value = OmegaConf.select(cfg, key)
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false, got {value!r}")


def ends_without_traceback(error: Exception) -> bool:
    """Whether a run stopped by this error ends with its message alone (exit status 1) rather than inside Hydra's
    traceback, which repeats it: a single run (a sweep's launcher records each job's error and runs the others), an
    error that this project's code raised for a setting, the data, a file, a refused resume or a diverged run, with
    a message that names the fix, and HYDRA_FULL_ERROR unset. A library's error, or one of another type, is a bug
    to trace: it keeps the traceback."""
    if HydraConfig.get().mode != RunMode.RUN or os.environ.get("HYDRA_FULL_ERROR") == "1":
        return False
    return isinstance(error, (ValueError, OSError, DatasetError, FloatingPointError)) and raised_here(error)


def raised_here(error: Exception) -> bool:
    """Whether the innermost Python frame of the error's traceback is this repository's code, not a library's."""
    trace = error.__traceback__
    while trace.tb_next:
        trace = trace.tb_next
    path = Path(trace.tb_frame.f_code.co_filename).resolve()
    return path.is_relative_to(REPO_ROOT) and "site-packages" not in path.parts


def check_overrides(overrides: list[str], readable: list[str], groups, script: str, listing: str) -> None:
    """Refuse a command-line setting that nothing would read: a key added with Hydra's `+` (which Hydra suggests
    for a mistyped key) or one the script does not use (`readable`: its settings; `groups`: the config groups it
    may be given, such as experiment=demo). Removing a setting (~key) is refused too: the script reads them all."""
    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.key_or_group
        parts = key.split(".")
        known = any(".".join(parts[:i]) in readable for i in range(1, len(parts) + 1))  # data.mean.0: data.mean's
        if override.is_delete():
            raise ValueError(f"{override.input_line}: {script} does not take a setting away; set {key} instead")
        if key in groups or (known and not override.is_add()):
            continue
        problem = f"adds {key} with +, but {script} reads only its configs' settings" if override.is_add() else (
            f"{script} does not read {key}")
        close = difflib.get_close_matches(key, [k for k in readable if k != key], n=1)
        raise ValueError(f"{override.input_line}: {problem}, so it would be ignored"
                         + (f" (did you mean {close[0]}?)" if close else "") + f". {listing}")


def check_settings(cfg) -> None:
    """Reject settings that cannot train, naming the key, before anything starts."""
    # a training batch of one image has no batch statistics for the classifier's BatchNorm1d
    for key, least in (("trainer.epochs", 1), ("trainer.batch_size", 2), ("trainer.eval_batch_size", 1),
                       ("schedule.reference_epochs", 1), ("data.crop_padding", 0), ("model.num_classes", 1)):
        value = OmegaConf.select(cfg, key)
        if not is_int(value) or value < least:
            raise ValueError(f"{key} must be an int >= {least}, got {value!r}")
    for key, zero_allowed in (("optim.lr", False), ("schedule.gamma", False), ("optim.momentum", True),
                              ("optim.weight_decay", True)):
        value = OmegaConf.select(cfg, key)
        if not is_finite_number(value) or value < 0 or (value == 0 and not zero_allowed):
            raise ValueError(f"{key} must be a finite number {'>=' if zero_allowed else '>'} 0, got {value!r}")
    if not (is_int(cfg.seed) and -2**63 <= cfg.seed < 2**64):
        raise ValueError(f"seed must be an int from -2**63 to 2**64 - 1, as torch.manual_seed takes, got {cfg.seed!r}")
    milestones = OmegaConf.select(cfg, "schedule.milestones")
    if not (OmegaConf.is_list(milestones) and all(is_int(m) and m >= 0 for m in milestones)):
        raise ValueError(f"schedule.milestones must be a list of epochs (ints >= 0) at schedule.reference_epochs, "
                         f"got {milestones!r}")
    jobs_per_gpu = cfg.trainer.jobs_per_gpu
    if jobs_per_gpu is not None and not (is_int(jobs_per_gpu) and jobs_per_gpu >= 1):
        raise ValueError(f"trainer.jobs_per_gpu must be an int >= 1 (or null to not pin jobs), got {jobs_per_gpu!r}")
    check_flags(cfg, FLAGS)
    for key, positive in (("data.mean", False), ("data.std", True)):
        values = OmegaConf.select(cfg, key)
        if not (OmegaConf.is_list(values) and len(values) == 3
                and all(is_finite_number(v) and (v > 0 or not positive) for v in values)):
            raise ValueError(f"{key} must be 3 finite numbers{' > 0' if positive else ''}, one per RGB channel, "
                             f"got {values}")
    if cfg.optim.nesterov and cfg.optim.momentum == 0:
        raise ValueError("optim.nesterov=true needs optim.momentum > 0: set a momentum, or optim.nesterov=false")
    # An unknown trainer.compile or trainer.hetconv fails here, before a GPU is claimed.
    compile_mode(cfg.trainer.compile, torch.device("cpu"))
    check_impl(cfg.trainer.hetconv, "trainer.hetconv")


def configure_backend(device: torch.device) -> None:
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest conv algorithm once
        return
    # glibc hands large freed blocks back to the OS and page-faults them in again at the next step:
    # every activation of every step. Keeping them in the heap saves that work and changes no result.
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4
        libc.mallopt(m_mmap_max, 0)
        # mallopt takes a C int: ctypes silently wraps a larger value (2**40 became 0, trim always).
        libc.mallopt(m_trim_threshold, 2**31 - 1)


def uses_amp(device: torch.device, amp: bool) -> bool:
    """bf16 autocast on CUDA when asked; the CPU path runs in float32."""
    return amp and device.type == "cuda"


def precision(device: torch.device, amp: bool) -> str:
    """What a run computes in, as its record and the bench report name it."""
    return "bf16 autocast" if uses_amp(device, amp) else "float32"


def autocast(device: torch.device, amp: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=uses_amp(device, amp))


# torch.compile's modes; reduce-overhead adds CUDA graphs on CUDA and is the default mode on the CPU.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_mode(setting, device: torch.device) -> str | None:
    """trainer.compile as a torch.compile mode, None for eager. auto: reduce-overhead on CUDA, where a
    CIFAR-size step is bound by kernel launches that CUDA graphs remove; eager on the CPU, where
    inductor's code trains slower than eager (scripts/bench.py measures both)."""
    if setting is False or setting is True:
        return "default" if setting else None
    if setting == "auto":
        return "reduce-overhead" if device.type == "cuda" else None
    if setting in COMPILE_MODES:
        return setting
    raise ValueError(f"trainer.compile must be auto, true, false or a torch.compile mode ({', '.join(COMPILE_MODES)}),"
                     f" got {setting!r}")


def compiled(model: nn.Module, compile_as: str | None) -> nn.Module:
    """The module a training step calls: the model itself, or torch.compile's wrapper sharing its weights."""
    return torch.compile(model, mode=compile_as) if compile_as else model


def train_config(*overrides: str) -> DictConfig:
    """configs/train.yaml composed with these overrides, as train.py would see it (without hydra's node)."""
    with initialize_config_dir(config_dir=str(REPO_ROOT / "configs"), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def build_optimizer(model: nn.Module, optim) -> torch.optim.Optimizer:
    if optim.name != "sgd":
        raise ValueError(f"optim.name must be sgd, got {optim.name!r}")
    return torch.optim.SGD(model.parameters(), lr=optim.lr, momentum=optim.momentum,
                           weight_decay=optim.weight_decay, nesterov=optim.nesterov)


def milestone_epochs(schedule, epochs: int) -> list[int]:
    """The recipe's milestones, given at a reference length, scaled to this run's epochs. Milestones that
    land on the same epoch compound (MultiStepLR counts them), and none lands after the last epoch's start
    (a short run's would round to its end and never fire), so the last epoch trains at the recipe's final lr
    from 2 epochs up."""
    return sorted(max(1, min(round(m * epochs / schedule.reference_epochs), epochs - 1)) for m in schedule.milestones)


def build_scheduler(optimizer: torch.optim.Optimizer, schedule, epochs: int):
    """Stepped once per epoch."""
    if schedule.name != "step":
        raise ValueError(f"schedule.name must be step, got {schedule.name!r}")
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestone_epochs(schedule, epochs), schedule.gamma)


class Preprocess:
    """uint8 images on the device -> the network's float inputs (see data.to_inputs)."""

    def __init__(self, data_cfg, channels_last: bool, device: torch.device):
        stats = [torch.tensor(data_cfg[k], device=device) for k in ("mean", "std")] if data_cfg.normalize else [None] * 2
        self.mean, self.std = stats
        self.channels_last = channels_last

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return to_inputs(images, self.mean, self.std, self.channels_last)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, inputs: torch.Tensor, labels: torch.Tensor,
               amp: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One SGD step; returns the batch's summed loss and number of correct predictions, on the device
    (no host synchronisation)."""
    with autocast(inputs.device, amp):
        logits = model(inputs)
        loss = F.cross_entropy(logits, labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach() * len(labels), (logits.argmax(1) == labels).sum()


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, preprocess: Preprocess, batch_size: int, amp: bool,
             num_classes: int = 10) -> dict:
    """Loss, accuracy (%, 2 decimals) and per-class accuracy on a whole split, in eval mode."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=split.images.device)
    hits = torch.zeros(num_classes, device=split.images.device)
    for start in range(0, len(split), batch_size):
        images, labels = split.images[start:start + batch_size], split.labels[start:start + batch_size]
        with autocast(images.device, amp):
            logits = model(preprocess(images))
        loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum")
        hits.index_add_(0, labels, (logits.argmax(1) == labels).float())
    model.train(was_training)
    counts = torch.bincount(split.labels, minlength=num_classes).cpu()
    hits = hits.cpu()
    return {
        "loss": loss_sum.item() / len(split),
        "acc": percent(hits.sum().item(), len(split)),
        "per_class_acc": [percent(h, c) if c else None for h, c in zip(hits.tolist(), counts.tolist())],
    }


def percent(correct: float, total: int) -> float:
    return round(100 * correct / total, 2)
