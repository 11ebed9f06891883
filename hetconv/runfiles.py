"""A run's files, each written atomically: a kill at any moment leaves the previous version whole.

    <run dir>/metrics.json          the run's record, rewritten after every epoch (RunRecord)
    <run dir>/checkpoints/last.pt   everything needed to resume, rewritten after every epoch
    <run dir>/model.pt              the final weights with the config that made them
"""

import json
import os
from pathlib import Path

import torch

from hetconv.provenance import git_commit, library_versions, now

# Config keys that may change when a run is resumed without changing what it computes.
RESUMABLE_CHANGES = ("data.root", "data.download", "trainer.device", "trainer.jobs_per_gpu")


def atomic_write(path: Path, write) -> None:
    """write(file) into a temporary file beside path, flushed to disk, then renamed over path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, data: dict) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(data, indent=2) + "\n").encode()))


def save(path: Path, state: dict) -> None:
    atomic_write(path, lambda f: torch.save(state, f))


def load(path: Path, map_location="cpu") -> dict:
    """A checkpoint written by train.py; a clear error for a missing or foreign file."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path} (expected a run's checkpoints/last.pt or "
                                "model.pt, written by train.py)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as error:
        raise ValueError(f"{path}: not a readable checkpoint ({type(error).__name__}: {error})") from error
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


def config_differences(saved: dict, current: dict) -> list[str]:
    """'key: saved -> current' for every setting that differs, but those resuming may change."""
    old, new = flatten(saved), flatten(current)
    return [f"{key}: {old.get(key, '<unset>')} -> {new.get(key, '<unset>')}"
            for key in sorted(old.keys() | new.keys())
            if key not in RESUMABLE_CHANGES and old.get(key) != new.get(key)]


def rng_states() -> dict:
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def restore_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def last_checkpoint(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / "last.pt"


def metrics_path(run_dir: Path) -> Path:
    return run_dir / "metrics.json"


class RunRecord:
    """metrics.json: what the run is, how far it got, and how it ended.

    Derived from the per-epoch history, which the checkpoint carries too: a run resumed after a kill
    rebuilds the same record.
    """

    def __init__(self, run_dir: Path, config: dict, history: list[dict] | None = None, wall_s: float = 0.0):
        self.path = metrics_path(run_dir)
        self.history = list(history or [])
        self.wall_s = wall_s
        versions = library_versions()
        self.info = {"part": config["model"]["part"], "width": config["model"]["width"], "seed": config["seed"],
                     "epochs": config["trainer"]["epochs"], "torch": versions["torch"], "git_commit": git_commit(),
                     "versions": versions, "started": now()}

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
        return metrics
