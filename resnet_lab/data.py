"""CIFAR-10 data as whole uint8 tensors, with batch-level augmentation on the training device.

Sources: `mini` (real CIFAR-10 subset shipped in data/), `cifar10` (torchvision download),
`synthetic` (generated, for tests). Images are kept as one uint8 NCHW tensor per split and moved
to the device once; crop/flip/normalize happen on whole batches with tensor ops (airbench's way):
no PIL, no per-image Python, no worker processes.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import math
import urllib.error
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .runs import file_lock, resolve

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2023, 0.1994, 0.2010)
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

MINI_FILE = "cifar10_mini.npz"
MINI_SHA256 = "a10bf2e77c90bd853784cf598f342d1225e6deb87acec7dbddc67910d8a8a5e9"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_LOCK = ".cifar-10.lock"


class DataUnavailable(RuntimeError):
    """The requested data cannot be read; the message says how to get it."""


@dataclass
class Split:
    images: torch.Tensor  # uint8, (N, 3, 32, 32)
    labels: torch.Tensor  # int64, (N,)

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Dataset:
    train: Split
    val: Split  # carved from the training set; may be empty
    test: Split
    classes: tuple[str, ...]
    source: str

    def describe(self) -> str:
        return f"{self.source}: {len(self.train)} train / {len(self.val)} val / {len(self.test)} test images"


def load(source: str = "mini", data_dir: str = "data", val_fraction: float = 0.1, seed: int = 0,
         synthetic_train: int = 512, synthetic_test: int = 128) -> Dataset:
    """Load a source and carve a seeded validation split from its training set."""
    if source == "mini":
        x_train, y_train, x_test, y_test = _load_mini(resolve(data_dir) / MINI_FILE)
    elif source == "cifar10":
        x_train, y_train, x_test, y_test = _load_cifar10(resolve(data_dir))
    elif source == "synthetic":
        x_train, y_train, x_test, y_test = _synthetic(synthetic_train, synthetic_test, seed)
    else:
        raise ValueError(f"unknown data source {source!r}; use 'mini', 'cifar10' or 'synthetic'")
    train, test = _to_split(x_train, y_train), _to_split(x_test, y_test)
    train, val = _carve(train, val_fraction, seed)
    return Dataset(train, val, test, CLASSES, source)


def from_params(p: dict) -> Dataset:
    return load(p["data"], p["data_dir"], p["val_fraction"], p["seed"], p["synthetic_train"], p["synthetic_test"])


def _to_split(x_hwc: np.ndarray, y: np.ndarray) -> Split:
    images = torch.from_numpy(np.ascontiguousarray(x_hwc.transpose(0, 3, 1, 2)))
    return Split(images, torch.as_tensor(np.asarray(y), dtype=torch.int64))


def _carve(train: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    n_val = int(round(len(train) * fraction))
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = order[:n_val].sort().values, order[n_val:].sort().values
    return (Split(train.images[train_idx], train.labels[train_idx]),
            Split(train.images[val_idx], train.labels[val_idx]))


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _load_mini(path: Path):
    if not path.is_file():
        raise DataUnavailable(
            f"{path} is missing. It ships with the repository (git checkout -- data/{MINI_FILE}); "
            f"a copy is also at ../shared/data/{MINI_FILE}.")
    digest = sha256(path)
    if digest != MINI_SHA256:
        raise DataUnavailable(f"{path} is corrupt: sha256 {digest}, expected {MINI_SHA256}. "
                              f"Restore it with git checkout -- data/{MINI_FILE}.")
    with np.load(path, allow_pickle=False) as z:
        return z["x_train"], z["y_train"], z["x_test"], z["y_test"]


@contextlib.contextmanager
def _data_lock(root: Path):
    """Exclusive lock on the data folder while CIFAR-10 is downloaded, extracted and read: two processes starting on
    a fresh folder download and extract it once (the second waits, then finds the files), not twice into the same
    files. A folder this process cannot write (a read-only shared copy) is read without the lock: nobody changes it."""
    with contextlib.ExitStack() as held:
        try:
            root.mkdir(parents=True, exist_ok=True)
            held.enter_context(file_lock(root / CIFAR10_LOCK, busy=f"waiting for another process downloading or "
                                                                  f"reading CIFAR-10 in {root}"))
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
        yield


def _load_cifar10(root: Path):
    from torchvision.datasets import CIFAR10

    try:
        with _data_lock(root):
            train = CIFAR10(str(root), train=True, download=True)
            test = CIFAR10(str(root), train=False, download=True)
    except (urllib.error.URLError, OSError, RuntimeError) as e:
        archive = root / CIFAR10_ARCHIVE
        if archive.is_file():  # torchvision found it wrong and tried to download a good one: say it is the file
            from torchvision.datasets.utils import calculate_md5

            digest = calculate_md5(str(archive))
            if digest != CIFAR10.tgz_md5:
                raise DataUnavailable(
                    f"{archive} is there but is not the CIFAR-10 archive (md5 {digest}, expected {CIFAR10.tgz_md5}; "
                    f"{archive.stat().st_size:,} bytes): a damaged or partial download. Delete it and download "
                    f"{CIFAR10_URL} again, or use data: mini.") from None
        raise DataUnavailable(
            f"full CIFAR-10 could not be downloaded or read ({type(e).__name__}: {e}). Without a network, "
            f"download {CIFAR10_URL} elsewhere and place {CIFAR10_ARCHIVE} in {root}/ (it is verified and "
            f"extracted there), or use data: mini.") from None
    return train.data, np.asarray(train.targets), test.data, np.asarray(test.targets)


def _synthetic(n_train: int, n_test: int, seed: int):
    """Learnable fake images: a smooth per-class colour pattern plus noise."""
    g = np.random.default_rng(seed)
    templates = g.uniform(40, 215, size=(10, 4, 4, 3))
    templates = templates.repeat(8, axis=1).repeat(8, axis=2)  # (10, 32, 32, 3)

    def make(n):
        y = g.integers(0, 10, size=n)
        x = templates[y] + g.normal(0, 40, size=(n, 32, 32, 3))
        return np.clip(x, 0, 255).astype(np.uint8), y.astype(np.int64)

    return (*make(n_train), *make(n_test))


class Batches:
    """Batches of (normalized float images, labels) from one split, produced on `device`.

    With `train=True` each epoch is reshuffled and augmented (random crop with 4-px zero padding,
    horizontal flip) from a generator seeded by (seed, epoch), so a resumed run sees the same
    batches as an uninterrupted one. Incomplete last batches are dropped in training only.
    Images are held as NHWC uint8, so one gather does crop and flip and yields channels_last
    batches without a copy.
    """

    def __init__(self, split: Split, batch_size: int, device: torch.device | str = "cpu", train: bool = False,
                 seed: int = 0, pad: int = 4, channels_last: bool = False):
        self.device = torch.device(device)
        self.batch_size = min(batch_size, len(split)) if train else batch_size
        self.train, self.seed, self.pad, self.channels_last = train, seed, pad, channels_last
        self.epoch = 0
        images = split.images.to(self.device)
        # Zero padding in pixel space, as torchvision's RandomCrop(32, padding=4) does.
        if train and pad:
            images = torch.nn.functional.pad(images, (pad,) * 4)
        self.images = images.permute(0, 2, 3, 1).contiguous()  # NHWC
        self.labels = split.labels.to(self.device)
        self.scale = (1 / (255 * torch.tensor(STD))).view(1, 3, 1, 1).to(self.device)
        self.shift = (-torch.tensor(MEAN) / torch.tensor(STD)).view(1, 3, 1, 1).to(self.device)

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.train else math.ceil(n / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def normalize(self, x_nhwc: torch.Tensor) -> torch.Tensor:
        x = x_nhwc.permute(0, 3, 1, 2).float()  # NCHW view with channels_last strides
        x = x.mul_(self.scale).add_(self.shift)
        return x if self.channels_last else x.contiguous()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.labels)
        if not self.train:
            for i in range(0, n, self.batch_size):
                yield self.normalize(self.images[i:i + self.batch_size]), self.labels[i:i + self.batch_size]
            return
        g = torch.Generator(device="cpu").manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(n, generator=g).to(self.device)
        shifts = torch.randint(0, 2 * self.pad + 1, (n, 2), generator=g).to(self.device)
        flips = (torch.rand(n, generator=g) < 0.5).to(self.device)
        for b in range(len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            yield self.normalize(crop_flip(self.images[idx], shifts[idx], flips[idx], 32)), self.labels[idx]


def crop_flip(padded_nhwc: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, size: int) -> torch.Tensor:
    """Crop a `size` window from each padded NHWC image at its (dy, dx) offset, mirrored where
    `flips` is set, in one gather."""
    r = torch.arange(size, device=padded_nhwc.device)
    rows = offsets[:, 0:1] + r
    cols = offsets[:, 1:2] + torch.where(flips.view(-1, 1), size - 1 - r, r)
    n = torch.arange(len(padded_nhwc), device=padded_nhwc.device).view(-1, 1, 1)
    return padded_nhwc[n, rows.view(-1, size, 1), cols.view(-1, 1, size)]
