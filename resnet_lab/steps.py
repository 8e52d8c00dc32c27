"""One mechanism for every compression step, written once.

A step takes a parent model run (the baseline, or any finished model run), applies a registered
technique (`registry`), fine-tunes where the technique trains (one recipe merge, one device
policy), evaluates with one protocol, and stores a child run whose identity includes the parent's
run key. The pieces, each small: chains from params (`link_settings`, `link`, `links`), the run
identity (`identity`), save → reload → exact check → evaluate (`keep`), the baseline as the root of every
chain (`root`), and `Context.apply`: lock → reuse, or make → keep → measure → finish. Finding the baseline
lives in `baselines`, the device and evaluation protocol in `evaluation`. A chain (`then: [...]`, `start: [...]` in params) is a list of links; each link is such a step,
its own run, reused when finished, and the model it makes is named by its lineage
("L1 structured, global, 60% of channels → INT8 (x86, 1024 calibration images)").

Every model's row carries fields (technique, family, parent, lineage, links, seed) that tables and
headlines select by, and one set of column names (below) serves 03, 04, 05 and 06.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
from torch import nn

from . import baselines as baseline_mod
from . import data as data_mod
from . import evaluation, metrics, models, registry, results, runs, stats, train
from . import params as params_mod
from .registry import Made  # noqa: F401  (what a technique's `make` returns; tests build it from here)

if TYPE_CHECKING:  # tables are built on demand; pandas is imported there
    import pandas as pd

# ---------------------------------------------------------------- one set of column names (03–06)
ACC = "test accuracy (%)"
VAL = "validation accuracy (%)"
DELTA = "Δ vs baseline (pt)"
DELTA_PARENT = "Δ vs parent (pt)"
ACC_CI = "test 95% interval (%)"
P_BASELINE = "p vs baseline (paired, BH)"
IMAGES, RECIPE, VERDICT, BASIS = results.IMAGES, results.RECIPE, results.VERDICT, results.BASIS
P_RECIPE = "p recipe (pooled Δ spread, BH)"
BEFORE = "test acc. before fine-tuning (%)"
BITS = "bits (weights / activations)"
SPARSITY = "weight sparsity (%)"
PARAMS = "parameters"
NONZERO = "nonzero parameters"
MACS = "MACs"
SPARSE_MACS = "MACs over nonzero weights"
MAC_REDUCTION = "MAC reduction (×)"
SIZE = "size on disk (KB)"
SIZE_RATIO = "size vs baseline (×)"
SPEEDUP = "speed-up (×)"
SPEEDUP_SPREAD = "speed-up over rounds (×)"  # the median with the lowest and highest ratio of the timing rounds
SPEEDUP_PER_MAC = "speed-up ÷ MAC reduction"
COURSE = "course score"
MICRONET = "MicroNet score"
TRAIN_TIME = "fine-tuning time (s)"
# fields: what rows are selected by (never by their display name)
FIELDS = ["technique", "family", "parent", "lineage", "links", "seed"]


EXACT_CHECK = 128  # test images on which a saved model must give its maker's logits bit for bit


# ---------------------------------------------------------------- what a step is and makes
@dataclass(frozen=True)
class Link:
    """One step of a chain: a technique's kind and its complete settings (what its run is keyed by)."""
    kind: str
    settings: dict[str, Any]


@dataclass
class Model:
    """A finished model run: its stored row, its inference model (reloaded from the run's file, on the CPU,
    float32 in and out) and its fine-tuning history."""
    run: runs.Run
    row: dict[str, Any]
    model: nn.Module
    history: list[dict] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.row["label"]

    @property
    def ref(self) -> str:
        """The run's place in the store, `stage/key` (what a child's `parent` field holds)."""
        return f"{self.run.stage}/{self.run.key}"


