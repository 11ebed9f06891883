"""One GPU per job when a launcher runs several jobs at once on one host (joblib, submitit_local).

Those launchers give every job the same GPUs, so all would train on GPU 0. A job claims a slot
instead: slot k of the host's visible GPUs is an exclusive lock file, with `jobs_per_gpu` slots per
GPU, and the job's CUDA_VISIBLE_DEVICES becomes that slot's GPU, before CUDA is initialised. The
lock is held for the life of the process and released by the OS when it ends, however it ends, so a
worker process that the launcher reuses keeps its GPU, and a crashed job frees its slot.
"""

import fcntl
import logging
import os
import re
import subprocess
import tempfile
from pathlib import Path
from time import sleep

log = logging.getLogger(__name__)
_held = []  # the open lock file of this process's slot: closing it would release the slot


def visible_gpus() -> list[str]:
    """The GPUs this process may use: CUDA_VISIBLE_DEVICES when set, else every GPU on the host."""
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        return [d.strip() for d in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()]
    return host_gpus()


def host_gpus() -> list[str]:
    """Every GPU nvidia-smi lists, whatever CUDA_VISIBLE_DEVICES says."""
    try:
        listing = subprocess.run(["nvidia-smi", "--list-gpus"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return re.findall(r"^GPU (\d+):", listing, re.MULTILINE)  # a GPU in MIG mode lists its instances below it


def gpus_each_job_shares(launcher) -> int:
    """How many GPUs the jobs of a sweep that `launcher` (hydra.launcher) runs side by side on this host all see,
    each the same ones; 0 where it runs them one at a time, or where each gets its own (SLURM)."""
    if launcher.get("_target_", "").endswith("JoblibLauncher") and launcher.get("n_jobs") != 1:
        return len(visible_gpus())
    if is_submitit_local(launcher):
        # Each job sees the host's first gpus_per_node GPUs, or none: submitit sets CUDA_VISIBLE_DEVICES to 0..n-1,
        # whatever the launching shell's was.
        return min(launcher.get("gpus_per_node") or 0, len(host_gpus()))
    return 0


def is_submitit_local(launcher) -> bool:
    return launcher.get("_target_", "").endswith("submitit_launcher.LocalLauncher")


def refuse_one_gpu_for_all(launcher, launcher_name: str, trainers: list) -> None:
    """Jobs that a launcher runs side by side, all seeing the same GPUs, would all train on the first of them unless
    they claim one each (`claim_gpu`). `trainers`: the trainer settings of the sweep's jobs."""
    if all(trainer.jobs_per_gpu is not None or trainer.device == "cpu" for trainer in trainers):
        return
    shared = gpus_each_job_shares(launcher)
    if shared > 1:
        raise ValueError(f"hydra/launcher={launcher_name} runs the sweep's jobs side by side, each seeing the same "
                         f"{shared} GPUs, and with trainer.jobs_per_gpu=null every job would train on the first of "
                         f"them: add trainer.jobs_per_gpu=1 to give each job a GPU of its own (2 to put two jobs on "
                         f"each)")


def refuse_gpus_the_host_lacks(launcher, trainers: list) -> None:
    """submitit_local gives each job GPUs 0..gpus_per_node-1 whether or not the host has them: a job pinned to one it
    lacks finds no CUDA, and trains on the CPU (trainer.device=auto) or fails (cuda). `trainers`: the trainer
    settings of the sweep's jobs."""
    if not is_submitit_local(launcher) or all(trainer.device == "cpu" for trainer in trainers):
        return
    asked, host = launcher.get("gpus_per_node") or 0, len(host_gpus())
    if asked > host:
        raise ValueError(f"hydra.launcher.gpus_per_node={asked}, but this host has {host} GPUs (nvidia-smi "
                         f"--list-gpus): submitit_local would give the jobs GPUs that are not there, where they would "
                         f"train on the CPU. Set hydra.launcher.gpus_per_node={host}"
                         + ("" if host else ", or trainer.device=cpu to train on the CPU"))


def default_lock_dir() -> Path:
    """The slots of this user's jobs on this host. Under SLURM, each allocation's own: two allocations on one node
    each see their own GPUs as 0, 1, ... and must not wait for each other's slots."""
    allocation = os.environ.get("SLURM_JOB_ID")
    name = f"hetconv-gpu-slots-{os.getuid()}" + (f"-slurm{allocation}" if allocation else "")
    return Path(tempfile.gettempdir()) / name


def claim_gpu(jobs_per_gpu: int, lock_dir: Path | None = None, poll_s: float = 5.0) -> str | None:
    """Pin this process to a GPU with fewer than jobs_per_gpu jobs, waiting while all are busy.

    Returns the GPU (as written in CUDA_VISIBLE_DEVICES), or None when there is no GPU.
    """
    if _held:
        return os.environ["CUDA_VISIBLE_DEVICES"]
    gpus = visible_gpus()
    if not gpus:
        if "CUDA_VISIBLE_DEVICES" not in os.environ:  # nvidia-smi listed none, or is not there (a container, say)
            log.warning("trainer.jobs_per_gpu=%d, but nvidia-smi lists no GPU and CUDA_VISIBLE_DEVICES is unset: no "
                        "GPU claimed. If this host has GPUs, jobs side by side would all train on the first: set "
                        "CUDA_VISIBLE_DEVICES to them (0,1,...) and each job claims its own", jobs_per_gpu)
        return None
    lock_dir = lock_dir or default_lock_dir()
    lock_dir.mkdir(parents=True, exist_ok=True)
    announced = False
    while True:
        # Fill every GPU's first slot before any GPU's second one.
        for slot in range(len(gpus) * jobs_per_gpu):
            gpu = gpus[slot % len(gpus)]
            handle = open(lock_dir / f"gpu-{gpu}-slot-{slot // len(gpus)}.lock", "w")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            _held.append(handle)
            os.environ["CUDA_VISIBLE_DEVICES"] = gpu
            log.info("pinned to GPU %s (slot %d of %d)", gpu, slot, len(gpus) * jobs_per_gpu)
            return gpu
        if not announced:
            announced = True
            log.info("all %d GPU slots (%d GPUs x trainer.jobs_per_gpu=%d) are busy: waiting for one",
                     len(gpus) * jobs_per_gpu, len(gpus), jobs_per_gpu)
        sleep(poll_s)
