"""Faults found by injecting them (issue 31, item 5): two processes on a fresh data folder, a predictions file that
decompresses to gigabytes, a full disk and a read-only run store."""
import contextlib
import errno
import hashlib
import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from numpy.lib import format as npy

from resnet_lab import data, params, runs
from resnet_lab.__main__ import main
from resnet_lab.runs import RunStoreError

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- one download for two processes
def _fake_cifar_archive(path: Path, n_per_batch: int = 10) -> dict[str, str]:
    """A small cifar-10-python.tar.gz in torchvision's format; returns the md5 of the archive and of each member."""
    rng = np.random.default_rng(0)
    members = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        members[name] = pickle.dumps({"data": rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8),
                                      "labels": rng.integers(0, 10, n_per_batch).tolist()})
    members["batches.meta"] = pickle.dumps({"label_names": list(data.CLASSES)})
    with tarfile.open(path, "w:gz") as tar:
        for name, blob in members.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    md5 = {name: hashlib.md5(blob).hexdigest() for name, blob in members.items()}
    md5["archive"] = hashlib.md5(path.read_bytes()).hexdigest()
    return md5


# One process of the race: torchvision's real download-and-extract with the network replaced by a slow copy of the
# fake archive that counts its calls; both processes meet at a barrier, then load the same fresh folder.
CHILD = r"""
import hashlib, json, shutil, sys, time
from pathlib import Path

import torchvision.datasets.utils as tv_utils
from torchvision.datasets import CIFAR10

from resnet_lab import data

source, root, work, me, md5 = sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4], json.loads(sys.argv[5])
CIFAR10.tgz_md5 = md5["archive"]
CIFAR10.train_list = [[f"data_batch_{i}", md5[f"data_batch_{i}"]] for i in range(1, 6)]
CIFAR10.test_list = [["test_batch", md5["test_batch"]]]
CIFAR10.meta["md5"] = md5["batches.meta"]


def slow_download(url, root, filename=None, md5=None, max_redirect_hops=3):
    with open(work / "downloads", "a") as f:
        f.write(me + "\n")
    time.sleep(1.5)  # a slow network: the other process is well under way meanwhile
    shutil.copyfile(source, Path(root) / filename)


tv_utils.download_url = slow_download
(work / f"ready-{me}").touch()
deadline = time.time() + 120
while not all((work / f"ready-{p}").exists() for p in ("a", "b")) and time.time() < deadline:
    time.sleep(0.01)
d = data.load("cifar10", data_dir=root, val_fraction=0.1)
print(json.dumps({name: hashlib.sha256(split.images.numpy().tobytes() + split.labels.numpy().tobytes()).hexdigest()
                  for name, split in (("train", d.train), ("val", d.val), ("test", d.test))}))
"""


def test_two_processes_on_a_fresh_data_folder_download_and_extract_cifar10_once(tmp_path, monkeypatch):
    # Before: both processes found no data, and both downloaded and extracted into the same files.
    source = tmp_path / "archive.tar.gz"
    md5 = _fake_cifar_archive(source)
    root = tmp_path / "data"  # fresh: not even the folder exists
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, str(script), str(source), str(root), str(tmp_path), me,
                               json.dumps(md5)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for me in ("a", "b")]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    assert (tmp_path / "downloads").read_text().split() in (["a"], ["b"])  # one download, one extraction
    loaded = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert loaded[0] == loaded[1]  # both read the same arrays
    assert "waiting for another process" in outs[0][1] + outs[1][1]  # the second said why it waited
    from torchvision.datasets import CIFAR10  # what they extracted is whole: it reads here, offline, checksummed

    monkeypatch.setattr("urllib.request.urlopen", lambda *a, **k: pytest.fail("downloaded a third time"))
    monkeypatch.setattr(CIFAR10, "train_list", [[f"data_batch_{i}", md5[f"data_batch_{i}"]] for i in range(1, 6)])
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", md5["test_batch"]]])
    monkeypatch.setitem(CIFAR10.meta, "md5", md5["batches.meta"])
    d = data.load("cifar10", data_dir=str(root), val_fraction=0.1)
    assert len(d.train) + len(d.val) == 50 and len(d.test) == 10


