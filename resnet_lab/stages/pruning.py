"""04_pruning: L1 unstructured and Ln structured pruning registered as the `prune` step, the sensitivity
analysis and the accuracy-vs-amount curves; the notebook's run and tables.

Every variant × amount (× seed) of the params is one `prune` link from the baseline, followed by its
`then` chain (e.g. [int8], [{svd: {rank: 0.5}}, int8], [binaryconnect]).
"""
from __future__ import annotations

import copy
import functools
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm import tqdm

from .. import metrics, params, prune, registry, steps

if TYPE_CHECKING:
    import pandas as pd

STAGE = "pruning"
ANALYSIS = "prune_analysis"
registry.register_analysis(registry.Analysis(ANALYSIS, "04_pruning", "analysis: sensitivity or accuracy-vs-amount "
                                                                     "curve (no model)"))


@functools.cache
def _stage_defaults() -> dict[str, Any]:
    """04's default params file: where a `prune` link's settings come from when a chain gives none."""
    return params.load(params.PARAMS_DIR / params.DEFAULT_FILES[STAGE], STAGE)


def link_settings(v: dict[str, Any], amount: float, p: dict[str, Any]) -> dict[str, Any]:
    """A `prune` link's settings from a pruning recipe `v` (a variant, or 04's top-level keys) at `amount`; the
    fine-tuning recipe is the variant's epochs, lr and distill, and the stage's other keys."""
    return {**{k: v[k] for k in params.PRUNE_KEYS}, "amount": amount, "sensitivity_amounts": p["sensitivity_amounts"],
            **{k: p[k] for k in params.FINETUNE}, "epochs": v["epochs"], "lr": v["lr"], "distill": v["distill"]}


def _defaults() -> dict[str, Any]:
    """A `prune` link's settings where a chain gives none: 04's default recipe (its fine-tuning recipe comes from
    the stage the chain is in)."""
    p = _stage_defaults()
    return {**{k: p[k] for k in params.PRUNE_KEYS}, "sensitivity_amounts": p["sensitivity_amounts"]}


def _normalize(s: dict[str, Any]) -> dict[str, Any]:
    """Drop the settings that do not apply, so equivalent recipes share a run."""
    drop = ("schedule", "steps", "include_fc") if s["method"] == "ln_structured" else ("norm", "round_to")
    if s["scope"] != "sensitivity":
        drop += ("sensitivity_amounts",)
    return {k: v for k, v in s.items() if k not in drop}


def _check(where: str, s: dict[str, Any]) -> None:
    params.check_prune_link(where, s, s["sensitivity_amounts"])


# ---------------------------------------------------------------- names
def family(s: dict[str, Any]) -> str:
    """The curve a pruning recipe belongs to: its method and scope (and schedule)."""
    if s["method"] == "l1":
        return ", ".join(["L1 unstructured", s["scope"]] + ([f"{s['steps']} steps"] if s.get("schedule") == "iterative" else []))
    return f"L{s['norm']:g} structured, {s['scope']}"


def name(s: dict[str, Any]) -> str:
    """A pruned model's name, e.g. 'L1 unstructured, global, 80%' or 'L1 structured, global, 60% of channels'."""
    if s["method"] == "l1":
        parts = ["L1 unstructured", s["scope"], f"{s['amount']:.0%}"]
        return ", ".join(parts + ([f"{s['steps']} steps"] if s["schedule"] == "iterative" else []))
    return f"L{s['norm']:g} structured, {s['scope']}, {s['amount']:.0%} of channels"


# ---------------------------------------------------------------- the step
def _layer_amounts(step: steps.Step, s: dict[str, Any], layers: list) -> float | dict[str, float]:
    if s["scope"] != "sensitivity":
        return s["amount"]
    drops = sensitivity(step.ctx, step.parent, s["sensitivity_amounts"])
    sizes = {n: m.weight.numel() for n, m in layers}
    return prune.amounts_from_sensitivity({n: {a: drops["val_acc"] - x for a, x in drops["acc"][n].items()} for n in sizes},
                                          sizes, s["amount"])


