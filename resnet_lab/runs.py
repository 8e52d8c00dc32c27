"""Run store: one directory per (stage, parameters), written atomically, read back safely.

    runs/<stage>/<hash>/params.yaml     resolved parameters (written first)
                        checkpoint.pt   training state after the last complete epoch (while running)
                        model.pt        final weights (a state_dict)
                        *.json          history, ...
                        predictions.npz predicted class of every test and validation image (uint8: one byte
                                        per image), so any two models can be compared image by image later
                        metrics.json    written last: its presence means the run is finished

The hash is taken over the parameters that decide the result (see `params.identity`), so the
same parameters find the same run and a finished stage is reused instead of recomputed.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import os
import pickle
import re
import sys
import tempfile
import time
import zipfile
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch

from . import config as params_mod

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# Bump when the meaning of stored runs changes, so old runs are not reused by mistake.
STORE_FORMAT = 3  # 2: per-epoch curves evaluated single-view; 3: steps keyed by their parent run, predictions.npz


class RunStoreError(RuntimeError):
    """A run or file in the store is missing or unreadable; the message says which and why."""


def shown(path: str | os.PathLike) -> str:
    """A path as a report shows it: relative to the repository root when it lies inside it (a report names no
    folder of the machine it was built on), else as given."""
    try:
        return str(Path(path).relative_to(PROJECT_ROOT))
    except ValueError:
        return str(path)


def resolve(path: str | os.PathLike) -> Path:
    """Relative paths are taken from the repository root, so notebooks work from any folder."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else PROJECT_ROOT / p


# ---------------------------------------------------------------- atomic writes and safe reads
def atomic_write(path: str | os.PathLike, write: Callable[[io.BufferedWriter], None],
                 store: str | os.PathLike | None = None) -> Path:
    """Write through `write(file)` into a temp file beside `path`, fsync, then rename over `path`.

    A crash leaves either the old file or the new one, never a partial file under the final name. The file gets
    the mode a plain `open` would give it (0666 less the umask: 0644 under the usual 022), not the temp file's 0600,
    so that reports and run stores can be read by a web server, a group or a colleague.

    A write the file system refuses (full disk or quota, read-only, not permitted) raises `RunStoreError`, one line
    naming the folder and what to do (`store`: the run store it belongs to, for the advice); the temp file is
    removed and `path` keeps its old content. Other errors propagate as they are.
    """
    path = Path(path)
    with refused_writes(path.parent, store):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            os.fchmod(fd, 0o666 & ~_umask())
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
    return path


# what the file system answers when the store cannot take a write: nothing the lab can fix by retrying
NO_SPACE = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}
READ_ONLY = {errno.EROFS: "is read-only", errno.EACCES: "cannot be written by this user",
             errno.EPERM: "cannot be written by this user"}


def _refusal(err: BaseException) -> OSError | None:
    """The OSError of a full, read-only or forbidden file system behind `err`, if any. torch.save reports a failed
    write of its zip writer as a RuntimeError whose context is the OSError, so the chain is searched."""
    seen = 0
    while err is not None and seen < 8:
        if isinstance(err, OSError) and (err.errno in NO_SPACE or err.errno in READ_ONLY):
            return err
        if not isinstance(err, (OSError, RuntimeError)):
            return None
        err, seen = err.__cause__ or err.__context__, seen + 1
    return None


@contextlib.contextmanager
def refused_writes(folder: str | os.PathLike, store: str | os.PathLike | None = None) -> Iterator[None]:
    """Writes into `folder` that the file system refuses (ENOSPC, EDQUOT, EROFS, EACCES, EPERM) become one
    `RunStoreError` line naming the folder and what to do; `store` is the run store the folder belongs to."""
    try:
        yield
    except RunStoreError:
        raise
    except (OSError, RuntimeError) as e:
        err = _refusal(e)
        if err is None:
            raise
        raise RunStoreError(_refusal_message(err, Path(folder), store)) from None


