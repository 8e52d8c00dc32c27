"""Parameters of each stage: its schema (composed from the config core's shared keys and each technique's own
`CONFIG`), loading from YAML, and validation before any work.

Parameters are flat `key: value` mappings, so papermill can inject them as notebook variables.
Every stage declares the keys it accepts; an unknown key, a wrong type or a value out of range
stops the run at once with a message naming the key and what is allowed.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable, Mapping

from . import registry, techniques
from .config import (ADDED_OFF, COMMON, FINETUNE, NOT_IN_IDENTITY, REPORTING, SPACE_CHOICES, SPACE_LOG, SPACE_RANGES, SEEDS, STAGE, TRAINING, TUNING, Field,  # noqa: F401
                     ParamsError, bounded, check_all, with_defaults, check_seeds, did_you_mean, dump_yaml, fractions, identity,
                     notebook_values, read_yaml)
from .registry import THEN, check_chain
from .techniques import binaryconnect, prune, qat, svd

_f = Field
METHODS = registry.steps_of("03_quantization")  # 03's methods: the quantization techniques, in registration order


def _variants(key: str, value: Any, fields: dict[str, Field]) -> list[dict[str, Any]]:
    """A list of mappings of `fields`' keys, each value checked like the key itself (missing keys stay missing)."""
    if not isinstance(value, list):
        raise ParamsError(f"'{key}' must be a list of variants (mappings of {', '.join(fields)}), not {bounded(repr(value))}")
    out = []
    for i, variant in enumerate(value):
        where = f"{key}[{i}]"
        if not isinstance(variant, dict):
            raise ParamsError(f"'{where}' must be a mapping of {', '.join(fields)}, not {variant!r}")
        unknown = [k for k in variant if k not in fields]
        if unknown:
            raise ParamsError(f"unknown key '{where}.{unknown[0]}'" + did_you_mean(unknown[0], fields)
                              + f"; a variant may set {', '.join(fields)}")
        out.append({k: fields[k].check(f"{where}.{k}", v) for k, v in variant.items()})
    return out


# A variant of 03 may set a technique's own keys and its fine-tuning epochs, lr, seeds and distillation.
BC_VARIANT_KEYS: dict[str, Field] = {**binaryconnect.KEYS, **{k: FINETUNE[k] for k in ("epochs", "lr", "distill")},
                                     "seeds": SEEDS}
QAT_VARIANT_KEYS: dict[str, Field] = {**qat.KEYS, **{k: FINETUNE[k] for k in ("epochs", "lr", "distill")}, "seeds": SEEDS}


