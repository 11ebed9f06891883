"""Write a small, learnable stand-in for CIFAR-10 in the official python format.

    python scripts/make_fake_cifar.py ROOT [--train 5000] [--test 1000] [--seed 0] [--force]

ROOT/cifar-10-batches-py/ gets data_batch_1..5, test_batch and batches.meta, laid out as the official
release (the same dict keys, uint8 rows of 3072 = 3 x 32 x 32 values) and read as hetconv.data reads it,
with pickle's encoding="bytes". They are Python 3 pickles, not the release's Python 2 ones: read with
encoding="latin1", as torchvision's CIFAR10 does, their keys stay bytes, so that class cannot load them.
Each class is a coloured shape (its own colour, one of five shapes) at a random place and size on a
noisy random background: easy for a CNN, impossible for chance. For trying the pipeline offline and
for the tests.
"""

import argparse
import pickle
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's hetconv, whichever one a venv installed

from hetconv.data import CLASSES, FOLDER, is_official  # noqa: E402
from hetconv.report import output_folder, positive_int  # noqa: E402

PALETTE = np.array([(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
                    (145, 30, 180), (70, 240, 240), (240, 50, 230), (128, 128, 0), (0, 0, 128)], dtype=np.float32)


def shape_masks(kind: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(N, 32, 32) boolean masks: 0 disk, 1 square, 2 triangle, 3 bar, 4 cross, at random place and size."""
    n = len(kind)
    yy, xx = np.mgrid[:32, :32].astype(np.float32)
    cy, cx = (rng.uniform(10, 22, (2, n, 1, 1))).astype(np.float32)
    r = rng.uniform(5, 9, (n, 1, 1)).astype(np.float32)
    dy, dx = yy - cy, xx - cx
    k = kind[:, None, None]
    return np.select(
        [k == 0, k == 1, k == 2, k == 3],
        [dy**2 + dx**2 <= r**2,
         (np.abs(dy) <= r * 0.8) & (np.abs(dx) <= r * 0.8),
         (dy <= r * 0.7) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6),
         (np.abs(dy) <= r * 0.3) & (np.abs(dx) <= r * 1.2)],
        (np.abs(dy) <= r * 0.25) & (np.abs(dx) <= r) | (np.abs(dx) <= r * 0.25) & (np.abs(dy) <= r))


def make_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(N, 3072) uint8 rows, channel-major like CIFAR-10."""
    n = len(labels)
    background = rng.uniform(40, 200, (n, 3, 1, 1)) + rng.normal(0, 30, (n, 3, 32, 32))
    colour = PALETTE[labels][:, :, None, None] + rng.normal(0, 20, (n, 3, 1, 1))
    mask = shape_masks(labels % 5, rng)[:, None]
    images = np.where(mask, colour, background) + rng.normal(0, 12, (n, 3, 32, 32))
    return np.clip(images, 0, 255).astype(np.uint8).reshape(n, 3072)


def write_batch(path: Path, label: str, labels: np.ndarray, rng: np.random.Generator) -> None:
    batch = {b"batch_label": label.encode(), b"labels": labels.tolist(), b"data": make_images(labels, rng),
             b"filenames": [f"fake_{label.replace(' ', '_')}_{i}.png".encode() for i in range(len(labels))]}
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=2)


def make_fake_cifar(root: Path | str, train: int = 5000, test: int = 1000, seed: int = 0,
                    overwrite: bool = False) -> Path:
    folder = Path(root) / FOLDER
    held = sorted(p.name for p in folder.glob("*_batch*"))  # none when the folder does not exist
    if held and not overwrite:  # it may be the real CIFAR-10, which would then have to be downloaded again
        raise FileExistsError(f"{folder} already holds {', '.join(held)}: use it as it is (data.root={root}), "
                              "choose another folder, or pass --force to replace it with generated data")
    if held and is_official(root):  # make demo DEMO=. would force generated data over ./data, the default data.root
        raise FileExistsError(f"{folder} holds the official CIFAR-10, which --force does not replace (it would have to "
                              "be downloaded again): choose another folder")
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    batches = np.array_split(rng.integers(0, 10, train), 5)  # the first ones one image larger where 5 does not divide
    for index, labels in enumerate(batches, start=1):
        write_batch(folder / f"data_batch_{index}", f"training batch {index} of 5", labels, rng)
    write_batch(folder / "test_batch", "testing batch 1 of 1", rng.integers(0, 10, test), rng)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [c.encode() for c in CLASSES], b"num_cases_per_batch": len(batches[0]),
                     b"num_vis": 3072}, f, protocol=2)
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=output_folder, help="folder to hold cifar-10-batches-py/ (use it as data.root)")
    parser.add_argument("--train", type=positive_int, default=5000, help="training images (split over 5 batch files)")
    parser.add_argument("--test", type=positive_int, default=1000, help="test images")
    parser.add_argument("--seed", type=int, default=0, help="numpy's generator seed, >= 0")
    parser.add_argument("--force", action="store_true",
                        help="replace the batch files that root already holds (never the official CIFAR-10's)")
    args = parser.parse_args(argv)
    if args.seed < 0:
        parser.error(f"--seed must be >= 0 (numpy's generator takes no negative seed), got {args.seed}")
    try:
        folder = make_fake_cifar(args.root, args.train, args.test, args.seed, overwrite=args.force)
    except FileExistsError as error:
        parser.error(str(error))
    print(f"wrote {args.train} training and {args.test} test images to {folder}; use data.root={args.root}")


if __name__ == "__main__":
    main()