def _refusal_message(err: OSError, folder: Path, store: str | os.PathLike | None) -> str:
    name = Path(err.filename) if err.filename else folder
    where = f" (writing {name})" if name != folder and name.parent != folder else ""
    if err.errno in NO_SPACE:
        advice = "free space or point run_root elsewhere" if store is not None else "free space or write elsewhere"
        return f"{NO_SPACE[err.errno]} in {folder}{where}: {advice}; nothing was half-written"
    if store is None:
        return f"the folder {folder} {READ_ONLY[err.errno]}{where}: make it writable or write elsewhere"
    if Path(store) != folder:
        where = f" (writing {name if where else folder})"
    return (f"the run store {store} {READ_ONLY[err.errno]}{where}: make it writable or point run_root at a writable "
            f"folder (its finished runs can still be read)")


def _umask() -> int:
    """The process's umask (read by setting it and setting it back: POSIX has no other way before Linux 4.7's
    /proc status field, which is read first)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_json(path: str | os.PathLike, obj: Any, store: str | os.PathLike | None = None) -> Path:
    data = json.dumps(obj, indent=1, allow_nan=False).encode()
    return atomic_write(path, lambda f: f.write(data), store)


def write_text(path: str | os.PathLike, text: str, store: str | os.PathLike | None = None) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode()), store)


def save_torch(path: str | os.PathLike, obj: Any, store: str | os.PathLike | None = None) -> Path:
    return atomic_write(path, lambda f: torch.save(obj, f), store)


STALE_TMP_S = 600  # a temp file this old in a run folder is a write that was killed (writes take seconds)
MAX_JSON_BYTES = 50_000_000  # a run's record; a larger file (or a symlink to an endless one) is refused unread


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"it holds {name}, which the lab never writes")


def read_json(path: str | os.PathLike) -> Any:
    """A JSON file the lab wrote: bounded in size, strict (NaN and Infinity, which `write_json` refuses to
    write, are refused when read: a NaN accuracy is not a result)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_JSON_BYTES + 1)
    except FileNotFoundError:
        raise RunStoreError(f"{path} does not exist") from None
    except OSError as e:
        raise RunStoreError(f"{path} cannot be read: {e.strerror}") from None
    if len(raw) > MAX_JSON_BYTES:
        raise RunStoreError(f"{path} is larger than {MAX_JSON_BYTES:,} bytes: not a file the lab wrote")
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # JSONDecodeError is a ValueError
        reason = str(e)[:200] if not isinstance(e, RecursionError) else "nested too deeply"
        raise RunStoreError(f"{path} is not valid JSON ({reason}); delete the run folder to recompute it") from None


