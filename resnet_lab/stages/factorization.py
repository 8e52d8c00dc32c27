"""05_svd: the `svd` technique swept over variants and ranks; the notebook's run and tables.

Every variant × rank (× seed) of the params is one `svd` link from the baseline (fine-tuned after the
factorization), followed by its `then` chain; `scratch_ranks` also train the same factorized
architectures from random weights, as the old scripts did.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .. import params, steps
from ..techniques import svd

if TYPE_CHECKING:
    import pandas as pd

STAGE = "svd"


def link_settings(v: dict[str, Any], rank: float, p: dict[str, Any], mode: str = "posttraining") -> dict[str, Any]:
    """An `svd` link's settings from a factorization recipe `v` (a variant, or 05's top-level keys) at `rank`;
    the fine-tuning recipe is the variant's epochs, lr (from scratch: `scratch_epochs`) and distill, and the stage's
    other keys."""
    return {**{k: v[k] for k in svd.KEYS}, "rank": rank, "mode": mode, **{k: p[k] for k in params.FINETUNE},
            "epochs": v["epochs"] if mode == "posttraining" else p["scratch_epochs"], "lr": v["lr"],
            "distill": v["distill"]}


# ---------------------------------------------------------------- the 05 stage
def run(p: dict[str, Any]) -> steps.Result:
    """Factorize the baseline of `p['baseline']` at every rank of every variant and fine-tune it, apply each
    variant's `then` chain; train the architectures of `p['scratch_ranks']` from scratch; each model is a run in
    the store, reused when finished."""
    def one(ctx: steps.Context, first: bool) -> steps.Result:
        result = steps.Result(ctx, [ctx.root])
        steps.check_chains(p["variants"], ctx.p)
        ctx.sweep(result, "svd", p["variants"], "ranks", lambda v, rank: link_settings(v, rank, ctx.p))
        for rank in p["scratch_ranks"]:
            top = {k: p[k] for k in params.SVD_VARIANT}
            result.add(ctx.apply(ctx.root, steps.link("svd", link_settings(top, rank, ctx.p, "scratch"), ctx.p)))
        return result

    return steps.replicated(p, one)


COLUMNS = ["layers factorized", "left alone", steps.PARAMS, "compression (× fewer params)", steps.MACS,
           steps.MAC_REDUCTION, steps.SIZE, steps.BEFORE, steps.ACC, steps.ACC_CI, steps.VAL, steps.DELTA, steps.IMAGES, steps.RECIPE, steps.THROUGHPUT,
           steps.SPEEDUP_SPREAD, steps.SPEEDUP_PER_MAC, steps.TRAIN_TIME]


def table(result: steps.Result, speed: dict[str, dict] | None = None) -> pd.DataFrame:
    """`steps.table` with the factorization's own columns: layers factorized and left alone, compression, mode."""
    df = steps.table(result, speed)
    rows = result.rows()
    df["layers factorized"] = [len(r.get("arch", {}).get("factorized", {})) for r in rows]
    df["left alone"] = [len(r.get("skipped", [])) for r in rows]
    df["compression (× fewer params)"] = result.ctx.root.row["params"] / df[steps.PARAMS]
    df["mode"] = [r["settings"]["mode"] if r["technique"] == "svd" else None for r in rows]
    return df


def left_alone(result: steps.Result) -> str:
    """Which layers each model left unfactorized because the pair would not have saved parameters."""
    lines = [f"**{name}**: {', '.join(f'`{n}`' for n in r['skipped'])}"
             for name, r in zip(result.names(), result.rows()) if r.get("skipped")]
    if not lines:
        return "Every candidate layer was factorized."
    return ("Left alone (at that rank the two convolutions would hold at least as many parameters as the "
            "original):  \n" + "  \n".join(lines))


def headline(table: pd.DataFrame, max_loss: float = 3.0) -> str:
    """The most compressed fine-tuned factorized model within `max_loss` points of the baseline that no verdict
    calls worse (each recipe by its model from the reference seed)."""
    table = steps.first_seed(table)
    tuned = steps.not_worse(table[(table["technique"] == "svd") & (table["mode"] == "posttraining")])
    ok = tuned[tuned[steps.DELTA] >= -max_loss]
    pick = ok if len(ok) else tuned
    if not len(pick):
        return "no factorized model"
    name = pick["compression (× fewer params)"].idxmax()
    r = pick.loc[name]
    speed = (f", {r[steps.SPEEDUP]:.2f}× CPU throughput ({r[steps.SPEEDUP_PER_MAC]:.2f} of the "
             f"{r[steps.MAC_REDUCTION]:.2f}× MAC reduction)") if steps.SPEEDUP in r else ""
    return (f"{name}: {r['compression (× fewer params)']:.1f}× fewer parameters, test {r[steps.ACC]:.1f}% "
            f"({steps.said(r, 1)} after fine-tuning){speed}")
