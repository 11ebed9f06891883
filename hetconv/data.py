"""CIFAR-10 in its official python format, held whole on the training device as uint8.

The batch files are read here rather than through torchvision.datasets.CIFAR10, which refuses any
file whose md5 differs from the official release: a subset or a generated set in the same format
loads too. The official archive's checksum is verified when we download it.
Augmentation (random crop of the zero-padded image, horizontal flip) runs on the device, per batch,
from one generator: no DataLoader workers, and an epoch can be replayed exactly from its start state.
"""

import fcntl
import hashlib
import http.client
import logging
import os
import pickle
import re
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.datasets import CIFAR10
from torchvision.datasets.utils import check_integrity

FOLDER = "cifar-10-batches-py"
URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
IMAGE_SHAPE = (3, 32, 32)
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
DOWNLOAD_TIMEOUT_S = 20

log = logging.getLogger(__name__)


class DatasetError(RuntimeError):
    """The dataset is missing, unreadable or inconsistent; the message says what to do."""


def how_to_get(root: Path, first: str = "run with data.download=true") -> str:
    """What to do about missing data; `first` is the way that fits the case."""
    return (f"To get it: {first}, or download {URL} (md5 {ARCHIVE_MD5}) and "
            f"extract it into {root}, or point data.root at a folder holding {FOLDER}/. To try the pipeline offline "
            "on generated data: make demo (experiment=demo reads the data it generates), or python "
            "scripts/make_fake_cifar.py data/fake, then data.root=data/fake")


def how_to_replace(folder: Path) -> str:
    """What to do about an incomplete folder: a download does not touch one that exists."""
    return how_to_get(folder.parent, f"move {folder} away and run with data.download=true")


@dataclass
class Split:
    images: torch.Tensor  # (N, 3, 32, 32) uint8
    labels: torch.Tensor  # (N,) int64

    def to(self, device: torch.device) -> "Split":
        return Split(self.images.to(device), self.labels.to(device))

    def __len__(self) -> int:
        return len(self.labels)


def read_batch(path: Path) -> Split:
    """One pickled batch file: {b'data': uint8 (N, 3072), b'labels': N ints}."""
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        data, labels = batch[b"data"], batch[b"labels"]
        images = torch.as_tensor(data).reshape(-1, *IMAGE_SHAPE)
        labels = torch.as_tensor(labels, dtype=torch.int64)
    except Exception as error:  # a truncated file fails in pickle, a foreign one anywhere above
        raise DatasetError(
            f"{path}: not a readable CIFAR-10 batch file ({type(error).__name__}: {error}). The file is "
            f"truncated or corrupt: delete {path.parent} and run again with data.download=true.") from error
    if images.dtype != torch.uint8 or len(images) != len(labels):
        raise DatasetError(f"{path}: expected uint8 images with one label each, got {images.dtype} "
                           f"data for {len(images)} images and {len(labels)} labels")
    if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < len(CLASSES):
        raise DatasetError(f"{path}: labels must lie in 0..{len(CLASSES) - 1}, found "
                           f"{int(labels.min())}..{int(labels.max())}")
    return Split(images, labels)


def batch_files(folder: Path, splits: tuple[str, ...] = ("train", "test")) -> dict[str, list[Path]]:
    """data_batch_1..n (fewer than five is a subset, which loads) and test_batch; where `splits` has the training
    split, a gap in the numbering is a lost file, not a subset."""
    numbered = {int(m.group(1)): p for p in folder.iterdir() if (m := re.fullmatch(r"data_batch_(\d+)", p.name))}
    gaps = sorted(set(range(1, max(numbered, default=0) + 1)) - numbered.keys())
    if gaps and "train" in splits:
        raise DatasetError(f"CIFAR-10 in {folder} is missing {', '.join(f'data_batch_{k}' for k in gaps)} while "
                           f"data_batch_{max(numbered)} is there. " + how_to_replace(folder))
    return {"train": [numbered[k] for k in sorted(numbered)], "test": [folder / "test_batch"]}


def fingerprint(splits: dict[str, Split]) -> str:
    """A digest of the images and labels themselves: what a resumed run checks it still trains on."""
    digest = hashlib.sha256()
    for name in sorted(splits):
        for tensor in (splits[name].images, splits[name].labels):
            digest.update(tensor.contiguous().numpy())
    return digest.hexdigest()[:16]


def fingerprint_of_test(test: Split) -> str:
    """The test split's own fingerprint: what eval.py checks it evaluates on the images the run was tested on."""
    return fingerprint({"test": test})


def top_label(splits: dict[str, Split]) -> int:
    """The highest label: one that the model has no output for would fail deep inside the loss."""
    return max(int(split.labels.max()) for split in splits.values())


def is_official(root: Path | str) -> bool:
    """Whether root holds the official CIFAR-10 batch files, byte for byte (md5 of each file), and no other
    data_batch_N, which load_cifar10 would train on too."""
    folder = Path(root) / FOLDER
    official = CIFAR10.train_list + CIFAR10.test_list
    try:
        loaded = sorted(path.name for paths in batch_files(folder).values() for path in paths)
    except (OSError, DatasetError):  # no folder, or a gap in the training batches (eval reads the test split only)
        return False
    return (loaded == sorted(name for name, _ in official)
            and all(check_integrity(str(folder / name), md5) for name, md5 in official))


