"""02_optuna: an honest, resumable, shareable study."""
import contextlib
import os
import signal
import subprocess
import sys
import time

import numpy as np
import optuna
import pytest
import yaml

from resnet_lab import params, train, tune
from resnet_lab.__main__ import main
from resnet_lab.params import ParamsError

from conftest import ROOT

SPACE = {"lr": {"sgd": [0.01, 0.2], "adam": [1.0e-4, 1.0e-2]}, "optimizer": ["sgd", "adam"],
         "batch_size": [32, 64], "label_smoothing": [0.0, 0.2], "scheduler": ["onecycle", "cosine"]}


def tiny(tmp_path, **over):
    values = {"data": "synthetic", "synthetic_train": 256, "synthetic_test": 64, "val_fraction": 0.25, "width": 8,
              "epochs": 2, "batch_size": 32, "lr": 0.05, "trial_width": 4, "trial_epochs": 2, "n_trials": 4,
              "progress": False, "run_root": str(tmp_path / "runs"), "search_space": SPACE, **over}
    return params.validate(values, "optuna")


def finished(study):
    return study.get_trials(deepcopy=False, states=tune.FINISHED)


def test_tiny_study_never_sees_the_test_set_and_writes_a_baseline_params_file(tmp_path, monkeypatch):
    seen_test_sizes = []
    real_fit = train.fit

    def spy(model, dataset, p, *a, **k):
        seen_test_sizes.append(len(dataset.test))
        assert p["test_each_epoch"] is False and p["width"] == 4
        return real_fit(model, dataset, p, *a, **k)

    monkeypatch.setattr(train, "fit", spy)
    p = tiny(tmp_path)
    study = tune.run(p)
    assert len(finished(study)) == 4 and seen_test_sizes == [0] * len(study.trials)
    first = study.trials[0].params  # the base recipe, enqueued as trial 0
    assert first["optimizer"] == "sgd" and first["lr_sgd"] == 0.05 and first["batch_size"] == 32
    for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)):  # each kept its validation predictions
        right = tune.val_correct(t)
        assert len(right) == 64 and 100 * right.mean() == pytest.approx(t.value)
    choice = tune.choose(study, p)
    best = params.load(tune.write_best(study, p, choice), "baseline")  # 01_baseline accepts it unchanged
    assert best["width"] == 8 and best["epochs"] == 2  # the final recipe's scale, not the proxy's
    lr_key = f"lr_{best['optimizer']}"
    assert best["lr"] == choice.trial.params[lr_key] and best["batch_size"] == choice.trial.params["batch_size"]
    table = tune.trials_table(study)
    assert list(table["state"]) == ["COMPLETE"] * 4 or "PRUNED" in set(table["state"])
    assert {"val_acc (%)", "duration (s)", "optimizer"} <= set(table.columns)
    figures = tune.plots(study)
    assert set(figures) == {"optimization history", "hyperparameter importances", "parallel coordinates", "contour", "slice"}
    # rerunning with the same parameters resumes the same study and runs nothing more
    again = tune.run(p)
    assert again.study_name == study.study_name and len(again.trials) == len(study.trials)


def scripted_study(p, results, enqueue_base=True):
    """An in-memory study whose trials draw their values as `tune.run`'s do but, instead of training, score the
    given per-image validation correctness (the first one is the base recipe's trial when `enqueue_base`)."""
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    if enqueue_base:
        study.enqueue_trial(tune._base_values(p))
    scores = iter(results)

    def objective(trial):
        tune.sample(trial, p["search_space"], p)
        right = np.asarray(next(scores), bool)
        tune.store_val_correct(trial, right)
        return 100 * right.mean()

    study.optimize(objective, n_trials=len(results))
    return study


def correctness(n_right, n=400, flip=(0, 0)):
    """`n_right` of `n` images right; `flip` = (wrong images made right, right images made wrong) after that."""
    right = np.arange(n) < n_right
    right[n_right:n_right + flip[0]] = True
    right[:flip[1]] = False
    return right


