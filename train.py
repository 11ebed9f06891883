"""Train VGG-16 with HetConv(part) on CIFAR-10.

    python train.py model.part=4                      # the recipe on record: 330 epochs, step decay
    python train.py model.part=4 trainer.epochs=30    # shorter: the schedule keeps its shape
    python train.py -m experiment=paper               # the sweep over P (README, "Reproduce")

Everything goes to Hydra's output dir: train.log, metrics.json (rewritten after every epoch),
TensorBoard events, checkpoints/last.pt (every epoch) and model.pt (the final weights).
Running a command again on the same folder resumes it from checkpoints/last.pt; a finished run is
left as it is. SIGINT/SIGTERM save the current step's state, to resume from exactly there.
"""

import datetime
import logging
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams
from tqdm import tqdm

from hetconv.data import TrainBatches, is_official, load_cifar10
from hetconv.flops import count_flops, count_params
from hetconv.gpus import claim_gpu
from hetconv.provenance import device_name
from hetconv.runfiles import (RunRecord, config_differences, last_checkpoint, load, restore_rng_states,
                              rng_states, save)
from hetconv.training import (Preprocess, build_optimizer, build_scheduler, configure_backend, evaluate,
                              select_device, train_step)
from models import vgg16
from models.vgg import check_part_fits

log = logging.getLogger("train")


class Interrupted(SystemExit):
    """Raised after the state of an interrupted run has been saved; exits with 128 + signal number."""


class StopSignals:
    """Turns SIGINT/SIGTERM into a flag the training loop checks after each step."""

    def __init__(self):
        self.received: signal.Signals | None = None
        self.previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signals can only be caught there
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def handle(self, signum, frame):
        self.received = signal.Signals(signum)

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def resume_point(run_dir: Path, config: dict) -> dict | None:
    """The run's last checkpoint, or None; refuses one saved under settings that change the result."""
    path = last_checkpoint(run_dir)
    if not path.exists():
        return None
    state = load(path)
    differences = config_differences(state["config"], config)
    if differences:
        raise ValueError(
            f"{run_dir} holds a run with other settings ({'; '.join(differences)}). Nothing was changed. "
            f"Rerun with the settings it was started with to resume it, or train in another folder "
            f"(hydra.run.dir=... for a run, hydra.sweep.dir=... for a sweep).")
    return state


