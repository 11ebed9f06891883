"""The data pipeline against plain references: augmentation, epochs, and what counts as the official CIFAR-10."""

import hashlib
import io
import pickle
import shutil
import tarfile
import urllib.error
import urllib.request

import pytest
import torch
import torch.nn.functional as F

import train as train_module
from hetconv import data as data_module
from hetconv.data import FOLDER, DatasetError, Split, TrainBatches, augment, fingerprint, is_official, load_cifar10
from hetconv.settings import train_config
from hetconv.training import Preprocess
from scripts import make_fake_cifar as make_fake_cifar_script
from scripts.make_fake_cifar import make_fake_cifar


def test_augment_is_a_crop_of_the_zero_padded_image_mirrored_where_asked():
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=generator)
    shifts = torch.randint(0, 9, (16, 2), generator=generator)
    flips = torch.rand(16, generator=generator) < 0.5
    expected = []
    for image, (row, col), flip in zip(images, shifts.tolist(), flips):
        crop = F.pad(image, (4, 4, 4, 4))[:, row:row + 32, col:col + 32]
        expected.append(crop.flip(-1) if flip else crop)
    assert flips.any() and not flips.all()
    assert torch.equal(augment(images, shifts, flips, padding=4), torch.stack(expected))


def test_an_epoch_shows_every_image_once_in_full_batches_and_replays_from_its_start_state():
    split = Split(torch.zeros(250, 3, 32, 32, dtype=torch.uint8), torch.arange(250))  # a label names its image
    batches = TrainBatches(split, 100, torch.Generator().manual_seed(0), crop_padding=4, flip=True)
    start = batches.generator.get_state()
    seen = torch.cat([labels for _, labels in batches.epoch()])
    assert len(seen) == 200 and len(set(seen.tolist())) == 200  # the last, partial batch is dropped
    batches.generator.set_state(start)
    assert torch.equal(torch.cat([labels for _, labels in batches.epoch(start_step=1)]), seen[100:])
    with pytest.raises(ValueError, match="trainer.batch_size=300 exceeds the 250 training images: set "
                                         "trainer.batch_size <= 250"):
        TrainBatches(split, 300, batches.generator, crop_padding=4, flip=True)


