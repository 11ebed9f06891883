"""Train VGG-16 with HetConv(part) on CIFAR-10.

    python train.py model.part=4                      # the recipe on record: 330 epochs, step decay
    python train.py model.part=4 trainer.epochs=30    # shorter: the schedule keeps its shape
    python train.py -m experiment=paper               # the sweep over P (README, "Reproduce the table")

Everything goes to Hydra's output dir: train.log, metrics.json (rewritten after every epoch),
TensorBoard events, checkpoints/last.pt (every epoch) and model.pt (the final weights).
Running a command again on the same folder resumes it from checkpoints/last.pt; a finished run is
left as it is. SIGINT, SIGTERM and SIGUSR2 save the current step's state, to resume from exactly there.
"""

import datetime
import logging
import math
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Collection
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf
from tensorboard.compat.proto.summary_pb2 import Summary
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams
from tqdm import tqdm

from hetconv.data import FOLDER, Split, fingerprint, fingerprint_of_test, is_official, load_cifar10, top_label
from hetconv.flops import describe_flops, model_costs
from hetconv.gpus import claim_gpu
from hetconv.layer import resolved_impl
from hetconv.provenance import device_name
from hetconv.runfiles import (ANOTHER_FOLDER, RESUMABLE_CHANGES, Refused, RunRecord, check_writable,
                              command_line_override, config_differences, exclusive, final_weights, flatten,
                              how_to_resume, is_sweep_folder, last_checkpoint, last_launch_overrides, load, lock_path,
                              read_metrics, refuse_a_sweeps_folder, save, save_final_weights, training_point)
from hetconv.settings import (check_command_line, check_jobs, check_settings, config_groups, config_options,
                              ends_without_traceback, override_key, refuse_a_sweep, train_config)
from hetconv.training import (build_training, compile_mode, evaluate, execution, how_it_runs, percent, precision,
                              train_step)
from models.vgg import check_part_fits

log = logging.getLogger("train")
# Sweep jobs are named by part and seed, then by every other override that changes what the job computes
# (train.yaml's exclude_keys leave out the rest).
OmegaConf.register_new_resolver(
    "job_name", lambda part, seed, others: f"part={part},seed={seed}" + (f",{others}" if others else ""),
    replace=True)


class Interrupted(SystemExit):
    """Raised after the state of an interrupted run has been saved, with exit code 128 + signal number; train.py then
    dies of that signal (`die_of`)."""


def die_of(stopped: Interrupted) -> None:
    """End the process by the signal that stopped the run, as an unhandled one would have: a shell loop over runs
    stops at Ctrl-C only when its child dies of SIGINT, where an exit status of 130 lets it start the next run."""
    sig = stopped.code - 128
    signal.signal(sig, signal.SIG_DFL)
    signal.raise_signal(sig)


