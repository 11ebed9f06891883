"""A run's files, each written atomically: a kill at any moment leaves the previous version whole.

    <run dir>/metrics.json          the run's record, rewritten after every epoch (RunRecord)
    <run dir>/checkpoints/last.pt   everything needed to resume, rewritten after every epoch
    <run dir>/model.pt              the final weights with the config that made them
"""

import contextlib
import fcntl
import json
import os
import re
import shlex
import shutil
import time
from collections.abc import Collection
from pathlib import Path
from pickle import UnpicklingError

import torch

from hetconv.provenance import git_commit, library_versions, now

# Config keys that may change when a run is resumed without changing what it computes (trainer.device,
# trainer.compile and trainer.hetconv as long as they resolve to the same device type, compile mode and
# HetConv form: train.py checks that). A sweep's table also sets jobs that differ in them side by side.
RESUMABLE_CHANGES = ("data.root", "data.download", "trainer.device", "trainer.jobs_per_gpu", "trainer.compile",
                     "trainer.hetconv")

# What may differ between the jobs of one sweep folder besides RESUMABLE_CHANGES: make_table.py pools a part's seeds
# into one row, so the rest, the recipe, is the same for every job.
SWEPT_IN_A_RECIPE = ("seed", "model.part", "model.width")

# What a refused or failed run tells the user to do when its settings must change, or its folder is taken.
ANOTHER_FOLDER = "train in another folder (hydra.run.dir=... for a run, hydra.sweep.dir=... for a sweep)"

# The temporary file atomic_write writes beside its target: .<name>.<pid>.tmp
TEMPORARY = re.compile(r"\..+\.\d+\.tmp")


def atomic_write(path: Path, write) -> None:
    """write(file) into a temporary file beside path, flushed to disk, then renamed over path."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        with contextlib.suppress(OSError):  # none was made where its folder could not be
            tmp.unlink(missing_ok=True)
        # A full disk or a bad folder surfaces as OSError, or as RuntimeError from torch.save; anything else (a value
        # that cannot be written, say) is a bug, raised as it is, with its traceback.
        if isinstance(error, (OSError, RuntimeError)):
            free_mb = shutil.disk_usage(existing_parent(path)).free / 2**20
            raise OSError(f"could not write {path} ({type(error).__name__}: {error}); {free_mb:.0f} MB are free "
                          f"there. Free space or fix the folder, then rerun the same command (a training run "
                          f"resumes from its last checkpoint, or starts over if it has none yet).") from error
        raise


def existing_parent(path: Path) -> Path:
    while not path.parent.is_dir():
        path = path.parent
    return path.parent


def check_writable(folder: Path) -> None:
    """Fail now, not when the first epoch has trained, where its checkpoint could not be written."""
    probe = folder / f".writable.{os.getpid()}"  # a process's own: evaluations started together share a folder
    atomic_write(probe, lambda f: None)
    probe.unlink()


def write_json(path: Path, data: dict) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(data, indent=2) + "\n").encode()))


def save(path: Path, state: dict) -> None:
    atomic_write(path, lambda f: torch.save(state, f))


def load(path: Path) -> dict:
    """A checkpoint written by train.py; a clear error for a missing, damaged or foreign file."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path} (expected a run's checkpoints/last.pt or "
                                "model.pt, written by train.py)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain data only
    except Exception as error:
        # torch's message for an UnpicklingError advises weights_only=False: unsafe, and no help with a foreign file
        reason = ("it holds more than tensors and plain data, or is no torch file" if isinstance(error, UnpicklingError)
                  else f"{type(error).__name__}: {error}")
        raise ValueError(f"{path}: not a readable checkpoint ({reason}); a run's model.pt or checkpoints/last.pt is. "
                         "A damaged last.pt can be moved away to start its run over.") from error
    if not isinstance(state, dict) or not {"model", "config"} <= state.keys():
        raise ValueError(f"{path}: not a train.py checkpoint (it needs 'model' and 'config' entries)")
    return state


