"""Interruptions, corrupt or foreign files and concurrent runs: each is refused clearly or survived whole."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from resnet_lab import baselines, models, packed, params, runs, train
from resnet_lab.stages import pruning
from resnet_lab.runs import RunStoreError

from conftest import PARAMS, ROOT

# A smoke recipe slow enough (about a second an epoch) to be killed between two checkpoints.
SLOW = {"synthetic_train": 1024, "epochs": 4, "progress": False, "seeds": []}  # one run: the run of `seed`


def _params_file(tmp_path, name, **values):
    doc = {**yaml.safe_load((PARAMS / "smoke.yaml").read_text()), **SLOW, "run_root": str(tmp_path / "runs"), **values}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _train(path, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1")  # several processes on 2 cores: no oversubscription
    return subprocess.Popen([sys.executable, "-m", "resnet_lab", "train", str(path)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _strip(history):
    return [{k: v for k, v in r.items() if not k.endswith("time_s")} for r in history]


def test_training_killed_mid_epoch_resumes_from_its_last_epoch_with_the_same_history(tmp_path):
    (tmp_path / "ref").mkdir()
    reference = _train(_params_file(tmp_path / "ref", "p"))  # the same run, uninterrupted, in another store
    path = _params_file(tmp_path, "p")
    p = params.load(path, "baseline")
    run = runs.RunStore(p["run_root"]).run("baseline", p, create=False)
    proc = _train(path)
    deadline = time.time() + 120
    while not run.path("checkpoint.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)  # mid-epoch 2 (or later): the checkpoint holds the last complete epoch
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not run.done  # an unfinished run is never taken as finished
    saved = runs.load_torch(run.path("checkpoint.pt"))
    done_epochs = len(saved["history"])
    assert 1 <= done_epochs < SLOW["epochs"]

    resumed = _train(path)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-2000:]
    assert "trained" in out
    ref_out, ref_err = reference.communicate(timeout=300)
    assert reference.returncode == 0, ref_err[-2000:]
    ref_run = runs.RunStore(tmp_path / "ref" / "runs").run("baseline", dict(p, run_root=str(tmp_path / "ref" / "runs")),
                                                          create=False)
    history, ref_history = run.read_json("history.json"), ref_run.read_json("history.json")
    assert history[:done_epochs] == saved["history"]  # epochs before the kill kept as they were, timings too: not redone
    assert _strip(history) == _strip(ref_history)  # and the rest is what an uninterrupted run computes
    assert run.metrics["test_acc"] == ref_run.metrics["test_acc"]
    assert not run.path("checkpoint.pt").exists()


def test_two_processes_on_one_run_train_it_once_and_both_get_it(tmp_path):
    path = _params_file(tmp_path, "p", epochs=3)
    first, second = _train(path), _train(path)
    outs = [proc.communicate(timeout=300) for proc in (first, second)]
    assert [proc.returncode for proc in (first, second)] == [0, 0], [e[-1000:] for _, e in outs]
    states = sorted(out.split()[0] for out, _ in outs)
    assert states == ["reused", "trained"]  # the second waited on the run's lock, then reused it
    p = params.load(path, "baseline")
    store = runs.RunStore(p["run_root"])
    [run] = store.runs("baseline")
    assert run.done and len(run.read_json("history.json")) == 3
    assert not [f for f in os.listdir(run.dir) if f.endswith(".tmp") or f == "checkpoint.pt"]


# ---------------------------------------------------------------- corrupt and foreign files
@pytest.fixture
def trained(baseline_store):
    """The finished smoke baseline in this test's own store (conftest's `baseline_store`), and its params."""
    smoke = params.load(PARAMS / "smoke.yaml", "baseline")
    smoke.update(run_root=str(baseline_store), progress=False)
    return baselines.train(smoke), smoke


@pytest.mark.parametrize("damage", ["truncated", "random bytes", "other width", "other architecture"])
def test_a_damaged_or_foreign_baseline_checkpoint_is_refused_naming_the_file(trained, damage):
    result, smoke = trained
    path = result.run.path("model.pt")
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "random bytes":
        path.write_bytes(os.urandom(4096))
    elif damage == "other width":
        runs.save_torch(path, models.resnet18(smoke["width"] * 2).state_dict())
    else:
        runs.save_torch(path, torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Linear(8, 10)).state_dict())
    with pytest.raises(RunStoreError, match="model.pt"):
        baselines.train(smoke)
    p = params.load(PARAMS / "quantization_smoke.yaml", "quantization")
    p.update(run_root=smoke["run_root"])
    with pytest.raises(RunStoreError, match="model.pt"):  # a later stage stops on it as well, before any work
        baselines.trained(p["baseline"], p)


def test_a_corrupt_metrics_file_is_refused_not_taken_as_a_result(trained):
    result, smoke = trained
    result.run.path("metrics.json").write_text('{"test_acc": 7')
    with pytest.raises(RunStoreError, match="metrics.json"):
        baselines.train(smoke)


@pytest.mark.parametrize("damage", ["truncated", "random bytes", "other architecture", "pickled code"])
def test_a_damaged_or_foreign_packed_model_is_refused(tmp_path, damage):
    model = models.resnet18(4)
    path = packed.save_model(model, tmp_path / "packed.pt", models.arch_of(model))
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:-200])
    elif damage == "random bytes":
        path.write_bytes(os.urandom(8192))
    elif damage == "other architecture":  # the weights of a width-4 net under a width-8 record
        packed.save(model.state_dict(), path, {**models.arch_of(model), "width": 8})
    else:  # a complete, valid file whose arch record runs a shell command when unpickled
        torch.save({**packed.pack(model.state_dict(), models.arch_of(model)), "arch": _Evil(tmp_path / "pwned")}, path)
    with pytest.raises(RunStoreError, match="packed.pt"):
        packed.load_model(path)
    assert not (tmp_path / "pwned").exists()


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_a_refused_params_file_creates_no_run_directory(tmp_path):
    bad = _params_file(tmp_path, "bad", epochs=0)
    r = subprocess.run([sys.executable, "-m", "resnet_lab", "train", str(bad)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "'epochs' = 0 is out of range" in r.stderr
    assert not (tmp_path / "runs").exists()


def test_report_of_a_stage_without_its_upstream_names_the_command(tmp_path):
    p = params.load(PARAMS / "pruning_smoke.yaml", "pruning")
    p.update(run_root=str(tmp_path / "empty"))
    with pytest.raises(baselines.UpstreamMissing, match="papermill notebooks/01_baseline.ipynb out.ipynb -f params/smoke.yaml"):
        pruning.run(p)
    assert not (tmp_path / "empty").exists()


@pytest.mark.slow
def test_two_report_builds_at_once_take_turns_and_the_second_finds_the_report_up_to_date(tmp_path):
    code = ("import sys; from resnet_lab import report; "  # one epoch: what is tested is the lock, not the training
            f"sys.exit(report.build('smoke', {str(tmp_path / 'reports')!r}, only=['01_baseline'], "
            f"overrides={{'run_root': {str(tmp_path / 'runs')!r}, 'progress': False, 'epochs': 1}}))")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for _, e in outs]
    assert sum("another build is writing" in err for _, err in outs) == 1  # one waited for the other
    assert sum("01_baseline: up to date" in out for out, _ in outs) == 1  # the second found the first's report
    html = (tmp_path / "reports" / "01_baseline.html").read_text()
    assert "trained now into" in html and "Traceback" not in html
    baselines = runs.RunStore(tmp_path / "runs").runs("baseline")
    assert len(baselines) == len(params.load(PARAMS / "smoke.yaml", "baseline")["seeds"])  # one per seed, each once
    assert all(run.done for run in baselines)