def test_without_crop_and_flip_a_batch_holds_its_images_as_they_are():
    images = torch.randint(0, 256, (250, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    batches = TrainBatches(Split(images, torch.arange(250)), 100, torch.Generator().manual_seed(0), crop_padding=0,
                           flip=False)
    for batch, labels in batches.epoch():
        assert torch.equal(batch, images[labels])


def test_normalize_standardises_each_channel_with_the_configured_statistics():
    data = train_config("data.normalize=true").data
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    mean, std = (torch.tensor(data[key])[:, None, None] for key in ("mean", "std"))
    expected = (images.double() / 255 - mean) / std
    assert torch.allclose(Preprocess(data, False, torch.device("cpu"))(images).double(), expected, atol=1e-5)
    data.normalize = False
    assert torch.equal(Preprocess(data, False, torch.device("cpu"))(images), images.float() / 255)


def packed_like_the_release(fake_root, tmp_path):
    """fake_root's batch files in an archive laid out as the official one, and its md5."""
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(fake_root / FOLDER, arcname=FOLDER)
    return archive, hashlib.md5(archive.read_bytes()).hexdigest()


def test_a_download_is_md5_checked_and_extracted_whole(fake_root, tmp_path, monkeypatch, caplog):
    archive, md5 = packed_like_the_release(fake_root, tmp_path)
    monkeypatch.setattr(data_module, "URL", archive.as_uri())
    monkeypatch.setattr(data_module, "ARCHIVE_MD5", "0" * 32)
    with pytest.raises(DatasetError, match="does not have the official md5"):
        load_cifar10(tmp_path / "tampered", download_if_missing=True)
    assert [p.name for p in (tmp_path / "tampered").iterdir()] == [".download.lock"]  # nothing half-made kept
    monkeypatch.setattr(data_module, "ARCHIVE_MD5", md5)
    root = tmp_path / "data"
    with caplog.at_level("INFO", logger=data_module.__name__):
        downloaded = load_cifar10(root, download_if_missing=True)
    assert f"downloading CIFAR-10 from {archive.as_uri()} into {root}" in caplog.text  # logged: into train.log
    assert fingerprint(downloaded) == fingerprint(load_cifar10(fake_root, download_if_missing=False))
    assert sorted(p.name for p in root.iterdir()) == [".download.lock", FOLDER]  # the archive is not kept


class CutOff(io.BytesIO):
    """A response whose connection drops after its first chunk."""

    def read(self, size=-1):
        if self.tell():
            raise ConnectionResetError("Connection reset by peer")
        return super().read(size)


@pytest.mark.parametrize("failure", ["offline", "cut off"])
def test_a_failed_download_leaves_no_partial_file_and_says_what_to_do(failure, tmp_path, monkeypatch):
    timeouts = []

    def urlopen(url, timeout):
        timeouts.append(timeout)
        if failure == "offline":
            raise urllib.error.URLError(OSError(101, "Network is unreachable"))
        return CutOff(b"the first megabyte")

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    with pytest.raises(DatasetError, match="downloading it failed") as error:
        load_cifar10(tmp_path, download_if_missing=True)
    assert "rerun where the download can reach it" in str(error.value) and "md5" in str(error.value)
    assert timeouts == [data_module.DOWNLOAD_TIMEOUT_S]  # a network that drops packets does not hang the job
    assert sorted(p.name for p in tmp_path.iterdir()) == [".download.lock"]


def official_copy(tmp_path, monkeypatch):
    """A generated data folder that is_official takes for the release: the md5s on record are its own."""
    make_fake_cifar(tmp_path, train=500, test=100, seed=0)
    folder = tmp_path / FOLDER
    for listing in ("train_list", "test_list"):
        names = [name for name, _ in getattr(data_module.CIFAR10, listing)]
        monkeypatch.setattr(data_module.CIFAR10, listing,
                            [[name, hashlib.md5((folder / name).read_bytes()).hexdigest()] for name in names])
    return folder


def test_an_extra_training_batch_is_not_the_official_cifar10(tmp_path, monkeypatch):
    folder = official_copy(tmp_path, monkeypatch)
    assert is_official(tmp_path)
    assert train_module.load_data(train_config(f"data.root={tmp_path}"), tmp_path / "run", None)[1]["official_cifar10"]  # a run's record
    shutil.copy(folder / "test_batch", folder / "data_batch_6")  # loaded, so trained on: the test set leaks in
    assert len(load_cifar10(tmp_path, download_if_missing=False)["train"]) == 600
    assert not is_official(tmp_path)
    (folder / "data_batch_1").unlink()  # a gap: eval, which reads the test split only, still asks
    assert not is_official(tmp_path) and not is_official(tmp_path / "nowhere")
    assert len(load_cifar10(tmp_path, download_if_missing=False, splits=("test",))["test"]) == 100  # eval's split
    with pytest.raises(DatasetError, match="is missing data_batch_1 while data_batch_6 is there"):
        load_cifar10(tmp_path, download_if_missing=False)


def change_one_pixel(batch: dict) -> None:
    batch[b"data"][7, 1000] ^= 1  # one pixel of one image, one bit


def change_one_label(batch: dict) -> None:
    batch[b"labels"][7] = (batch[b"labels"][7] + 1) % 10


@pytest.mark.parametrize("change", [change_one_pixel, change_one_label])
def test_a_changed_pixel_or_label_changes_the_fingerprint_and_the_official_verdict(change, tmp_path, monkeypatch):
    folder = official_copy(tmp_path, monkeypatch)
    before = fingerprint(load_cifar10(tmp_path, download_if_missing=False))
    batch_file = folder / "data_batch_3"
    batch = pickle.loads(batch_file.read_bytes())
    change(batch)
    batch_file.write_bytes(pickle.dumps(batch))
    assert fingerprint(load_cifar10(tmp_path, download_if_missing=False)) != before
    assert not is_official(tmp_path)


def test_generated_data_replaces_a_dataset_only_when_forced(tmp_path, capsys):
    batch_file = make_fake_cifar(tmp_path, train=50, test=10, seed=0) / "data_batch_1"
    before = batch_file.read_bytes()  # the real CIFAR-10, it might have been
    with pytest.raises(SystemExit):
        make_fake_cifar_script.main([str(tmp_path), "--seed", "1"])
    assert "already holds data_batch_1" in capsys.readouterr().err and batch_file.read_bytes() == before
    make_fake_cifar_script.main([str(tmp_path), "--seed", "1", "--force"])
    assert batch_file.read_bytes() != before


def test_generated_data_never_replaces_the_official_cifar10(tmp_path, capsys, monkeypatch):
    """make demo DEMO=<folder> forces generated data into <folder>/data: DEMO=. would be ./data, data.root's default."""
    batch_file = make_fake_cifar(tmp_path, train=50, test=10, seed=0) / "data_batch_1"
    before = batch_file.read_bytes()
    monkeypatch.setattr(make_fake_cifar_script, "is_official", lambda root: str(root) == str(tmp_path))  # md5s
    with pytest.raises(SystemExit):
        make_fake_cifar_script.main([str(tmp_path), "--seed", "1", "--force"])
    assert "holds the official CIFAR-10, which --force does not replace" in capsys.readouterr().err
    assert batch_file.read_bytes() == before


def test_an_empty_split_is_named_before_training(tmp_path):
    test_file = make_fake_cifar(tmp_path, train=50, test=10, seed=0) / "test_batch"
    batch = pickle.loads(test_file.read_bytes())
    batch.update({b"data": batch[b"data"][:0], b"labels": []})
    test_file.write_bytes(pickle.dumps(batch))
    with pytest.raises(DatasetError, match="has no test images"):
        load_cifar10(tmp_path, download_if_missing=False)