def flatten(config: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_differences(saved: dict, current: dict, ignored: Collection[str] = RESUMABLE_CHANGES) -> list[str]:
    """'key: saved -> current' for every setting that differs but the ignored ones (by default those that resuming
    may change)."""
    old, new = flatten(saved), flatten(current)
    return [f"{key}: {old.get(key, '<unset>')} -> {new.get(key, '<unset>')}"
            for key in sorted(old.keys() | new.keys()) if key not in ignored and old.get(key) != new.get(key)]


def recipe_differences(one: dict, other: dict) -> list[str]:
    """config_differences between two jobs' configs in what makes a recipe: not in SWEPT_IN_A_RECIPE."""
    return config_differences(one, other, {*SWEPT_IN_A_RECIPE, *RESUMABLE_CHANGES})


def command_line_override(key: str, path: Path) -> str:
    """key=path as it is typed in a shell: quoted for Hydra's grammar where the path has other characters than
    letters, digits and _ . / - (a sweep job's folder, part=4,seed=0, has = and ,), then for the shell."""
    if re.fullmatch(r"[A-Za-z0-9_./-]+", str(path)):
        return f"{key}={path}"
    # Hydra reads a backslash as an escape only before a quote or at the end of a quoted value.
    quoted = re.sub(r"(\\+)(?='|$)", r"\1\1", str(path)).replace("'", "\\'")
    hydra_text = f"{key}='{quoted}'"
    return f'"{hydra_text}"' if not re.search(r'[$`"\\!]', hydra_text) else shlex.quote(hydra_text)


def how_to_resume(run_dir: Path, in_sweep: bool, overrides: list[str] | None = None,
                  hydra_overrides: Collection[str] = (), options: Collection[str] = ()) -> str:
    """The command that resumes the run: the one that started it, pointed at its folder, which by default is named
    after the time of the launch. overrides: the command line's (a sweep's job: its own values, which launch that job
    alone), with Hydra's own and the config's options (-cp, -cd, -cn) apart, as Hydra keeps them; None for a run
    started without Hydra, which gets how to make the command."""
    key, folder = ("hydra.sweep.dir", run_dir.parent) if in_sweep else ("hydra.run.dir", run_dir)
    where = command_line_override(key, folder)
    if overrides is None:
        return f"rerun the {'sweep' if in_sweep else 'same'} command with {where}"
    hydras = [o for o in hydra_overrides if not o.startswith((f"{key}=", "hydra.mode="))]  # -m sets the mode
    arguments = [*(["-m"] if in_sweep else []), *options, *overrides, *hydras]
    return " ".join(["python train.py", *map(shlex.quote, arguments), where])


def last_checkpoint(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / "last.pt"


def final_weights(run_dir: Path) -> Path:
    return run_dir / "model.pt"


def training_point(epochs_done: int, steps_done: int, epochs: int | None = None) -> str:
    """Where a checkpoint stands in its run ("after epoch 2", "at epoch 3 of 5, step 7"), as messages say it."""
    of = "" if epochs is None else f" of {epochs}"
    return f"at epoch {epochs_done + 1}{of}, step {steps_done}" if steps_done else f"after epoch {epochs_done}{of}"


def save_final_weights(run_dir: Path, weights: dict, config: dict, epoch: int, data: dict) -> None:
    """What eval.py reads: the weights, the config that made them and the data they were trained on."""
    save(final_weights(run_dir), {"model": weights, "config": config, "epoch": epoch, "data": data})


def is_sweep_folder(path: Path) -> bool:
    """A sweep's own folder, where Hydra writes multirun.yaml, not one of its jobs'."""
    return (path / "multirun.yaml").exists()


class Refused(ValueError):
    """A launch that train.py declines: a resume that would change what the run computes, or a folder that is not
    this run's to train in (a sweep's, final weights alone, another job's twin). The run's files are left exactly
    as they are: no failed record is written over them."""


def refuse_a_sweeps_folder(run_dir: Path) -> None:
    """A single run does not train in a sweep's own folder: it would mix with the sweep's jobs."""
    if is_sweep_folder(run_dir):
        raise Refused(f"{run_dir} is a sweep's folder (it holds multirun.yaml): a run there would mix with its jobs. "
                      f"To add to the sweep, rerun the sweep command with its values and "
                      f"{command_line_override('hydra.sweep.dir', run_dir)}; for a single run, {ANOTHER_FOLDER}.")


def last_launch_overrides(metrics: dict) -> list[str] | None:
    """The command-line overrides of a record's last launch; None where it has no launch, or one recorded before
    launches kept their overrides."""
    launches = metrics["launches"]
    return launches[-1].get("overrides") if launches else None


def metrics_path(run_dir: Path) -> Path:
    return run_dir / "metrics.json"


def holds_a_run(folder: Path) -> bool:
    """Whether train.py has trained in the folder: its record, checkpoint or final weights are there."""
    return any(path.exists() for path in (metrics_path(folder), last_checkpoint(folder), final_weights(folder)))


class RunRecord:
    """metrics.json: what the run is, how far it got, and how it ended.

    Derived from the per-epoch history; the checkpoint carries the whole record (`state`), so a run
    resumed after a kill continues the same record.
    """

    def __init__(self, run_dir: Path, config: dict, saved: dict | None = None):
        self.path = metrics_path(run_dir)
        self.written = False  # whether this launch has written metrics.json yet
        if saved:
            self.info, self.history, self.wall_s = dict(saved["info"]), list(saved["history"]), saved["wall_s"]
            self.info["launches"] = list(self.info["launches"])  # this launch is added to a copy
        else:
            versions = library_versions()
            self.info = {"part": config["model"]["part"], "width": config["model"]["width"], "seed": config["seed"],
                         "epochs": config["trainer"]["epochs"], "torch": versions["torch"], "git_commit": git_commit(),
                         "versions": versions, "started": now(), "config": config, "launches": []}
            self.history, self.wall_s = [], 0.0
        self.start_clock()

    def launched(self, **where) -> None:
        """Adds this launch to the record: when, at which commit, with which libraries, and where (device, data).
        The run's own git_commit, versions and started are its first launch's."""
        self.info["launches"].append({"started": now(), "git_commit": git_commit(), "versions": library_versions(),
                                      **where})

    def start_clock(self) -> None:
        """wall_s counts on from here (train.py: when training starts), after the run's earlier launches' time."""
        self.wall_before, self.clock_started = self.wall_s, time.perf_counter()

    def tick(self) -> None:
        """wall_s brought up to now."""
        self.wall_s = self.wall_before + time.perf_counter() - self.clock_started

    def state(self) -> dict:
        return {"info": self.info, "history": self.history, "wall_s": self.wall_s}

    def update(self, status: str, reason: str | None = None, **info) -> dict:
        self.info.update(info)
        best = max(self.history, key=lambda h: h["test_acc"], default=None)
        last = self.history[-1] if self.history else {}
        metrics = {"status": status, "reason": reason, **self.info,
                   "epochs_done": len(self.history),
                   "test_acc": last.get("test_acc"), "best_test_acc": best and best["test_acc"],
                   "best_epoch": best and best["epoch"], "train_loss": last.get("train_loss"),
                   "train_acc": last.get("train_acc"), "test_loss": last.get("test_loss"),
                   "wall_s": round(self.wall_s, 1), "updated": now(), "history": self.history}
        write_json(self.path, metrics)
        self.written = True
        return metrics


def read_metrics(run_dir: Path) -> dict | None:
    path = metrics_path(run_dir)
    if not path.exists():
        return None
    try:
        metrics = json.loads(path.read_text())
        if not (isinstance(metrics, dict) and {"status", "config", "epochs_done"} <= metrics.keys()):
            raise ValueError("not a run's record: it lacks status, config or epochs_done")
    except ValueError as error:  # written atomically by train.py, so damaged or replaced by something else
        then = ("the run's next launch writes it again from checkpoints/last.pt, which holds its whole record"
                if last_checkpoint(run_dir).exists() else "with no checkpoints/last.pt to rebuild it from, the run's "
                "next launch starts it over")
        raise ValueError(f"{path} is not readable ({error}). Move it away: {then}.") from error
    return metrics


def lock_path(run_dir: Path) -> Path:
    return run_dir / ".lock"


@contextlib.contextmanager
def exclusive(run_dir: Path):
    """Hold the run folder for this process: a second process on the same folder is refused."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_path(run_dir), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BlockingIOError(f"another process is training in {run_dir}; wait for it, or "
                                  f"{ANOTHER_FOLDER}") from None
        for folder in (run_dir, last_checkpoint(run_dir).parent):  # where train.py writes
            for stale in folder.glob(".*.tmp"):  # left by a writer killed mid-write; no writer can be running now
                if TEMPORARY.fullmatch(stale.name):
                    stale.unlink()
        yield


def held_by_a_process(run_dir: Path) -> bool:
    """Whether a process holds the run folder, as `exclusive` does while train.py trains.

    metrics.json alone cannot tell: a job killed with SIGKILL, or on a lost node, still says "running". Where a
    cluster filesystem keeps locks per node, a job training on another node looks unheld too (the README says so).
    """
    if not lock_path(run_dir).exists():  # exclusive makes it before metrics.json: no lock file, no holder
        return False
    with open(lock_path(run_dir)) as lock:  # closing the file at once releases the lock if we took it
        try:
            fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:  # held, or a filesystem without locks: do not call a job killed that may be running
            return True
    return False
