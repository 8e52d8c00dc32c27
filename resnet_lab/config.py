"""The config core: typed keys (`Field`: type, default, range, help), the keys every stage shares, and safe
YAML reading. Names no technique: each technique declares its own keys in its module
(`resnet_lab/techniques/`), and `params` composes the stages' schemas from these and those.

A parameter set is a flat `key: value` mapping, so papermill can inject it as notebook variables. An
unknown key, a wrong type or a value out of range stops the run at once with one line naming the key,
what is allowed, and the closest valid key.
"""
from __future__ import annotations

import copy
import difflib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import yaml


class ParamsError(ValueError):
    """A parameter set that cannot be run: the message names the key and what is allowed."""


@dataclass(frozen=True)
class Field:
    kind: type  # bool, int, float or str
    default: Any
    help: str
    choices: tuple | None = None
    low: float | None = None  # inclusive lower bound
    high: float | None = None  # inclusive upper bound
    low_open: bool = False  # exclude `low` itself
    high_open: bool = False  # exclude `high` itself
    validator: Callable[[str, Any], Any] | None = None  # deeper check of a list/dict value
    required: bool = False  # a chain link must give it (no default)

    def allowed(self) -> str:
        if self.kind is object:  # a chain: its validator says what it takes
            return "a list of steps"
        if self.choices:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        lo = "(" if self.low_open else "["
        hi = ")" if self.high_open else "]"
        low = "-inf" if self.low is None else f"{self.low:g}"
        high = "inf" if self.high is None else f"{self.high:g}"
        if self.low is None and self.high is None:
            return f"a {self.kind.__name__}"
        return f"a {self.kind.__name__} in {lo}{low}, {high}{hi}"

    def check(self, key: str, value: Any) -> Any:
        """Return the value coerced to the field's type, or raise ParamsError."""
        if self.kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if self.kind is float and isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            # YAML 1.1 (PyYAML, papermill's -f) reads 1e-3 without a dot as a string; a person means the number
            value = float(value)
        ok_type = isinstance(value, self.kind) and not (self.kind is not bool and isinstance(value, bool))
        if not ok_type:
            raise ParamsError(
                f"parameter '{key}' = {bounded(repr(value))} has type {type(value).__name__}; "
                f"expected {self.allowed()} ({self.help})"
            )
        bad = False
        if self.choices is not None:
            bad = value not in self.choices
        elif self.kind in (int, float):
            if isinstance(value, float) and not math.isfinite(value):
                bad = True
            if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
                bad = True
            if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
                bad = True
        if bad:
            raise ParamsError(f"parameter '{key}' = {bounded(repr(value))} is out of range; expected {self.allowed()} ({self.help})")
        return self.validator(key, value) if self.validator else value