def load_torch(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """Load tensors and plain containers with `weights_only=True`: no code from the file runs."""
    path = Path(path)
    if not path.is_file():
        raise RunStoreError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only load failed" not in str(e).lower():
            raise RunStoreError(f"checkpoint {path} cannot be loaded safely: {_first_line(e)}") from None
        # torch's message advises retrying with weights_only=False, which would run the file's code: not ours to give
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f" ({found.group(1)})" if found else ""
        raise RunStoreError(f"checkpoint {path} is refused: it holds Python code or objects{what} beyond tensors and "
                            "plain containers, which resnet-lab never writes; it was made elsewhere or altered, and "
                            "the lab does not run code from a file") from None
    except Exception as e:  # torch raises many types for truncated, foreign or malicious files
        raise RunStoreError(f"checkpoint {path} cannot be loaded safely: {_first_line(e)}") from None


def _checked_metrics(m: Any, path: Path) -> dict[str, Any]:
    """A run's metrics, checked where readers rely on them: a mapping whose accuracies (`*_acc`) are percentages
    and whose label is text; anything else names the file and the field, and the run is not used."""
    if not isinstance(m, dict):
        raise RunStoreError(f"{path} holds {type(m).__name__}, not a mapping of metrics")
    for key, value in m.items():
        if key.endswith("_acc") and value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 100):
            raise RunStoreError(f"{path}: '{key}' = {str(value)[:60]!r} is not a percentage")
    for key in ("label", "parent_label"):
        if key in m and not isinstance(m[key], str):
            raise RunStoreError(f"{path}: '{key}' is {type(m[key]).__name__}, not text")
    return m


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, busy: str | None = None) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if missing); another process asking for it waits.
    `busy` is printed when the lock is held elsewhere, before waiting."""
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if busy:
                print(busy, file=sys.stderr, flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ---------------------------------------------------------------- runs
def run_key(stage: str, values: Mapping[str, Any]) -> str:
    ident = {"stage": stage, "format": STORE_FORMAT, "params": params_mod.identity(values)}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]


PREDICTIONS = "predictions.npz"
MAX_PREDICTIONS = 10_000_000  # images of one split, when the caller gives no size (CIFAR-10 has 60,000 in all)
MAX_SPLITS = 16  # arrays in one predictions file (the lab writes test and val)


def _read_predictions(path: Path, sizes: dict[str, int]) -> dict[str, torch.Tensor]:
    """Read predictions.npz member by member, checking each .npy header (version, dtype, shape) before its data."""
    from numpy.lib import format as npy

    out = {}
    with zipfile.ZipFile(path) as z:
        members = z.infolist()
        if len(members) > MAX_SPLITS:
            raise RunStoreError(f"{path} holds {len(members):,} arrays, not one per split (at most {MAX_SPLITS}); "
                                "delete the run folder to recompute it")
        for member in members:
            split = member.filename[:-4] if member.filename.endswith(".npy") else member.filename
            with z.open(member) as f:
                version = npy.read_magic(f)
                if version == (1, 0):
                    shape, _, dtype = npy.read_array_header_1_0(f)
                elif version == (2, 0):
                    shape, _, dtype = npy.read_array_header_2_0(f)
                else:
                    raise ValueError(f"array '{split}' has .npy format {version}, which predictions never use")
                bound = sizes.get(split, MAX_PREDICTIONS)
                if dtype != np.uint8 or len(shape) != 1 or not 0 <= shape[0] <= bound:
                    what = f"{'x'.join(map(str, shape)) or 'scalar'} {dtype}"
                    limit = f"the {bound:,} images of split '{split}'" if split in sizes else f"{bound:,} images"
                    raise RunStoreError(f"{path}: array '{split}' is {what}, not one uint8 class per image of at most "
                                        f"{limit}; refused unread (a damaged or foreign file); delete the run folder "
                                        "to recompute it")
                raw = f.read(shape[0])
                if len(raw) != shape[0]:
                    raise ValueError(f"array '{split}' is truncated: {len(raw):,} of {shape[0]:,} bytes")
            out[split] = torch.from_numpy(np.frombuffer(raw, dtype=np.uint8).astype(np.int64))
    return out


class Run:
    """One stage's outputs for one parameter set."""

    def __init__(self, store: "RunStore", stage: str, key: str):
        for part in (stage, key):  # a key read from a shared run's params.yaml must not lead out of the store
            if not isinstance(part, str) or part in ("", ".", "..") or "/" in part or "\0" in part or os.sep in part:
                raise RunStoreError(f"{str(part)[:80]!r} is not the name of a run folder (a run is <stage>/<key> "
                                    f"inside {store.root})")
        self.store, self.stage, self.key = store, stage, key
        self.dir = store.root / stage / key

    def __repr__(self) -> str:
        return f"Run({self.stage}/{self.key}{', done' if self.done else ''})"

    def __str__(self) -> str:
        return shown(self.dir)

    def path(self, name: str) -> Path:
        return self.dir / name

    def file(self, name: str) -> Path:
        """The existing file `name` of this run, to read: a plain file inside the run folder. A run store is
        shared, so a symlink or a name leading out of the folder (`../../x`, `/etc/x`) is refused, not followed."""
        path = self.path(name)
        if path.resolve().parent != self.dir.resolve():
            raise RunStoreError(f"{path} leads outside its run folder {self.dir}: not read")
        if not path.is_file():
            raise RunStoreError(f"{path} is missing")
        return path

    @property
    def done(self) -> bool:
        return self.path("metrics.json").is_file()

    @property
    def params(self) -> dict[str, Any]:
        """The run's params.yaml, read as a params file is (bounded size, no aliases: `params.read_yaml`)."""
        try:
            return params_mod.read_yaml(self.path("params.yaml"))
        except params_mod.ParamsError as e:
            raise RunStoreError(str(e)) from None

    def write_json(self, name: str, obj: Any) -> Path:
        return write_json(self.path(name), obj, self.store.root)

    def read_json(self, name: str) -> Any:
        return read_json(self.path(name))

    def save_weights(self, state_dict: Mapping[str, torch.Tensor], name: str = "model.pt") -> Path:
        return save_torch(self.path(name), dict(state_dict), self.store.root)

    def load_weights(self, name: str = "model.pt") -> dict[str, torch.Tensor]:
        sd = load_torch(self.path(name))
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise RunStoreError(f"{self.path(name)} is not a state_dict")
        return sd

    def save_predictions(self, predictions: Mapping[str, torch.Tensor]) -> Path:
        """Store the predicted class of every image of each split ({split: classes}), one byte per image."""
        arrays = {split: np.asarray(t.cpu(), dtype=np.uint8) for split, t in predictions.items()}
        return atomic_write(self.path(PREDICTIONS), lambda f: np.savez(f, **arrays), self.store.root)

    def predictions(self, sizes: Mapping[str, int] | None = None) -> dict[str, torch.Tensor]:
        """{split: predicted class per image} as `save_predictions` stored it (read without unpickling).

        A run store is shared, so each array's header is read before its data: an array that is not one byte per
        image (uint8, 1-D) or holds more images than its split (`sizes`: {split: images}, from the caller) or, for
        a split not given, than `MAX_PREDICTIONS`, is refused unread, so a small file that would decompress to
        gigabytes raises `RunStoreError`, not `MemoryError`."""
        path = self.path(PREDICTIONS)
        try:
            return _read_predictions(path, dict(sizes or {}))
        except FileNotFoundError:
            raise RunStoreError(f"{path} does not exist") from None
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError) as e:
            raise RunStoreError(f"{path} is not a predictions file ({_first_line(e)}); delete the run folder to "
                                "recompute it") from None

    def finish(self, metrics: Mapping[str, Any]) -> None:
        """Mark the run finished by writing metrics.json, the last file of every run."""
        self.write_json("metrics.json", dict(metrics))

    @property
    def metrics(self) -> dict[str, Any]:
        if not self.done:
            raise RunStoreError(f"run {self.dir} is not finished (no metrics.json)")
        return _checked_metrics(self.read_json("metrics.json"), self.path("metrics.json"))

    @contextlib.contextmanager
    def lock(self) -> Iterator["Run"]:
        """Exclusive lock on this run: a second process computing the same run waits, then reuses it. Holding it,
        the temp files of writes that were killed half-way (`atomic_write`'s `.name.*.tmp`, older than
        `STALE_TMP_S`) are removed. A finished run of a store this process cannot write (a read-only archive, a
        colleague's folder) is read without a lock: nobody can change it."""
        with contextlib.ExitStack() as held:
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
                held.enter_context(file_lock(self.path(".lock")))
            except OSError as e:
                if e.errno in NO_SPACE:  # a full disk: one line naming the folder, not a traceback
                    raise RunStoreError(_refusal_message(e, self.dir, self.store.root)) from None
                if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                    raise
                if not self.done:
                    raise RunStoreError(f"run {self.dir} is not finished and its store cannot be written "
                                        f"({e.strerror})") from None
            else:
                self._sweep()
            yield self

    def _sweep(self) -> None:
        now = time.time()
        for tmp in self.dir.glob(".*.tmp"):
            with contextlib.suppress(OSError):
                if now - tmp.stat().st_mtime > STALE_TMP_S:
                    tmp.unlink()


