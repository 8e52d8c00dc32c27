import hashlib
import io
import pickle
import shutil
import tarfile
import urllib.error

import numpy as np
import pytest
import torch

from resnet_lab import data
from resnet_lab.data import DataUnavailable

from conftest import ROOT


def test_mini_loads_checked_with_seeded_disjoint_validation_split():
    d = data.load("mini", val_fraction=0.1, seed=0)
    assert d.train.images.dtype == torch.uint8 and d.train.images.shape[1:] == (3, 32, 32)
    assert len(d.train) + len(d.val) == 4068 and len(d.val) == 407 and len(d.test) == 1017
    assert set(d.test.labels.tolist()) == set(range(10))
    again = data.load("mini", val_fraction=0.1, seed=0)
    assert torch.equal(d.val.images, again.val.images)
    other = data.load("mini", val_fraction=0.1, seed=1)
    assert not torch.equal(d.val.labels, other.val.labels)
    # no validation image is also a training image
    train_keys = {bytes(x.numpy()) for x in d.train.images}
    assert not any(bytes(x.numpy()) in train_keys for x in d.val.images)


def test_corrupt_or_missing_mini_file_says_how_to_restore(tmp_path):
    with pytest.raises(DataUnavailable, match="missing"):
        data.load("mini", data_dir=str(tmp_path))
    raw = bytearray((ROOT / "data" / data.MINI_FILE).read_bytes())
    raw[-100] ^= 0xFF
    (tmp_path / data.MINI_FILE).write_bytes(bytes(raw))
    with pytest.raises(DataUnavailable, match="corrupt: sha256"):
        data.load("mini", data_dir=str(tmp_path))


def test_eval_batches_are_normalized_in_order():
    d = data.load("synthetic", synthetic_train=64, synthetic_test=50, val_fraction=0)
    xs, ys = zip(*data.Batches(d.test, 16))
    assert [len(y) for y in ys] == [16, 16, 16, 2]
    x = torch.cat(xs)
    mean, std = torch.tensor(data.MEAN).view(1, 3, 1, 1), torch.tensor(data.STD).view(1, 3, 1, 1)
    assert torch.allclose(x, (d.test.images.float() / 255 - mean) / std, atol=1e-5)
    assert torch.equal(torch.cat(ys), d.test.labels)


def test_crop_and_flip_match_slicing_of_the_zero_padded_image():
    imgs = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    padded = torch.nn.functional.pad(imgs, (4, 4, 4, 4))
    offsets = torch.tensor([[0, 0], [8, 8], [3, 5], [8, 0], [4, 4], [2, 7]])
    flips = torch.tensor([False, False, True, False, False, True])
    out = data.crop_flip(padded.permute(0, 2, 3, 1), offsets, flips, 32).permute(0, 3, 1, 2)
    for i, ((dy, dx), f) in enumerate(zip(offsets.tolist(), flips.tolist())):
        window = padded[i, :, dy:dy + 32, dx:dx + 32]
        assert torch.equal(out[i], window.flip(2) if f else window)
    assert torch.equal(out[4], imgs[4])  # offset (4, 4), no flip: the unshifted image


def test_channels_last_batches_hold_the_same_values():
    d = data.load("synthetic", synthetic_train=64, val_fraction=0)
    a = next(iter(data.Batches(d.train, 32, train=True, channels_last=True)))[0]
    b = next(iter(data.Batches(d.train, 32, train=True, channels_last=False)))[0]
    assert a.is_contiguous(memory_format=torch.channels_last) and b.is_contiguous()
    assert torch.equal(a, b)


def test_training_batches_augment_reproducibly_per_epoch():
    d = data.load("synthetic", synthetic_train=256, val_fraction=0)
    b = data.Batches(d.train, 100, train=True, seed=3)
    assert len(b) == 2  # the incomplete last batch is dropped in training
    b.set_epoch(0)
    first = [x for x, _ in b]
    b.set_epoch(0)
    assert all(torch.equal(a, c) for a, c in zip(first, (x for x, _ in b)))
    b.set_epoch(1)
    assert not torch.equal(first[0], next(iter(b))[0])
    labels = torch.cat([y for _, y in b])
    assert len(labels.unique()) > 1 and len(labels) == 200


def _fake_cifar_archive(root, n_per_batch=20):
    """A cifar-10-python.tar.gz in torchvision's format (pickled dict batches) with random images."""
    rng = np.random.default_rng(0)
    members = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8),
                 "labels": rng.integers(0, 10, n_per_batch).tolist()}
        members[name] = pickle.dumps(batch)
    members["batches.meta"] = pickle.dumps({"label_names": list(data.CLASSES)})
    path = root / data.CIFAR10_ARCHIVE
    with tarfile.open(path, "w:gz") as tar:
        for name, blob in members.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    md5 = {name: hashlib.md5(blob).hexdigest() for name, blob in members.items()}
    return path, md5


@pytest.fixture
def offline(monkeypatch):
    def refuse(*a, **k):
        raise urllib.error.URLError("network unreachable (test)")
    monkeypatch.setattr("urllib.request.urlopen", refuse)


def test_cifar10_offline_without_archive_says_where_to_put_it(tmp_path, offline):
    with pytest.raises(DataUnavailable) as e:
        data.load("cifar10", data_dir=str(tmp_path))
    assert data.CIFAR10_ARCHIVE in str(e.value) and str(tmp_path) in str(e.value)


def test_a_garbage_cifar10_archive_is_named_as_damaged_not_missing(tmp_path, offline):
    # Before: the message said to place the archive there, which it was (issue 17, item 7).
    (tmp_path / data.CIFAR10_ARCHIVE).write_bytes(b"<html>404 Not Found</html>")
    with pytest.raises(DataUnavailable) as e:
        data.load("cifar10", data_dir=str(tmp_path))
    assert "is there but is not the CIFAR-10 archive" in str(e.value) and "Delete it" in str(e.value)


def test_cifar10_from_a_local_archive_in_the_real_format(tmp_path, offline, monkeypatch):
    from torchvision.datasets import CIFAR10

    archive, md5 = _fake_cifar_archive(tmp_path)
    # torchvision verifies the real archive's checksums; point them at the fake's.
    monkeypatch.setattr(CIFAR10, "tgz_md5", hashlib.md5(archive.read_bytes()).hexdigest())
    monkeypatch.setattr(CIFAR10, "train_list", [[f"data_batch_{i}", md5[f"data_batch_{i}"]] for i in range(1, 6)])
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", md5["test_batch"]]])
    monkeypatch.setitem(CIFAR10.meta, "md5", md5["batches.meta"])
    d = data.load("cifar10", data_dir=str(tmp_path), val_fraction=0.1)
    assert len(d.train) + len(d.val) == 100 and len(d.val) == 10 and len(d.test) == 20
    assert d.train.images.shape[1:] == (3, 32, 32) and d.train.images.dtype == torch.uint8
    shutil.rmtree(tmp_path / "cifar-10-batches-py")
