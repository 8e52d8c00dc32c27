"""03_quantization: the quantization techniques applied to one start model; the notebook's run and tables.

The methods apply to the start model: the baseline, or any model a chain of steps from it makes
(`start` in params, e.g. the structured-pruned model).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .. import metrics, params, registry, steps

if TYPE_CHECKING:
    import pandas as pd

STAGE = "quantization"


# ---------------------------------------------------------------- the 03 stage
def run(p: dict[str, Any]) -> steps.Result:
    """Apply every method of `p['methods']` to the start model (the baseline, or the end of `p['start']`): each of
    its variants (`p[method]`, a list, where the stage has one; else its settings from the stage), then the kinds the
    technique says follow it (a W8A8 QAT model onto int8 kernels). Each model is a run in the store (reused when
    finished), reloaded from its saved file before it is measured."""
    def one(ctx: steps.Context, first: bool) -> steps.Result:
        q = ctx.p
        [start_links] = _one_chain(q)
        chain = ctx.chain(ctx.root, start_links)
        start = chain[-1] if chain else ctx.root
        result = steps.Result(ctx, [start])
        for method in q["methods"]:
            tech = registry.get(method)
            for variant in q.get(method) or [{}]:
                for seed in (variant.get("seeds") or [q["seed"]]) if tech.trains else [None]:
                    link = steps.link(method, steps.link_settings(method, variant, q), q, seed)
                    made = ctx.apply(start, link)
                    result.add(made)
                    for kind in tech.follow(link.settings):
                        result.add(ctx.apply(made, steps.link(kind, steps.link_settings(kind, {}, q), q)))
        return result

    return steps.replicated(p, one)


def _one_chain(p: dict[str, Any]) -> list[list[steps.Link]]:
    chains = steps.links(p["start"], p, "start")
    if len(chains) != 1:
        raise params.ParamsError(f"'start' must name one model, but its seeds make {len(chains)}; give one seed")
    return chains


COLUMNS = [steps.BITS, steps.ACC, steps.ACC_CI, steps.VAL, steps.DELTA_PARENT, steps.DELTA, steps.IMAGES, steps.RECIPE, steps.PARAMS, steps.MACS, steps.SIZE,
           steps.SIZE_RATIO, steps.THROUGHPUT, steps.SPEEDUP_SPREAD, steps.COURSE, steps.MICRONET]


def histories(result: steps.Result, technique: str) -> dict[str, list[dict]]:
    """The training history of each model of `technique` (binaryconnect, qat), by its name."""
    return {name: m.history for name, m in zip(result.names(), result.models) if m.row["technique"] == technique}


def bc_table(result: steps.Result) -> pd.DataFrame:
    """BinaryConnect details: layers binarized, accuracy before/after training, export check and size."""
    import pandas as pd

    parents = {m.ref: m.row for m in result.models}
    rows = [{"variant": name, "binarized layers": m.row["binarized_layers"],
             "test accuracy before training (%)": m.row["test_acc_before_finetune"], "after (%)": m.row["test_acc"],
             "validation accuracy (%)": m.row["val_acc"], "training time (s)": m.row["train_time_s"],
             "packed file (KB)": m.row["size_bytes"] / 1e3,
             "parent's file / packed file": parents[m.row["parent"]]["size_bytes"] / m.row["size_bytes"],
             "rebuilt model gives identical logits": m.row["reload_exact"]}
            for name, m in zip(result.names(), result.models) if m.row["technique"] == "binaryconnect"]
    return pd.DataFrame(rows).set_index("variant")


def qat_table(result: steps.Result) -> pd.DataFrame:
    """QAT details: measured bits, accuracy before/after the fine-tune, the bit-packed file against the parent's,
    the exact reload, and, for a W8A8 model, its INT8-kernel child (accuracy, agreement with the QAT model)."""
    import pandas as pd

    names = dict(zip((m.ref for m in result.models), result.names()))
    parents = {m.ref: m.row for m in result.models}
    children = {m.row["parent"]: m.row for m in result.models if m.row["technique"] == "int8" and m.row.get("parent")}
    rows = []
    for m in result.models:
        if m.row["technique"] != "qat":
            continue
        r, child = m.row, children.get(m.ref, {})
        rows.append({"variant": names[m.ref], "bits (weights / activations), measured": f"{r['weight_bits']:.2f} / {r['act_bits']:.0f}",
                     "test accuracy before training (%)": r["test_acc_before_finetune"], "after (%)": r["test_acc"],
                     "validation accuracy (%)": r["val_acc"], "packed file (KB)": r["size_bytes"] / 1e3,
                     "parent's file / packed file": parents[r["parent"]]["size_bytes"] / r["size_bytes"],
                     "rebuilt model gives identical logits": r["reload_exact"],
                     "on int8 kernels: test accuracy (%)": child.get("test_acc"),
                     "on int8 kernels: agreement with the QAT model (%)": child.get("agreement_with_parent")})
    return pd.DataFrame(rows).set_index("variant") if rows else pd.DataFrame()


def describe(table: pd.DataFrame, result: steps.Result) -> str:
    """What half precision and INT8 cost on this CPU (and under CUDA autocast), in words, from the measured table."""
    if steps.SPEEDUP not in table:
        return ""
    flags = metrics.cpu_flags()
    lines = [f"**{name}** under CUDA autocast (float32 weights): test accuracy {m.row['autocast_test_acc']:.2f}%."
             for name, m in zip(result.names(), result.models) if "autocast_test_acc" in m.row]
    for technique, flag in (("fp16", "avx512_fp16"), ("bf16", "avx512_bf16"), ("int8", "avx512_vnni")):
        for name, r in table[table["technique"] == technique].iterrows():
            native = "has" if flag in flags or "amx_" + technique in flags else "lacks"
            lines.append(f"**{name}** on this CPU ({native} `{flag}`): {r[steps.SPEEDUP]:.2f}× the start model's "
                         f"throughput, accuracy {r[steps.DELTA]:+.2f} pt vs the baseline, file {r[steps.SIZE_RATIO]:.2f}× the "
                         f"baseline's size.")
    lines.append("BinaryConnect's rebuilt model runs float32 convolutions with ±1 (or ±α) weights: without "
                 "binary kernels its gain is the file size, not speed.")
    if (table["technique"] == "qat").any():
        lines.append("QAT models are simulated: float32 convolutions on weights and inputs rounded to their levels "
                     "(the rounding costs time: no int4 CPU kernels exist); their file holds each weight at its bits.")
    return "  \n".join(lines)


def headline(table: pd.DataFrame) -> str:
    """One line of results, one entry per recipe (its model from the reference seed, with the verdict its
    replicates support); every Δ is against the baseline (a chained model's parent is another model)."""
    parts, table = [], steps.first_seed(table)
    for technique in ("int8", "fp16", "bf16"):
        for name, r in table[table["technique"] == technique].iterrows():
            speed = f", {r[steps.SPEEDUP]:.1f}× CPU throughput" if steps.SPEEDUP in r else ""
            parts.append(f"{name} {steps.said(r)}{speed}")
    for name, r in table[table["technique"] == "qat"].iterrows():
        parts.append(f"{name} {r[steps.ACC]:.1f}% ({steps.said(r, 1)}), bits {r[steps.BITS]}")
    bc = table[table["technique"] == "binaryconnect"]
    if len(bc):
        best = bc[steps.VAL].idxmax()  # chosen on validation
        r = bc.loc[best]
        parts.append(f"{best} {r[steps.ACC]:.1f}% ({steps.said(r, 1)}) in 1/{1 / r[steps.SIZE_RATIO]:.0f} "
                     f"of the baseline's file")
    return " · ".join(parts)