def test_the_best_trial_replaces_the_base_recipe_only_when_validation_tells_them_apart(tmp_path):
    p = tiny(tmp_path)
    base = correctness(240)
    # the best trial 1.0 pt above the base, 10 images only it gets right and 6 only the base: not told apart
    close = scripted_study(p, [base, correctness(240, flip=(10, 6)), correctness(200)])
    choice = tune.choose(close, p)
    assert close.best_trial.number == 1 and choice.kept_base and choice.trial.number == 0
    assert (choice.pair.a_only, choice.pair.b_only) == (10, 6) and choice.pair.p > 0.05
    assert "not told apart" in choice.reason
    written = params.load(tune.write_best(close, p, choice), "baseline")
    assert params.identity(written) == params.identity(params.validate(tune.recipe(p), "baseline"))  # 01's own run
    assert "the base recipe" in (tune.study_dir(p) / "best.yaml").read_text().splitlines()[0]
    # 25 images better and none worse: told apart, so the best trial's values are retrained
    far = scripted_study(p, [base, correctness(240, flip=(25, 0))])
    choice = tune.choose(far, p)
    assert not choice.kept_base and choice.trial.number == 1 and choice.pair.p < 0.05 and "told apart" in choice.reason
    written = tune.best_params(far, p, choice)
    assert written["batch_size"] == far.trials[1].params["batch_size"]
    # keep_base off: the best trial, even when nothing tells it apart
    off = tiny(tmp_path, keep_base=False)
    assert tune.choose(close, off).trial.number == 1 and "keep_base is off" in tune.choose(close, off).reason


def test_without_a_base_trial_or_its_predictions_the_best_trial_is_taken(tmp_path):
    p = tiny(tmp_path)
    no_base = scripted_study(p, [correctness(200), correctness(240)], enqueue_base=False)
    choice = tune.choose(no_base, p)
    assert choice.base is None and choice.trial.number == 1 and "no completed trial of the base recipe" in choice.reason
    scored = scripted_study(p, [correctness(200), correctness(240)])
    old_trials = optuna.create_study(direction="maximize")  # the same trials, from before trials kept predictions
    for t in scored.trials:
        old_trials.add_trial(optuna.trial.create_trial(params=t.params, distributions=t.distributions, value=t.value))
    choice = tune.choose(old_trials, p)
    assert choice.base is not None and choice.pair is None and choice.trial.number == 1
    assert "no stored validation predictions" in choice.reason


def test_pruned_trials_are_recorded_and_the_study_goes_on(tmp_path):
    p = tiny(tmp_path, n_trials=3)
    study = tune.run(p, pruner=optuna.pruners.ThresholdPruner(lower=101.0))  # prunes every trial after epoch 1
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.PRUNED] * 3
    assert all(t.last_step == 1 for t in study.trials)


def test_diverged_trials_are_recorded_as_pruned_and_the_study_goes_on(tmp_path, monkeypatch):
    real_fit, calls = train.fit, []

    def diverge_every_other(model, dataset, p, *a, **k):  # a real NaN is tested in test_train
        calls.append(1)
        if len(calls) % 2:
            raise train.TrainingDiverged("training loss became nan at epoch 1, step 3 (lr 0.1); lower the learning rate.")
        return real_fit(model, dataset, p, *a, **k)

    monkeypatch.setattr(train, "fit", diverge_every_other)
    study = tune.run(tiny(tmp_path, n_trials=4, pruner="none"))
    states = [t.state.name for t in study.trials]
    assert states == ["PRUNED", "COMPLETE", "PRUNED", "COMPLETE"]
    assert "lower the learning rate" in study.trials[0].user_attrs["diverged"]


@pytest.mark.parametrize("space, message", [
    ({"lr": [0.3, 0.01]}, "low 0.3 > high 0.01"),
    ({"optimizer": ["sgd", "rmsprop"]}, "'rmsprop' is out of range; expected one of 'sgd', 'adam', 'adamw'"),
    ({"lr": {"sgd": [0.01, 0.1], "lion": [0.01, 0.1]}}, "unknown optimizer 'lion'"),
    ({"lr": {"sgd": [0.01, 0.1]}, "optimizer": ["sgd", "adam"]}, "no range for optimizer(s) ['adam']"),
    ({"weight_decay": [0.0, 0.01]}, "log scale, so low must be > 0"),
    ({"weight_decy": [1.0e-5, 0.1]}, "unknown search-space key 'search_space.weight_decy' (did you mean 'weight_decay'?)"),
])
def test_invalid_search_space_fails_before_any_trial(tmp_path, capsys, space, message):
    with pytest.raises(ParamsError) as e:
        tiny(tmp_path, search_space=space)
    assert message in str(e.value)
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump({"search_space": space, "run_root": str(tmp_path / "runs")}))
    # the command line's `tune` verb, in this process (`python -m resnet_lab tune` on a file it refuses, in a process
    # of its own: test_a_storage_that_cannot_be_opened_is_one_line_without_its_password)
    assert main(["tune", str(f)]) == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # nothing was created: no storage, no trial


def _write(tmp_path, name, **over):
    values = {k: v for k, v in tiny(tmp_path, **over).items()}
    f = tmp_path / name
    f.write_text(yaml.safe_dump(values))
    return f, values


