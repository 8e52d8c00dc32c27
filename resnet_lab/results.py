"""The results layer: what every table of the lab says about its models, computed once for the stage notebooks
(03–05) and the summary (06) alike.

- `Row`: one model as the tables read it (typed fields; rows are selected by these, never by display text).
- `names`: one naming rule (a model's name is its lineage; a seed or a run key only where two would collide).
- `recipe_key`: what a model is apart from its seed (models sharing it are one recipe on several seeds).
- `judge`: each model's Δ against the baseline it was made from, its 95% interval, and two verdicts (`stats`):
  **these images** (McNemar's exact test against that baseline, Benjamini–Hochberg over the table) and **the
  recipe, over seeds** (the Δs of the recipe's replicates, each against its own baseline, read against the Δ
  spread pooled over the recipes of its stage, `Row.pool`; BH over those recipes); `noise`: both in words.
- `seeds_table`: each recipe made on two or more seeds, over its seeds.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np

from . import config, runs, stats

if TYPE_CHECKING:
    import pandas as pd

IMAGES = "vs baseline, these images"  # the paired test of this model against its own baseline
RECIPE = "recipe vs baseline, over seeds"  # the recipe's Δ over its replicates
VERDICT = "verdict"  # the stronger of the two the data supports (the recipe's, where it was replicated)
BASIS = "verdict from"
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
    pool: str = ""  # the recipes whose Δ spreads are pooled together: the stage that made it (06 reads several)

    @property
    def is_seed_baseline(self) -> bool:
        return self.technique == "baseline" and self.replicate is not None


@dataclass
class Recipe:
    """One recipe over its replicates: the models, their Δs (each against its own baseline), the t-test against the
    pooled Δ spread (adjusted over the table's recipes) and its verdict."""
    members: list[str]
    accs: list[float]
    deltas: list[float]
    p: float  # nan below two replicates
    verdict: str

    @property
    def n(self) -> int:
        return len(self.deltas)


@dataclass
class Judged:
    delta: float  # test accuracy minus that of the baseline it was made from (pt)
    interval: tuple[float, float] | None  # 95% Wilson interval of its test accuracy (%)
    p: float | None  # paired test against that baseline, adjusted over the table (nan: a reference)
    images: str | None  # the verdict of that test (a baseline: "reference" or its seed)
    recipe: Recipe | None = None  # its recipe over seeds (None: a baseline, or a model not made from a seed's baseline)

    @property
    def verdict(self) -> str | None:
        """The stronger verdict the data supports: the recipe's where it was replicated, else these images'."""
        return self.recipe.verdict if self.recipe and self.recipe.n >= 2 else self.images

    @property
    def basis(self) -> str | None:
        """Where `verdict` comes from, in words."""
        if self.recipe and self.recipe.n >= 2:
            return f"recipe over {self.recipe.n} seeds"
        return "these test images" if self.images in (stats.BETTER, stats.WORSE, stats.SAME) else None


@dataclass
class Verdicts:
    rows: dict[str, Judged]
    spread: stats.Spread  # the reference baseline's test accuracy over its training seeds
    # pool (`Row.pool`) -> the Δ spread pooled over its replicated recipes (pt; nan: none replicated) and its df
    pools: dict[str, tuple[float, int]]

    def __getitem__(self, name: str) -> Judged:
        return self.rows[name]

    @property
    def df(self) -> int:
        return sum(df for _, df in self.pools.values())

    @property
    def sd(self) -> float:
        """The Δ spread of the one pool that has degrees of freedom (nan when none has, or several do)."""
        measured = [sd for sd, df in self.pools.values() if df]
        return measured[0] if len(measured) == 1 else float("nan")

    def spreads(self) -> str:
        """The pooled Δ spreads in words: "sd 0.21 pt on 4 degrees of freedom", per pool where there are several."""
        measured = {k: v for k, v in self.pools.items() if v[1]}
        return "; ".join((f"{k}: " if len(measured) > 1 else "") + f"sd {sd:.2f} pt on {df} degrees of freedom"
                         for k, (sd, df) in measured.items())


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
    """Every row's Δ, interval and both verdicts. `baselines`: the reference baseline first, then its replicates
    (other training seeds) — a model is judged against the one it descends from (the reference when it is not
    among them), paired image by image; a baseline of the reference's seeds is a reference itself. Models sharing
    a recipe key and made from the seeds' baselines are one recipe's replicates; recipes of one `Row.pool` share
    their pooled Δ spread and their adjustment. `seed_accs`: the reference recipe's test accuracies over its seeds
    (default: the `baselines`'), reported, never a verdict's noise."""
    reference = baselines[0]
    seeds = {b.origin: b for b in baselines}

    def against(row: Row) -> Row | None:
        return None if row.is_seed_baseline and row.origin in seeds else seeds.get(row.origin, reference)

    judged = [r for r in rows if against(r) is not None and r.correct is not None and against(r).correct is not None]
    tests = dict(zip((r.name for r in judged),
                     stats.verdicts([stats.mcnemar(r.correct, against(r).correct) for r in judged])))
    groups: dict[str, list[Row]] = {}
    for r in rows:
        if against(r) is not None and r.replicate is not None:
            groups.setdefault(r.recipe, []).append(r)
    delta = {r.name: r.test_acc - (against(r) or reference).test_acc for r in rows}
    # each pool (the stage that made the recipes: its table) on its own spread, adjusted over its own recipes, so that
    # 06 says of a model what its stage said (a family's Δ spread is its own: on the default store of 2026-12-08, INT8
    # 0.4 pt, unstructured 80% 1.3 pt, docs/statistics.md)
    pools, ps = {}, {}
    for pool in dict.fromkeys(g[0].pool for g in groups.values()):
        mine = {k: g for k, g in groups.items() if g[0].pool == pool}
        sd, df = pools[pool] = stats.pooled_sd([[delta[m.name] for m in g] for g in mine.values()])
        raw = {k: stats.recipe_p([delta[m.name] for m in g], sd, df) for k, g in mine.items()}
        tested = [k for k, p in raw.items() if not np.isnan(p)]
        ps |= raw | dict(zip(tested, stats.adjusted([raw[k] for k in tested])))
    recipes = {}
    for k, g in groups.items():
        ds = [delta[m.name] for m in g]
        verdict = stats.signed(ps[k], float(np.mean(ds))) if not np.isnan(ps[k]) else stats.NEEDS
        recipes[k] = Recipe([m.name for m in g], [m.test_acc for m in g], ds, ps[k], verdict)
    out = {}
    for r in rows:
        interval = stats.interval(r.correct) if r.correct is not None else None
        if against(r) is None:
            p, images = float("nan"), "reference" if r.origin == reference.origin else f"seed {r.replicate}"
        else:
            p, images = tests.get(r.name, (None, None))
        out[r.name] = Judged(delta[r.name], interval, p, images, recipes.get(r.recipe) if against(r) else None)
    return Verdicts(out, stats.spread(seed_accs or [b.test_acc for b in baselines]), pools or {"": (float("nan"), 0)})


def noise(v: Verdicts) -> str:
    """What the verdicts mean and what they were read against, in sentences."""
    s = v.spread
    text = ("Two verdicts per model. **These images**: the model against the baseline it was made from, on these "
            "test images (McNemar's exact test on the images where the two disagree, Benjamini–Hochberg over the "
            "table, 5%); it says nothing about another training run of the same recipe. **Recipe, over seeds**: the "
            "recipe applied to the baseline of each training seed, each Δ against its own baseline, its mean tested "
            "against the spread of a Δ between replicates")
    if v.df:
        text += (f" (pooled over the replicated recipes of the stage that made them: {v.spreads()}; t-test, "
                 "Benjamini–Hochberg over those recipes, 5%).")
    else:
        text += ("; no recipe here was made on two seeds, so it says \"needs replicates\" (give the stage "
                 "`baseline_seeds`, as `make report PROFILE=seeds` does).")
    if s.n >= 2:
        text += (f" The baseline itself scored {s.mean:.2f} ± {s.sd:.2f}% (sd) over {s.n} training seeds: that "
                 "absolute spread is not the noise of a Δ, since a compressed model inherits its parent's luck.")
    return text + " The verdict column holds the recipe's verdict where it was replicated, else these images'."


def resolution(v: Verdicts, replicates: tuple[int, ...] = (2, 3, 4, 6, 8)) -> pd.DataFrame:
    """How many replicates a resolution costs: for each number of seeds, the smallest mean Δ the recipe test can call
    with the Δ spread measured here (its degrees of freedom as measured; more recipes on more seeds add more).
    Empty when no recipe was replicated."""
    import pandas as pd

    measured = {k: sd_df for k, sd_df in v.pools.items() if sd_df[1]}
    if not measured:
        return pd.DataFrame()
    return pd.DataFrame({"seeds per recipe": replicates, **{
        "smallest mean Δ called (pt)" + (f", {k}" if len(measured) > 1 else ""): [stats.resolution(sd, df, n) for n in replicates]
        for k, (sd, df) in measured.items()}}).set_index("seeds per recipe")


def seeds_table(rows: list[Row], verdicts: Verdicts, fields: Callable[[Row], dict] = lambda r: {}) -> pd.DataFrame:
    """One row per recipe made on two or more seeds (the baseline's replicates, and each recipe made from them),
    named by its model from the reference baseline: mean ± sd of its test accuracy over the seeds, of its Δ (each against its own
    baseline), the recipe's p (pooled Δ spread, adjusted) and verdict. `fields`: columns of the first member to show
    beside. Empty when nothing has two seeds."""
    import pandas as pd

    by_name = {r.name: r for r in rows}
    out, seen = [], set()
    base = [r for r in rows if r.is_seed_baseline]
    reference = base[0].replicate if base else None
    if len(base) >= 2:
        a = stats.spread([r.test_acc for r in base])
        out.append({"model": base[0].name, "group": base[0].group, "technique": base[0].technique, **fields(base[0]),
                    "seeds": ", ".join(str(r.replicate) for r in base), "n": a.n, "test mean ± sd (%)": a.text()})
    for r in rows:
        rec = verdicts[r.name].recipe
        if rec is None or rec.n < 2 or id(rec) in seen:
            continue
        seen.add(id(rec))
        # named by the member made from the reference baseline (then the lowest seed), as the tables name it
        members = sorted((by_name[m] for m in rec.members), key=lambda m: (m.replicate != reference, m.replicate or 0))
        a, d = stats.spread(rec.accs), stats.spread(rec.deltas)
        out.append({"model": members[0].name, "group": members[0].group, "technique": members[0].technique,
                    **fields(members[0]), "seeds": ", ".join(str(m.replicate) for m in members), "n": rec.n,
                    "test mean ± sd (%)": a.text(), "Δ mean ± sd (pt)": d.text(), "Δ mean (pt)": d.mean,
                    "p (recipe, pooled Δ spread, BH)": rec.p, RECIPE: rec.verdict})
    return pd.DataFrame(out).set_index("model") if out else pd.DataFrame()
