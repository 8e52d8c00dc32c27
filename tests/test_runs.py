import os
import pickle
import time

import pytest
import torch

from resnet_lab import params, runs
from resnet_lab.runs import RunStoreError


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "metrics.json"
    runs.write_json(target, {"acc": 1})

    def explode(f):
        f.write(b"{partial")
        raise OSError("disk full")

    with pytest.raises(OSError):
        runs.atomic_write(target, explode)
    assert runs.read_json(target) == {"acc": 1}
    assert os.listdir(tmp_path) == ["metrics.json"]  # no temp file left behind


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_written_files_honour_the_umask_as_a_plain_open_does(tmp_path, umask):
    # Before: every file written through the temp file + rename was 0600 whatever the umask (issue 17, item 3).
    old = os.umask(umask)
    try:
        runs.write_json(tmp_path / "metrics.json", {"acc": 1})
        runs.write_text(tmp_path / "report.html", "<p>")
        runs.save_torch(tmp_path / "model.pt", {"w": torch.zeros(1)})
        with open(tmp_path / "plain", "w"):
            pass
    finally:
        os.umask(old)
    expected = (tmp_path / "plain").stat().st_mode & 0o777
    assert expected == 0o666 & ~umask
    for name in ("metrics.json", "report.html", "model.pt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == expected, name


def test_json_refuses_nan_and_reports_corruption(tmp_path):
    with pytest.raises(ValueError):
        runs.write_json(tmp_path / "m.json", {"acc": float("nan")})
    (tmp_path / "bad.json").write_text("{trunc")
    with pytest.raises(RunStoreError, match="not valid JSON"):
        runs.read_json(tmp_path / "bad.json")


def test_run_key_follows_the_parameters_that_matter(tmp_path):
    p = params.validate({}, "baseline")
    store = runs.RunStore(tmp_path)
    run = store.run("baseline", p)
    assert store.run("baseline", dict(p, run_root="x", progress=False)).dir == run.dir
    assert store.run("baseline", dict(p, lr=0.3)).dir != run.dir
    assert params.validate(run.params, "baseline") == p
    assert not run.done
    run.finish({"test_acc": 50.0})
    assert run.done and run.metrics == {"test_acc": 50.0}
    other = store.run("baseline", dict(p, lr=0.3))
    assert {r.dir for r in store.runs("baseline")} == {r.dir for r in store.runs()} == {run.dir, other.dir}


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_unsafe_truncated_and_missing_checkpoints_are_refused(tmp_path):
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"w": _Evil()}))
    torch_evil = tmp_path / "torch_evil.pt"
    torch.save({"w": _Evil()}, torch_evil)
    good = tmp_path / "good.pt"
    runs.save_torch(good, {"w": torch.ones(3)})
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:50])
    for path in (evil, torch_evil, truncated, tmp_path / "missing.pt"):
        with pytest.raises(RunStoreError, match=str(path.name)) as refused:
            runs.load_torch(path)
        # Before: torch's advice to retry with weights_only=False was quoted (issue 17, item 7)
        assert "weights_only" not in str(refused.value) and "will likely succeed" not in str(refused.value)
    with pytest.raises(RunStoreError, match=r"refused: it holds Python code or objects \(posix\.system\)"):
        runs.load_torch(torch_evil)
    assert not (tmp_path / "pwned").exists() and not os.path.exists("pwned")
    assert torch.equal(runs.load_torch(good)["w"], torch.ones(3))


def test_a_run_file_is_read_only_inside_its_folder(tmp_path):
    # Before: a stored `artifact` path or a symlink leading outside the run folder was followed (issue 17, item 6).
    store = runs.RunStore(tmp_path / "runs")
    run = store.run("svd", {"x": 1})
    run.dir.mkdir(parents=True, exist_ok=True)
    (run.dir / "model.pt").write_bytes(b"weights")
    assert run.file("model.pt") == run.dir / "model.pt"
    outside = tmp_path / "secret.pt"
    outside.write_bytes(b"not the lab's")
    (run.dir / "link.pt").symlink_to(outside)
    for name in ("link.pt", "../../../secret.pt", str(outside)):
        with pytest.raises(RunStoreError, match="leads outside its run folder"):
            run.file(name)
    with pytest.raises(RunStoreError, match="is missing"):
        run.file("gone.pt")