def _make(step: steps.Step) -> steps.Made:
    s, parent = step.settings, step.parent.model
    if s["method"] == "ln_structured":
        model, plan = prune.structured(copy.deepcopy(parent), s["amount"], s["norm"], s["scope"], s["round_to"],
                                       s["include_stem"])
        before = step.accuracy(model)
        history = step.finetune(model)
        model = model.to("cpu", memory_format=torch.contiguous_format)
        return steps.Made(model, prune.structured_arch(step.parent.row["arch"], model), before, history,
                          {"method": s["method"], "amount": s["amount"],
                           "removed_channels": {k: len(i) for k, i in plan.items()}})
    model = copy.deepcopy(parent)
    layers = prune.prunable(model, s["include_stem"], s["include_fc"])
    target = _layer_amounts(step, s, layers)
    n = s["steps"] if s["schedule"] == "iterative" else 1
    amount = s["amount"]
    fractions = [f / amount for f in prune.gradual(amount, n)] if amount > 0 else [1.0] * n
    epochs = [s["epochs"] // n + (1 if i < s["epochs"] % n else 0) for i in range(n)]
    before, history = None, []
    for i, (f, e) in enumerate(zip(fractions, epochs)):
        step_target = {k: a * f for k, a in target.items()} if isinstance(target, dict) else target * f
        model.to("cpu", memory_format=torch.contiguous_format)  # after fit: channels_last, maybe on the GPU
        prune.unstructured(model, step_target, "global" if s["scope"] == "global" else "layer", layers)
        if before is None:
            before = step.accuracy(model)  # the first cut: what the first fine-tuning starts from
        part = step.finetune(model, epochs=e, checkpoint=f"checkpoint_{i}.pt")
        history += [{**r, "epoch": len(history) + r["epoch"], "step": i + 1} for r in part]  # one epoch count
    model = prune.make_permanent(model).to("cpu", memory_format=torch.contiguous_format)
    return steps.Made(model, step.parent.row["arch"], before, history,
                      {"method": s["method"], "amount": amount, "layer_amounts": target if isinstance(target, dict) else None,
                       "step_sparsity": prune.gradual(amount, n)})


registry.register(registry.Technique(
    "prune", "04_pruning", "pruning", describe=name, make=_make, defaults=_defaults, check=_check, trains=True,
    prunes=True, normalize=_normalize))


# ---------------------------------------------------------------- analyses without fine-tuning
def sensitivity(ctx: steps.Context, parent: steps.Model, amounts: list[float]) -> dict[str, Any]:
    """Validation accuracy of `parent` with one layer L1-pruned at each amount (validation: it chooses amounts),
    one view per image (a relative measure, twice as fast): {'layers', 'amounts', 'val_acc', 'acc': {layer: {amount: acc}}}."""
    def compute() -> dict[str, Any]:
        model = copy.deepcopy(parent.model)
        layers = [n for n, _ in prune.prunable(model, True, True)]
        acc = prune.sensitivity(model, layers, amounts, lambda m: ctx.evaluate_split(m, "val", flip=False), ctx.p["progress"])
        return {"layers": layers, "amounts": amounts, "val_acc": ctx.evaluate_split(model, "val", flip=False),
                "acc": {n: {str(a): v for a, v in d.items()} for n, d in acc.items()}}

    m = ctx.cached(ANALYSIS, {"kind": "sensitivity", "parent": parent.ref, "amounts": amounts}, compute)
    return {**m, "acc": {n: {float(a): v for a, v in d.items()} for n, d in m["acc"].items()}}


CURVE_KEYS = ("method", "scope", "norm", "round_to", "include_stem", "include_fc")


def curves(ctx: steps.Context, variants: list[dict[str, Any]], amounts: list[float]) -> list[dict[str, Any]]:
    """Test accuracy of the baseline right after one-shot pruning (no fine-tuning) at `amounts`, for each method
    and scope of the variants: what fine-tuning has to recover."""
    kinds = []
    for v in variants:
        k = {key: v[key] for key in CURVE_KEYS}
        if k not in kinds and v["scope"] != "sensitivity":
            kinds.append(k)
    rows = []
    for k in kinds:
        def compute(k=k) -> dict[str, Any]:
            points = []
            for a in tqdm(amounts, desc=f"{k['method']} {k['scope']} right after pruning", disable=not ctx.p["progress"]):
                model = _one_shot(ctx.root.model, k, a)
                points.append({"amount": a, "test_acc": ctx.evaluate_split(model),
                               "weight_sparsity": metrics.sparsity(model, ctx.root.model)["weight_sparsity"],
                               **metrics.count_macs(model)})
            return {"points": points}

        m = ctx.cached(ANALYSIS, {"kind": "curve", **k, "amounts": amounts}, compute)
        rows += [{"family": family(k), **pt} for pt in m["points"]]
    return rows


def _one_shot(model: nn.Module, k: dict[str, Any], amount: float) -> nn.Module:
    """A pruned copy of `model`, one shot (no fine-tuning); L1 keeps its masks."""
    model = copy.deepcopy(model)
    if k["method"] == "ln_structured":
        return prune.structured(model, amount, k["norm"], k["scope"], k["round_to"], k["include_stem"])[0]
    layers = prune.prunable(model, k["include_stem"], k["include_fc"])
    prune.unstructured(model, amount, "global" if k["scope"] == "global" else "layer", layers)
    return model


# ---------------------------------------------------------------- the 04 stage
def run(p: dict[str, Any]) -> steps.Result:
    """Prune the baseline of `p['baseline']` with every variant at every amount (and seed), fine-tune, then
    apply each variant's `then` chain; each model is a run in the store (reused when finished), reloaded from
    its saved file before it is measured."""
    def one(ctx: steps.Context, first: bool) -> steps.Result:
        result = steps.Result(ctx, [ctx.root])
        ctx.check_chains(p["variants"])
        if first and p["sensitivity_amounts"]:
            result.extras["sensitivity"] = sensitivity(ctx, ctx.root, p["sensitivity_amounts"])
        if first:
            result.extras["curves"] = curves(ctx, p["variants"], p["curve_amounts"])
        ctx.sweep(result, "prune", p["variants"], "amounts", lambda v, amount: link_settings(v, amount, ctx.p))
        return result

    return steps.replicated(p, one)


# ---------------------------------------------------------------- tables for the report
COLUMNS = [steps.SPARSITY, steps.PARAMS, steps.NONZERO, steps.MACS, steps.SPARSE_MACS, steps.MAC_REDUCTION, steps.SIZE,
           steps.SIZE_RATIO, steps.BEFORE, steps.ACC, steps.ACC_CI, steps.VAL, steps.DELTA, steps.VERDICT, steps.THROUGHPUT, steps.SPEEDUP,
           steps.SPEEDUP_PER_MAC, steps.COURSE, steps.MICRONET, steps.TRAIN_TIME]


def score_inputs(result: steps.Result) -> pd.DataFrame:
    """The measured inputs of the course score and the MicroNet counts, per model."""
    import pandas as pd

    return pd.DataFrame([{"model": name, "p_s": r["p_s"], "p_u": r["p_u"], "q_w (bits)": r["weight_bits"],
                          "q_a (bits)": r["act_bits"], "w": r["score_w"], "f": r["score_f"], "course score": r["score"],
                          "MicroNet params (32-bit eq.)": r["micronet_params"], "MicroNet ops (32-bit eq.)": r["micronet_ops"],
                          "MicroNet score": r["micronet_score"]}
                         for name, r in zip(result.names(), result.rows())]).set_index("model")


def per_layer(result: steps.Result) -> pd.DataFrame:
    """Long table: layer, model, share of the baseline layer's weights gone (zeroed or removed), for the models
    the `prune` step made (a later link keeps its parent's pattern)."""
    import pandas as pd

    return pd.DataFrame([{"layer": layer, "model": name, "sparsity (%)": 100 * s}
                         for name, r in zip(result.names(), result.rows()) if r["technique"] == "prune"
                         for layer, s in r["per_layer_sparsity"].items()])


def layer_amounts(result: steps.Result) -> pd.DataFrame | None:
    """Per-layer amounts (%) derived from the sensitivity analysis, per model that used them."""
    import pandas as pd

    derived = {name: r["layer_amounts"] for name, r in zip(result.names(), result.rows()) if r.get("layer_amounts")}
    return 100 * pd.DataFrame(derived).rename_axis("layer") if derived else None


def removed_channels(result: steps.Result) -> pd.DataFrame | None:
    """Channels removed per group (root conv), per structured model."""
    import pandas as pd

    removed = {name: r["removed_channels"] for name, r in zip(result.names(), result.rows()) if "removed_channels" in r}
    return pd.DataFrame(removed).fillna(0).astype(int).rename_axis("group (root conv)") if removed else None


def sensitivity_table(result: steps.Result) -> pd.DataFrame:
    """Layers × amounts: validation accuracy drop (pt) with only that layer pruned."""
    import pandas as pd

    s = result.extras["sensitivity"]
    return pd.DataFrame({f"{a:.0%}": {n: s["val_acc"] - s["acc"][n][a] for n in s["layers"]} for a in s["amounts"]})


def curve_table(result: steps.Result) -> pd.DataFrame:
    """Accuracy against sparsity and MACs: right after pruning (the curves) and after fine-tuning (each model the
    `prune` step made)."""
    import pandas as pd

    rows = [{**c, "stage": "right after pruning"} for c in result.extras["curves"]]
    rows += [{"family": family(r["settings"]), "amount": r["amount"], "test_acc": r["test_acc"],
              "weight_sparsity": r["weight_sparsity"], "macs": r["macs"], "sparse_macs": r["sparse_macs"],
              "stage": "after fine-tuning"} for r in result.rows() if r["technique"] == "prune"]
    df = pd.DataFrame(rows)
    df["weight sparsity (%)"] = 100 * df["weight_sparsity"]
    df["MACs (millions)"] = df["macs"] / 1e6
    df["sparse MACs (millions)"] = df["sparse_macs"] / 1e6
    return df.rename(columns={"test_acc": "test accuracy (%)", "family": "method"})


def table(result: steps.Result, speed: dict[str, dict] | None = None) -> pd.DataFrame:
    """`steps.table` with the pruning method of each model the `prune` step made (a field to select by)."""
    df = steps.table(result, speed)
    df["method"] = [r.get("method") if r["technique"] == "prune" else None for r in result.rows()]
    return df


def headline(table: pd.DataFrame) -> str:
    """The sparsest unstructured model within 2 pt and the structured model with the largest MAC reduction within
    5 pt (models of the `prune` step, picked by their method field, never by their name), and the best course
    score."""
    parts = []
    pruned = table[table["technique"] == "prune"]
    ok = pruned[(pruned["method"] == "l1") & (pruned[steps.DELTA] >= -2)]
    if len(ok):
        name = ok[steps.SPARSITY].idxmax()
        parts.append(f"{name}: {ok.loc[name, steps.DELTA]:+.1f} pt")
    ok = pruned[(pruned["method"] == "ln_structured") & (pruned[steps.DELTA] >= -5)]
    if len(ok):
        name = ok[steps.MAC_REDUCTION].idxmax()
        r = ok.loc[name]
        speed = f", {r[steps.SPEEDUP]:.2f}× CPU throughput" if steps.SPEEDUP in r else ""
        parts.append(f"{name}: {r[steps.MAC_REDUCTION]:.1f}× fewer MACs{speed}, {r[steps.DELTA]:+.1f} pt")
    best = table[steps.COURSE].idxmin()
    parts.append(f"best course score {table.loc[best, steps.COURSE]:.3f} ({best})")
    return " · ".join(parts)