# A decimal number as people write one: 1e-3, 5E-4, .5, 3., -2.5e+1 (not inf/nan, not hex)
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def did_you_mean(name: Any, allowed) -> str:
    """" (did you mean 'x'?)" for the allowed name closest to a misspelled one, or ""."""
    close = difflib.get_close_matches(str(name), allowed, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _f(kind, default, help, **kw) -> Field:
    return Field(kind, default, help, **kw)


def _available(key: str, value: str) -> str:
    """A device named explicitly must exist on this machine: refused before any work, not after minutes of it."""
    import torch

    if value == "cuda" and not torch.cuda.is_available():
        raise ParamsError(f"parameter '{key}' = 'cuda', but this machine has no CUDA GPU that torch can use "
                          "(use 'auto' or 'cpu')")
    if value == "mps" and not torch.backends.mps.is_available():
        raise ParamsError(f"parameter '{key}' = 'mps', but MPS is not available on this machine (use 'auto' or 'cpu')")
    return value


# Keys shared by every stage that loads data, builds a model or writes a run.
COMMON: dict[str, Field] = {
    "profile": _f(str, "default", "label of the profile these params belong to", choices=("default", "full", "smoke", "seeds")),
    "data": _f(str, "mini", "data source", choices=("mini", "cifar10", "synthetic")),
    "data_dir": _f(str, "data", "folder of the data files (relative to the repo root)"),
    "synthetic_train": _f(int, 512, "training images generated by the synthetic source", low=16, high=10_000_000),
    "synthetic_test": _f(int, 128, "test images generated by the synthetic source", low=16, high=10_000_000),
    "val_fraction": _f(float, 0.1, "share of the training set held out for validation", low=0.0, high=0.5),
    "seed": _f(int, 0, "seed of the split, the initialisation, the shuffling and the augmentation", low=0,
               high=2**32 - 1),  # numpy's seeds stop there; torch's a little further
    "device": _f(str, "auto", "compute device (auto: cuda, then mps, then cpu)", choices=("auto", "cpu", "cuda", "mps"),
                 validator=_available),
    "eval_batch_size": _f(int, 500, "batch size for evaluation", low=1),
    "measure_batch_size": _f(int, 128, "batch size at which CPU throughput and latency are measured", low=1),
    "run_root": _f(str, "runs", "run store folder (relative to the repo root)"),
    "reuse": _f(bool, True, "reuse a finished run with the same parameters instead of recomputing"),
    "progress": _f(bool, True, "show tqdm progress bars"),
}

# Keys of one training recipe (the baseline, and every fine-tuning later).
TRAINING: dict[str, Field] = {
    "width": _f(int, 64, "channels of the first ResNet18 stage (64 = the standard ResNet18)", low=1, high=1024),
    "epochs": _f(int, 10, "training epochs", low=1, high=10_000),
    "batch_size": _f(int, 128, "training batch size", low=1, high=65_536),
    "optimizer": _f(str, "sgd", "optimizer", choices=("sgd", "adam", "adamw")),
    "lr": _f(float, 0.1, "peak learning rate", low=0.0, high=10.0, low_open=True),
    "momentum": _f(float, 0.9, "SGD momentum (Adam: beta1)", low=0.0, high=1.0, high_open=True),
    "nesterov": _f(bool, True, "Nesterov momentum (SGD only)"),
    "weight_decay": _f(float, 5e-4, "weight decay", low=0.0, high=1.0),
    "scheduler": _f(str, "onecycle", "learning-rate schedule", choices=("onecycle", "cosine", "step", "none")),
    "warmup_fraction": _f(float, 0.25, "one-cycle: share of the steps spent rising to the peak lr", low=0.0, high=1.0, low_open=True, high_open=True),
    "step_size": _f(int, 30, "step schedule: epochs between lr drops", low=1),
    "gamma": _f(float, 0.1, "step schedule: lr factor at each drop", low=0.0, high=1.0, low_open=True),
    "label_smoothing": _f(float, 0.0, "label smoothing of the cross-entropy", low=0.0, high=1.0, high_open=True),
    "amp": _f(str, "auto", "mixed precision on CUDA (auto: bf16 where supported)", choices=("auto", "bf16", "fp16", "off")),
    "eval_flip": _f(bool, False, "final evaluation averages each image and its mirror (test-time flip); per-epoch curves use one view"),
    "test_each_epoch": _f(bool, True, "also evaluate the test set after every epoch (curves only; never used to choose)"),
}

REPORTING: dict[str, Field] = {
    "sample_images": _f(int, 24, "test images shown with their predictions", low=0, high=200),
}

# ---------------------------------------------------------------- Optuna search space
# A search space maps training keys to either a list of choices or a [low, high] range.
SPACE_CHOICES = ("batch_size", "optimizer", "scheduler", "width", "nesterov")
SPACE_RANGES = ("lr", "weight_decay", "momentum", "label_smoothing", "gamma", "warmup_fraction", "step_size", "epochs")
SPACE_LOG = ("lr", "weight_decay")  # sampled log-uniformly


def check_search_space(key: str, space: Any) -> dict[str, Any]:
    """Validate a search space (see params/optuna.yaml); every value is checked like the key itself."""
    allowed = SPACE_CHOICES + SPACE_RANGES
    out = {}
    for name, spec in space.items():
        where = f"{key}.{name}"
        if name not in allowed:
            raise ParamsError(f"unknown search-space key '{where}'" + did_you_mean(name, allowed)
                              + f"; searchable keys: {', '.join(allowed)}")
        field = TRAINING[name]
        if name in SPACE_CHOICES:
            if not isinstance(spec, list) or not spec:
                raise ParamsError(f"'{where}' must be a non-empty list of choices, not {spec!r}")
            out[name] = [field.check(where, v) for v in spec]
        elif name == "lr" and isinstance(spec, dict):  # one range per optimizer
            for opt in spec:
                if opt not in TRAINING["optimizer"].choices:
                    raise ParamsError(f"'{where}' names unknown optimizer '{opt}'; "
                                      f"known: {', '.join(TRAINING['optimizer'].choices)}")
            out[name] = {opt: _check_range(f"{where}.{opt}", field, r, True) for opt, r in spec.items()}
        else:
            out[name] = _check_range(where, field, spec, name in SPACE_LOG)
    if isinstance(out.get("lr"), dict) and "optimizer" in out:
        missing = set(out["optimizer"]) - set(out["lr"])
        if missing:
            raise ParamsError(f"'{key}.lr' has no range for optimizer(s) {sorted(missing)} listed in '{key}.optimizer'")
    return out


def _check_range(where: str, field: Field, spec: Any, log: bool) -> list:
    if not isinstance(spec, list) or len(spec) != 2:
        raise ParamsError(f"'{where}' must be a range [low, high], not {spec!r}")
    low, high = (field.check(where, v) for v in spec)
    if low > high:
        raise ParamsError(f"'{where}' has low {low} > high {high}")
    if log and low <= 0:
        raise ParamsError(f"'{where}' is sampled on a log scale, so low must be > 0 (got {low})")
    return [low, high]


TUNING: dict[str, Field] = {
    "study_name": _f(str, "", "Optuna study name; empty: derived from the parameters, so other settings start another study"),
    "storage": _f(str, "", "Optuna storage: empty (SQLite file in the run store), an RDB URL (sqlite:///…, "
                  "postgresql://…, mysql://…) or journal:<file> for a journal file shared by processes"),
    "n_trials": _f(int, 10, "finished (complete or pruned) trials the study should have; rerunning adds only the missing ones", low=1),
    "trial_width": _f(int, 8, "ResNet18 width of the trial models (a cheap proxy of the final width)", low=1, high=1024),
    "trial_epochs": _f(int, 6, "epochs of each trial when 'epochs' is not in the search space", low=1),
    "sampler_startup_trials": _f(int, 4, "TPE: random trials before it models the search space", low=0),
    "pruner": _f(str, "median", "early stopping of hopeless trials", choices=("median", "hyperband", "none")),
    "pruner_startup_trials": _f(int, 3, "median pruner: trials that are never pruned", low=0),
    "pruner_warmup_epochs": _f(int, 2, "epochs before a trial can be pruned", low=0),
    "heartbeat_s": _f(int, 30, "RDB storage heartbeat; a trial silent for 2x this is marked failed (0: off)", low=0),
    "enqueue_base": _f(bool, True, "run the base recipe (these params) as the first trial, a known-good starting point"),
    "keep_base": _f(bool, True, "retrain the base recipe, not the best trial, unless the best trial is told apart from "
                    "the base recipe's trial on the validation images (McNemar, p < 0.05): the top of a few noisy trials is "
                    "often the luckiest; false: always the best trial"),
    "search_space": Field(dict, {}, "keys to search: a list of choices or a [low, high] range each", validator=check_search_space),
}


def check_seeds(key: str, value: Any) -> list[int]:
    if not isinstance(value, list):
        raise ParamsError(f"'{key}' must be a list of seeds (one run per seed), not {bounded(repr(value))}")
    seed = COMMON["seed"]
    out = [seed.check(f"{key}[{i}]", v) for i, v in enumerate(value)]
    if len(set(out)) != len(out):
        raise ParamsError(f"'{key}' lists a seed twice: {bounded(repr(value))}")
    return out


# ---------------------------------------------------------------- compression stages
# A compression stage starts from a finished baseline run; the data it uses is the baseline's.
STAGE: dict[str, Field] = {
    **{k: COMMON[k] for k in ("profile", "seed", "device", "eval_batch_size", "measure_batch_size",
                               "run_root", "reuse", "progress")},
    "baseline": _f(str, "params/baseline.yaml", "params file of the 01_baseline run this stage starts from "
                   "(looked up in the run store; the data and model come from it)"),
    "baseline_seeds": Field(list, [], "replicate the stage's whole sweep from the baseline run of each of these "
                            "training seeds (each one of the baseline's `seeds`), fine-tuning with that seed: the "
                            "spread of every model over seeds; [] = from the baseline of `seed` only",
                            validator=check_seeds),
    "calibration_images": _f(int, 1024, "training images (not augmented) that calibrate the activation ranges of "
                             "every post-training quantized model this stage makes (a chain's links included)",
                             low=1, high=50_000),
    "speed_rounds": _f(int, 5, "rounds of interleaved CPU timing of the stage's models side by side at "
                       "measure_batch_size (each model keeps the median of its batches)", low=1),
}
def check_distill(key: str, value: Any) -> dict[str, Any]:
    """Knowledge distillation of a fine-tune: {} (off), or {alpha, temperature, teacher} (missing keys take
    DISTILL_KEYS' defaults)."""
    if value is None or value == {}:
        return {}
    if not isinstance(value, dict):
        raise ParamsError(f"'{key}' must be a mapping of {', '.join(DISTILL_KEYS)} (or {{}}: off), not {bounded(repr(value))}")
    for k in value:
        if k not in DISTILL_KEYS:
            raise ParamsError(f"unknown key '{key}.{k}'" + did_you_mean(k, DISTILL_KEYS)
                              + f"; distillation takes {', '.join(DISTILL_KEYS)}")
    return {k: f.check(f"{key}.{k}", value.get(k, f.default)) for k, f in DISTILL_KEYS.items()}


DISTILL_KEYS: dict[str, Field] = {
    "alpha": _f(float, 0.5, "weight of the teacher's soft targets in the loss: (1 − α)·CE + α·T²·KL", low=0.0, high=1.0),
    "temperature": _f(float, 4.0, "softmax temperature of both models' logits in the KL term", low=0.0, high=100.0,
                      low_open=True),
    "teacher": _f(str, "baseline", "the teacher: 'baseline' (the baseline this stage starts from) or the params file "
                  "of another finished baseline run (e.g. params/full.yaml)"),
}
# The recipe of any (re)training a stage does: the baseline's training keys except the architecture,
# and eval_flip, which stays the baseline's so every accuracy is measured the same way; and distillation.
FINETUNE: dict[str, Field] = {
    **{k: f for k, f in TRAINING.items() if k not in ("width", "eval_flip")},
    "distill": Field(dict, {}, "knowledge distillation from a teacher during the fine-tune: {} (off) or {alpha, "
                     "temperature, teacher} (defaults 0.5, 4, 'baseline')", validator=check_distill),
}

# ---------------------------------------------------------------- chains of compression steps
# A chain is a list of links, each a registered technique's kind, bare (`int8`) or with settings
# (`{svd: {rank: 0.5}}`); a link's settings not given take the technique's defaults (its notebook's
# default params file) and, for the seed, the stage's. `LINKS` holds each kind's settings schema; the
# registry adds the schema of every technique registered later.
SEEDS = Field(list, [], "training seeds: one run per seed (empty: the stage's `seed`)", validator=check_seeds)
# what a link that trains accepts besides its own settings: the fine-tuning recipe and its seed(s)
LINK_TRAINING: dict[str, Field] = {**FINETUNE, "seed": COMMON["seed"], "seeds": SEEDS}


def fractions(low_open: bool, what: str) -> Callable[[str, Any], list[float]]:
    """Validator of a list of distinct fractions in [0, 1) (or (0, 1) when `low_open`)."""
    def check(key: str, value: Any) -> list[float]:
        if not isinstance(value, list):
            raise ParamsError(f"'{key}' must be a list of {what}, not {bounded(repr(value))}")
        for v in value:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 < v < 1 if low_open else 0 <= v < 1):
                raise ParamsError(f"'{key}' holds {v!r}; each of its {what} lies in {'(0' if low_open else '[0'}, 1)")
        if len(set(value)) != len(value):
            raise ParamsError(f"'{key}' lists a value twice: {bounded(repr(value))}")
        return [float(v) for v in value]
    return check