class RunStore:
    def __init__(self, root: str | os.PathLike = "runs"):
        self.root = resolve(root)

    def run(self, stage: str, values: Mapping[str, Any], create: bool = True) -> Run:
        """The run of `stage` for these (validated) parameters; its folder and params.yaml are created
        unless `create` is False (a lookup of an upstream run)."""
        run = Run(self, stage, run_key(stage, values))
        if create and not run.path("params.yaml").is_file():
            made = [d for d in (run.dir, run.dir.parent, self.root) if not d.is_dir()]
            try:
                with refused_writes(run.dir, self.root):
                    run.dir.mkdir(parents=True, exist_ok=True)
                write_text(run.path("params.yaml"), params_mod.dump_yaml(values), self.root)
            except RunStoreError:  # a full or read-only store: leave no empty run folder behind
                for d in made:
                    with contextlib.suppress(OSError):
                        d.rmdir()
                raise
        return run

    def runs(self, stage: str | None = None) -> list[Run]:
        """Every run folder of `stage` (or of all stages), finished or not."""
        if not self.root.is_dir():
            return []
        stage_dirs = [self.root / stage] if stage else sorted(p for p in self.root.iterdir() if p.is_dir())
        return [Run(self, d.name, p.name) for d in stage_dirs if d.is_dir() for p in sorted(d.iterdir()) if p.is_dir()]