def download(root: Path) -> None:
    """Fetch the official archive (md5-checked) and extract it into root; fail fast when offline.

    Jobs started side by side on a fresh clone take turns: the first downloads, the others find it done.
    """
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".download.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (root / FOLDER).is_dir():
            return
        log.info("downloading CIFAR-10 from %s into %s", URL, root)  # into train.log too
        archive = root / URL.rpartition("/")[2]
        partial = archive.with_suffix(".partial")
        try:
            with urllib.request.urlopen(URL, timeout=DOWNLOAD_TIMEOUT_S) as response, open(partial, "wb") as f:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
        except BaseException as error:  # offline, cut off, or interrupted: leave no partial file behind
            partial.unlink(missing_ok=True)
            if isinstance(error, (OSError, http.client.HTTPException)):
                raise DatasetError(f"CIFAR-10 is not in {root / FOLDER} and downloading it failed ({error}). "
                                   + how_to_get(root, "rerun where the download can reach it")) from error
            raise
        if not check_integrity(str(partial), ARCHIVE_MD5):
            partial.unlink()
            raise DatasetError(f"the download from {URL} does not have the official md5 {ARCHIVE_MD5}; retry")
        with tempfile.TemporaryDirectory(dir=root) as staging, tarfile.open(partial) as tar:
            tar.extractall(staging, filter="data")
            os.replace(Path(staging) / FOLDER, root / FOLDER)  # appears whole, or not at all
        partial.unlink()


def find_batches(root: Path, download_if_missing: bool = True,
                 splits: tuple[str, ...] = ("train", "test")) -> dict[str, list[Path]] | None:
    """The batch files of each of splits under root/cifar-10-batches-py, or None where they are to be downloaded. A
    data.root that is the dataset folder or a file, and data that is not there (nor to be downloaded) or incomplete,
    are refused, naming the fix: by load_cifar10, and by a sweep once for all its jobs, before they start."""
    folder = root / FOLDER
    if root.name == FOLDER and not folder.is_dir():
        raise DatasetError(f"data.root={root} is the dataset folder itself; data.root names the folder that holds "
                           f"{FOLDER}/: data.root={root.parent}")
    if root.exists() and not root.is_dir():
        raise DatasetError(f"data.root={root} is a file; data.root names the folder that holds {FOLDER}/ (or will, "
                           "once downloaded)")
    if not folder.is_dir():
        if not download_if_missing:
            raise DatasetError(f"CIFAR-10 not found: {folder} does not exist (expected data_batch_1..5 and "
                               f"test_batch in it) and data.download=false. " + how_to_get(root))
        return None
    files = batch_files(folder, splits)
    files["train"] = files["train"] or [folder / "data_batch_1..5"]  # none at all: named as missing below
    missing = [str(p) for name in splits for p in files[name] if not p.is_file()]
    if missing:
        raise DatasetError(f"CIFAR-10 in {folder} is incomplete: missing {', '.join(missing)}. " + how_to_replace(folder))
    return files


def load_cifar10(root: Path | str, download_if_missing: bool = True,
                 splits: tuple[str, ...] = ("train", "test")) -> dict[str, Split]:
    """{name: Split} for each of splits ('train', 'test') from root/cifar-10-batches-py, on the CPU."""
    root = Path(root)
    folder = root / FOLDER
    files = find_batches(root, download_if_missing, splits)
    if files is None:
        download(root)
        files = find_batches(root, False, splits)
    loaded = {}
    for name in splits:
        parts = [read_batch(p) for p in files[name]]
        loaded[name] = Split(torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts]))
        if not len(loaded[name]):
            raise DatasetError(f"CIFAR-10 in {folder} has no {name} images: its batch files for that split are empty. "
                               + how_to_replace(folder))
    return loaded


def memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def to_inputs(images: torch.Tensor, mean: torch.Tensor | None, std: torch.Tensor | None,
              channels_last: bool) -> torch.Tensor:
    """uint8 images -> float network inputs in [0, 1], optionally standardised per channel."""
    x = images.float().div_(255)
    if mean is not None:
        x = x.sub_(mean[:, None, None]).div_(std[:, None, None])
    return x.contiguous(memory_format=memory_format(channels_last))


def augment(images: torch.Tensor, shifts: torch.Tensor, flips: torch.Tensor, padding: int) -> torch.Tensor:
    """Crop each image of the zero-padded batch at its (row, col) shift, mirrored where flips is True."""
    n, channels, height, width = images.shape
    padded = F.pad(images, (padding,) * 4)
    rows = shifts[:, 0, None] + torch.arange(height, device=images.device)
    cols = shifts[:, 1, None] + torch.arange(width, device=images.device)
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    return padded[torch.arange(n, device=images.device)[:, None, None, None],
                  torch.arange(channels, device=images.device)[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]


class TrainBatches:
    """Shuffled, augmented training batches of a device-resident split; the last partial batch is dropped.

    Every random draw of an epoch (order, crops, flips) is made at its start from `generator`, so
    an epoch resumed at step k from the generator state of its start replays the same batches.
    """

    def __init__(self, split: Split, batch_size: int, generator: torch.Generator, crop_padding: int, flip: bool):
        if batch_size > len(split):
            raise ValueError(f"trainer.batch_size={batch_size} exceeds the {len(split)} training images: set "
                             f"trainer.batch_size <= {len(split)}")
        self.split, self.batch_size, self.generator = split, batch_size, generator
        self.crop_padding, self.flip = crop_padding, flip

    def __len__(self) -> int:
        return len(self.split) // self.batch_size

    def epoch(self, start_step: int = 0):
        n, device, g = len(self.split), self.split.images.device, self.generator
        order = torch.randperm(n, generator=g, device=device)
        shifts = torch.randint(0, 2 * self.crop_padding + 1, (n, 2), generator=g, device=device)
        flips = torch.rand(n, generator=g, device=device) < (0.5 if self.flip else 0.0)
        for step in range(start_step, len(self)):
            index = order[step * self.batch_size:(step + 1) * self.batch_size]
            images = augment(self.split.images[index], shifts[index], flips[index], self.crop_padding)
            yield images, self.split.labels[index]
