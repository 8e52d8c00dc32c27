import os
import pickle

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
        with pytest.raises(RunStoreError, match=str(path.name)):
            runs.load_torch(path)
    assert not (tmp_path / "pwned").exists() and not os.path.exists("pwned")
    assert torch.equal(runs.load_torch(good)["w"], torch.ones(3))
