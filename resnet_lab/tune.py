"""Hyperparameter search with Optuna: honest (validation split only), resumable, shareable.

Trials train a narrow proxy model (`trial_width`) on the training split and are scored by
validation accuracy; the test split is removed from the data the study sees. The study lives in
Optuna storage named by a URL, so rerunning resumes it (finished trials are kept) and several
processes or machines pointed at the same storage share it. The best hyperparameters become a
complete baseline params file (`best.yaml`) that 01_baseline accepts unchanged.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import random
import socket
import time
import warnings
from pathlib import Path
from typing import Any

# Optuna imports tqdm.auto, which warns inside Jupyter when ipywidgets is absent; its bar is not used.
warnings.filterwarnings("ignore", message="IProgress not found")

import numpy as np  # noqa: E402
import optuna  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from . import data as data_mod  # noqa: E402
from . import models, params as params_mod, runs, stats, train  # noqa: E402

FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
# Keys that do not change which trials the study runs: they are left out of its default name.
NOT_IN_STUDY = params_mod.NOT_IN_IDENTITY | {"n_trials", "storage", "study_name", "width", "epochs",
                                             "measure_batch_size", "heartbeat_s", "test_each_epoch", "keep_base"}
# Trial user attributes: each finished trial's per-image validation correctness (hex of the packed bits) and the
# number of images, so that two trials can be compared image by image (McNemar) after the study.
VAL_CORRECT, VAL_IMAGES = "val_correct", "val_images"


def study_name(p: dict) -> str:
    if p["study_name"]:
        return p["study_name"]
    return "tune-" + runs.run_key("optuna", params_mod.identity(p, NOT_IN_STUDY))


def study_dir(p: dict) -> Path:
    return runs.RunStore(p["run_root"]).root / "optuna" / study_name(p)


# A bare `postgresql://` or `mysql://` URL gets the first of these drivers that is installed (SQLAlchemy would
# pick one that may not be: psycopg 3 for postgresql, mysqlclient for mysql). `pip install -e ".[postgres]"` or
# `".[mysql]"` installs the first one.
DRIVERS = {"postgresql": ("psycopg", "psycopg2"), "mysql": ("pymysql", "MySQLdb")}
EXTRAS = {"postgresql": "postgres", "mysql": "mysql"}
RACE_ATTEMPTS = 10  # tries to open an RDB storage whose schema other workers are creating at the same moment


def rdb_url(url: str) -> str:
    """`url` with an installed driver named: `postgresql://…` (or Heroku's `postgres://…`) and `mysql://…` get
    the first installed driver of `DRIVERS`; a URL that names its driver (`postgresql+psycopg2://…`) is kept."""
    scheme, sep, rest = url.partition("://")
    if not sep or "+" in scheme:
        return url
    base = "postgresql" if scheme == "postgres" else scheme
    if base not in DRIVERS:
        return url
    for module in DRIVERS[base]:
        if importlib.util.find_spec(module) is not None:
            return f"{base}+{module.lower()}://{rest}"
    raise params_mod.ParamsError(f"parameter 'storage': a {base} study needs a database driver, and none of "
                                 f"{', '.join(DRIVERS[base])} is installed: pip install -e \".[{EXTRAS[base]}]\"")


def _shown(url: str) -> str:
    """The URL without its password, for messages."""
    import sqlalchemy

    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy parses: shown as given, it carries no password SQLAlchemy would use
        return url


def _lost_race(err: Exception) -> bool:
    """Whether opening an RDB storage failed because another worker was creating Optuna's schema at the same
    moment (tables, types or the version row created twice, or the file locked), not for a lasting reason."""
    import sqlalchemy

    if isinstance(err, sqlalchemy.exc.IntegrityError):  # the version row or a type inserted twice
        return True
    text = str(err).lower()
    return isinstance(err, sqlalchemy.exc.DBAPIError) and any(
        sign in text for sign in ("already exists", "duplicate key", "database is locked", "deadlock"))


def _open_rdb(url: str, beat: int | None, attempts: int = RACE_ATTEMPTS) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage at `url`, creating its schema if it is not there. Several workers started together on
    a fresh database race to create it (SQLite: "table … already exists", PostgreSQL: "duplicate key … CREATE
    TYPE"); the loser waits a random moment and opens it again, when the schema is there. Any other failure (a
    server that does not answer, a refused login) is a one-line error naming the storage."""
    import sqlalchemy

    for attempt in range(1, attempts + 1):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, heartbeat_interval=beat, grace_period=2 * beat if beat else None)
        except sqlalchemy.exc.SQLAlchemyError as err:
            if attempt < attempts and _lost_race(err):
                time.sleep(random.uniform(0.05, 0.25) * attempt)
                continue
            reason = str(getattr(err, "orig", None) or err).strip().splitlines()
            raise params_mod.ParamsError(f"parameter 'storage': cannot open the study storage {_shown(url)}: "
                                         f"{reason[0] if reason else type(err).__name__}") from None
    raise AssertionError("unreachable")