class StopSignals:
    """SIGINT, SIGTERM and SIGUSR2 become a flag that the training loop checks between steps, where
    the state it saves is consistent. A handler that was installed before ours (submitit's, which
    requeues a SLURM job) is then called; without one, the run stops. A second SIGINT before the run
    has stopped for the first (during an evaluation or a compilation, say) stops it at once, unsaved: a
    second Ctrl-C is not made to wait. (Launchers may send SIGTERM twice; it only sets the flag.) A
    signal that was ignored when the run started (SIGINT in a shell's background job) stays ignored, as the log says."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)

    def __init__(self):
        self.received: signal.Signals | None = None
        self.previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signals can only be caught there
            for sig in self.SIGNALS:
                if signal.getsignal(sig) is not signal.SIG_IGN:
                    self.previous[sig] = signal.signal(sig, self.handle)
                elif sig == signal.SIGINT:
                    log.info("SIGINT is ignored in this process (a shell's background job, say): Ctrl-C does not "
                             "stop this run; SIGTERM does, its state saved")
        return self

    def handle(self, signum, frame):
        if self.received is None:
            self.received = signal.Signals(signum)
        elif signum == signal.SIGINT:
            log.warning("SIGINT again: stopping now, without saving the current step")
            self.restore_handlers()
            signal.raise_signal(signum)  # to the handler from before ours: KeyboardInterrupt, by default

    def pass_on(self) -> None:
        """Once the state is saved: hand the signal to the earlier handler, or stop the run."""
        sig, self.received = self.received, None
        previous = self.previous.get(sig)
        if callable(previous) and previous is not signal.default_int_handler:
            previous(sig, None)  # it may exit (submitit requeues first) or return to let training go on
            return
        raise Interrupted(128 + sig)

    def restore_handlers(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def __exit__(self, *exc):
        self.restore_handlers()


def refuse_other_settings(run_dir: Path, saved: dict, config: dict) -> None:
    differences = config_differences(saved, config)
    if differences:
        raise Refused(
            f"{run_dir} holds a run with other settings ({'; '.join(differences)}). Its files were left as they "
            f"are. To resume it (or see that it has finished), rerun with the settings it was started with; for "
            f"other settings, {ANOTHER_FOLDER}.")


def resume_point(run_dir: Path, config: dict) -> dict | None:
    """The run's last checkpoint, or None; refuses one saved under settings that change the result."""
    path = last_checkpoint(run_dir)
    if not path.exists():
        return None
    state = load(path)
    refuse_other_settings(run_dir, state["config"], config)
    return state


def refuse_other_execution(run_dir: Path, state: dict, device: torch.device, compile_as: str | None,
                           form: str) -> None:
    """A run resumes on the device type, in the compile mode and with the HetConv form it started with, so that it
    ends as an uninterrupted one would (exactly, on the CPU): a device type's generator draws its own data order,
    and compiled kernels and the two forms round differently."""
    if state["device_type"] != device.type:
        raise Refused(f"{run_dir} was trained on {state['device_type']} and cannot resume on {device.type}: "
                      f"its data order comes from a {state['device_type']} generator. Use "
                      f"trainer.device={state['device_type']}.")
    started_with = state["config"]["trainer"]["compile"]
    started_as = compile_mode(started_with, device)
    if started_as != compile_as:
        raise Refused(f"{run_dir} was trained {how_it_runs(started_as)} and cannot resume {how_it_runs(compile_as)}: "
                      f"compiled and eager kernels round differently. Use trainer.compile={str(started_with).lower()}.")
    started_form = resolved_impl(state["config"]["trainer"]["hetconv"], device)
    if started_form != form:
        raise Refused(f"{run_dir} was trained with its HetConv layers computed {started_form} and cannot resume "
                      f"{form}: the two forms round differently. Use trainer.hetconv={started_form}.")


def warn_other_threads(run_dir: Path, state: dict, device: torch.device) -> None:
    """On the CPU a sum split over another number of threads rounds differently: the resumed run trains on, but
    not to the digit of an uninterrupted one. (A joblib launcher, say, gives each job fewer threads.)"""
    started_with = state["cpu_threads"]
    if device.type == "cpu" and started_with and started_with != torch.get_num_threads():
        log.warning("%s trained on %d CPU threads and resumes on %d: it will not end exactly as an uninterrupted run "
                    "would (sums round differently). For that, resume with OMP_NUM_THREADS=%d.", run_dir,
                    started_with, torch.get_num_threads(), started_with)


def refuse_other_data(run_dir: Path, started_on: dict | None, data: dict) -> None:
    """data.root may move between a run's starts; the images and labels under it may not change."""
    if started_on and started_on["fingerprint"] != data["fingerprint"]:
        raise Refused(
            f"{run_dir} started training on the data in {started_on['root']} (fingerprint "
            f"{started_on['fingerprint']}), and data.root={data['root']} holds other data (fingerprint "
            f"{data['fingerprint']}). Rerun it with {command_line_override('data.root', started_on['root'])}, or "
            f"{ANOTHER_FOLDER}.")