# ---------------------------------------------------------------- predictions that decompress to gigabytes
def _npz_with_header(path: Path, header: dict, body: bytes = b"\0" * 64, name: str = "test.npy") -> Path:
    """A predictions.npz whose array header claims `header` but whose data is only `body`: small on disk."""
    f = io.BytesIO()
    npy.write_array_header_1_0(f, header)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(name, f.getvalue() + body)
    return path


@pytest.fixture
def run(tmp_path):
    return runs.RunStore(tmp_path / "runs").run("svd", {"x": 1})


@pytest.fixture
def no_whole_array_read(monkeypatch):
    """numpy's whole-array readers raise MemoryError, as they did on the 8 GiB array: the store must not call them."""
    def memory_error(*a, **k):
        raise MemoryError("allocating the whole array")
    monkeypatch.setattr(np, "load", memory_error)
    monkeypatch.setattr(npy, "read_array", memory_error)


def test_a_predictions_file_claiming_a_huge_array_is_refused_from_its_header(run, no_whole_array_read):
    # Before: np.load read the whole array: a 37 MB file holding 8 GiB raised a raw MemoryError.
    path = _npz_with_header(run.path(runs.PREDICTIONS),
                            {"descr": "|u1", "fortran_order": False, "shape": (8 * 2 ** 30,)})
    assert path.stat().st_size < 1000
    with pytest.raises(RunStoreError) as refused:
        run.predictions()
    message = str(refused.value)
    assert str(path) in message and "8589934592 uint8" in message and "refused unread" in message
    assert "\n" not in message


@pytest.mark.parametrize("header, sizes, reason", [
    ({"descr": "|u1", "fortran_order": False, "shape": (20_000,)}, {"test": 10_000},
     "at most the 10,000 images of split 'test'"),
    ({"descr": "<i8", "fortran_order": False, "shape": (10,)}, None, "10 int64"),
    ({"descr": "|u1", "fortran_order": False, "shape": (100, 100)}, None, "100x100 uint8"),
    ({"descr": "|u1", "fortran_order": False, "shape": ()}, None, "scalar uint8"),
])
def test_a_predictions_array_the_split_cannot_hold_is_refused(run, no_whole_array_read, header, sizes, reason):
    path = _npz_with_header(run.path(runs.PREDICTIONS), header)
    with pytest.raises(RunStoreError, match="refused unread") as refused:
        run.predictions(sizes)
    assert reason in str(refused.value) and str(path) in str(refused.value)


def test_predictions_round_trip_within_their_bounds_and_truncated_ones_are_named(run, no_whole_array_read):
    stored = {"test": torch.tensor([3, 1, 9, 0]), "val": torch.tensor([7, 7])}
    run.save_predictions(stored)
    for sizes in (None, {"test": 4, "val": 2}, {"test": 10_000}):
        back = run.predictions(sizes)
        assert back.keys() == stored.keys() and all(torch.equal(back[k], stored[k]) for k in stored)
        assert back["test"].dtype == torch.int64
    _npz_with_header(run.path(runs.PREDICTIONS), {"descr": "|u1", "fortran_order": False, "shape": (100,)}, b"\1" * 10)
    with pytest.raises(RunStoreError, match="truncated"):
        run.predictions()
    run.save_predictions({"test": torch.full((1000,), 7)})
    blob = bytearray(run.path(runs.PREDICTIONS).read_bytes())
    blob[blob.index(b"\x07" * 1000) + 500] = 3  # a flipped byte in the data: the zip's CRC tells
    run.path(runs.PREDICTIONS).write_bytes(bytes(blob))
    with pytest.raises(RunStoreError, match="is not a predictions file .*CRC"):
        run.predictions()
    run.path(runs.PREDICTIONS).write_bytes(b"not a zip")
    with pytest.raises(RunStoreError, match="is not a predictions file"):
        run.predictions()
    run.path(runs.PREDICTIONS).unlink()
    with pytest.raises(RunStoreError, match="does not exist"):
        run.predictions()


# ---------------------------------------------------------------- a full disk, a read-only store
def _no_temp_files(folder: Path) -> bool:
    return not list(folder.rglob("*.tmp"))