@dataclass
class Step:
    """What a technique's `make` receives: the stage context, the parent model, the link's settings, its run."""
    ctx: "Context"
    parent: Model
    settings: dict[str, Any]
    run: runs.Run

    def accuracy(self, model: nn.Module, split: str = "test") -> float:
        """Accuracy (%) with the evaluation protocol, on the compute device (for 'before fine-tuning')."""
        return self.ctx.protocol.accuracy(model, split)

    def finetune(self, model: nn.Module, after_step: Callable[[], None] | None = None, epochs: int | None = None,
                 checkpoint: str = "checkpoint.pt") -> list[dict]:
        """Train `model` with the link's recipe (one merge for every technique: the baseline's params, then the
        link's fine-tuning keys and seed); resumable from `checkpoint` in the run folder."""
        recipe = {k: self.settings[k] for k in params_mod.FINETUNE}
        if epochs is not None:
            recipe["epochs"] = epochs
        p = {**self.ctx.bp, **recipe, "seed": self.settings["seed"], "device": self.ctx.p["device"],
             "progress": self.ctx.p["progress"]}
        teacher = self.ctx.teacher(recipe["distill"]["teacher"]) if recipe["distill"] else None
        return train.fit(model, self.ctx.dataset, p, checkpoint=self.run.path(checkpoint), after_step=after_step,
                         teacher=teacher)


@dataclass
class Result:
    """A stage's models: the reference (the baseline, or 03's start model) first, then each model made, once."""
    ctx: "Context"
    models: list[Model]
    extras: dict[str, Any] = field(default_factory=dict)  # stage analyses (sensitivity, curves)
    bases: dict[str, Model] = field(default_factory=dict)  # the baselines of replicates (run key -> root)
    _rows: list[results.Row] | None = field(default=None, repr=False)  # `result_rows`, read once
    _verdicts: results.Verdicts | None = field(default=None, repr=False)  # `verdicts`, judged once

    @property
    def baseline(self) -> baseline_mod.BaselineResult:
        return self.ctx.base

    def add(self, *made: Model) -> None:
        self._rows = self._verdicts = None
        seen = {m.ref for m in self.models}
        self.models += [m for m in made if m.ref not in seen and not seen.add(m.ref)]

    def roots(self) -> dict[str, Model]:
        """The baseline runs of this result (one, or one per replicate seed), by run key: each model's reference."""
        return {self.ctx.root.run.key: self.ctx.root, **self.bases,
                **{m.run.key: m for m in self.models if m.row["technique"] == "baseline"}}

    def root_of(self, m: Model) -> Model:
        """The baseline `m` descends from (its Δ and paired test are against it)."""
        roots = self.roots()
        return roots.get(m.row["baseline"], self.ctx.root) if m.row["technique"] != "baseline" else roots.get(
            m.run.key, self.ctx.root)

    def replicated(self) -> bool:
        return len(self.roots()) > 1

    def names(self) -> list[str]:
        """Each model's name in tables, by the one rule of `results.names`."""
        roots = self.roots()
        entries = []
        for m in self.models:
            baseline = m.row["technique"] == "baseline"
            origin = m.run.key if baseline else m.row["baseline"]
            label = results.baseline_label(m.row["arch"]["width"]) if baseline else m.name
            entries.append((label, m.run.key, origin, roots[origin].row["seed"] if origin in roots else None,
                            m.row.get("seed")))
        return results.names(entries, self.ctx.root.run.key)

    def _correct(self, m: Model) -> np.ndarray | None:
        try:
            return stats.correct(m.run.predictions()["test"].numpy(), self.ctx.dataset.test.labels.cpu().numpy())
        except (runs.RunStoreError, KeyError, ValueError):  # a run stored before predictions were: no interval
            return None

    def result_rows(self) -> list[results.Row]:
        """The models as the results layer reads them (`results.Row`), in table order, each named by `names` (their
        per-image predictions read once)."""
        if self._rows is not None:
            return self._rows
        roots, cache = self.roots(), {}
        out = []
        for name, m in zip(self.names(), self.models):
            origin = m.run.key if m.row["technique"] == "baseline" else m.row["baseline"]
            group = m.row["family"] if m.row["links"] <= 1 else "combination"
            out.append(results.Row(name, m.row["technique"], group, origin,
                                   roots[origin].row["seed"] if origin in roots else None, m.row["test_acc"],
                                   self._correct(m), results.recipe_key(m.run, cache)))
        self._rows = out
        return out

    def baseline_rows(self) -> list[results.Row]:
        """The reference baseline first, then the baselines of the replicates: what each model is judged against."""
        rows = {r.origin: r for r in self.result_rows() if r.technique == "baseline"}
        roots = list(self.roots().values())
        return [rows.get(m.run.key) or results.Row("baseline", "baseline", "baseline", m.run.key, m.row["seed"],
                                                    m.row["test_acc"], self._correct(m)) for m in roots]

    def verdicts(self) -> results.Verdicts:
        """Every model's Δ, interval and verdict (`results.judge`), read against the baseline's seeds in the store."""
        if self._verdicts is None:  # the table, the seeds table and the notebook's sentence all read them
            self._verdicts = results.judge(self.result_rows(), self.baseline_rows(), self.ctx.seed_accs)
        return self._verdicts

    def seeds_table(self) -> pd.DataFrame:
        """Each recipe of this result trained on two or more seeds, over its seeds (`results.seeds_table`)."""
        return results.seeds_table(self.result_rows(), self.verdicts())

    def inference_models(self) -> dict[str, nn.Module]:
        """The models to time side by side, by name: one per recipe (`timed_as`)."""
        models = dict(zip(self.names(), (m.model for m in self.models)))
        return {name: models[name] for name in dict.fromkeys(self.timed_as().values())}

    def timed_as(self) -> dict[str, str]:
        """Each model's name -> the model its speed is timed on: its recipe's model from the reference baseline when the
        two have the same MACs and parameters. A replicate (the recipe on another baseline seed) with the same layer
        shapes computes the same operations, so its speed is its recipe's: timing it again would cost the report time
        and say nothing new. Global structured pruning keeps other channels on another seed: those are timed apart."""
        rows, first = self.result_rows(), {}
        ops = {r.name: (r.recipe, m.row["macs"], m.row["params"]) for r, m in zip(rows, self.models)}
        reference = rows[0].replicate  # the member made from the reference baseline first, then table order
        for r in sorted(rows, key=lambda r: r.replicate != reference):
            first.setdefault(ops[r.name], r.name)
        return {r.name: first[ops[r.name]] for r in rows}

    def histories(self) -> dict[str, list[dict]]:
        """The fine-tuning (or training) history of every model made here, by name (not the reference's)."""
        return {n: m.history for n, m in zip(self.names()[1:], self.models[1:]) if m.history}

    def rows(self) -> list[dict[str, Any]]:
        return [m.row for m in self.models]

    def reads(self) -> list[str]:
        """The run folders this result was read from (the report's up-to-date check watches them)."""
        return list(dict.fromkeys(self.ctx.read))


