"""The pieces of a training run that train.py, eval.py and scripts/bench.py share.

The device, HetConv form, precision and compile mode a run computes with; the model, optimizer, schedule and
batches built from the config (`build_training`); one training step and one evaluation. bench.py builds what it
times with `build_training` and times exactly `train_step`, so its throughput is the throughput of train.py.
"""

import contextlib
import ctypes
import logging
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hetconv.data import Split, TrainBatches, memory_format, to_inputs
from hetconv.layer import resolved_impl
from models import vgg16

log = logging.getLogger(__name__)


DEVICES = ("auto", "cpu", "cuda")


def check_device(name, key: str = "trainer.device") -> None:
    """The setting names a device; whether it is there is for `select_device`, on the machine that trains."""
    if name not in DEVICES:
        raise ValueError(f"{key} must be {', '.join(DEVICES[:-1])} or {DEVICES[-1]}, got {name!r}")


def select_device(name: str, key: str = "trainer.device") -> torch.device:
    """'auto' (CUDA when available, else CPU), 'cpu' or 'cuda'; errors name the setting `key`."""
    check_device(name, key)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if os.environ.get("CUDA_VISIBLE_DEVICES") == "":
            log.warning("CUDA_VISIBLE_DEVICES is empty, so this job runs on the CPU. With "
                        "hydra/launcher=submitit_local, set hydra.launcher.gpus_per_node to the host's GPUs.")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{key}=cuda but torch sees no CUDA device: use {key}=cpu or auto, "
                         "or check the GPU driver and the CUDA build of torch (torch.version.cuda="
                         f"{torch.version.cuda})")
    return torch.device(name)


def configure_backend(device: torch.device) -> None:
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest conv algorithm once
        # float32 means float32: cuDNN would otherwise run float32 convolutions (all of them under trainer.amp=false)
        # in TF32 on Ampere and later, while the run records float32. Under bf16 autocast it changes nothing.
        torch.backends.cudnn.allow_tf32 = False  # not fp32_precision: then reading this flag (inductor may) raises
        return
    # glibc hands large freed blocks back to the OS and page-faults them in again at the next step:
    # every activation of every step. Keeping them in the heap saves that work and changes no result.
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4
        libc.mallopt(m_mmap_max, 0)
        # mallopt takes a C int: ctypes silently wraps a larger value (2**40 became 0, trim always).
        libc.mallopt(m_trim_threshold, 2**31 - 1)


def execution(trainer) -> tuple[torch.device, str | None, str]:
    """The device, torch.compile mode (None: eager) and HetConv form that the trainer settings ask for, with the
    device's backend configured."""
    device = select_device(trainer.device)
    configure_backend(device)
    return device, compile_mode(trainer.compile, device), resolved_impl(trainer.hetconv, device)


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
    if setting is True:
        return "default"
    if setting is False:
        return None
    if setting == "auto":
        return "reduce-overhead" if device.type == "cuda" else None
    if setting in COMPILE_MODES:
        return setting
    raise ValueError(f"trainer.compile must be auto, true, false or a torch.compile mode ({', '.join(COMPILE_MODES)}),"
                     f" got {setting!r}")


def how_it_runs(compile_as: str | None) -> str:
    return f"with torch.compile mode {compile_as}" if compile_as else "eagerly"


def compiled(model: nn.Module, compile_as: str | None) -> nn.Module:
    """The module a training step calls: the model itself, or torch.compile's wrapper sharing its weights."""
    if not compile_as:
        return model
    # Hydra's default launcher runs a sweep's jobs one after another in one process, each compiling a new model, and
    # torch.compile keeps at most 8 versions of a forward per process (recompile_limit), two per job (training and
    # evaluation): from the fifth job on, the model would run eagerly, silently. Each run starts with a clean slate.
    torch.compiler.reset()
    return torch.compile(model, mode=compile_as)


def build_optimizer(model: nn.Module, optim) -> torch.optim.Optimizer:
    """SGD, the one optimizer optim.name may name (check_settings refuses another)."""
    return torch.optim.SGD(model.parameters(), lr=optim.lr, momentum=optim.momentum,
                           weight_decay=optim.weight_decay, nesterov=optim.nesterov)


def milestone_epochs(schedule, epochs: int) -> list[int]:
    """The recipe's milestones, given at a reference length, scaled to this run's epochs. Milestones that
    land on the same epoch compound (MultiStepLR counts them), and none lands after the last epoch's start
    (a short run's would round to its end and never fire), so the last epoch trains at the recipe's final lr
    from 2 epochs up."""
    return sorted(max(1, min(round(m * epochs / schedule.reference_epochs), epochs - 1)) for m in schedule.milestones)


def build_scheduler(optimizer: torch.optim.Optimizer, schedule, epochs: int):
    """Step decay, the one schedule schedule.name may name (check_settings refuses another); stepped once per epoch."""
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestone_epochs(schedule, epochs), schedule.gamma)


class Preprocess:
    """uint8 images on the device -> the network's float inputs (see data.to_inputs)."""

    def __init__(self, data_cfg, channels_last: bool, device: torch.device):
        self.mean = torch.tensor(data_cfg.mean, device=device) if data_cfg.normalize else None
        self.std = torch.tensor(data_cfg.std, device=device) if data_cfg.normalize else None
        self.channels_last = channels_last

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return to_inputs(images, self.mean, self.std, self.channels_last)


@dataclass
class Training:
    """A run's model and what trains it, as `build_training` makes them from the config."""

    model: nn.Module  # on the device, in the config's memory format
    forward_model: nn.Module  # what a step calls: the model, or torch.compile's wrapper sharing its weights
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    generator: torch.Generator  # draws and augments the batches: its state is the data order's
    batches: TrainBatches
    preprocess: Preprocess


def build_model(cfg, impl: str, device: torch.device) -> nn.Module:
    """VGG-16 at cfg.model's part, classes and width, its HetConv layers computing with `impl`, on `device` in the
    memory format cfg.trainer asks for."""
    model = vgg16(cfg.model.part, cfg.model.num_classes, cfg.model.width, impl)
    return model.to(device, memory_format=memory_format(cfg.trainer.channels_last))


def build_training(cfg, train_split: Split, device: torch.device, impl: str, compile_as: str | None) -> Training:
    """VGG-16 at cfg.model's part and width, seeded by cfg.seed, with its optimizer, schedule, training batches and
    preprocessing, computing with `impl` and `compile_as` on `device` (see `execution`)."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, impl, device)
    optimizer = build_optimizer(model, cfg.optim)
    generator = torch.Generator(device).manual_seed(cfg.seed)
    return Training(model, compiled(model, compile_as), optimizer,
                    build_scheduler(optimizer, cfg.schedule, cfg.trainer.epochs), generator,
                    TrainBatches(train_split, cfg.trainer.batch_size, generator, cfg.data.crop_padding, cfg.data.flip),
                    Preprocess(cfg.data, cfg.trainer.channels_last, device))


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
             num_classes: int) -> dict:
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