def check_methods(key: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not value:
        raise ParamsError(f"'{key}' must be a non-empty list drawn from {', '.join(METHODS)}, not {bounded(repr(value))}")
    for v in value:
        if v not in METHODS:
            raise ParamsError(f"'{key}' names unknown method {v!r}" + did_you_mean(v, METHODS)
                              + f"; known: {', '.join(METHODS)}")
    if len(set(value)) != len(value):
        raise ParamsError(f"'{key}' lists a method twice: {bounded(repr(value))}")
    return list(value)


def check_bc_variants(key: str, value: Any) -> list[dict[str, Any]]:
    """A list of BinaryConnect variants; each a mapping of BC_VARIANT_KEYS (missing keys take the defaults,
    except epochs, lr and seeds, which fall back to the stage's)."""
    return [{**{k: f.default for k, f in binaryconnect.KEYS.items()}, **v} for v in _variants(key, value, BC_VARIANT_KEYS)]


QUANTIZATION: dict[str, Field] = {
    "start": Field(object, [], "the model the methods are applied to: a chain of steps from the baseline (e.g. "
                   "[{prune: {method: ln_structured, scope: global, amount: 0.6, epochs: 10, lr: 0.001}}], each link "
                   "its own run, reused when finished); empty: the baseline itself", validator=check_chain),
    "methods": Field(list, list(METHODS), f"which methods to run, from {', '.join(METHODS)}",
                     validator=check_methods),
    "int8_backend": techniques.int8.CONFIG["backend"],
    "binaryconnect": Field(list, [{}], "BinaryConnect variants to train, each a mapping of "
                           + ", ".join(BC_VARIANT_KEYS) + " (epochs, lr and seeds default to the stage's)",
                           validator=check_bc_variants),
    "qat": Field(list, [{"weight_bits": 8, "act_bits": 8}, {"weight_bits": 4, "act_bits": 4}],
                 "quantization-aware training variants (LSQ), each a mapping of " + ", ".join(QAT_VARIANT_KEYS)
                 + " (epochs, lr and seeds default to the stage's)",
                 validator=lambda key, value: [{**{k: f.default for k, f in qat.KEYS.items()}, **v}
                                               for v in _variants(key, value, QAT_VARIANT_KEYS)]),
}


def check_ranks(key: str, value: Any) -> list[float]:
    """Rank values of a sweep: numbers > 0 (their meaning, and whether they must be whole or ≤ 1, depends
    on rank_rule, checked in `validate`)."""
    if not isinstance(value, list):
        raise ParamsError(f"'{key}' must be a list of rank values, not {bounded(repr(value))}")
    for v in value:
        svd._rank_value(key, v)
    if len(set(value)) != len(value):
        raise ParamsError(f"'{key}' lists a value twice: {bounded(repr(value))}")
    return list(value)


# One factorization recipe; the top-level keys are the defaults of every entry of `variants`.
SVD_VARIANT: dict[str, Field] = {
    **svd.KEYS,
    "ranks": Field(list, [0.5, 0.25], "the sweep: rank values under rank_rule (fixed: whole ranks >= 1; "
                   "fraction and energy: in (0, 1])", validator=check_ranks),
    "then": THEN,
    "epochs": TRAINING["epochs"],
    "lr": TRAINING["lr"],
    "distill": FINETUNE["distill"],
    "seeds": SEEDS,
}


SVD: dict[str, Field] = {
    **SVD_VARIANT,
    "variants": Field(list, [], "factorization recipes to run, each a mapping of the keys above (missing keys take "
                      "the top-level values); empty: the top-level keys are the one recipe",
                      validator=lambda key, value: _variants(key, value, SVD_VARIANT)),
    "scratch_ranks": Field(list, [], "rank values (as in 'ranks', top-level rule) whose factorized architecture is "
                           "also trained from random weights, like the old scripts, for comparison", validator=check_ranks),
    "scratch_epochs": _f(int, 40, "training epochs of the from-scratch models", low=1, high=10_000),
}


def _resolve_variants(values: dict[str, Any], keys) -> None:
    """Each variant completed by the top-level values of `keys` it does not set; no variants: the top level alone."""
    top = {k: values[k] for k in keys}
    values["variants"] = [{**top, **v} for v in values["variants"]] or [top]


def _check_svd(values: dict[str, Any]) -> None:
    """Resolve `variants` to full recipes (top-level keys fill the gaps) and check the ranks under their rule."""
    _resolve_variants(values, SVD_VARIANT)
    for i, v in enumerate(values["variants"]):
        where = f"variant {i}" if len(values["variants"]) > 1 else "the recipe"
        if not v["ranks"]:
            raise ParamsError(f"{where}: 'ranks' must list at least one rank value")
        svd.check_rank_values(where, v["rank_rule"], v["ranks"])
    svd.check_rank_values("scratch_ranks", values["rank_rule"], values["scratch_ranks"])


# One pruning recipe. The top-level keys are the defaults of every entry of `variants`.
PRUNE_VARIANT: dict[str, Field] = {
    **prune.KEYS,
    "amounts": Field(list, [0.5], "the sweep: share of the chosen weights zeroed (l1) or of the channels removed "
                     "(ln_structured), each in [0, 1)", validator=fractions(False, "amounts")),
    "then": THEN,
    "epochs": _f(int, 5, "fine-tuning epochs after pruning (iterative: in total)", low=1, high=10_000),
    "lr": TRAINING["lr"],
    "distill": FINETUNE["distill"],
    "seeds": SEEDS,
}


def check_prune_variants(key: str, value: Any) -> list[dict[str, Any]]:
    """A list of mappings of PRUNE_VARIANT keys; the keys a variant leaves out take the top-level values."""
    return _variants(key, value, PRUNE_VARIANT)


PRUNING: dict[str, Field] = {
    **PRUNE_VARIANT,
    "variants": Field(list, [], "pruning recipes to run, each a mapping of the keys above (missing keys take the "
                      "top-level values); empty: the top-level keys are the one recipe", validator=check_prune_variants),
    "sensitivity_amounts": prune.SENSITIVITY_AMOUNTS,
    "curve_amounts": Field(list, [0.5, 0.8, 0.9], "amounts at which each method's accuracy right after pruning "
                           "(no fine-tuning) is measured for the curves", validator=fractions(False, "amounts")),
}


def _check_pruning(values: dict[str, Any]) -> None:
    """Resolve `variants` to full recipes (top-level keys fill the gaps) and check what spans keys."""
    _resolve_variants(values, PRUNE_VARIANT)
    for i, v in enumerate(values["variants"]):
        where = f"variant {i} ({v['method']}, {v['scope']})" if len(values["variants"]) > 1 else "the recipe"
        if not v["amounts"]:
            raise ParamsError(f"{where}: 'amounts' must list at least one amount")
        prune.check_link(where, v, values["sensitivity_amounts"])


# The groups 06 sorts models into, in table order: one per technique family; a model made by two or more
# steps is a combination.
GROUPS = ("baseline", "quantization", "pruning", "factorization", "combination")


def _subset(key: str, value: Any, allowed: tuple[str, ...]) -> list[str]:
    if not isinstance(value, list) or any(v not in allowed for v in value) or len(set(value)) != len(value):
        raise ParamsError(f"'{key}' must list distinct values of {', '.join(allowed)}, not {bounded(repr(value))}")
    return list(value)


# 06_summary reads the run store and measures again; it trains nothing and writes no run.
SUMMARY: dict[str, Field] = {
    **{k: STAGE[k] for k in ("profile", "baseline", "device", "eval_batch_size", "measure_batch_size", "run_root", "progress")},
    "latency_batch_size": _f(int, 1, "batch size at which CPU latency is measured (1: one image, as a deployed model "
                             "answers a request)", low=1),
    "speed_rounds": _f(int, 3, "rounds of interleaved CPU timing of all models (each keeps its median)", low=1),
    "speed_repeats": _f(int, 2, "timed batches per model and round at measure_batch_size", low=1),
    "latency_repeats": _f(int, 10, "timed batches per model and round at latency_batch_size", low=1),
    "profile_groups": Field(list, list(GROUPS),
                            "groups of models whose CPU time is profiled layer by layer at both batch sizes, one "
                            "model per technique within each (the first in the table: what explains a family's speed; "
                            "torch.profiler, profile_rounds rounds of speed_repeats / latency_repeats batches); [] = none",
                            validator=lambda key, value: _subset(key, value, GROUPS)),
    "profile_rounds": _f(int, 1, "rounds of profiled forwards per model and batch size: the profile gives shares of the "
                         "time, not the speed-ups (those come from speed_rounds of unprofiled timing)", low=1),
    "onnx": _f(bool, True, "export every model to ONNX in its run folder (made once, reused), check its test-set "
               "predictions against the PyTorch model's, and time it in ONNX Runtime beside eager PyTorch"),
    "onnx_agreement": _f(float, 99.0, "an exported float model whose predicted classes match its PyTorch model's on "
                         "fewer than this % of test images is flagged", low=0.0, high=100.0),
    "onnx_agreement_quantized": _f(float, 98.0, "the same for an integer-quantized model (ONNX Runtime's int8 kernels round "
                              "differently from PyTorch's)", low=0.0, high=100.0),
    "max_drop": _f(float, 2.0, "'best within': the largest test-accuracy loss (points) a model may have against the "
                   "baseline to compete on cost", low=0.0, high=100.0),
    "plot_floor_drop": _f(float, 10.0, "Pareto plots leave out (and name) models more than this many points below "
                          "the baseline, so that one failed model does not squash the others", low=0.0),
    "target_acc": _f(float, 90.0, "the course target: test accuracy (%) a model must reach to count, judged on full "
                     "CIFAR-10", low=0.0, high=100.0, low_open=True),
}

# Checks across keys of one stage, run after each key's own check.
CROSS_CHECKS: dict[str, Callable[[dict[str, Any]], None]] = {"svd": _check_svd, "pruning": _check_pruning}

# The baseline's replicates: the same recipe and data split, other training seeds (each its own run).
BASELINE_SEEDS = Field(list, [], "training seeds of replicate baselines (the split stays that of `seed`; each its "
                       "own run): the spread of the recipe over seeds (reported: a compressed model's Δ is not read against it; a "
                       "stage's `baseline_seeds` replicate its recipes on these baselines). "
                       "`seed` itself is always trained, and the stages start from it", validator=check_seeds)

# ---------------------------------------------------------------- every stage's schema, with its defaults
# The defaults are the default profile (the real CIFAR-10 subset, a 2-core CPU, `make report` within its budget):
# a key's default is declared once, here or in the Field it comes from; params files carry only what they change,
# and a notebook's parameters cell means the same as these defaults (a test checks). Where a number was chosen, the
# evidence is beside it: choices were made on the validation split, the cheaper recipe unless the paired test on
# validation (McNemar) told two apart.
_FINETUNE_CPU = {"optimizer": "adam", "weight_decay": 0.0}  # every fine-tune of the default profile: Adam, no decay

SCHEMAS: dict[str, dict[str, Field]] = {
    # two training seeds: their spread is measured by every report; the seeds profile trains three
    "baseline": with_defaults({**COMMON, **TRAINING, **REPORTING, "seeds": BASELINE_SEEDS}, seeds=[0, 1]),
    "optuna": with_defaults({**COMMON, **TRAINING, **REPORTING, **TUNING}, trial_epochs=5, search_space={
        "batch_size": [32, 64, 128, 256], "optimizer": ["sgd", "adam", "adamw"],
        "lr": {"sgd": [0.01, 0.3], "adam": [0.0001, 0.01], "adamw": [0.0001, 0.01]}, "weight_decay": [1.0e-6, 1.0e-2],
        "scheduler": ["onecycle", "cosine", "step"], "step_size": [1, 4], "gamma": [0.1, 0.9],
        "label_smoothing": [0.0, 0.2], "epochs": [3, 6]}),
    "quantization": with_defaults(
        {**STAGE, **FINETUNE, **QUANTIZATION}, **_FINETUNE_CPU,
        methods=["fp16", "int8", "binaryconnect", "qat"],  # BF16: params/fp16.yaml (no bf16 kernels on most CPUs)
        # Every recipe runs on both baseline seeds (`baseline_seeds` "all": its verdict over seeds needs the two
        # replicates), so the sweep is what answers a question within the budget of 240 baseline epochs; the rest is
        # in params/bc.yaml, qat.yaml and the full profile.
        # BinaryConnect: Adam 0.003 (val 71.0%) ~ Adam 0.01 (70.8%) > SGD 0.05 (69.8%); 8 epochs (72.7%) ~ 15 (75.9%,
        # p = 0.07: close; params/bc.yaml trains 15, with and without KD: 8 (74.5%) ~ 15 (74.2%, p = 1.0)).
        epochs=8, lr=0.003,
        binaryconnect=[{"init": "pretrained", "layers": "inner", "mode": "deterministic", "scale": False}],
        # QAT: W4A4 5 epochs (73.2%) ~ 10 (73.7%, p = 0.88). W8A8 (3 epochs at 1e-4, val 74.7%) matched post-training
        # INT8 (74.7%) on validation; W4A4 + KD 5 (74.9%) ~ 10 (75.2%, p = 1.0): both in params/qat.yaml.
        # Distillation is shown in 04, on structured 60% (5 epochs of a pruned student cost a third of QAT's).
        qat=[{"weight_bits": 4, "act_bits": 4, "epochs": 5, "lr": 0.001}]),
    "svd": with_defaults(
        {**STAGE, **{k: f for k, f in FINETUNE.items() if k not in SVD_VARIANT}, **SVD}, **_FINETUNE_CPU,
        ranks=[0.5, 0.25, 0.125], then=["int8"], scratch_epochs=15,
        # Adam 0.001 (val 70.8%) > SGD 0.02 (70.0%) at fraction 0.25; 4 epochs ~ 8 at every rank (0.5: p = 0.63;
        # 0.25: p = 0.72; 0.125: p = 0.68; 0.25 + KD: p = 0.69)
        epochs=4, lr=0.001,
        # on both baseline seeds: 0.5 and 0.25 (0.125, val 72.0%, ~ 0.25, 72.7%; 0.25 + KD: params/svd_full.yaml)
        variants=[{"ranks": [0.5, 0.25]}]),
    "pruning": with_defaults(
        {**STAGE, **{k: f for k, f in FINETUNE.items() if k not in PRUNE_VARIANT}, **PRUNING}, **_FINETUNE_CPU,
        # unstructured, at L1 global 80%: Adam 3e-4 (val 72.5%) ~ 1e-4 (72.5%) ~ SGD 0.01 (72.2%) > Adam 1e-3 (71.7%)
        amounts=[0.8, 0.9], epochs=4, lr=0.0003, curve_amounts=[0.5, 0.7, 0.8, 0.9, 0.95],
        # structured: global ranking keeps more of the early layers than a per-layer ratio (val 69.3% at 2.16x fewer
        # MACs vs 67.1% at 2.12x); 60%: 5 epochs (70.0%) ~ 10 (70.5%, p = 0.86). Chains: structured -> QAT W4A4 at 4
        # bits everywhere: 52% of channels, the least pruning whose course score is <= 0.01 (0.0091; 60%: 0.0083),
        # beat 60% on validation (74.7% vs 70.8%, p = 0.03), at 5 epochs as 60% (5 ~ 10 there).
        # On both baseline seeds (see 03's note): one unstructured amount, its FP16 chain, structured 60% with and
        # without KD (5 ~ 10 epochs with KD too, p = 0.69) and its INT8 chain, the course-score chain; 90%,
        # -> SVD -> INT8, -> BinaryConnect: params/pruning_full.yaml.
        variants=[
            {"method": "l1", "scope": "global", "amounts": [0.8]},
            {"method": "l1", "scope": "global", "amounts": [0.8], "then": ["fp16"]},
            {"method": "ln_structured", "scope": "global", "amounts": [0.6], "epochs": 5, "lr": 0.001},
            {"method": "ln_structured", "scope": "global", "amounts": [0.6], "epochs": 5, "lr": 0.001,
             "distill": {"alpha": 0.5, "temperature": 4.0}},
            {"method": "ln_structured", "scope": "global", "amounts": [0.6], "epochs": 5, "lr": 0.001, "then": ["int8"]},
            {"method": "ln_structured", "scope": "global", "amounts": [0.52], "epochs": 5, "lr": 0.001,
             "then": [{"qat": {"weight_bits": 4, "act_bits": 4, "first_last_bits": 4, "epochs": 5, "lr": 0.001}}]}]),
    # batches of 128 evaluate faster than 500 on the 2-core CPU (the accuracy is the same)
    "summary": with_defaults(SUMMARY, eval_batch_size=128),
    "bench": {
        **COMMON,
        "width": TRAINING["width"],
        "batch_size": with_defaults(TRAINING, batch_size=128)["batch_size"],
        "steps": _f(int, 16, "timed training steps per round and pipeline", low=1),
        "warmup_steps": _f(int, 2, "untimed steps before each timing", low=0),
        "rounds": _f(int, 5, "rounds of interleaved timing (the median is kept)", low=1),
        "stock_workers": _f(int, 2, "DataLoader worker processes of the stock pipeline", low=0),
        "baseline": STAGE["baseline"],
    },
}


def defaults(stage: str) -> dict[str, Any]:
    return {k: copy.deepcopy(f.default) for k, f in _schema(stage).items()}


def _schema(stage: str) -> dict[str, Field]:
    if stage not in SCHEMAS:
        raise ParamsError(f"unknown stage '{stage}'; known stages: {', '.join(SCHEMAS)}")
    return SCHEMAS[stage]


def validate(values: Mapping[str, Any], stage: str) -> dict[str, Any]:
    """Check `values` against the stage's schema; return the full parameter set (defaults filled in)."""
    out = check_all(values, _schema(stage), stage)
    if stage in CROSS_CHECKS:
        CROSS_CHECKS[stage](out)
    return out


def probe(p: dict[str, Any]) -> dict[str, Any]:
    """The one step that looks at the machine, after validation: a device named explicitly exists, and sizes whose
    allocation cannot succeed here are refused now, not after minutes of work (`resources`). Returns `p`."""
    from . import resources

    resources.check(p, p if "width" in p else _baseline_values(p.get("baseline")))
    return p


def _baseline_values(path: str | None) -> dict[str, Any]:
    """The model and data keys of a stage's baseline params file (their declared defaults where it leaves them out),
    each only if valid; {} when it cannot be read (the stage refuses it later, with its own message)."""
    if not path:
        return {}
    try:
        raw = read_yaml(PARAMS_DIR.parent / path)
    except (ParamsError, OSError):
        return {}
    out = {}
    for key in ("width", "data", "synthetic_train", "synthetic_test"):
        field = {**COMMON, **TRAINING}[key]
        try:
            out[key] = field.check(key, raw.get(key, field.default))
        except ParamsError:
            pass
    return out


PARAMS_DIR = Path(__file__).resolve().parent.parent / "params"


def load(path: str | Path, stage: str) -> dict[str, Any]:
    """Read a params YAML file and validate it for `stage`; the keys it leaves out take their declared defaults."""
    _schema(stage)
    return probe(validate(read_yaml(path), stage))


def infer_stage(path: str | Path) -> str:
    """The stage a params file is written for, from its keys and name: among the stages it validates for (default
    values filled from each stage's declaration), the one its file name names (`svd_seeds.yaml`: only keys that
    every stage of a technique takes), else the one with the smallest schema (a baseline file is also a valid
    optuna file, which adds the search); if it validates for none, the stage that knows most of its keys, whose
    error then names what is wrong."""
    doc = read_yaml(path)
    fits, closest = [], []
    for stage, schema in SCHEMAS.items():
        unknown = sum(k not in schema for k in doc)
        closest.append((unknown, len(schema), stage))
        if unknown:
            continue
        try:
            validate(doc, stage)
        except ParamsError:
            continue
        fits.append((len(schema), stage))
    named = [stage for _, stage in fits if stage in Path(path).stem.split("_")]
    return named[0] if len(named) == 1 else min(fits)[1] if fits else min(closest)[2]


def from_notebook(namespace: Mapping[str, Any], stage: str) -> dict[str, Any]:
    """Collect the notebook's parameters (its parameters cell plus papermill's injected ones) and validate.

    Call it right after the parameters cell, before defining other names, so that a misspelled
    key injected by papermill is caught instead of silently ignored.
    """
    return probe(validate(notebook_values(namespace), stage))