# ---------------------------------------------------------------- chains from params
def link(kind: str, settings: dict[str, Any], p: dict[str, Any], seed: int | None = None) -> Link:
    """A link of technique `kind` with these settings; the seed (else the stage's) belongs to it only if the
    technique trains."""
    tech = registry.get(kind)
    settings = tech.normalize(dict(settings))
    if tech.trains:
        settings["seed"] = p["seed"] if seed is None else seed
    return Link(kind, settings)


def links(chain: list[dict[str, dict]], p: dict[str, Any], where: str = "then") -> list[list[Link]]:
    """Concrete chains of links for a validated chain ([{kind: {settings given}}]) of a stage's params `p`: each
    link's settings completed by `link_settings`, checked; a link with `seeds` gives one chain per seed. Refused
    (ParamsError) before any work when a link cannot follow the one before."""
    chains: list[list[Link]] = [[]]
    for i, item in enumerate(chain):
        (kind, given), = item.items()
        tech = registry.get(kind)
        here = f"'{where}[{i}]' ({kind})"
        if not tech.is_step:
            raise params_mod.ParamsError(f"{here}: {kind} is not a compression step")
        if tech.terminal and i < len(chain) - 1:
            raise params_mod.ParamsError(f"{here}: its model is not transformed further, so it must be the last "
                                         f"step of the chain")
        if tech.followed_by is not None and i < len(chain) - 1 and next(iter(chain[i + 1])) not in tech.followed_by:
            raise params_mod.ParamsError(f"{here}: only {', '.join(tech.followed_by)} may follow it, not "
                                         f"{next(iter(chain[i + 1]))}")
        settings = link_settings(kind, given, p)
        tech.check(here, settings)
        seeds = given.get("seeds") or [given.get("seed", p["seed"])]
        chains = [c + [link(kind, settings, p, s)] for c in chains for s in (seeds if tech.trains else [None])]
    return chains