# Keys that do not change what a run computes, so they are left out of its identity (hash).
# A baseline's `seeds` lists its replicates; each run is keyed by its own training seed (`train.run_params`).
NOT_IN_IDENTITY = frozenset({"run_root", "reuse", "progress", "sample_images", "profile", "seeds"})


MAX_PARAMS_BYTES = 1_000_000  # a params file is a page of settings; a larger one is refused before parsing


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader without anchors and aliases: nested aliases expand without bound when the value is
    later walked (a 438-byte file became gigabytes), and a params file has no need of them."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.events.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not accepted in a params file: "
                                              "write the value out", event.start_mark)
        return super().compose_node(parent, index)


class _NoAliasDumper(yaml.SafeDumper):
    def ignore_aliases(self, data):  # a value used twice is written twice: the files stay readable by `read_yaml`
        return True


def dump_yaml(values: Mapping[str, Any], sort_keys: bool = True) -> str:
    """YAML text of a params mapping that `read_yaml` reads back: no anchors or aliases (PyYAML's safe_dump writes
    `&id001`/`*id001` for a list or mapping that appears twice)."""
    return yaml.dump(dict(values), Dumper=_NoAliasDumper, sort_keys=sort_keys)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping of a params file, read safely: a bounded size, UTF-8 text, no aliases, bounded nesting; any
    other file is a one-line ParamsError naming it."""
    path = Path(path)
    try:
        with open(path, "rb") as f:  # at most one byte past the limit: a symlink to an endless file ends here
            raw = f.read(MAX_PARAMS_BYTES + 1)
    except OSError as e:
        raise ParamsError(f"cannot read params file {path}: {e.strerror}") from None
    if len(raw) > MAX_PARAMS_BYTES:
        raise ParamsError(f"params file {path} is larger than {MAX_PARAMS_BYTES:,} bytes: not a params file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ParamsError(f"params file {path} is not UTF-8 text (byte {e.start}): not a params file") from None
    try:
        doc = yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise ParamsError(f"params file {path} is not valid YAML: {bounded(str(e))}") from None
    except RecursionError:
        raise ParamsError(f"params file {path} is nested too deeply: not a params file") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ParamsError(f"params file {path} must hold a mapping of key: value, not {type(doc).__name__}")
    return doc


def bounded(text: str, limit: int = 300) -> str:
    """`text` cut to `limit` characters: an error message quotes a value, never a whole file."""
    return text if len(text) <= limit else text[:limit] + f"… ({len(text):,} characters)"


# Names IPython puts in a notebook's namespace; everything else defined before the first import
# of resnet_lab is a parameter (from the `parameters` cell or papermill's injected cell).
_IPYTHON_NAMES = frozenset({"In", "Out", "get_ipython", "exit", "quit", "open"})


def notebook_values(namespace: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters of a notebook's namespace: its parameters cell plus papermill's injected ones."""
    return {k: v for k, v in namespace.items()
            if not k.startswith("_") and k not in _IPYTHON_NAMES
            and isinstance(v, (bool, int, float, str, list, dict, type(None)))}


