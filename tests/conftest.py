"""Shared fixtures: a generated CIFAR-10 stand-in, the real configs shrunk for CPU, and script runners."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.make_fake_cifar import make_fake_cifar

REPO = Path(__file__).resolve().parent.parent
# The users' configs, shrunk: narrow model, few epochs, small batches of a small generated dataset.
SMALL = ["model.part=4", "model.width=0.25", "trainer.epochs=3", "trainer.batch_size=100",
         "trainer.eval_batch_size=250", "trainer.device=cpu"]
# Fields of metrics.json that depend on the wall clock, the process or the run's folder, not on the computation.
INCIDENTAL = {"wall_s", "started", "updated", "epoch_s", "images_per_s", "status", "reason", "launches", "resume"}


@pytest.fixture(scope="session", autouse=True)
def ctrl_c_as_at_a_terminal():
    """The tests press Ctrl-C as a user at a terminal would: a suite started with SIGINT ignored (`make test &` in a
    script) would pass that on to every run it starts, which then, rightly, would not stop."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # a handler: its children get SIGINT's default
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture(scope="session")
def fake_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cifar")
    make_fake_cifar(root, train=4000, test=500, seed=0)
    return root


def script(name: str, *args: str, cwd: Path = REPO, check: bool = True, timeout: float = 600,
           env: dict | None = None) -> subprocess.CompletedProcess:
    """Run one of the repository's scripts the way a user does, in a fresh interpreter."""
    result = subprocess.run([sys.executable, str(REPO / name), *args], cwd=cwd, capture_output=True, text=True,
                            timeout=timeout, env={**os.environ, **(env or {})})
    if check and result.returncode != 0:
        raise AssertionError(f"{name} {' '.join(args)} exited {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def start(name: str, *args: str, cwd: Path = REPO) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO / name), *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def comparable(metrics: dict) -> dict:
    """metrics.json without what depends on the wall clock, the process or the folder."""
    return {k: ([{kk: vv for kk, vv in h.items() if kk not in INCIDENTAL} for h in v] if k == "history" else v)
            for k, v in metrics.items() if k not in INCIDENTAL}


@pytest.fixture(scope="session")
def reference_run(fake_root, tmp_path_factory) -> Path:
    """One uninterrupted small run, shared by the tests that compare against it."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    script("train.py", *SMALL, f"data.root={fake_root}", f"hydra.run.dir={run_dir}")
    return run_dir