def storage(p: dict) -> optuna.storages.BaseStorage:
    """The study's storage: SQLite in the run store by default, a journal file, or any RDB URL."""
    url = p["storage"] or f"sqlite:///{runs.RunStore(p['run_root']).root / 'optuna' / 'studies.db'}"
    if url.startswith("journal:"):
        path = runs.resolve(url[len("journal:"):])
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    return _open_rdb(rdb_url(url), p["heartbeat_s"] or None)


def make_pruner(p: dict) -> optuna.pruners.BasePruner:
    if p["pruner"] == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=p["pruner_startup_trials"], n_warmup_steps=p["pruner_warmup_epochs"])
    if p["pruner"] == "hyperband":
        max_epochs = p["search_space"].get("epochs", [0, p["trial_epochs"]])[1]
        return optuna.pruners.HyperbandPruner(min_resource=max(1, p["pruner_warmup_epochs"]), max_resource=max_epochs)
    return optuna.pruners.NopPruner()


def open_study(p: dict, pruner: optuna.pruners.BasePruner | None = None) -> tuple[optuna.Study, bool]:
    """Create the study, or load it if it exists in the storage (resume / join); also whether this worker created
    it. Creation is one insert under the study name's unique constraint, so of several workers started together
    exactly one creates the study (and enqueues the base recipe, once) and the others join it."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    where = storage(p)
    try:
        study = optuna.create_study(study_name=study_name(p), storage=where, direction="maximize",
                                    pruner=pruner or make_pruner(p))
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=study_name(p), storage=where, pruner=pruner or make_pruner(p))
        created = False
    study.sampler = optuna.samplers.TPESampler(
        n_startup_trials=p["sampler_startup_trials"],
        seed=sampler_seed(p["seed"], study.get_trials(deepcopy=False), joined=not created))
    return study, created


def sampler_seed(seed: int, trials: list, joined: bool = False) -> int:
    """A fresh study replays `seed`; a resumed one continues from the number of trials it holds, so it
    does not redraw the configurations already tried; a worker joining others adds its process id: one that
    finds trials running, or that joined a study with nothing finished yet (started together with its creator, it
    would otherwise draw the creator's configurations: measured, two workers ran the same trial twice)."""
    others_running = any(t.state == optuna.trial.TrialState.RUNNING for t in trials)
    nothing_finished = not any(t.state in FINISHED for t in trials)
    together = others_running or (joined and nothing_finished)
    return (seed + 7919 * len(trials) + (os.getpid() if together else 0)) % 2**32


# Keys that only matter under one schedule are drawn only then (Optuna's define-by-run space).
ONLY_WITH_SCHEDULER = {"step_size": "step", "gamma": "step", "warmup_fraction": "onecycle"}


def _applies(name: str, scheduler: str) -> bool:
    return ONLY_WITH_SCHEDULER.get(name, scheduler) == scheduler


def sample(trial: optuna.Trial, space: dict, base: dict) -> dict[str, Any]:
    """Draw one value per search-space key that applies (the lr range may depend on the optimizer)."""
    values: dict[str, Any] = {}
    for name, spec in space.items():
        if name in params_mod.SPACE_CHOICES:
            values[name] = trial.suggest_categorical(name, spec)
    scheduler = values.get("scheduler", base["scheduler"])
    for name, spec in space.items():
        if name in params_mod.SPACE_CHOICES or not _applies(name, scheduler):
            continue
        label = name
        if isinstance(spec, dict):  # lr per optimizer: a separate Optuna parameter per range
            opt = values.get("optimizer", base["optimizer"])
            spec, label = spec[opt], f"{name}_{opt}"
        low, high = spec
        if isinstance(low, int) and isinstance(high, int):
            values[name] = trial.suggest_int(label, low, high)
        else:
            values[name] = trial.suggest_float(label, low, high, log=name in params_mod.SPACE_LOG)
    return values


def recipe(p: dict) -> dict[str, Any]:
    """The base recipe: the baseline-stage keys of the optuna params."""
    return {k: p[k] for k in params_mod.SCHEMAS["baseline"] if k in p}


def trial_params(p: dict, values: dict[str, Any]) -> dict[str, Any]:
    """The baseline-stage params of one trial: the base recipe at proxy scale, plus the drawn values."""
    base = recipe(p)
    base.update(width=p["trial_width"], epochs=p["trial_epochs"], progress=False, test_each_epoch=False)
    base.update(values)
    return params_mod.validate(base, "baseline")


def _base_values(p: dict) -> dict[str, Any]:
    """The base recipe expressed as Optuna parameters, for the values that fall inside the space."""
    out = {}
    for name, spec in p["search_space"].items():
        if not _applies(name, p["scheduler"]):
            continue
        value = p["trial_epochs"] if name == "epochs" else p[name]
        label = name
        if isinstance(spec, dict):
            if p["optimizer"] not in spec:
                continue
            spec, label = spec[p["optimizer"]], f"{name}_{p['optimizer']}"
        inside = value in spec if name in params_mod.SPACE_CHOICES else spec[0] <= value <= spec[1]
        if inside:
            out[label] = value
    return out


def objective(p: dict, dataset: data_mod.Dataset):
    def run_trial(trial: optuna.Trial) -> float:
        tp = trial_params(p, sample(trial, p["search_space"], p))
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")

        def report(record: dict) -> None:
            trial.report(record["val_acc"], record["epoch"])
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at epoch {record['epoch']} (val {record['val_acc']:.1f}%)")

        torch.manual_seed(tp["seed"])
        model = models.resnet18(tp["width"])
        try:
            history = train.fit(model, dataset, tp, on_epoch=report)
        except train.TrainingDiverged as e:  # recorded as pruned, and the study goes on
            trial.set_user_attr("diverged", str(e))
            raise optuna.TrialPruned(str(e)) from None
        logits = train.predict_split(model, dataset.val, tp["eval_batch_size"], device=train.pick_device(tp["device"]))
        store_val_correct(trial, stats.correct(logits.argmax(1).numpy(), dataset.val.labels.numpy()))
        return history[-1]["val_acc"]

    return run_trial


def without_test(dataset: data_mod.Dataset) -> data_mod.Dataset:
    """The study never sees the test split: it is replaced by an empty one."""
    empty = data_mod.Split(dataset.test.images[:0], dataset.test.labels[:0])
    return dataclasses.replace(dataset, test=empty)


def run(p: dict, pruner: optuna.pruners.BasePruner | None = None) -> optuna.Study:
    """Open (or resume, or join) the study and run trials until it has `n_trials` finished ones."""
    if not p["search_space"]:
        raise params_mod.ParamsError("parameter 'search_space' is empty: name at least one key to search")
    dataset = data_mod.from_params(p)
    if len(dataset.val) == 0:
        raise params_mod.ParamsError("the study is scored on the validation split: set val_fraction > 0")
    dataset = without_test(dataset)
    study, created = open_study(p, pruner)
    finished = len(study.get_trials(deepcopy=False, states=FINISHED))
    if p["enqueue_base"] and created:  # the creator only: workers started together would each enqueue it
        study.enqueue_trial(_base_values(p), skip_if_exists=True)
    remaining = p["n_trials"] - finished
    if remaining > 0:
        callbacks = [optuna.study.MaxTrialsCallback(p["n_trials"], states=FINISHED)]
        study.optimize(objective(p, dataset), n_trials=remaining, callbacks=callbacks + ([_print_trial] if p["progress"] else []))
    return study


def _print_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """One line per finished trial (plain text: readable in a terminal and in the HTML report)."""
    value = "–" if trial.value is None else f"{trial.value:.1f}%"
    seconds = trial.duration.total_seconds() if trial.duration else 0.0
    done = len(study.get_trials(deepcopy=False, states=FINISHED))
    print(f"trial {trial.number} {trial.state.name.lower()}: val {value} in {seconds:.0f} s · "
          f"{done} finished · best {study.best_value:.1f}% (trial {study.best_trial.number})", flush=True)


# ---------------------------------------------------------------- results
def store_val_correct(trial: optuna.Trial, right: np.ndarray) -> None:
    """Keep the trial's per-image validation correctness in the study (`val_correct` reads it back)."""
    trial.set_user_attr(VAL_CORRECT, np.packbits(np.asarray(right, bool)).tobytes().hex())
    trial.set_user_attr(VAL_IMAGES, int(len(right)))


def val_correct(trial: optuna.trial.FrozenTrial) -> np.ndarray | None:
    """The trial's per-image validation correctness, or None for a trial that did not finish its epochs (or ran
    before the study stored it)."""
    if VAL_CORRECT not in trial.user_attrs or VAL_IMAGES not in trial.user_attrs:
        return None
    bits = np.unpackbits(np.frombuffer(bytes.fromhex(trial.user_attrs[VAL_CORRECT]), dtype=np.uint8))
    return bits[: int(trial.user_attrs[VAL_IMAGES])].astype(bool)


def base_trial(study: optuna.Study, p: dict) -> optuna.trial.FrozenTrial | None:
    """The completed trial that ran the base recipe (what `enqueue_base` enqueues), if the study has one."""
    values = _base_values(p)
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if t.params == values:
            return t
    return None


@dataclasses.dataclass(frozen=True)
class Choice:
    """Which trial's hyperparameters the final recipe takes, and why."""

    trial: optuna.trial.FrozenTrial  # the chosen one
    best: optuna.trial.FrozenTrial  # the study's best trial
    base: optuna.trial.FrozenTrial | None  # the base recipe's trial, if the study ran it to the end
    pair: stats.Paired | None  # best against base on the validation images (McNemar), when both were stored
    reason: str

    @property
    def kept_base(self) -> bool:
        return self.base is not None and self.trial.number == self.base.number


def choose(study: optuna.Study, p: dict) -> Choice:
    """The best trial, or, with `keep_base`, the base recipe unless the best trial is told apart from it on the
    validation images (McNemar's exact test, p < stats.ALPHA): the top of a few trials scored on a few hundred
    images is often the luckiest rather than the best (the winner's curse), and a switch should rest on evidence."""
    best, base = study.best_trial, base_trial(study, p)
    if base is None:
        return Choice(best, best, None, None, "the study has no completed trial of the base recipe "
                      "(enqueue_base off, a base value outside the search space, or that trial pruned): the best trial")
    if best.number == base.number:
        return Choice(base, best, base, None, "the base recipe is the best trial")
    right_best, right_base = val_correct(best), val_correct(base)
    pair = None if right_best is None or right_base is None or len(right_best) != len(right_base) \
        else stats.mcnemar(right_best, right_base)
    if not p["keep_base"]:
        return Choice(best, best, base, pair, "keep_base is off: the best trial")
    if pair is None:
        return Choice(best, best, base, None, "the two trials have no stored validation predictions to pair "
                      "(a study begun by an older version): the best trial")
    told_apart = stats.verdict(pair) == stats.BETTER
    words = (f"the best trial {best.number} ({pair.acc_a:.2f}%) against the base recipe's trial {base.number} "
             f"({pair.acc_b:.2f}%) on the same {len(right_best)} validation images: {pair.a_only} images right "
             f"only with the best, {pair.b_only} only with the base, McNemar p = {pair.p:.2g}")
    if told_apart:
        return Choice(best, best, base, pair, words + ": told apart, the best trial")
    return Choice(base, best, base, pair, words + ": not told apart, so the base recipe stands")


def best_params(study: optuna.Study, p: dict, choice: Choice | None = None) -> dict[str, Any]:
    """A complete baseline params set: the base recipe at full scale with the chosen trial's values
    (`choose`: the best trial, or the base recipe itself when the best is not told apart from it)."""
    chosen = (choice or choose(study, p)).trial
    values = {k.split("_")[0] if k.startswith("lr_") else k: v for k, v in chosen.params.items()}
    values.pop("epochs", None)  # trial epochs belong to the proxy; the final recipe keeps its own
    out = recipe(p)
    out.update(values)
    return params_mod.validate(out, "baseline")


def write_best(study: optuna.Study, p: dict, choice: Choice | None = None) -> Path:
    """Write best.yaml next to the study; `papermill notebooks/01_baseline.ipynb … -f <it>` trains it."""
    choice = choice or choose(study, p)
    best = best_params(study, p, choice)
    t = choice.trial
    header = (f"# Trial {t.number} of study '{study.study_name}' ({'the base recipe' if choice.kept_base else 'the best trial'}): "
              f"validation accuracy {t.value:.2f}% at width {p['trial_width']}.\n# Chosen because {choice.reason}.\n"
              f"# A complete 01_baseline params file (hyperparameters from the study, width and epochs from the final "
              f"recipe).\n")
    path = study_dir(p) / "best.yaml"
    runs.write_text(path, header + params_mod.dump_yaml(best, sort_keys=False))
    return path


def trials_table(study: optuna.Study) -> pd.DataFrame:
    df = study.trials_dataframe(attrs=("number", "state", "value", "duration", "params"))
    df["duration"] = df["duration"].dt.total_seconds().round(1)
    df["value"] = df["value"].round(2)
    df = df.rename(columns={"value": "val_acc (%)", "duration": "duration (s)"})
    df.columns = [c.replace("params_", "") for c in df.columns]
    return df.set_index("number")


PLOT_SIZES = {"parallel coordinates": (16, 6), "slice": (18, 4.5)}  # inches; the others keep Optuna's size


def plots(study: optuna.Study) -> dict[str, Any]:
    """Optuna's own matplotlib figures (history, importances, parallel coordinates, contour of the
    two most important parameters, slice), with the objective labelled as validation accuracy."""
    from optuna.visualization import matplotlib as vis

    with warnings.catch_warnings():
        # Optuna warns that importances and slices are rough with few trials; the notebook says so.
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.simplefilter("ignore", UserWarning)
        out = {"optimization history": vis.plot_optimization_history(study),
               "hyperparameter importances": vis.plot_param_importances(study),
               "parallel coordinates": vis.plot_parallel_coordinate(study)}
        top = list(optuna.importance.get_param_importances(study))[:2]
        out["contour"] = vis.plot_contour(study, params=top) if len(top) == 2 else None
        out["slice"] = vis.plot_slice(study)
    for name, ax in out.items():
        if ax is None:
            continue
        fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
        if name in PLOT_SIZES:
            fig.set_size_inches(*PLOT_SIZES[name])
        for a in fig.axes:
            if a.get_ylabel() == "Objective Value":
                a.set_ylabel("validation accuracy (%)")
            if name == "slice":
                a.tick_params(axis="x", labelrotation=45, labelsize=8)
    return out