def check_all(values: Mapping[str, Any], schema: Mapping[str, Field], name: str) -> dict[str, Any]:
    """Check `values` against `schema`: unknown keys refused (the closest valid one suggested), every key's value
    (or its default) checked and coerced. Pure: reads nothing but its arguments."""
    if not isinstance(values, Mapping):
        raise ParamsError(f"parameters must be a mapping of key: value, not {type(values).__name__}")
    unknown = [k for k in values if k not in schema]
    if unknown:
        lines = [f"unknown parameter '{k}'" + did_you_mean(k, schema) for k in unknown]
        raise ParamsError("; ".join(lines) + f". Allowed keys for stage '{name}': {', '.join(sorted(schema))}")
    # defaults pass the same checks, so list/dict values are always in their normalized form
    return {key: field.check(key, values[key] if key in values else copy.deepcopy(field.default))
            for key, field in schema.items()}


def with_defaults(schema: Mapping[str, Field], **defaults: Any) -> dict[str, Field]:
    """`schema` with other defaults for some keys (a stage whose recipe differs from another's)."""
    import dataclasses

    return {k: dataclasses.replace(f, default=defaults[k]) if k in defaults else f for k, f in schema.items()}


# Keys added after runs were stored, left out of a run's identity while they hold this value (off), so the runs
# stored before them keep their keys.
ADDED_OFF = {"distill": {}}


def identity(values: Mapping[str, Any], ignore: Iterable[str] = NOT_IN_IDENTITY) -> dict[str, Any]:
    """The part of a parameter set that decides what a run computes."""
    return {k: v for k, v in sorted(values.items())
            if k not in set(ignore) and not (k in ADDED_OFF and v == ADDED_OFF[k])}

