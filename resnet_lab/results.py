"""The results layer: what every table of the lab says about its models, computed once for the stage notebooks
(03–05) and the summary (06) alike.

- `Row`: one model as the tables read it (typed fields; rows are selected by these, never by display text).
- `names`: one naming rule (a model's name is its lineage; a seed or a run key only where two would collide).
- `recipe_key`: what a model is apart from its seed (models sharing it are one recipe on several seeds).
- `judge`: each model's Δ against the baseline of its own training seed, its 95% interval, the paired test
  (McNemar's exact test, Benjamini–Hochberg over the table) and the verdict; `noise`: what it was read against.
- `seeds_table`: each recipe trained on two or more seeds, over its seeds.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np

from . import config, runs, stats

if TYPE_CHECKING:
    import pandas as pd

VERDICT = "vs baseline"
# a step run's params that say where and with which seed it ran, not what recipe it is
NOT_RECIPE = ("seed", "parent", "baseline", "device", "eval_batch_size")


@dataclass
class Row:
    """One model of a table."""
    name: str
    technique: str
    group: str  # its technique's family; a model of two or more steps: "combination"
    origin: str  # run key of the baseline it descends from (a baseline: its own)
    replicate: int | None  # that baseline's training seed, when it is the reference or one of its replicates
    test_acc: float
    correct: np.ndarray | None  # per test image: predicted right (None: a run stored before predictions were)
    recipe: str = ""  # `recipe_key`

    @property
    def is_seed_baseline(self) -> bool:
        return self.technique == "baseline" and self.replicate is not None


@dataclass
class Judged:
    delta: float  # test accuracy minus that of the baseline of its own seed (pt)
    interval: tuple[float, float] | None  # 95% Wilson interval of its test accuracy (%)
    p: float | None  # paired test against that baseline, adjusted over the table (nan: a reference)
    verdict: str | None


@dataclass
class Verdicts:
    rows: dict[str, Judged]
    spread: stats.Spread  # the reference baseline's test accuracy over its training seeds
    band: float  # how far one model's Δ moves by the seed alone (95%; nan: one seed, not measured)

    def __getitem__(self, name: str) -> Judged:
        return self.rows[name]


def names(entries: list[tuple[str, str, str, int | None, int | None]], reference: str) -> list[str]:
    """One name per model from (label, run key, origin, origin's replicate seed, the model's own seed): its label;
    a model made from another baseline than `reference` adds ", seed N" (a replicate of it) or ", from baseline
    KEY"; where two names still collide, each adds its own seed (", seed N") if that tells them apart, else its run
    key."""
    out = []
    for label, key, origin, replicate, _ in entries:
        if origin != reference:
            label += f", seed {replicate}" if replicate is not None else f", from baseline {origin}"
        out.append(label)
    for name in set(out):
        same = [i for i, n in enumerate(out) if n == name]
        if len(same) < 2:
            continue
        seeds = [entries[i][4] for i in same]
        distinct = None not in seeds and len(set(seeds)) == len(seeds)
        for i in same:
            out[i] = f"{name}, seed {entries[i][4]}" if distinct else f"{name} [{entries[i][1]}]"
    return out


def baseline_label(width: int) -> str:
    return f"baseline (FP32, width {width})"


def recipe_key(run: runs.Run, cache: dict[str, str], twin: bool = False) -> str:
    """What the model of `run` is apart from its seed: its technique and settings without the seed, after its
    parent's recipe key (a baseline: its params without the training seed). `twin`: also without its own `distill`
    setting (a model fine-tuned with and without distillation shares it). `cache`: keys already computed."""
    ref = f"{run.stage}/{run.key}" + (" twin" if twin else "")
    if ref not in cache:
        if run.stage == "baseline":
            key = ["baseline", without_seed(run.params)]
        else:
            stage, _, parent_key = str(run.params.get("parent", "")).partition("/")
            up = recipe_key(runs.Run(run.store, stage, parent_key), cache) if parent_key else ""
            left_out = NOT_RECIPE + (("distill",) if twin else ())
            key = [up, run.stage, {k: v for k, v in run.params.items() if k not in left_out
                                   and not (k in config.ADDED_OFF and v == config.ADDED_OFF[k])}]
        cache[ref] = json.dumps(key, sort_keys=True, default=str)
    return cache[ref]


def without_seed(baseline_params: dict) -> dict:
    """A baseline run's params without its training seed: equal for the replicates of one recipe and split."""
    return {k: v for k, v in baseline_params.items() if k not in ("train_seed", "seeds")}