@pytest.fixture
def full_disk(monkeypatch):
    """The disk fills while a file is written: the kernel answers ENOSPC when the data is flushed to it."""
    def enospc(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "fsync", enospc)


def test_a_full_disk_is_one_line_naming_the_folder_and_leaves_the_old_files(run, full_disk):
    # Before: ENOSPC ended in a traceback.
    write = {
        "params.yaml": lambda: runs.write_text(run.path("params.yaml"), "x: 2\n", run.store.root),
        "metrics.json": lambda: run.finish({"test_acc": 50.0}),
        "history.json": lambda: run.write_json("history.json", {"loss": [1.0]}),
        "model.pt": lambda: run.save_weights({"w": torch.ones(3)}),
        runs.PREDICTIONS: lambda: run.save_predictions({"test": torch.tensor([1, 2])}),
    }
    before = run.path("params.yaml").read_bytes()
    for name, attempt in write.items():
        with pytest.raises(RunStoreError) as refused:
            attempt()
        message = str(refused.value)
        assert message == (f"no space left on device in {run.dir}: free space or point run_root elsewhere; "
                           "nothing was half-written"), name
    assert run.path("params.yaml").read_bytes() == before  # the old content kept
    assert sorted(p.name for p in run.dir.iterdir()) == ["params.yaml"] and not run.done
    assert _no_temp_files(run.store.root)


def test_a_full_disk_inside_torch_save_is_recognised(tmp_path, monkeypatch):
    # torch.save reports a failed write of its zip writer as a RuntimeError whose context is the OSError.
    real_fdopen = os.fdopen

    class FillsUp(io.RawIOBase):
        def __init__(self, f):
            self.f, self.written = f, 0

        def writable(self):
            return True

        def write(self, b):
            if self.written + len(b) > 200:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.written += len(b)
            return self.f.write(b)

        def flush(self):
            self.f.flush()

        def fileno(self):
            return self.f.fileno()

        def close(self):
            super().close()
            self.f.close()

    monkeypatch.setattr(os, "fdopen", lambda fd, mode: FillsUp(real_fdopen(fd, mode)))
    with pytest.raises(RunStoreError, match=f"no space left on device in {tmp_path}: free space or write elsewhere"):
        runs.save_torch(tmp_path / "model.pt", {"w": torch.zeros(10_000)})
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match="not a space problem"):  # other errors stay what they are
        runs.atomic_write(tmp_path / "x", lambda f: (_ for _ in ()).throw(RuntimeError("not a space problem")))
    with pytest.raises(OSError, match="Input/output error"):
        runs.atomic_write(tmp_path / "x", lambda f: (_ for _ in ()).throw(OSError(errno.EIO, "Input/output error")))
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def read_only(monkeypatch):
    """Make folders read-only the way the kernel answers on a read-only mount (EROFS on creating anything in them).
    The tests run as root, whom permission bits (chmod 0o555) do not stop, and mounting is not theirs to do: the
    refusal is injected at the calls that create files and folders (mkdir, mkstemp, the lock file)."""
    frozen: list[Path] = []

    def inside(path) -> bool:
        p = Path(path).absolute()
        return any(p == f or f in p.parents for f in frozen)

    def erofs(path):
        return OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    real_mkdir, real_mkstemp, real_lock = os.mkdir, tempfile.mkstemp, runs.file_lock

    def mkdir(path, mode=0o777, *a, **k):
        if inside(path):
            if os.path.isdir(path):
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(path))
            raise erofs(path)
        return real_mkdir(path, mode, *a, **k)

    def mkstemp(suffix=None, prefix=None, dir=None, text=False):
        if dir is not None and inside(dir):
            raise erofs(Path(dir) / f"{prefix}XXXXXX{suffix}")
        return real_mkstemp(suffix, prefix, dir, text)

    def file_lock(path, busy=None):
        if inside(path):
            raise erofs(path)
        return real_lock(path, busy)

    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(runs, "file_lock", file_lock)
    return frozen.append