def load_data(cfg: DictConfig, run_dir: Path, started_on: dict | None) -> tuple[dict[str, Split], dict]:
    """CIFAR-10's splits from data.root, and what the run's record keeps of them; a run that started on other data
    (`started_on`, its record's) is refused, before any download where a download could not fetch its data."""
    data_root = Path(to_absolute_path(cfg.data.root))
    if started_on and not started_on["official_cifar10"] and not (data_root / FOLDER).is_dir():
        recorded = Path(started_on["root"])
        fix = (f"rerun with {command_line_override('data.root', recorded)}" if (recorded / FOLDER).is_dir() else
               f"put that data back there, or {ANOTHER_FOLDER}")
        raise Refused(f"{run_dir} trained on the data in {recorded}, not the official CIFAR-10 files that a download "
                      f"fetches, and {data_root} holds no {FOLDER}/: {fix}.")
    splits = load_cifar10(data_root, cfg.data.download)
    data_info = {"root": str(data_root), "official_cifar10": is_official(data_root), "fingerprint": fingerprint(splits),
                 "test_fingerprint": fingerprint_of_test(splits["test"]),
                 "train_images": len(splits["train"]), "test_images": len(splits["test"])}
    refuse_other_data(run_dir, started_on, data_info)
    return splits, data_info


def leave_finished(cfg: DictConfig, run_dir: Path, trained_on: dict) -> None:
    """A finished run has nothing to do, but a command that names other data for it is refused as a resume would be:
    a sweep relaunched on other data must not skip its jobs as if they had trained on it."""
    load_data(cfg, run_dir, trained_on)
    log.info("%s already finished %d epochs: nothing to do", run_dir, cfg.trainer.epochs)


def training_data(cfg: DictConfig, device: torch.device, run_dir: Path,
                  started_on: dict | None) -> tuple[dict[str, Split], dict]:
    """CIFAR-10's splits on the device, and what the run's record keeps of them; a resumed run refuses other data
    than it started on (`started_on`, its record's)."""
    splits, data_info = load_data(cfg, run_dir, started_on)
    if not data_info["official_cifar10"]:  # a subset, generated data, an extra batch: said now, not after the sweep
        log.warning("%s does not hold the official CIFAR-10 files (%d training and %d test images here): fine for "
                    "trying the pipeline, but make_table.py keeps this run out of results/", data_info["root"],
                    data_info["train_images"], data_info["test_images"])
    highest = top_label(splits)  # the test split's too: they would fail at the end of epoch 1
    if highest >= cfg.model.num_classes:
        raise ValueError(f"model.num_classes={cfg.model.num_classes}, but the data's labels go up to {highest}: set "
                         f"model.num_classes to the data's class count")
    return {name: split.to(device) for name, split in splits.items()}, data_info