def _count(p):
    try:
        return len(finished(optuna.load_study(study_name=tune.study_name(p), storage=tune.storage(p))))
    except KeyError:  # the study does not exist yet
        return 0


def test_study_killed_mid_way_resumes_without_redoing_trials(tmp_path, python):
    f, p = _write(tmp_path, "study.yaml", n_trials=6, pruner="none")  # the tiny study's trials: about a second each
    proc = subprocess.Popen([python, "-m", "resnet_lab", "tune", str(f)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while _count(p) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {t.number: t.params for t in finished(optuna.load_study(study_name=tune.study_name(p), storage=tune.storage(p)))}
    assert 2 <= len(before) < 6, "the kill should land mid-study"

    r = subprocess.run([python, "-m", "resnet_lab", "tune", str(f)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    study = optuna.load_study(study_name=tune.study_name(p), storage=tune.storage(p))
    after = {t.number: t.params for t in finished(study)}
    assert len(after) == 6
    assert all(after[n] == before[n] for n in before)  # finished trials kept, not redone
    unfinished = [t for t in study.trials if t.state not in tune.FINISHED]
    assert len(unfinished) <= 1  # at most the trial the kill interrupted
    drawn = [tuple(sorted(t.params.items())) for t in finished(study)]
    assert len(set(drawn)) == len(drawn)  # the resumed sampler does not replay earlier draws


def test_two_processes_share_one_study(tmp_path, python):
    journal = tmp_path / "shared.journal"
    f, p = _write(tmp_path, "shared.yaml", n_trials=8, synthetic_train=512, trial_epochs=2, pruner="none",
                  storage=f"journal:{journal}", study_name="shared")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one core each: two workers must not oversubscribe 2 cores
    procs = [subprocess.Popen([python, "-m", "resnet_lab", "tune", str(f)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
    study = optuna.load_study(study_name="shared", storage=tune.storage(p))
    trials = finished(study)
    assert 8 <= len(trials) <= 9  # MaxTrialsCallback stops both; one trial may be in flight at the limit
    assert len({t.user_attrs["worker"] for t in trials}) == 2
    assert len({t.number for t in trials}) == len(trials)


# ---------------------------------------------------------------- a study shared by workers started together
import postgres_server  # noqa: E402

WHY_NO_POSTGRES = postgres_server.missing()
needs_postgres = pytest.mark.skipif(WHY_NO_POSTGRES is not None, reason=f"no PostgreSQL server: {WHY_NO_POSTGRES}")

# Each worker imports the lab, says it is ready, waits for the go, then opens the study: all open it within
# milliseconds, which is what happens when several `tune` commands are started at once on a fresh storage. One set
# of workers (one import of the lab each) does this on each kind of storage in turn, each a race of its own.
OPEN_AT_ONCE = """
import sys, time, traceback
from pathlib import Path
from resnet_lab import params, tune
folder, me, storages = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
for kind, url in zip(storages[::2], storages[1::2]):
    p = params.validate({"data": "synthetic", "run_root": str(folder / "runs"), "storage": url, "study_name": "race",
                         "search_space": {"lr": {"sgd": [0.01, 0.2], "adam": [1e-4, 1e-2]}}}, "optuna")
    (folder / f"ready-{kind}-{me}").touch()
    while not (folder / f"go-{kind}").exists():
        time.sleep(0.002)
    try:
        study, created = tune.open_study(p)
        print(kind, "opened", study.study_name, "created" if created else "joined", flush=True)
    except Exception:
        print(kind, "failed:", traceback.format_exc().replace(chr(10), " | "), flush=True)
"""


def _open_together(folder, python, storages, workers=6):
    """{kind: [(return code, what the worker printed for that storage, its stderr)] for each worker}."""
    args = [x for kind_url in storages.items() for x in kind_url]
    procs = [subprocess.Popen([python, "-c", OPEN_AT_ONCE, str(folder), str(i), *args], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(workers)]
    for kind in storages:
        deadline = time.time() + 240
        while (len(list(folder.glob(f"ready-{kind}-*"))) < workers and time.time() < deadline
               and all(proc.poll() is None for proc in procs)):
            time.sleep(0.05)
        (folder / f"go-{kind}").touch()
    done = [(proc.returncode, out, err) for proc in procs for out, err in [proc.communicate(timeout=240)]]
    return {kind: [(rc, "\n".join(line for line in out.splitlines() if line.startswith(f"{kind} ")), err)
                   for rc, out, err in done] for kind in storages}


@pytest.fixture(scope="module")
def opened_together(tmp_path_factory):
    """Six workers started together opening one study on a fresh SQLite file, then on a fresh journal file, then (where
    a server can be started) on a fresh PostgreSQL database: ({kind: storage URL}, {kind: what each worker got},
    the folder they ran in)."""
    folder = tmp_path_factory.mktemp("race")
    storages = {"sqlite": f"sqlite:///{folder / 'fresh.db'}", "journal": f"journal:{folder / 'fresh.journal'}"}
    with contextlib.ExitStack() as stack:
        if WHY_NO_POSTGRES is None:
            storages["postgresql"] = stack.enter_context(postgres_server.server())
        yield storages, _open_together(folder, sys.executable, storages), folder


@pytest.mark.parametrize("kind", ["sqlite", "journal", pytest.param("postgresql", marks=needs_postgres)])
def test_workers_started_together_on_a_fresh_storage_all_open_one_study(opened_together, kind):
    # Before: on a fresh SQLite file 1-3 of 4 workers died ("table studies already exists", "UNIQUE constraint
    # failed: alembic_version"), on PostgreSQL 1-2 of 6 ("duplicate key … pg_type_typname_nsp_index").
    storages, opened, folder = opened_together
    results = opened[kind]
    assert all(rc == 0 and f"{kind} opened race" in out for rc, out, _ in results), [out + err[-600:] for _, out, err in results]
    assert sum("created" in out for _, out, _ in results) == 1  # one creator; the others joined
    p = params.validate({"storage": storages[kind], "study_name": "race", "run_root": str(folder / "runs")}, "optuna")
    assert [s.study_name for s in optuna.get_all_study_summaries(tune.storage(p))] == ["race"]


@needs_postgres
def test_two_tune_workers_share_a_fresh_postgresql_study(tmp_path, python):
    f, _ = _write(tmp_path, "shared.yaml", n_trials=6, synthetic_train=512, trial_epochs=2, pruner="none")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with postgres_server.server() as url:
        procs = [subprocess.Popen([python, "-m", "resnet_lab", "tune", str(f), "--storage", url], cwd=ROOT, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
        for proc in procs:
            _, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err[-2000:]
        p = params.load(f, "optuna")
        study = optuna.load_study(study_name=tune.study_name(p), storage=tune.storage({**p, "storage": url}))
        assert tune.storage({**p, "storage": url}).url.startswith("postgresql+")
        trials = finished(study)
        assert 6 <= len(trials) <= 7  # Optuna's MaxTrialsCallback: at most one extra trial per extra worker
        assert len({t.user_attrs["worker"] for t in trials}) == 2  # both processes ran trials
        assert not [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
        # Before: both workers enqueued the base recipe and drew with the same seed, so trials ran twice
        drawn = [tuple(sorted(t.params.items())) for t in study.trials]
        assert len(set(drawn)) == len(drawn), drawn


def test_a_bare_database_url_gets_an_installed_driver(monkeypatch):
    installed = {"psycopg2", "pymysql"}
    monkeypatch.setattr(tune.importlib.util, "find_spec", lambda name: object() if name in installed else None)
    assert tune.rdb_url("postgresql://u@host/db") == "postgresql+psycopg2://u@host/db"
    assert tune.rdb_url("postgres://u@host/db") == "postgresql+psycopg2://u@host/db"  # Heroku's spelling
    assert tune.rdb_url("mysql://u@host/db") == "mysql+pymysql://u@host/db"
    assert tune.rdb_url("postgresql+psycopg://u@host/db") == "postgresql+psycopg://u@host/db"  # named: kept
    assert tune.rdb_url("sqlite:///x.db") == "sqlite:///x.db"
    installed.clear()
    with pytest.raises(ParamsError, match=r'needs a database driver.*pip install -e "\.\[postgres\]"'):
        tune.rdb_url("postgresql://u@host/db")


def test_a_storage_that_cannot_be_opened_is_one_line_without_its_password(tmp_path, python):
    (tmp_path / "garbage.db").write_text("not a database " * 100)
    f, _ = _write(tmp_path, "s.yaml", storage=f"sqlite:///{tmp_path / 'garbage.db'}")
    r = subprocess.run([python, "-m", "resnet_lab", "tune", str(f)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and "cannot open the study storage" in r.stderr and "not a database" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    if WHY_NO_POSTGRES is None or "driver" not in WHY_NO_POSTGRES:
        url = f"postgresql://lab:secret-pw@/db?host={tmp_path / 'no-server-here'}"
        r = subprocess.run([python, "-m", "resnet_lab", "tune", str(f), "--storage", url], capture_output=True,
                           text=True, cwd=ROOT, timeout=120)
        assert r.returncode == 2 and "cannot open the study storage" in r.stderr and "secret-pw" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