def check_chains(variants: list[dict[str, Any]], p: dict[str, Any]) -> None:
    """Refuse a bad `then` of any variant before any work (what `links` checks)."""
    for i, v in enumerate(variants):
        links(v["then"], p, f"variants[{i}].then")


# ---------------------------------------------------------------- the run identity
def identity(parent: Model, link: Link, baseline_key: str, p: dict[str, Any]) -> dict[str, Any]:
    """What a step's run is keyed by: its parent run, the baseline it descends from, the link's settings, and the
    evaluation settings."""
    return {"parent": parent.ref, "baseline": baseline_key, "eval_batch_size": p["eval_batch_size"],
            "device": p["device"], **link.settings}


# ---------------------------------------------------------------- save → reload → check → measure
def keep(tech: registry.Technique, made: Made, run: runs.Run, protocol: evaluation.Protocol) -> tuple[nn.Module, dict]:
    """Save the model a technique made in its file, load it back, check that the file holds the model that was
    made, and evaluate what was loaded (what is measured is what was saved): (the reloaded model, its accuracies
    and losses with `reload_exact`, and its predicted class per image of each split, `predictions`)."""
    made.model.to("cpu", memory_format=torch.contiguous_format).eval()
    tech.save(made.model, run.path(tech.artifact), made.arch)
    model = tech.load(run)
    acc, logits = protocol.evaluate(model, tech.cpu_only)
    # the same logits, bit for bit, on a batch of test images (on the CPU, in one memory layout: a layer that
    # computes its weight on the fly, like BinaryConnect's α, rounds by layout; a batch, since half precision runs
    # ~40 img/s in that layout on a CPU without fp16 arithmetic)
    test = protocol.dataset.test
    check = data_mod.Batches(data_mod.Split(test.images[:EXACT_CHECK], test.labels[:EXACT_CHECK]), EXACT_CHECK, "cpu")
    exact = bool(torch.equal(train.predict(made.model, check), train.predict(model, check)))
    return model, {**acc, "reload_exact": exact, "predictions": {split: t.argmax(1) for split, t in logits.items()}}