@hydra.main(config_path="configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> dict:
    try:
        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode == RunMode.RUN:  # where check_jobs left the command to Hydra (-cp, say)
            refuse_a_sweep(OmegaConf.select(hydra_cfg, "sweeper.params") or {},
                           {override_key(override) for override in hydra_cfg.overrides.task},
                           hydra_cfg.runtime.choices.get("experiment"))
        return train(cfg, Path(hydra_cfg.runtime.output_dir), in_sweep=hydra_cfg.mode == RunMode.MULTIRUN,
                     overrides=list(hydra_cfg.overrides.task), hydra_overrides=list(hydra_cfg.overrides.hydra),
                     options=config_options(hydra_cfg))
    except Exception as error:
        log.error("%s: %s", type(error).__name__, error)  # into train.log too: under SLURM stderr is the launcher's
        if ends_without_traceback(error):
            raise SystemExit(1) from None  # its message is the line just logged, on stderr too
        raise


def train(cfg: DictConfig, run_dir: Path, in_sweep: bool = False, overrides: list[str] | None = None,
          hydra_overrides: Collection[str] = (), options: Collection[str] = ()) -> dict:
    """Train, resume or leave as finished the run in run_dir. overrides: the command line's (a sweep's job: its own
    values), for the run's record and, with Hydra's own (`hydra_overrides`) and the config's -cp, -cd and -cn
    (`options`), the command that resumes it; None when called without Hydra."""
    config = OmegaConf.to_container(cfg, resolve=True)
    if not in_sweep:  # checked before Hydra too (check_jobs), but not for a config from another folder (-cp)
        refuse_a_sweeps_folder(run_dir)
    with exclusive(run_dir):
        state = resume_point(run_dir, config)
        metrics = read_metrics(run_dir)
        if state is None and metrics is None:
            if in_sweep:
                refuse_a_twin(run_dir, config, overrides)
            elif is_sweep_folder(run_dir.parent) and not final_weights(run_dir).exists():  # refused below, if so
                refuse_a_run_among_jobs(run_dir)
        if state is None:
            if metrics and metrics["status"] == "finished":  # its checkpoint was deleted
                refuse_other_settings(run_dir, metrics["config"], config)
                leave_finished(cfg, run_dir, metrics["data"])
                return metrics
            if final_weights(run_dir).exists():  # a finished run's checkpoint and record deleted
                raise Refused(f"{run_dir} holds a run's final weights (model.pt), but neither its checkpoints/last.pt "
                              f"nor a finished metrics.json: train.py does not train over them. Move model.pt away to "
                              f"train in this folder again, or {ANOTHER_FOLDER}.")
            # A damaged last.pt moved away, say; an interrupted run saved one, even in its first epoch.
            if metrics and (metrics["epochs_done"] or metrics["status"] == "interrupted"):
                log.warning("%s: metrics.json records a run that trained (%d epochs done, %s), but there is no %s to "
                            "resume it from: the run starts over, and its new record replaces that one", run_dir,
                            metrics["epochs_done"], metrics["status"], last_checkpoint(run_dir).relative_to(run_dir))
        record = RunRecord(run_dir, config, state and state["record"])
        if state and state["epoch"] == cfg.trainer.epochs:
            leave_finished(cfg, run_dir, record.info["data"])
            if not final_weights(run_dir).exists():  # killed between the last checkpoint and the final save
                save_final_weights(run_dir, state["model"], config, state["epoch"], record.info["data"])
            if metrics and metrics["status"] == "finished":
                return metrics
            # Killed before its record said finished, perhaps before TensorBoard's success mark: marked now (where
            # the mark is there, TensorBoard keeps the first).
            return record_finished(*open_tensorboard(run_dir, state["epoch"], cfg, record.info), record)
        try:
            resume = how_to_resume(run_dir, in_sweep, overrides, hydra_overrides, options)
            return run(cfg, config, run_dir, state, record, resume, overrides)
        except Exception as error:
            # A run with a checkpoint that this launch did not get to train (bad input on resume, say) keeps
            # the record it had: it is still resumable.
            if not isinstance(error, Refused) and (record.written or state is None):
                record.update("failed", f"{type(error).__name__}: {error}")
            raise


def refuse_a_twin(run_dir: Path, config: dict, overrides: list[str]) -> None:
    """A new sweep job whose settings a job of the sweep already has, where and how they run aside (RESUMABLE_CHANGES,
    which make_table.py sets side by side too): the sweep was launched again with its overrides written otherwise (a
    setting at its default value added or left out, say), which names a new folder. Training there would repeat that
    job, and the table would refuse the pair."""
    for other in sorted(run_dir.parent.iterdir()):
        try:
            started = other != run_dir and read_metrics(other)
        except ValueError:  # an unreadable record is its own job's to report
            continue
        if started and not config_differences(started["config"], config):
            removed = remove_if_hydras_alone(run_dir)
            # Where the data is and how many jobs share a GPU make no difference to a job; how it computes does, but
            # not to the table, which would count the two as one job.
            runs_otherwise = config_differences(started["config"], config,
                                                ("data.root", "data.download", "trainer.jobs_per_gpu"))
            computed_otherwise = (f" and only another way to compute it ({'; '.join(runs_otherwise)}), which "
                                  "make_table.py would count as the same job: to compare such settings, give each its "
                                  "own hydra.sweep.dir. It would train it" if runs_otherwise else "")
            what_to_remove = (f" ({run_dir}, which held only Hydra's files, was removed)" if removed
                              else f", and remove {run_dir}, which holds no training")
            raise Refused(f"{run_dir.name} would train the job that {other.name} holds, with the same recipe"
                          f"{computed_otherwise} under another name: a job's folder is named after its overrides, and "
                          f"this launch {naming_changes(last_launch_overrides(started), overrides)}. Relaunch the "
                          f"sweep with the overrides its jobs were launched with{what_to_remove}; to train the job "
                          f"again, {ANOTHER_FOLDER}.")


def refuse_a_run_among_jobs(run_dir: Path) -> None:
    """A single run does not start in a new folder inside a sweep's (a job's folder name mistyped, say): it would train
    there with the single run's recipe, and make_table would take it for one of the sweep's jobs."""
    removed = remove_if_hydras_alone(run_dir)
    raise Refused(f"{run_dir} is a new folder in the sweep folder {run_dir.parent}, where a single run would stand "
                  f"among its jobs{' (it was removed)' if removed else ''}. To resume or add one of the sweep's jobs, "
                  f"rerun the sweep's command with {command_line_override('hydra.sweep.dir', run_dir.parent)}; for a "
                  f"single run, {ANOTHER_FOLDER}.")


def remove_if_hydras_alone(run_dir: Path) -> bool:
    """Remove run_dir where it holds only the files Hydra wrote as this launch started (make_table would list it as a
    job that never trained); True where it was removed."""
    if {entry.name for entry in run_dir.iterdir()} <= {".hydra", "train.log", lock_path(run_dir).name}:
        shutil.rmtree(run_dir)
        return True
    return False


def naming_changes(before: list[str] | None, overrides: list[str]) -> str:
    """What a launch's overrides add to or leave out of those of a job's last launch (`before`; None: not recorded),
    among those that name a job's folder."""
    if before is None:
        return "writes them otherwise"
    changed = [o for o in overrides if o not in before] + [o for o in before if o not in overrides]
    # RESUMABLE_CHANGES are among the keys that train.yaml's exclude_keys leave out of a folder's name.
    changes = [f"{'adds' if o in overrides else 'leaves out'} {o}" for o in changed
               if override_key(o) not in RESUMABLE_CHANGES]
    return f"{' and '.join(changes) or 'writes them otherwise'}, against that job's last launch"


def run(cfg: DictConfig, config: dict, run_dir: Path, state: dict | None, record: RunRecord, resume: str,
        overrides: list[str] | None) -> dict:
    # Everything that bad input can break comes first, before any training.
    check_settings(cfg)
    check_part_fits(cfg.model.part, cfg.model.width)
    device, compile_as, form = choose_execution(cfg, run_dir, state)
    data, data_info = training_data(cfg, device, run_dir, record.info.get("data"))
    check_writable(last_checkpoint(run_dir).parent)

    setup = build_training(cfg, data["train"], device, form, compile_as)
    model, optimizer, scheduler, generator = setup.model, setup.optimizer, setup.scheduler, setup.generator
    costs = model_costs(model)  # in the form the device runs

    def checkpoint(epochs_done: int, steps_done: int, epoch_rng: torch.Tensor, partial_sums: dict | None) -> dict:
        """Everything a resume after `steps_done` steps of the next epoch needs: `resume_from` loads the training
        state; resume_point, refuse_other_execution, warn_other_threads and RunRecord check and carry on the rest."""
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "config": config, "epoch": epochs_done, "step": steps_done,
                "data_rng": epoch_rng, "partial": partial_sums, "torch_rng": torch.get_rng_state(),
                "device_type": device.type, "record": record.state(),
                "cpu_threads": torch.get_num_threads() if device.type == "cpu" else None}

    epoch, step, partial = 0, 0, None
    saved = None  # where the checkpoint on disk stands: what a diverged run keeps
    if state:
        epoch, step, partial = resume_from(state, model, optimizer, scheduler, generator)
        saved = training_point(epoch, step)
        log.info("resuming %s %s", run_dir, saved)
    else:
        log.info("new run in %s", run_dir)  # by default named after the launch's time: said before the first epoch

    where = {"device": device_name(device), "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    record.launched(**where, data_root=data_info["root"], overrides=overrides)
    info = dict(**costs, **where, torch_compile=compile_as, hetconv=form, data=data_info, resume=resume,
                precision=precision(device, cfg.trainer.amp))  # float32 on the CPU: amp asks bf16 of CUDA only
    record.update("running", **info)
    log.info("VGG-16 part=%d width=%s: %s, %.3fM params, on %s, %s, HetConv %s", cfg.model.part, cfg.model.width,
             describe_flops(costs), costs["params"] / 1e6, info["device"], how_it_runs(compile_as), form)
    writer, finished_session = open_tensorboard(run_dir, epoch, cfg, info)

    def interrupted(stop: StopSignals, reason: str) -> None:
        writer.flush()  # the process may end by the signal itself, with no exit handlers
        record.update("interrupted", f"{reason}; to resume: {resume}")
        log.warning("%s: %s, state saved; to resume: %s", run_dir, reason, resume)
        stop.pass_on()  # returns where the launcher's own handler lets training go on (submitit's, for SIGTERM)
        record.update("running")
        log.info("%s: the launcher's own signal handler let training go on", run_dir)

    record.start_clock()
    with StopSignals() as stop:
        while epoch < cfg.trainer.epochs:
            model.train()
            epoch_rng = generator.get_state()  # the whole epoch's random draws follow from it
            partial = partial or {"loss": 0.0, "correct": 0, "seen": 0, "train_s": 0.0}
            # A resumed epoch counts what it trained before the interruption, on both clocks.
            wall_at_start = record.wall_s - partial["train_s"]
            started = time.perf_counter() - partial["train_s"]
            loss_sum = torch.tensor(partial["loss"], device=device)
            correct = torch.tensor(partial["correct"], device=device)
            seen = partial["seen"]
            progress = tqdm(setup.batches.epoch(step), total=len(setup.batches), initial=step, leave=False,
                            desc=f"epoch {epoch + 1}", disable=not sys.stderr.isatty())
            for images, labels in progress:
                batch_loss, batch_correct = train_step(setup.forward_model, optimizer, setup.preprocess(images),
                                                       labels, cfg.trainer.amp)
                loss_sum += batch_loss
                correct += batch_correct
                seen += len(labels)
                step += 1
                if stop.received:
                    record.tick()
                    so_far = {"loss": loss_sum.item(), "correct": correct.item(), "seen": seen,
                              "train_s": time.perf_counter() - started}
                    stop_if_diverged(run_dir, saved, epoch, so_far["loss"] / seen, model=model)  # before it is saved
                    save(last_checkpoint(run_dir), checkpoint(epoch, step, epoch_rng, so_far))
                    saved = training_point(epoch, step)
                    interrupted(stop, f"{stop.received.name} {saved}")
            train_loss = loss_sum.item() / seen  # the epoch's first host synchronisation: none between its steps
            train_s = time.perf_counter() - started
            test = evaluate(setup.forward_model, data["test"], setup.preprocess, cfg.trainer.eval_batch_size,
                            cfg.trainer.amp, cfg.model.num_classes)
            stop_if_diverged(run_dir, saved, epoch, train_loss, test["loss"])
            lr = optimizer.param_groups[0]["lr"]
            scheduler.step()
            epoch += 1
            record.tick()
            record.history.append({
                "epoch": epoch, "train_loss": round(train_loss, 6), "train_acc": percent(correct.item(), seen),
                "test_loss": round(test["loss"], 6), "test_acc": test["acc"], "lr": lr,
                "epoch_s": round(time.perf_counter() - started, 2),
                "images_per_s": round(seen / train_s, 1)})
            step, partial = 0, None
            # Logged before the checkpoint: a kill in between resumes from the epoch before, which
            # rewrites this epoch's scalars (purge_step) rather than leaving it out.
            metrics = record.update("running")
            log_epoch(writer, record.history[-1], metrics, cfg.trainer.epochs, record.wall_s - wall_at_start)
            save(last_checkpoint(run_dir), checkpoint(epoch, 0, generator.get_state(), None))
            saved = training_point(epoch, 0)
            if stop.received and epoch < cfg.trainer.epochs:  # arrived during evaluation: the state is saved
                interrupted(stop, f"{stop.received.name} {saved}")

        # Still under StopSignals: a signal from here on lets the run finish, which takes less than stopping, and is
        # then passed on (a sweep stops, rather than start its next job). The weights first: a finished record means
        # there is a model.pt to evaluate.
        save_final_weights(run_dir, model.state_dict(), config, epoch, data_info)
        metrics = record_finished(writer, finished_session, record)
        log.info("%s finished: test accuracy %.2f%% (best %.2f%% at epoch %d), %.0fs", run_dir, metrics["test_acc"],
                 metrics["best_test_acc"], metrics["best_epoch"], metrics["wall_s"])
        if stop.received:
            log.warning("%s: %s after the last epoch's steps: the run finished first", run_dir, stop.received.name)
            stop.pass_on()
    return metrics


def choose_execution(cfg: DictConfig, run_dir: Path, state: dict | None) -> tuple[torch.device, str | None, str]:
    """The device, torch.compile mode (None: eager) and HetConv form the run computes with: a resumed run's own."""
    if cfg.trainer.jobs_per_gpu is not None and cfg.trainer.device != "cpu":  # a CPU job would hold a GPU's slot
        claim_gpu(cfg.trainer.jobs_per_gpu)  # before anything initialises CUDA
    device, compile_as, form = execution(cfg.trainer)
    if state:
        refuse_other_execution(run_dir, state, device, compile_as, form)
        warn_other_threads(run_dir, state, device)
    return device, compile_as, form


def resume_from(state: dict, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                generator: torch.Generator) -> tuple[int, int, dict | None]:
    """Loads a checkpoint into the run's objects; returns where it was saved: the epochs done, the steps done of the
    next one and their partial sums."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    generator.set_state(state["data_rng"])
    torch.set_rng_state(state["torch_rng"])
    return state["epoch"], state["step"], state["partial"]


def stop_if_diverged(run_dir: Path, saved: str | None, epoch: int, train_loss: float, test_loss: float | None = None,
                     model: nn.Module | None = None) -> None:
    """A loss that is no longer a number stays so: the epochs after it would only spend the machine, and a checkpoint
    of its state would replace the last good one (`saved` says where that stands; None: there is none). At a signal
    mid-epoch there is no test loss yet, and the `model`'s weights are checked too: the last step's update came after
    the loss it saw."""
    weights_finite = model is None or all(torch.isfinite(t).all() for t in model.state_dict().values()
                                          if t.is_floating_point())
    if math.isfinite(train_loss) and (test_loss is None or math.isfinite(test_loss)) and weights_finite:
        return
    kept = f"The last good state, {saved}, is kept in {last_checkpoint(run_dir)}. " if saved else ""
    became = f"{train_loss} (train)" + ("" if test_loss is None else f" / {test_loss} (test)") + (
        "" if weights_finite else ", and the weights are no longer finite")
    raise FloatingPointError(
        f"the loss became {became} in epoch {epoch + 1}: training diverged. "
        f"{kept}Check the data, or lower optim.lr and {ANOTHER_FOLDER}: a run resumes only with the settings it "
        f"started with.")


# The record's figures that TensorBoard's HParams tab shows beside each run's settings.
HPARAM_METRICS = ("test_acc", "best_test_acc", "train_loss")


def open_tensorboard(run_dir: Path, epoch: int, cfg: DictConfig, info: dict) -> tuple[SummaryWriter, Summary]:
    """The run's TensorBoard writer, with the settings that tell runs apart in the HParams tab, and the record that
    marks the run a success in the tab's status filter, to write once it has finished. TensorBoard keeps a run's first
    status, so a run that has not finished (failed or interrupted, and perhaps resumed later) gets none."""
    # Scalars from after the checkpoint, or from a launch that left none, are written again: purge them.
    writer = SummaryWriter(run_dir, purge_step=epoch + 1)
    values = {"part": cfg.model.part, "width": cfg.model.width, "seed": cfg.seed, "epochs": cfg.trainer.epochs,
              "flops_m": info["flops"] / 1e6, "params_m": info["params"] / 1e6,
              # to filter out runs that do not compare: other data, another form or precision
              "data": "official CIFAR-10" if info["data"]["official_cifar10"] else "other",  # a bool shows as 0/1
              "hetconv": info["hetconv"],
              "precision": info.get("precision", "unrecorded")}  # a record from before a971463 lacks it
    experiment, session_start, finished_session = hparams(values, {f"hparam/{key}": 0 for key in HPARAM_METRICS})
    writer.file_writer.add_summary(experiment)
    writer.file_writer.add_summary(session_start)
    return writer, finished_session


def record_finished(writer: SummaryWriter, finished_session: Summary, record: RunRecord) -> dict:
    """Marks the run a success in TensorBoard's HParams tab, closes its writer, and records the run finished."""
    writer.file_writer.add_summary(finished_session)
    writer.close()
    return record.update("finished")


def log_epoch(writer: SummaryWriter, h: dict, metrics: dict, epochs: int, epoch_wall_s: float) -> None:
    epoch = h["epoch"]
    for tag, key in (("train/loss", "train_loss"), ("train/acc", "train_acc"), ("test/loss", "test_loss"),
                     ("test/acc", "test_acc"), ("lr", "lr"), ("time/epoch_s", "epoch_s"),
                     ("time/images_per_s", "images_per_s")):
        writer.add_scalar(tag, h[key], epoch)
    for key in HPARAM_METRICS:
        writer.add_scalar(f"hparam/{key}", metrics[key], epoch)
    writer.flush()
    eta_s = (epochs - epoch) * epoch_wall_s  # the last epoch's pace: the first one includes compiling the model
    log.info("epoch %d/%d  train loss %.4f acc %.2f%%  test loss %.4f acc %.2f%%  lr %.4g  %.1fs  %.0f img/s  ETA %s",
             epoch, epochs, h["train_loss"], h["train_acc"], h["test_loss"], h["test_acc"], h["lr"], h["epoch_s"],
             h["images_per_s"], datetime.timedelta(seconds=round(eta_s)))


if __name__ == "__main__":
    check_command_line(sys.argv[1:], list(flatten(OmegaConf.to_container(train_config()))), config_groups(),
                       "train.py", hint="`python train.py --cfg job` lists them.")
    check_jobs(sys.argv[1:])
    try:
        main()
    except Interrupted as stopped:  # its state saved and its logs flushed, all it had open closed as it unwound
        die_of(stopped)
        raise
