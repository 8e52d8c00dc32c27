"""04_pruning: the `prune` technique swept over variants and amounts, the sensitivity analysis and the
accuracy-vs-amount curves; the notebook's run and tables.

Every variant × amount (× seed) of the params is one `prune` link from the baseline, followed by its
`then` chain (e.g. [int8], [{svd: {rank: 0.5}}, int8], [binaryconnect]).
"""
from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

from torch import nn
from tqdm import tqdm

from .. import metrics, params, steps
from ..techniques import prune

if TYPE_CHECKING:
    import pandas as pd

STAGE = "pruning"
def link_settings(v: dict[str, Any], amount: float, p: dict[str, Any]) -> dict[str, Any]:
    """A `prune` link's settings from a pruning recipe `v` (a variant, or 04's top-level keys) at `amount`; the
    fine-tuning recipe is the variant's epochs, lr and distill, and the stage's other keys."""
    return {**{k: v[k] for k in prune.KEYS}, "amount": amount, "sensitivity_amounts": p["sensitivity_amounts"],
            **{k: p[k] for k in params.FINETUNE}, "epochs": v["epochs"], "lr": v["lr"], "distill": v["distill"]}


# ---------------------------------------------------------------- analyses without fine-tuning
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
                points.append({"amount": a, "test_acc": ctx.protocol.accuracy(model),
                               "weight_sparsity": metrics.sparsity(model, ctx.root.model)["weight_sparsity"],
                               **metrics.count_macs(model)})
            return {"points": points}

        m = ctx.cached(prune.ANALYSIS, {"kind": "curve", **k, "amounts": amounts}, compute)
        rows += [{"family": prune.family(k), **pt} for pt in m["points"]]
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
        steps.check_chains(p["variants"], ctx.p)
        if first and p["sensitivity_amounts"]:
            result.extras["sensitivity"] = prune.analyse(ctx, ctx.root, p["sensitivity_amounts"])
        if first:
            result.extras["curves"] = curves(ctx, p["variants"], p["curve_amounts"])
        ctx.sweep(result, "prune", p["variants"], "amounts", lambda v, amount: link_settings(v, amount, ctx.p))
        return result

    return steps.replicated(p, one)


# ---------------------------------------------------------------- tables for the report
COLUMNS = [steps.SPARSITY, steps.PARAMS, steps.NONZERO, steps.MACS, steps.SPARSE_MACS, steps.MAC_REDUCTION, steps.SIZE,
           steps.SIZE_RATIO, steps.BEFORE, steps.ACC, steps.ACC_CI, steps.VAL, steps.DELTA, steps.IMAGES, steps.RECIPE, steps.THROUGHPUT, steps.SPEEDUP_SPREAD,
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
    rows += [{"family": prune.family(r["settings"]), "amount": r["amount"], "test_acc": r["test_acc"],
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
    5 pt that no verdict calls worse (models of the `prune` step, picked by their method field, never by their name),
    and the lowest course score with 06's filter (within `max_drop` of the baseline, not found worse); each recipe
    by its model from the reference seed."""
    parts, table = [], steps.first_seed(table)
    pruned = steps.not_worse(table[table["technique"] == "prune"])
    ok = pruned[(pruned["method"] == "l1") & (pruned[steps.DELTA] >= -2)]
    if len(ok):
        name = ok[steps.SPARSITY].idxmax()
        parts.append(f"{name}: {steps.said(ok.loc[name], 1)}")
    ok = pruned[(pruned["method"] == "ln_structured") & (pruned[steps.DELTA] >= -5)]
    if len(ok):
        name = ok[steps.MAC_REDUCTION].idxmax()
        r = ok.loc[name]
        speed = f", {r[steps.SPEEDUP]:.2f}× CPU throughput" if steps.SPEEDUP in r else ""
        parts.append(f"{name}: {r[steps.MAC_REDUCTION]:.1f}× fewer MACs{speed}, {steps.said(r, 1)}")
    drop = params.SUMMARY["max_drop"].default  # 06's filter, so that the index's lines agree
    close = steps.not_worse(table[table[steps.DELTA] >= -drop])
    if len(close):
        best = close[steps.COURSE].idxmin()
        parts.append(f"lowest course score within {drop:g} pt and not found worse: {close.loc[best, steps.COURSE]:.4f} "
                     f"({best}, {steps.said(close.loc[best], 1)})")
    return " · ".join(parts)