# ---------------------------------------------------------------- the stage context
class Context:
    """What every step of a stage shares: its params, the baseline it starts from (looked up, never trained
    here: `baselines.trained`), the run store, the evaluation protocol on the compute device
    (`evaluation.Protocol`), and `read`, the record of every run read or made (the report's up-to-date check)."""

    def __init__(self, p: dict[str, Any], train_seed: int | None = None):
        self.p = p
        self.base, self.bp = baseline_mod.trained(p["baseline"], p, train_seed)
        self.dataset = self.base.dataset
        self.store = runs.RunStore(p["run_root"])
        self.device = train.pick_device(p["device"])
        self.protocol = evaluation.Protocol(self.dataset, self.bp["eval_flip"], p["eval_batch_size"], self.device)
        self.root = root(self.base, self.bp["seed"])
        replicates = baseline_mod.replicate_runs(p["baseline"], p)
        self.read: list[str] = [self.root.ref] + [f"{r.stage}/{r.key}" for r in replicates.values()]
        # the baseline's test accuracy over its training seeds: the seed noise every Δ is read against
        self.seed_accs = [r.metrics["test_acc"] for r in replicates.values()] or [self.base.metrics["test_acc"]]

    def teacher(self, name: str) -> nn.Module:
        """A distillation teacher, a copy the fine-tune may move to its device: 'baseline' (the baseline this
        context starts from), or the model of the finished baseline run of a params file."""
        import copy

        if name == "baseline":
            return copy.deepcopy(self.root.model)
        result, _ = baseline_mod.trained(name, self.p)
        self.read.append(f"{result.run.stage}/{result.run.key}")
        return result.model

    def chain(self, start: Model, chain: list[Link]) -> list[Model]:
        """Apply the links of `chain` in order from `start`; every model of the chain (each its own run)."""
        out = []
        for one in chain:
            start = self.apply(start, one)
            out.append(start)
        return out

    def sweep(self, result: "Result", kind: str, variants: list[dict[str, Any]], values: str,
              settings: Callable[[dict[str, Any], Any], dict[str, Any]]) -> None:
        """A stage's sweep: for each variant, each of its `values` (amounts, ranks) and each of its seeds, one
        `kind` link from the root model with `settings(variant, value)`, then each chain of the variant's `then`
        from that model; every model added to `result`."""
        for v in variants:
            for value in v[values]:
                for seed in v["seeds"] or [self.p["seed"]]:
                    made = self.apply(self.root, link(kind, settings(v, value), self.p, seed))
                    result.add(made)
                    for chain in links(v["then"], self.p):
                        result.add(*self.chain(made, chain))

    def cached(self, stage: str, identity: dict[str, Any], compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """An analysis without a model (e.g. a sensitivity analysis) as a run of `stage`: its stored result, or
        `compute()` stored now, under the run's lock. Keyed by `identity` plus the baseline and evaluation settings."""
        run = self.store.run(stage, {"baseline": self.base.run.key, "eval_batch_size": self.p["eval_batch_size"],
                                     "device": self.p["device"], **identity})
        with run.lock():
            if not (run.done and self.p["reuse"]):
                run.finish(compute())
            self.read.append(f"{run.stage}/{run.key}")
            return run.metrics

    def apply(self, parent: Model, link: Link) -> Model:
        """The child run of `parent` for `link`: reused when finished, else made now (under the run's lock, so a
        second process waits and reuses it)."""
        tech = registry.get(link.kind)
        before = registry.get(parent.row["technique"])
        if before.terminal or (before.followed_by is not None and link.kind not in before.followed_by):
            raise params_mod.ParamsError(f"{parent.name} is not transformed further by {link.kind}"
                                         + (f" (only {', '.join(before.followed_by)} may follow it)" if before.followed_by else ""))
        if tech.trains:  # a recipe torch cannot schedule is refused before its run folder exists
            recipe = {**self.bp, **{k: link.settings[k] for k in params_mod.FINETUNE}}
            train.check_schedule(recipe, train.steps_per_epoch(recipe, len(self.dataset.train)))
        run = self.store.run(link.kind, identity(parent, link, self.base.run.key, self.p))
        with run.lock():
            fresh = None
            if not (run.done and self.p["reuse"]):
                fresh = self._make(tech, parent, link, run)
            model = fresh if fresh is not None else tech.load(run)
            self.read.append(f"{run.stage}/{run.key}")
            return Model(run, run.metrics, model, run.read_json("history.json"))

    def _make(self, tech: registry.Technique, parent: Model, link: Link, run: runs.Run) -> nn.Module:
        """Make the model (`tech.make`), keep it (`keep`), and finish its run with its row."""
        name = tech.describe(link.settings) + distilled(link.settings)
        label = name if parent.row["technique"] == "baseline" else f"{parent.name} → {name}"
        if self.p["progress"]:
            print(f"{label}: computing into {run}", flush=True)
        torch.manual_seed(link.settings.get("seed", self.p["seed"]))
        made = tech.make(Step(self, parent, link.settings, run))
        model, kept = keep(tech, made, run, self.protocol)
        predictions = kept.pop("predictions")
        pruned = parent.row["pruned"] or tech.prunes
        row = {
            "label": label, "link": name, "technique": link.kind, "family": tech.family, "parent": parent.ref,
            "parent_label": parent.name, "lineage": parent.row["lineage"] + [link.kind], "links": parent.row["links"] + 1,
            "seed": link.settings.get("seed"), "baseline": self.base.run.key, "settings": link.settings,
            "arch": made.arch, "artifact": tech.artifact, "pruned": pruned, **kept,
            "test_acc_before_finetune": made.before,
            "size_bytes": run.path(tech.artifact).stat().st_size,
            **measure(model, self.root.model if pruned else None, self.root.model),
            "train_time_s": sum(r["train_time_s"] for r in made.history),
            "eval_device": str(self.protocol.device_for(tech.cpu_only)),
            "run": str(run), **made.extra}
        run.write_json("history.json", made.history)
        run.save_predictions(predictions)
        run.finish(row)
        for f in run.dir.glob("checkpoint*.pt"):
            f.unlink()
        return model


def root(base: baseline_mod.BaselineResult, seed: int) -> Model:
    """The baseline's run as the root of every chain, its row measured by the rule of every model (`measure`)."""
    model = base.model.eval()
    row = {"label": registry.get("baseline").describe({}), "link": "baseline (FP32)", "technique": "baseline",
           "family": "baseline", "parent": None, "lineage": [], "links": 0, "seed": seed,
           "baseline": base.run.key, "arch": models.arch_of(model), "pruned": False,
           "test_acc": base.metrics["test_acc"], "val_acc": base.metrics.get("val_acc"),
           "test_acc_before_finetune": None, "size_bytes": base.run.path("model.pt").stat().st_size,
           "artifact": "model.pt", "train_time_s": base.metrics.get("train_time_s"), "run": str(base.run),
           **measure(model, None, model)}
    return Model(base.run, row, model, base.history)


def distilled(settings: dict[str, Any]) -> str:
    """What a link's name adds when its fine-tune distilled from a teacher: " + KD (α, T[, teacher])"."""
    d = settings.get("distill") or {}
    if not d:
        return ""
    teacher = "" if d["teacher"] == "baseline" else f", teacher {d['teacher']}"
    return f" + KD (α {d['alpha']:g}, T {d['temperature']:g}{teacher})"


def replicated(p: dict[str, Any], one: Callable[[Context, bool], Result]) -> Result:
    """A stage's result: `one(ctx, first)` from the baseline of `seed`, then, for each other seed of
    `p['baseline_seeds']` ("all": every seed the baseline trained), the same sweep from that seed's baseline
    replicate, fine-tuned with that seed (each model its own run); the replicates' models (and their baselines)
    added to the first result. `first` is False for a replicate, so a stage computes its analyses (sensitivity,
    curves) once."""
    result = one(Context(p), True)
    seeds = p["baseline_seeds"]
    for s in baseline_mod.seeds_of(result.ctx.bp) if seeds == "all" else seeds:
        if s != result.ctx.bp["seed"]:
            other = one(Context({**p, "seed": s}, s), False)
            result.add(*other.models)
            result.bases[other.ctx.root.run.key] = other.ctx.root
            result.ctx.read += other.ctx.read
    return result


def link_settings(kind: str, given: dict[str, Any], p: dict[str, Any]) -> dict[str, Any]:
    """A link's complete settings, one merge for every technique: its own defaults (`config`), the settings it
    takes from the stage's params (`inherit`), for a technique that fine-tunes the stage's fine-tuning recipe (its
    top-level keys in `p`), then what the link gives (its seed aside: see `Context.links`)."""
    tech = registry.get(kind)
    inherited = {k: p[key] for k, key in tech.inherit.items() if key in p}
    recipe = {k: p[k] for k in params_mod.FINETUNE} if tech.trains else {}
    return {**tech.defaults(), **inherited, **recipe, **{k: v for k, v in given.items() if k not in ("seed", "seeds")}}


def measure(model: nn.Module, pruned_from: nn.Module | None, root: nn.Module) -> dict[str, Any]:
    """Every count and score of a model, by one rule for every stage and the summary: parameters (nonzero),
    MACs (dense and over nonzero weights), the course score with its measured inputs (against `pruned_from`,
    the unpruned model, when the model descends from pruning), the MicroNet-style score, and the share of the
    `root` model's conv/linear weights it no longer has (zeroed or removed), in total and per layer."""
    return {"params": metrics.count_params(model), "nonzero_params": metrics.count_nonzero(model),
            **metrics.count_macs(model), **metrics.course_inputs(model, pruned_from), **metrics.micronet(model),
            **metrics.sparsity(model, root)}


# ---------------------------------------------------------------- the shared table
def table(result: Result, speed: dict[str, dict] | None = None) -> pd.DataFrame:
    """One row per model of `result` (index: its name), the fields first, then every shared column; speed
    columns from `metrics.compare_speed(result.inference_models(), …)` when given (a replicate shows its recipe's). A notebook shows the
    columns that concern it."""
    import pandas as pd

    names, verdicts, timed = result.names(), result.verdicts(), result.timed_as()
    parents = {m.ref: m.row for m in result.models}
    rows = []
    for name, m, rr in zip(names, result.models, result.result_rows()):
        r, j = m.row, verdicts[name]
        base = result.root_of(m).row
        parent = parents.get(r["parent"]) if r["parent"] else None
        mac_reduction = base["macs"] / r["macs"]
        row = {"model": name, **{k: r.get(k) for k in FIELDS}, "replicate": rr.replicate,
               BITS: f"{r['weight_bits']:.2f} / {r['act_bits']:.0f}", SPARSITY: 100 * r["weight_sparsity"],
               PARAMS: r["params"], NONZERO: r["nonzero_params"], MACS: r["macs"], SPARSE_MACS: r["sparse_macs"],
               MAC_REDUCTION: mac_reduction, SIZE: r["size_bytes"] / 1e3, SIZE_RATIO: r["size_bytes"] / base["size_bytes"],
               BEFORE: r["test_acc_before_finetune"], ACC: r["test_acc"], VAL: r["val_acc"], DELTA: j.delta,
               DELTA_PARENT: r["test_acc"] - parent["test_acc"] if parent else None,
               ACC_CI: stats.interval_text(*j.interval) if j.interval else None, P_BASELINE: j.p, IMAGES: j.images,
               P_RECIPE: j.recipe.p if j.recipe else None, RECIPE: j.recipe.verdict if j.recipe else None,
               VERDICT: j.verdict, BASIS: j.basis}
        if speed:
            row |= metrics.speed_columns(speed, timed[name], timed[names[0]], mac_reduction)
        row |= {COURSE: r["score"], MICRONET: r["micronet_score"], TRAIN_TIME: r.get("train_time_s")}
        rows.append(row)
    return pd.DataFrame(rows).set_index("model")


def said(r: "pd.Series", digits: int = 2) -> str:
    """A model's Δ against its baseline with the verdict it rests on, for a headline: "-5.51 pt, worse, recipe over
    2 seeds"."""
    return f"{r[DELTA]:+.{digits}f} pt" + (f", {verdict_text(r)}" if isinstance(r.get(BASIS), str) else "")


def verdict_text(r: "pd.Series") -> str:
    """A model's verdict and what it rests on: "worse, recipe over 2 seeds"; the verdict alone without a basis."""
    basis = r.get(BASIS)
    return f"{r[VERDICT]}, {basis}" if isinstance(basis, str) else str(r[VERDICT])


def first_seed(df: pd.DataFrame) -> pd.DataFrame:
    """The models made from the reference baseline (the table's first row's seed): a headline names each recipe
    once, with the verdict its replicates support."""
    return df[df["replicate"] == df["replicate"].iloc[0]] if "replicate" in df and len(df) else df


def not_worse(df: pd.DataFrame) -> pd.DataFrame:
    """The rows no verdict calls worse than their baseline."""
    return df[df[VERDICT] != stats.WORSE] if VERDICT in df else df


THROUGHPUT = "CPU throughput"  # stands for the throughput column (its name carries the batch size) in `shown`


def shown(df: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """The columns a notebook shows, in its order; those absent (speed, when it was not measured) left out."""
    picked = []
    for c in columns:
        picked += [d for d in df.columns if d.startswith(THROUGHPUT)] if c == THROUGHPUT else [c] if c in df.columns else []
    return df[picked]
