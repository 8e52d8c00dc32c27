"""The baseline: train it (or reuse its finished run), find the finished run a stage starts from, its replicates
over training seeds, and its model. The stages never train a baseline: they look it up here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import data as data_mod
from . import metrics, models, params, registry, runs
from . import train as fit_mod
from .config import ParamsError


@dataclass
class BaselineResult:
    run: runs.Run
    model: nn.Module
    dataset: data_mod.Dataset
    history: list[dict]
    metrics: dict[str, Any]
    test_predictions: torch.Tensor  # predicted class per test image (predictions.npz also holds the validation split's)
    reused: bool


def train(p: dict, train_seed: int | None = None) -> BaselineResult:
    """Train the baseline ResNet18 for params `p` (validated), or reuse the finished run. `train_seed` (one of
    `p['seeds']`) trains a replicate: the same data split (of `p['seed']`), another initialisation, order and
    augmentation, its own run."""
    dataset = data_mod.from_params(p)  # fails here, before any run folder, if the data is missing
    fit_mod.check_schedule(p, fit_mod.steps_per_epoch(p, len(dataset.train)))
    store = runs.RunStore(p["run_root"])
    run = store.run("baseline", run_params(p, train_seed))
    with run.lock():
        reused = run.done and p["reuse"]
        if not reused:
            _train_baseline(run, dataset, {**p, "seed": training_seed(p, train_seed)})
        return _finished_baseline(run, dataset, p, reused)


def replicates(p: dict) -> list[BaselineResult]:
    """The baseline of `p` trained with each of its training seeds (`p['seed']` first, then `p['seeds']`), each
    its own run, reused when finished: the spread of the recipe over seeds."""
    return [train(p, s) for s in seeds_of(p)]


def seeds_of(p: dict) -> list[int]:
    """The baseline's training seeds: `seed` first, then the others of `seeds`."""
    return [p["seed"]] + [s for s in p.get("seeds", []) if s != p["seed"]]


def training_seed(p: dict, train_seed: int | None) -> int:
    return p["seed"] if train_seed is None else train_seed


def run_params(p: dict, train_seed: int | None = None) -> dict:
    """What a baseline run of `p` is keyed by: its params without the list of seeds, with `train_seed` where it
    differs from `seed` (so the run of `seed` keeps the key it always had)."""
    q = {k: v for k, v in p.items() if k != "seeds"}
    if train_seed is not None and train_seed != p["seed"]:
        q["train_seed"] = train_seed
    return q


class UpstreamMissing(runs.RunStoreError):
    """A stage needs a run that an earlier notebook produces; the message says which and how."""


def trained(params_file: str, p: dict, train_seed: int | None = None) -> tuple[BaselineResult, dict]:
    """The finished 01_baseline run of `params_file` (its replicate of `train_seed`, if given), looked up in the
    run store of `p` (never trained here).

    Returns the result and the baseline's parameters (their data keys describe the dataset; `seed` is the
    run's training seed).
    """
    bp = params.load(runs.resolve(params_file), "baseline")
    bp.update(run_root=p["run_root"], progress=p["progress"])  # not part of the run's identity
    if train_seed is not None and train_seed not in seeds_of(bp):
        raise ParamsError(f"baseline seed {train_seed} is not one of the training seeds of {params_file} "
                                 f"({seeds_of(bp)}); add it to that file's 'seeds'")
    run = runs.RunStore(bp["run_root"]).run("baseline", run_params(bp, train_seed), create=False)
    if not run.done:
        extra = f" -p run_root {bp['run_root']}" if bp["run_root"] != "runs" else ""
        raise UpstreamMissing(
            f"this stage starts from the trained baseline of {params_file}"
            f"{f' with training seed {train_seed}' if train_seed is not None else ''}, but {run} holds no finished run. "
            f"Produce it first with `papermill notebooks/01_baseline.ipynb out.ipynb -f {params_file}{extra}` "
            f"(or `python -m resnet_lab train {params_file}`); `make report` runs 01_baseline first.")
    seeded = {**bp, "seed": training_seed(bp, train_seed)}
    return _finished_baseline(run, data_mod.from_params(bp), seeded, True), seeded


def replicate_runs(params_file: str, p: dict) -> dict[int, runs.Run]:
    """{training seed: run} of the finished runs of the baseline of `params_file` over its seeds (looked up in the
    run store of `p`): the spread every Δ is read against."""
    bp = params.load(runs.resolve(params_file), "baseline")
    store = runs.RunStore(p["run_root"])
    found = {s: store.run("baseline", run_params(bp, s), create=False) for s in seeds_of(bp)}
    return {s: run for s, run in found.items() if run.done}


def load_model(run: runs.Run) -> nn.Module:
    """The trained model of a baseline run (a ResNet18 of the width in its params.yaml)."""
    width = run.params["width"]
    model = models.resnet18(width)
    try:
        model.load_state_dict(run.load_weights())
    except RuntimeError as e:  # shapes or keys of another architecture
        raise runs.RunStoreError(f"{run.path('model.pt')} does not hold a ResNet18 of width {width}: "
                                 f"{str(e).splitlines()[0]}") from None
    return model.eval()


def _finished_baseline(run: runs.Run, dataset: data_mod.Dataset, p: dict, reused: bool) -> BaselineResult:
    model = load_model(run)
    return BaselineResult(run, model, dataset, run.read_json("history.json"), run.metrics,
                          run.predictions()["test"], reused)


def _train_baseline(run: runs.Run, dataset: data_mod.Dataset, p: dict) -> None:
    torch.manual_seed(p["seed"])
    model = models.resnet18(p["width"])
    history = fit_mod.fit(model, dataset, p, checkpoint=run.path("checkpoint.pt"))
    device = next(model.parameters()).device
    # the stored accuracy is measured as every stage and 06 measure it: float32 (no autocast), the eval protocol
    test = data_mod.Batches(dataset.test, p["eval_batch_size"], device, channels_last=fit_mod.channels_last(device))
    logits = fit_mod.predict(model, test, None, p["eval_flip"])
    preds = logits.argmax(1)
    result = fit_mod.score(logits, dataset.test.labels)
    val = data_mod.Batches(dataset.val, p["eval_batch_size"], device, channels_last=fit_mod.channels_last(device))
    val_logits = fit_mod.predict(model, val, None, p["eval_flip"])
    val_result = fit_mod.score(val_logits, dataset.val.labels) if len(dataset.val) else {"acc": None}
    model = model.to("cpu", memory_format=torch.contiguous_format)
    m = {
        "test_acc": result["acc"], "test_loss": result["loss"],
        "val_acc": val_result["acc"] if len(dataset.val) else None,
        # from the history, so epochs done before a resume count too
        "train_time_s": sum(r["train_time_s"] for r in history),
        "train_and_eval_time_s": sum(r["epoch_time_s"] for r in history),
        "train_device": str(device), "data": dataset.describe(),
        **metrics.measure(model, p["measure_batch_size"], "cpu"),
        "machine": metrics.machine(),
    }
    run.save_weights(model.state_dict())
    run.write_json("history.json", history)
    run.save_predictions({"test": preds, "val": val_logits.argmax(1)})
    run.finish(m)
    run.path("checkpoint.pt").unlink(missing_ok=True)


registry.register(registry.Technique("baseline", "01_baseline", "baseline", describe=lambda s: "baseline (FP32)",
                                     loader=load_model, artifact="model.pt"))
registry.register_analysis(registry.Analysis("optuna", "02_optuna", "analysis: an Optuna study (its trials train "
                                             "narrow proxies; the retrained model is a baseline run)"))
