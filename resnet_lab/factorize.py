"""Low-rank factorization of convolutions by truncated SVD, and the 05_svd stage.

A k×k Conv2d (groups = 1) with weight W reshaped to (C_out, C_in·k·k) = U·S·Vᵀ becomes a k×k conv
C_in→r (weights √S_r·V_rᵀ, the original stride/padding/dilation) followed by a 1×1 conv r→C_out
(weights U_r·√S_r, the original bias). At full rank the pair computes the same function. The
square roots split the singular values evenly between the two factors, which keeps both equally
scaled for fine-tuning (putting all of S on one side, as the old scripts did, gives the same product).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import data as data_mod
from . import metrics, models, runs, train
from . import params as params_mod

if TYPE_CHECKING:  # tables are built on demand; pandas is imported there
    import pandas as pd

RULES = ("fixed", "fraction", "energy")


def full_rank(conv: nn.Conv2d) -> int:
    return min(conv.out_channels, conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1])


def choose_rank(conv: nn.Conv2d, rule: str, value: float, multiple: int = 1) -> int:
    """The layer's rank: `fixed` r (clamped to the full rank), a `fraction` of the full rank (rounded up),
    or the smallest r whose singular values keep an `energy` share of the sum of their squares;
    then rounded up to a `multiple` (CPU kernels compute channels in SIMD-wide blocks)."""
    full = full_rank(conv)
    if rule == "fixed":
        r = int(value)
    elif rule == "fraction":
        r = math.ceil(value * full)
    elif rule == "energy":
        s2 = torch.linalg.svdvals(conv.weight.detach().flatten(1).double()) ** 2
        kept = torch.cumsum(s2, 0) / s2.sum()
        r = int(torch.searchsorted(kept, torch.tensor(value, dtype=kept.dtype) - 1e-12)) + 1
    else:
        raise ValueError(f"unknown rank rule {rule!r}; known: {', '.join(RULES)}")
    return max(1, min(full, math.ceil(r / multiple) * multiple))


def factorized_params(conv: nn.Conv2d, rank: int) -> int:
    k = conv.kernel_size[0] * conv.kernel_size[1]
    return rank * (conv.in_channels * k + conv.out_channels) + (conv.out_channels if conv.bias is not None else 0)


def saves_params(conv: nn.Conv2d, rank: int) -> bool:
    return factorized_params(conv, rank) < sum(p.numel() for p in conv.parameters())


def split(conv: nn.Conv2d, rank: int, init: bool = True) -> nn.Sequential:
    """The two-conv replacement of `conv` at `rank`; its weights from the truncated SVD when `init`."""
    first = nn.Conv2d(conv.in_channels, rank, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                      dilation=conv.dilation, bias=False, padding_mode=conv.padding_mode)
    second = nn.Conv2d(rank, conv.out_channels, 1, bias=conv.bias is not None)
    if init:
        with torch.no_grad():
            u, s, vh = torch.linalg.svd(conv.weight.detach().flatten(1).double(), full_matrices=False)
            root = s[:rank].sqrt()
            first.weight.copy_((root[:, None] * vh[:rank]).view(rank, *conv.weight.shape[1:]))
            second.weight.copy_((u[:, :rank] * root).view(conv.out_channels, rank, 1, 1))
            if conv.bias is not None:
                second.bias.copy_(conv.bias)
    return nn.Sequential(first, second)


def candidates(model: nn.Module, include_stem: bool = False, include_1x1: bool = False) -> list[tuple[str, nn.Conv2d]]:
    """Convolutions that may be factorized: groups = 1, k×k with k > 1 unless `include_1x1` (the 1×1
    shortcuts), the stem only with `include_stem` (3 input channels: little to gain, much to lose)."""
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups == 1]
    stem = convs[0][0] if convs else None
    return [(n, m) for n, m in convs
            if (include_1x1 or m.kernel_size != (1, 1)) and (include_stem or n != stem)]


def svd(model: nn.Module, rule: str, value: float, include_stem: bool = False, include_1x1: bool = False,
        multiple: int = 1) -> tuple[nn.Module, dict[str, int], list[str]]:
    """A copy of `model` with every candidate conv factorized at the rank its rule picks.

    Returns (model, {layer: rank}, [layers left alone because the pair would not save parameters]).
    """
    model = copy.deepcopy(model)
    ranks, skipped = {}, []
    for name, conv in candidates(model, include_stem, include_1x1):
        r = choose_rank(conv, rule, value, multiple)
        if saves_params(conv, r):
            model.set_submodule(name, split(conv, r))
            ranks[name] = r
        else:
            skipped.append(name)
    return model, ranks, skipped


def build(arch: dict) -> nn.Module:
    """The (untrained) factorized model an arch record describes: the base model plus {layer: rank}."""
    model = models.build(arch)
    for name, r in arch.get("factorized", {}).items():
        model.set_submodule(name, split(model.get_submodule(name), int(r), init=False))
    return model


# ---------------------------------------------------------------- the 05_svd stage
@dataclass
class Result:
    baseline: train.BaselineResult
    rows: list[dict[str, Any]]  # the baseline first, then one per (mode, rank value)
    models: dict[str, nn.Module]  # label -> CPU model
    histories: dict[str, list[dict]]


def label(mode: str, rule: str, value: float) -> str:
    what = {"fixed": f"rank {value:g}", "fraction": f"{value:g} of full rank", "energy": f"{value:.0%} energy"}[rule]
    return f"SVD {what}" + (" (from scratch)" if mode == "scratch" else "")


def run(p: dict) -> Result:
    """Factorize the baseline of `p['baseline']` at every value of `p['ranks']` and fine-tune it; train the
    architectures of `p['scratch_ranks']` from scratch; each is a run in the store, reused when finished."""
    base, bp = train.trained_baseline(p["baseline"], p)
    store = runs.RunStore(p["run_root"])
    fp32 = base.model.eval()
    base_row = {"label": "baseline (unfactorized)", "mode": "baseline", **_costs(fp32),
                "size_bytes": base.run.path("model.pt").stat().st_size, "test_acc": base.metrics["test_acc"],
                "test_acc_before_finetune": base.metrics["test_acc"], "val_acc": base.metrics["val_acc"],
                "train_time_s": base.metrics["train_time_s"], "run": str(base.run), "factorized": {}, "skipped": []}
    out = Result(base, [base_row], {base_row["label"]: fp32}, {})
    for mode, values in (("posttraining", p["ranks"]), ("scratch", p["scratch_ranks"])):
        for value in values:
            _one(out, store, base, bp, p, mode, value)
    return out


def _costs(model: nn.Module) -> dict[str, int]:
    return {"params": metrics.count_params(model), "macs": metrics.count_macs(model)["macs"]}


def _evaluate(model: nn.Module, dataset: data_mod.Dataset, split_name: str, p: dict, flip: bool) -> float:
    return train.evaluate_split(model, getattr(dataset, split_name), p["eval_batch_size"], flip)["acc"]


def _one(out: Result, store: runs.RunStore, base: train.BaselineResult, bp: dict, p: dict, mode: str, value: float) -> None:
    recipe = {k: p[k] for k in params_mod.FINETUNE}
    if mode == "scratch":
        recipe["epochs"] = p["scratch_epochs"]
    ident = {"baseline": base.run.key, "mode": mode, "rank_rule": p["rank_rule"], "rank": value,
             "rank_multiple": p["rank_multiple"], "include_stem": p["include_stem"], "include_1x1": p["include_1x1"], "seed": p["seed"],
             "device": p["device"], **recipe}
    run = store.run("svd", ident)
    name = label(mode, p["rank_rule"], value)
    with run.lock():
        if not (run.done and p["reuse"]):
            # ranks are chosen on the trained weights in both modes, so both train the same architecture
            model, ranks, skipped = svd(base.model, p["rank_rule"], value, p["include_stem"], p["include_1x1"],
                                        p["rank_multiple"])
            if mode == "scratch":
                torch.manual_seed(p["seed"])
                model = build({**models.arch_of(base.model), "factorized": ranks})
            before = _evaluate(model, base.dataset, "test", p, bp["eval_flip"])
            if p["progress"]:
                print(f"{name}: {'fine-tuning' if mode == 'posttraining' else 'training from scratch'} into {run}", flush=True)
            fit_p = {**bp, **recipe, "seed": p["seed"], "device": p["device"], "progress": p["progress"]}
            history = train.fit(model, base.dataset, fit_p, checkpoint=run.path("checkpoint.pt"))
            model = model.to("cpu", memory_format=torch.contiguous_format).eval()
            arch = {**models.arch_of(base.model), "factorized": ranks}
            runs.save_torch(run.path("model.pt"), model.state_dict())
            run.write_json("history.json", history)
            row = {"label": name, "mode": mode, "rank_rule": p["rank_rule"], "rank": value, **_costs(model),
                   "size_bytes": run.path("model.pt").stat().st_size,
                   "test_acc": _evaluate(model, base.dataset, "test", p, bp["eval_flip"]),
                   "val_acc": _evaluate(model, base.dataset, "val", p, bp["eval_flip"]) if len(base.dataset.val) else None,
                   "test_acc_before_finetune": before, "train_time_s": sum(r["train_time_s"] for r in history),
                   "arch": arch, "factorized": ranks, "skipped": skipped, "artifact": "model.pt", "run": str(run)}
            row |= metrics.course_inputs(model)
            run.finish(row)
            run.path("checkpoint.pt").unlink(missing_ok=True)
        row = run.metrics
        out.rows.append(row)
        out.models[name] = load(run)
        out.histories[name] = run.read_json("history.json")


def load(run: runs.Run) -> nn.Module:
    """The model of a finished svd run, rebuilt from its arch record and weights."""
    model = build(run.metrics["arch"])
    model.load_state_dict(run.load_weights())
    return model.eval()


def table(result: Result, speed: dict[str, dict] | None = None) -> pd.DataFrame:
    import pandas as pd

    base = result.rows[0]
    rows = []
    for r in result.rows:
        row = {"model": r["label"], "layers factorized": len(r["factorized"]), "left alone": len(r["skipped"]),
               "parameters": r["params"], "compression (× fewer params)": base["params"] / r["params"],
               "MACs": r["macs"], "MAC reduction (×)": base["macs"] / r["macs"], "size on disk (KB)": r["size_bytes"] / 1e3,
               "test acc. before fine-tuning (%)": r["test_acc_before_finetune"], "test accuracy (%)": r["test_acc"],
               "Δ vs baseline (pt)": r["test_acc"] - base["test_acc"]}
        if speed:
            row |= metrics.speed_columns(speed, r["label"], base["label"], row["MAC reduction (×)"])
        row["training time (s)"] = r["train_time_s"]
        rows.append(row)
    return pd.DataFrame(rows).set_index("model")


def left_alone(result: Result) -> str:
    """Which layers each model left unfactorized because the pair would not have saved parameters."""
    lines = [f"**{r['label']}**: {', '.join(f'`{n}`' for n in r['skipped'])}" for r in result.rows[1:] if r["skipped"]]
    if not lines:
        return "Every candidate layer was factorized."
    return ("Left alone (at that rank the two convolutions would hold at least as many parameters as the "
            "original):  \n" + "  \n".join(lines))


def headline(summary: pd.DataFrame, max_loss: float = 3.0) -> str:
    """The most compressed fine-tuned model within `max_loss` points of the baseline."""
    tuned = summary[~summary.index.str.contains("scratch") & (summary["layers factorized"] > 0)]
    ok = tuned[tuned["Δ vs baseline (pt)"] >= -max_loss]
    pick = ok if len(ok) else tuned
    if not len(pick):
        return "no factorized model"
    name = pick["compression (× fewer params)"].idxmax()
    r = pick.loc[name]
    speed = (f", {r['speed-up (×)']:.2f}× CPU throughput ({r['speed-up ÷ MAC reduction']:.2f} of the "
             f"{r['MAC reduction (×)']:.2f}× MAC reduction)") if "speed-up (×)" in r else ""
    return (f"{name}: {r['compression (× fewer params)']:.1f}× fewer parameters, test {r['test accuracy (%)']:.1f}% "
            f"({r['Δ vs baseline (pt)']:+.1f} pt after fine-tuning){speed}")