def judge(rows: list[Row], baselines: list[Row], seed_accs: list[float] | None = None) -> Verdicts:
    """Every row's Δ, interval and verdict. `baselines`: the reference baseline first, then its replicates (other
    training seeds) — a model is judged against the one it descends from (the reference when it is not among
    them), paired image by image; a baseline of the reference's seeds is a reference itself. The seed band comes
    from `seed_accs` (the reference recipe's test accuracies over its seeds; default: the `baselines`')."""
    reference = baselines[0]
    seeds = {b.origin: b for b in baselines}
    spread = stats.spread(seed_accs or [b.test_acc for b in baselines])
    band = stats.seed_band(spread)

    def against(row: Row) -> Row | None:
        return None if row.is_seed_baseline and row.origin in seeds else seeds.get(row.origin, reference)

    judged = [r for r in rows if against(r) is not None and r.correct is not None and against(r).correct is not None]
    tests = dict(zip((r.name for r in judged),
                     stats.verdicts([stats.mcnemar(r.correct, against(r).correct) for r in judged])))
    out = {}
    for r in rows:
        ref = against(r)
        delta = r.test_acc - (ref or reference).test_acc
        interval = stats.interval(r.correct) if r.correct is not None else None
        if ref is None:
            p, verdict = float("nan"), "reference" if r.origin == reference.origin else f"seed {r.replicate}"
        elif r.name in tests:
            p, test_verdict = tests[r.name]
            verdict = stats.overall(test_verdict, delta, band)
        else:
            p, verdict = None, None
        out[r.name] = Judged(delta, interval, p, verdict)
    return Verdicts(out, spread, band)


def noise(v: Verdicts) -> str:
    """What the verdicts were read against, in a sentence."""
    s = v.spread
    test = ("Δ: against the baseline of the model's own training seed. Verdicts: McNemar's exact test on the test "
            "images where the model and its baseline disagree, Benjamini–Hochberg over the table, 5%")
    if s.n < 2:
        return (test + "; the baseline was trained on one seed here, so the seed noise is not measured and the "
                "verdicts cover the test sample only (add `seeds` to the baseline's params to measure it).")
    return (test + f"; and only when |Δ| exceeds the seed band: the baseline over {s.n} training seeds scored "
            f"{s.mean:.2f} ± {s.sd:.2f}% (sd), so a single model's Δ moves by up to ±{v.band:.2f} pt (95%) by the "
            "seed alone.")


def seeds_table(rows: list[Row], baselines: list[Row], fields: Callable[[Row], dict] = lambda r: {}) -> pd.DataFrame:
    """One row per recipe with two or more seeds among `rows` (the baseline's replicates, and each model made from
    them), named by its model of the reference seed: mean ± sd over the seeds, the Δs against the baseline of each
    seed, their t-test, the pooled paired test, both adjusted over the table (Benjamini–Hochberg), and the verdict
    both support. `fields`: columns of the first member to show beside. Empty when nothing has two seeds."""
    import pandas as pd

    seeds = {b.origin: b for b in baselines}
    groups: dict[str, list[Row]] = {}
    for r in rows:
        if r.replicate is not None:
            groups.setdefault(r.recipe, []).append(r)
    out = []
    for members in groups.values():
        if len(members) < 2:
            continue
        members = sorted(members, key=lambda m: (m.replicate != baselines[0].replicate, m.replicate))
        first = members[0]
        row = {"model": first.name, "group": first.group, "technique": first.technique, **fields(first),
               "seeds": ", ".join(str(m.replicate) for m in members)}
        if first.technique == "baseline":
            a = stats.spread([m.test_acc for m in members])
            row |= {"n": a.n, "test mean ± sd (%)": a.text(), "test mean (%)": a.mean, "test sd (pt)": a.sd}
        else:
            bases = [seeds[m.origin] for m in members]
            row |= stats.over_seeds([m.test_acc for m in members], [m.test_acc - b.test_acc for m, b in zip(members, bases)],
                                    [stats.mcnemar(m.correct, b.correct) for m, b in zip(members, bases)])
        out.append(row)
    stats.adjust_over_seeds(out, VERDICT)
    return pd.DataFrame(out).set_index("model") if out else pd.DataFrame()