def test_a_read_only_run_store_is_one_line_naming_it_and_its_finished_runs_still_read(tmp_path, read_only):
    # Before: EROFS ended in a traceback.
    store = runs.RunStore(tmp_path / "runs")
    done = store.run("svd", {"x": 1})
    done.finish({"test_acc": 70.0})
    started = store.run("svd", {"x": 2})
    read_only(store.root)
    advice = "make it writable or point run_root at a writable folder (its finished runs can still be read)"
    with pytest.raises(RunStoreError) as refused:
        store.run("svd", {"x": 3})  # a new run: its folder cannot be made
    new = runs.Run(store, "svd", runs.run_key("svd", {"x": 3})).dir
    assert str(refused.value) == f"the run store {store.root} is read-only (writing {new}): {advice}"
    with pytest.raises(RunStoreError) as refused:
        started.finish({"test_acc": 60.0})
    assert str(refused.value) == f"the run store {store.root} is read-only (writing {started.dir}): {advice}"
    with pytest.raises(RunStoreError, match="not finished and its store cannot be written"):
        with started.lock():
            pass
    with done.lock():
        assert done.metrics == {"test_acc": 70.0}
    assert not started.done and sorted(p.name for p in started.dir.iterdir()) == ["params.yaml"]
    assert len(store.runs()) == 2 and _no_temp_files(store.root)


def test_a_new_run_on_a_full_disk_leaves_no_empty_run_folder(tmp_path, full_disk):
    store = runs.RunStore(tmp_path / "runs")
    with pytest.raises(RunStoreError, match="no space left on device in .*: free space or point run_root elsewhere"):
        store.run("svd", {"x": 1})
    assert not store.root.exists() and store.runs() == []


@contextlib.contextmanager
def _unprivileged():
    """Act as the unprivileged user `nobody` (uid 65534) for a moment when running as root, whom permission bits do
    not stop; the real ids stay root's, so the effective ones are restored after."""
    if os.geteuid() != 0:
        yield
        return
    os.setegid(65534)
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


def test_a_store_this_user_cannot_write_is_refused_by_the_kernel():
    # A real refusal by permission bits (chmod 0555), made by the kernel (EACCES): as root, the writes are made with
    # the effective uid of `nobody`, in a folder that user can reach (pytest's tmp_path lies in a 0700 folder).
    with tempfile.TemporaryDirectory() as top:
        os.chmod(top, 0o755)
        store = runs.RunStore(Path(top) / "runs")
        run = store.run("svd", {"x": 1})
        new = runs.Run(store, "svd", runs.run_key("svd", {"x": 2})).dir
        for folder in (run.dir, run.dir.parent):
            os.chmod(folder, 0o555)
        advice = "make it writable or point run_root at a writable folder (its finished runs can still be read)"
        try:
            with _unprivileged():
                with pytest.raises(RunStoreError) as new_run:
                    store.run("svd", {"x": 2})
                with pytest.raises(RunStoreError) as finished:
                    run.finish({"test_acc": 1.0})
        finally:
            for folder in (run.dir, run.dir.parent):
                os.chmod(folder, 0o755)
        refused = f"the run store {store.root} cannot be written by this user"
        assert str(new_run.value) == f"{refused} (writing {new}): {advice}"
        assert str(finished.value) == f"{refused} (writing {run.dir}): {advice}"
        assert sorted(p.name for p in run.dir.iterdir()) == ["params.yaml"] and not new.exists()


# ---------------------------------------------------------------- the same through the command line
@pytest.mark.parametrize("fault", ["full_disk", "read_only"])
def test_train_on_a_full_or_read_only_store_is_one_error_line_and_exit_2(tmp_path, request, capsys, fault):
    store = tmp_path / "runs"
    store.mkdir()
    file = tmp_path / "smoke.yaml"
    file.write_text((ROOT / "params" / "smoke.yaml").read_text() + f"run_root: {store}\nprogress: false\n")
    params.load(file, "baseline")  # a valid file: what fails is the store
    inject = request.getfixturevalue(fault)
    if fault == "read_only":
        inject(store)
    assert main(["train", str(file)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
    assert ("no space left on device in " + str(store / "baseline")) in err if fault == "full_disk" else \
        f"the run store {store} is read-only" in err
    assert list(store.iterdir()) == []  # no run folder left behind