@pytest.mark.parametrize("metrics, reason", [
    ('{"test_acc": "high", "label": "x"}', "'test_acc' = 'high' is not a percentage"),
    ('{"test_acc": NaN, "label": "x"}', "holds NaN"),
    ('{"test_acc": 250.0}', "'test_acc' = '250.0' is not a percentage"),
    ('{"test_acc": 70.0, "label": ["not", "text"]}', "'label' is list, not text"),
    ('[70.0]', "not a mapping of metrics"),
])
def test_a_damaged_but_parseable_metrics_file_names_the_file_and_the_field(tmp_path, metrics, reason):
    # Before: a string accuracy crashed 06 and 03 with no file named; a stored NaN was taken as reproduced
    # (issue 17, item 6).
    run = runs.RunStore(tmp_path / "runs").run("svd", {"x": 1})
    run.path("metrics.json").write_text(metrics)
    with pytest.raises(RunStoreError, match="metrics.json") as refused:
        run.metrics
    assert reason in str(refused.value)


def test_a_run_params_file_that_leads_to_an_endless_file_is_refused(tmp_path):
    run = runs.RunStore(tmp_path / "runs").run("svd", {"x": 1})
    run.path("params.yaml").unlink()
    run.path("params.yaml").symlink_to("/dev/zero")
    with pytest.raises(RunStoreError, match="larger than"):
        run.params
    shared = [1, 2]
    assert "&" not in params.dump_yaml({"a": shared, "b": shared})  # what the lab writes, read_yaml reads back


def test_a_killed_write_leaves_no_temp_file_for_good(tmp_path):
    # Before: a checkpoint write killed half-way left its .tmp file in the run folder forever (issue 17, item 7).
    run = runs.RunStore(tmp_path / "runs").run("svd", {"x": 1})
    stale, fresh = run.path(".model.pt.abc123.tmp"), run.path(".metrics.json.def456.tmp")
    stale.write_bytes(b"half a checkpoint")
    fresh.write_bytes(b"a write in progress")
    old = time.time() - runs.STALE_TMP_S - 60
    os.utime(stale, (old, old))
    with run.lock():
        pass
    assert not stale.exists() and fresh.exists()  # a write of this minute may be another process's, in progress


def test_a_read_only_store_can_be_read(tmp_path, monkeypatch):
    # Before: reusing a finished run opened its lock file for writing, so a read-only store could not be read
    # (issue 17, item 7). The store is made read-only the way the kernel answers (EACCES on opening the lock
    # file), which also holds when the tests run as root, who writes through permission bits.
    import errno

    run = runs.RunStore(tmp_path / "runs").run("svd", {"x": 1})
    runs.write_json(run.path("metrics.json"), {"test_acc": 70.0})
    unfinished = runs.RunStore(tmp_path / "runs").run("svd", {"x": 2})

    def read_only(path, busy=None):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(runs, "file_lock", read_only)
    with run.lock():
        assert run.metrics["test_acc"] == 70.0
    with pytest.raises(RunStoreError, match="not finished and its store cannot be written"):
        with unfinished.lock():
            pass


@pytest.mark.parametrize("key", ["../../etc", "..", "", "a/b", 7, None])
def test_a_run_key_read_from_a_shared_store_never_leads_outside_it(tmp_path, key):
    with pytest.raises(RunStoreError, match="is not the name of a run folder"):
        runs.Run(runs.RunStore(tmp_path / "runs"), "baseline", key)