@hydra.main(config_path="configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> dict:
    return train(cfg, Path(HydraConfig.get().runtime.output_dir))


def train(cfg: DictConfig, run_dir: Path) -> dict:
    config = OmegaConf.to_container(cfg, resolve=True)
    state = resume_point(run_dir, config)
    record = RunRecord(run_dir, config, state and state["history"], state["wall_s"] if state else 0.0)
    if state and len(state["history"]) == cfg.trainer.epochs:
        log.info("%s already finished %d epochs: nothing to do", run_dir, cfg.trainer.epochs)
        if not (run_dir / "model.pt").exists():  # killed between the last checkpoint and the final save
            save_final_weights(run_dir, state["model"], config, cfg.trainer.epochs)
        return record.update("finished")
    try:
        return run(cfg, config, run_dir, state, record)
    except Exception as error:
        record.update("failed", f"{type(error).__name__}: {error}")
        raise


def run(cfg: DictConfig, config: dict, run_dir: Path, state: dict | None, record: RunRecord) -> dict:
    # Everything that bad input can break comes first, before any training.
    check_part_fits(cfg.model.part, cfg.model.width)
    if cfg.trainer.jobs_per_gpu:
        claim_gpu(cfg.trainer.jobs_per_gpu)  # before anything initialises CUDA
    device = select_device(cfg.trainer.device)
    configure_backend(device)
    data_root = Path(to_absolute_path(cfg.data.root))
    data = {name: split.to(device) for name, split in load_cifar10(data_root, cfg.data.download).items()}

    torch.manual_seed(cfg.seed)
    model = vgg16(cfg.model.part, cfg.model.num_classes, cfg.model.width)
    flops, executed_flops = count_flops(model, "paper"), count_flops(model, "executed")
    params, stored_params = count_params(model)
    memory_format = torch.channels_last if cfg.trainer.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory_format)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.schedule, cfg.trainer.epochs)
    generator = torch.Generator(device).manual_seed(cfg.seed)
    batches = TrainBatches(data["train"], cfg.trainer.batch_size, generator, cfg.data.crop_padding, cfg.data.flip)
    preprocess = Preprocess(cfg.data, cfg.trainer.channels_last, device)
    forward_model = torch.compile(model) if cfg.trainer.compile else model

    epoch, step, partial = 0, 0, None
    if state:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["data_rng"])
        restore_rng_states(state["rng"])
        epoch, step, partial = len(state["history"]), state["step"], state["partial"]
        log.info("resuming %s at epoch %d, step %d", run_dir, epoch + 1, step)

    info = dict(flops=flops, executed_flops=executed_flops, params=params, stored_params=stored_params,
                device=device_name(device), cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
                data={"root": str(data_root), "official_cifar10": is_official(data_root),
                      "train_images": len(data["train"]), "test_images": len(data["test"])})
    record.update("running", **info)
    log.info("VGG-16 part=%d width=%s: %.2fM FLOPs (paper), %.2fM executed, %.3fM params, on %s",
             cfg.model.part, cfg.model.width, flops / 1e6, executed_flops / 1e6, params / 1e6, info["device"])
    writer = SummaryWriter(run_dir, purge_step=epoch + 1 if state else None)
    hparam_values = {"part": cfg.model.part, "width": cfg.model.width, "seed": cfg.seed, "epochs": cfg.trainer.epochs,
                     "flops_m": flops / 1e6, "params_m": params / 1e6}
    for summary in hparams(hparam_values, {f"hparam/{k}": 0 for k in ("test_acc", "best_test_acc", "train_loss")}):
        writer.file_writer.add_summary(summary)

    def checkpoint(step_in_epoch: int, epoch_rng: torch.Tensor, partial_sums: dict | None) -> dict:
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "config": config, "history": record.history,
                "step": step_in_epoch, "data_rng": epoch_rng, "partial": partial_sums, "rng": rng_states(),
                "wall_s": record.wall_s}

    with StopSignals() as stop:
        while epoch < cfg.trainer.epochs:
            model.train()
            epoch_rng = generator.get_state()  # the whole epoch's random draws follow from it
            sums = partial or {"loss": torch.zeros((), device=device), "correct": torch.zeros((), device=device,
                               dtype=torch.long), "seen": 0, "train_s": 0.0}
            started = time.perf_counter()
            progress = tqdm(batches.epoch(step), total=len(batches), initial=step, leave=False,
                            desc=f"epoch {epoch + 1}", disable=not sys.stderr.isatty())
            for images, labels in progress:
                loss_sum, correct = train_step(forward_model, optimizer, preprocess(images), labels, cfg.trainer.amp)
                sums["loss"] += loss_sum
                sums["correct"] += correct
                sums["seen"] += len(labels)
                step += 1
                if stop.received:
                    record.wall_s += time.perf_counter() - started
                    sums["train_s"] += time.perf_counter() - started
                    save(last_checkpoint(run_dir), checkpoint(step, epoch_rng, sums))
                    reason = f"{stop.received.name} at epoch {epoch + 1}, step {step}: rerun the same command to resume"
                    record.update("interrupted", reason)
                    log.warning("interrupted by %s", reason)
                    raise Interrupted(128 + stop.received)
            train_loss = sums["loss"].item() / sums["seen"]  # the epoch's one host synchronisation
            train_s = sums["train_s"] + time.perf_counter() - started
            test = evaluate(forward_model, data["test"], preprocess, cfg.trainer.eval_batch_size, cfg.trainer.amp,
                            cfg.model.num_classes)
            if not (math.isfinite(train_loss) and math.isfinite(test["loss"])):
                raise FloatingPointError(
                    f"the loss became {train_loss} (train) / {test['loss']} (test) in epoch {epoch + 1}: training "
                    f"diverged. The last good state, after epoch {epoch}, is kept in {last_checkpoint(run_dir)}. "
                    f"Lower optim.lr, or check the data.")
            epoch_s = time.perf_counter() - started
            lr = optimizer.param_groups[0]["lr"]
            scheduler.step()
            epoch += 1
            record.wall_s += epoch_s
            record.history.append({
                "epoch": epoch, "train_loss": round(train_loss, 6),
                "train_acc": round(100 * sums["correct"].item() / sums["seen"], 2),
                "test_loss": round(test["loss"], 6), "test_acc": test["acc"], "lr": lr,
                "epoch_s": round(epoch_s, 2), "images_per_s": round(sums["seen"] / train_s, 1)})
            step, partial = 0, None
            save(last_checkpoint(run_dir), checkpoint(0, generator.get_state(), None))
            metrics = record.update("running")
            log_epoch(writer, record.history[-1], metrics, cfg.trainer.epochs, record.wall_s)

    save_final_weights(run_dir, model.state_dict(), config, epoch)
    writer.close()
    metrics = record.update("finished")
    log.info("finished: test accuracy %.2f%% (best %.2f%% at epoch %d), %.0fs", metrics["test_acc"],
             metrics["best_test_acc"], metrics["best_epoch"], metrics["wall_s"])
    return metrics


def save_final_weights(run_dir: Path, weights: dict, config: dict, epoch: int) -> None:
    save(run_dir / "model.pt", {"model": weights, "config": config, "epoch": epoch})


def log_epoch(writer: SummaryWriter, h: dict, metrics: dict, epochs: int, wall_s: float) -> None:
    epoch = h["epoch"]
    for tag, key in (("train/loss", "train_loss"), ("train/acc", "train_acc"), ("test/loss", "test_loss"),
                     ("test/acc", "test_acc"), ("lr", "lr"), ("time/epoch_s", "epoch_s"),
                     ("time/images_per_s", "images_per_s")):
        writer.add_scalar(tag, h[key], epoch)
    for key in ("test_acc", "best_test_acc", "train_loss"):
        writer.add_scalar(f"hparam/{key}", metrics[key], epoch)
    writer.flush()
    eta_s = (epochs - epoch) * wall_s / metrics["epochs_done"]
    log.info("epoch %d/%d  train loss %.4f acc %.2f%%  test loss %.4f acc %.2f%%  lr %.4g  %.1fs  %.0f img/s  ETA %s",
             epoch, epochs, h["train_loss"], h["train_acc"], h["test_loss"], h["test_acc"], h["lr"], h["epoch_s"],
             h["images_per_s"], datetime.timedelta(seconds=round(eta_s)))


if __name__ == "__main__":
    main()
