"""Pruning: unstructured L1 magnitude (masks), structured Ln filter pruning with physical channel
removal, layer sensitivity (technique `prune`). The transforms are model in, model out; `_make` fine-tunes
through the shared step (`steps`), which saves, reloads and measures.

- `unstructured(model, amount, scope)`: torch.nn.utils.prune masks (pruned weights stay zero
  through fine-tuning); `make_permanent` folds them in at the end.
- `plan_channels` ranks output channels by the Ln norm of their filters; coupled channels (those
  added together across a residual connection) are ranked and removed together. `mask_channels`
  zeroes a plan's channels (what the old scripts saved as "compact"); `remove_channels` cuts them
  out with Torch-Pruning's DependencyGraph, giving a smaller dense ResNet with the same outputs;
  `compact` finds zeroed channels in any model and removes them.
- `sensitivity` prunes one layer at a time; `amounts_from_sensitivity` turns it into per-layer
  amounts for a target sparsity.
"""
from __future__ import annotations

import copy
import math
from typing import Any, Callable

import torch
import torch_pruning as tp
from torch import nn
from torch.nn.utils import prune as torch_prune
from tqdm import tqdm

from .. import config, models, registry


def prunable(model: nn.Module, include_stem: bool = False, include_fc: bool = True) -> list[tuple[str, nn.Module]]:
    """The conv and linear layers pruning may touch: the stem (first conv: 3 input channels, few weights,
    every later feature depends on it) and the classifier (last linear) only when asked."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    first, last = layers[0][0], layers[-1][0]
    return [(n, m) for n, m in layers
            if (include_stem or n != first) and (include_fc or n != last or not isinstance(m, nn.Linear))]


# ---------------------------------------------------------------- unstructured (masks)
def unstructured(model: nn.Module, amount: float | dict[str, float], scope: str = "global",
                 layers: list[tuple[str, nn.Module]] | None = None) -> None:
    """L1-magnitude pruning with masks, in place: the chosen layers reach `amount` sparsity in total.

    scope 'global': one threshold over all chosen layers (exactly round(amount·N) weights zeroed);
    'layer': each layer loses round(amount·n) of its weights; a dict {layer: amount} sets each layer's.
    Amounts are cumulative: weights already masked count, so calling again with a larger amount
    prunes more (the iterative schedule).
    """
    layers = layers if layers is not None else prunable(model)
    for _, m in layers:
        _refresh(m)
    if scope == "global":
        total = sum(m.weight.numel() for _, m in layers)
        extra = round(amount * total) - sum(_masked(m) for _, m in layers)
        if extra > 0:
            torch_prune.global_unstructured([(m, "weight") for _, m in layers], torch_prune.L1Unstructured, amount=extra)
        return
    for name, m in layers:
        a = amount[name] if isinstance(amount, dict) else amount
        extra = round(a * m.weight.numel()) - _masked(m)
        if extra > 0 or not torch_prune.is_pruned(m):
            torch_prune.l1_unstructured(m, "weight", amount=max(extra, 0))


def _refresh(m: nn.Module) -> None:
    """Recompute a masked weight from its parameter and mask, as the forward pre-hook does: after `.to()`
    (device, memory format) the attribute still holds the last forward's tensor."""
    for hook in m._forward_pre_hooks.values():
        if isinstance(hook, torch_prune.BasePruningMethod):
            setattr(m, hook._tensor_name, hook.apply_mask(m))


def _masked(m: nn.Module) -> int:
    return int((m.weight_mask == 0).sum()) if hasattr(m, "weight_mask") else 0


def make_permanent(model: nn.Module) -> nn.Module:
    """Fold every pruning mask into its weight (`prune.remove`): plain tensors holding the zeros."""
    for m in model.modules():
        for hook in list(m._forward_pre_hooks.values()):
            if isinstance(hook, torch_prune.BasePruningMethod):
                torch_prune.remove(m, hook._tensor_name)
    return model


def gradual(amount: float, steps: int) -> list[float]:
    """Cumulative sparsity after each of `steps` prune/fine-tune steps (Zhu & Gupta 2017: s·(1 − (1 − t)³)),
    fast at first while many weights are redundant, slower near the target."""
    return [amount * (1 - (1 - i / steps) ** 3) for i in range(1, steps + 1)]


def sparsity(model: nn.Module, layers: list[str]) -> float:
    """Share of zero weights over the named layers."""
    ws = [model.get_submodule(n).weight for n in layers]
    return sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)


# ---------------------------------------------------------------- sensitivity
@torch.no_grad()
def sensitivity(model: nn.Module, layers: list[str], amounts: list[float], accuracy: Callable[[nn.Module], float],
                progress: bool = True) -> dict[str, dict[float, float]]:
    """Accuracy after L1-pruning one layer at a time at each amount (no fine-tuning): {layer: {amount: acc}}."""
    out: dict[str, dict[float, float]] = {}
    bar = tqdm(total=len(layers) * len(amounts), desc="sensitivity", disable=not progress)
    for name in layers:
        w = model.get_submodule(name).weight
        original = w.detach().clone()
        order = original.abs().flatten().argsort()
        out[name] = {}
        for a in amounts:
            w.view(-1)[order[: round(a * w.numel())]] = 0
            out[name][a] = accuracy(model)
            w.copy_(original)
            bar.update()
    bar.close()
    return out


def amounts_from_sensitivity(drops: dict[str, dict[float, float]], sizes: dict[str, int], target: float) -> dict[str, float]:
    """Per-layer amounts that reach `target` sparsity over `sizes`' layers at the least summed accuracy drop,
    taking each layer's measured drops as its cost: the layers that lose the least accuracy per weight
    removed are pruned most (a big layer buys more sparsity for the same drop than a small one).

    Each layer's drop curve (0 at amount 0, the measured amounts, made non-decreasing) is priced with a
    multiplier λ per weight removed: every layer takes the amount maximizing λ·weights − drop. λ is
    bisected until the layers together reach the target, then the amounts are scaled to hit it exactly.
    Amounts never exceed the largest measured one.
    """
    curves = {}
    for name in sizes:
        running, pts = 0.0, []
        for a, d in sorted([(0.0, 0.0)] + [(float(a), float(d)) for a, d in drops[name].items()]):
            running = max(running, d)
            pts.append((a, running))
        curves[name] = pts
    total = sum(sizes.values())

    def choice(lam: float) -> dict[str, float]:
        return {n: max(curves[n], key=lambda pt: (lam * sizes[n] * pt[0] - pt[1], -pt[0]))[0] for n in sizes}

    def reached(amounts: dict[str, float]) -> float:
        return sum(amounts[n] * sizes[n] for n in sizes) / total

    top = reached({n: curves[n][-1][0] for n in sizes})
    if top < target - 1e-9:
        raise ValueError(f"the sensitivity analysis reaches at most {top:.1%} sparsity over these layers "
                         f"(its largest amount); target {target:.1%} needs larger sensitivity_amounts")
    lo, hi = 0.0, 1.0
    while reached(choice(hi)) < target and hi < 1e12:
        lo, hi = hi, hi * 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if reached(choice(mid)) < target else (lo, mid)
    amounts = choice(hi)
    scale = target / reached(amounts) if reached(amounts) > 0 else 0.0
    return {n: a * scale for n, a in amounts.items()}


# ---------------------------------------------------------------- structured (channels)
def _graph(model: nn.Module) -> tp.DependencyGraph:
    device = next(model.parameters()).device
    return tp.DependencyGraph().build_dependency(model, example_inputs=torch.zeros(1, 3, 32, 32, device=device))


def _groups(model: nn.Module, graph: tp.DependencyGraph, include_stem: bool) -> dict[str, Any]:
    """{root conv name: Torch-Pruning group over all its channels}; a group couples the convs whose
    outputs are added together (a stage's residual stream) or one block-internal conv."""
    names = {m: n for n, m in model.named_modules()}
    classifier = [m for m in model.modules() if isinstance(m, nn.Linear)][-1:]
    out = {}
    for g in graph.get_all_groups(ignored_layers=classifier, root_module_types=[nn.Conv2d]):
        root = names[g[0].dep.target.module]
        members = {names.get(dep.target.module) for dep, _ in g}
        stem = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)][0]
        if include_stem or stem not in members:
            out[root] = g
    return out


def _filter_norms(group: Any, norm: float) -> torch.Tensor:
    """Per channel of the group: the sum over its coupled convs of the Ln norm of the channel's filter."""
    total = None
    for i, (dep, idxs) in enumerate(group):
        if dep.handler == tp.prune_conv_out_channels:  # bound methods: compare with ==
            w = dep.target.module.weight.detach()[idxs].flatten(1)
            score = torch.zeros(len(group[0].idxs)).scatter_add_(0, torch.tensor(group[i].root_idxs), w.norm(p=norm, dim=1).cpu())
            total = score if total is None else total + score
    return total


def plan_channels(model: nn.Module, amount: float, norm: float = 1, scope: str = "layer", round_to: int = 1,
                  include_stem: bool = False) -> dict[str, list[int]]:
    """Which channels to remove: {root conv: channel indices}, the lowest filter Ln norms.

    scope 'layer': each group loses `amount` of its channels; 'global': `amount` of all channels,
    ranked together after dividing each group's norms by their mean (raw norms grow with filter size).
    The channels a group keeps are rounded up to a multiple of `round_to` (CPU kernels compute channels
    in SIMD-wide blocks; between multiples a smaller layer saves MACs, not time), so rounding never
    removes more than asked; at least one channel is kept.
    """
    groups = _groups(model, _graph(model), include_stem)
    scores = {root: _filter_norms(g, norm) for root, g in groups.items()}
    if scope == "global":
        normed = {root: s / s.mean().clamp(min=1e-12) for root, s in scores.items()}
        flat = torch.cat(list(normed.values()))
        k = round(amount * len(flat))
        threshold = flat.sort().values[k - 1] if k > 0 else -math.inf
        counts = {root: int((s <= threshold).sum()) for root, s in normed.items()}
    else:
        counts = {root: round(amount * len(s)) for root, s in scores.items()}
    plan = {}
    for root, s in scores.items():
        channels = len(s)
        keep = channels - counts[root]
        if round_to > 1 and channels >= round_to:
            keep = max(round_to, math.ceil(keep / round_to) * round_to)
        keep = min(channels, max(1, keep))
        if keep < channels:
            plan[root] = sorted(s.argsort()[: channels - keep].tolist())
    return plan


def mask_channels(model: nn.Module, plan: dict[str, list[int]]) -> nn.Module:
    """Zero the planned channels in place (conv filters, their BatchNorm's scale and shift): the outputs of
    these channels become 0, so the model computes what the compacted one does."""
    graph = _graph(model)  # traced with autograd: outside no_grad
    with torch.no_grad():
        for root, idxs in plan.items():
            for dep, sub in graph.get_pruning_group(model.get_submodule(root), tp.prune_conv_out_channels, idxs):
                layer = dep.target.module
                if dep.handler in (tp.prune_conv_out_channels, tp.prune_batchnorm_out_channels):
                    layer.weight[sub] = 0
                    if layer.bias is not None:
                        layer.bias[sub] = 0
    return model


def remove_channels(model: nn.Module, plan: dict[str, list[int]]) -> nn.Module:
    """Cut the planned channels out in place: filters, BatchNorm entries and every input channel that
    consumed them, across the residual connections (Torch-Pruning's DependencyGraph)."""
    graph = _graph(model)
    for root, idxs in plan.items():
        group = graph.get_pruning_group(model.get_submodule(root), tp.prune_conv_out_channels, idxs)
        group.prune()
    return model


def zero_channels(model: nn.Module) -> dict[str, list[int]]:
    """The plan of channels already zeroed in every coupled layer (filters and BatchNorm scale and shift)."""
    plan = {}
    for root, g in _groups(model, _graph(model), include_stem=True).items():
        dead = torch.ones(len(g[0].idxs), dtype=torch.bool)
        for i, (dep, idxs) in enumerate(g):
            if dep.handler in (tp.prune_conv_out_channels, tp.prune_batchnorm_out_channels):
                layer = dep.target.module
                rows = layer.weight.detach()[idxs].reshape(len(idxs), -1).abs().sum(1)
                if layer.bias is not None:
                    rows = rows + layer.bias.detach()[idxs].abs()
                zero = torch.zeros_like(dead).scatter_(0, torch.tensor(g[i].root_idxs), rows.cpu() == 0)
                dead &= zero
        if dead.any() and not dead.all():
            plan[root] = dead.nonzero().flatten().tolist()
    return plan


def compact(model: nn.Module) -> nn.Module:
    """A copy of `model` without its zeroed channels: smaller, dense, same outputs."""
    model = copy.deepcopy(model)
    return remove_channels(model, zero_channels(model))


def structured(model: nn.Module, amount: float, norm: float = 1, scope: str = "layer", round_to: int = 1,
               include_stem: bool = False) -> tuple[nn.Module, dict[str, list[int]]]:
    """A compacted copy of `model` with the planned channels removed, and the plan."""
    plan = plan_channels(model, amount, norm, scope, round_to, include_stem)
    return remove_channels(copy.deepcopy(model), plan), plan


def structured_arch(parent: dict, model: nn.Module) -> dict:
    """The arch record of a model whose channels were removed, made from a model of arch record `parent`:
    every layer's shape is recorded, so `models.build` rebuilds it at its sizes."""
    return {**parent, "shapes": models.shapes_of(models.unwrap(model))}


# ---------------------------------------------------------------- settings, names and the step
METHODS = ("l1", "ln_structured")
ANALYSIS = "prune_analysis"  # the run-store kind of the sensitivity analysis (and 04's curves): no model
registry.register_analysis(registry.Analysis(ANALYSIS, "04_pruning", "analysis: sensitivity or accuracy-vs-amount "
                                                                     "curve (no model)"))

KEYS: dict[str, config.Field] = {
    "method": config.Field(str, "l1", "l1: unstructured L1 magnitude (masked weights); ln_structured: whole output "
                           "channels with the lowest filter Ln norm, physically removed", choices=METHODS),
    "scope": config.Field(str, "global", "global: one ranking over all chosen layers; layer: the same amount in each "
                          "layer (or channel group); sensitivity (l1): per-layer amounts derived from the sensitivity "
                          "analysis", choices=("global", "layer", "sensitivity")),
    "schedule": config.Field(str, "oneshot", "oneshot: prune then fine-tune; iterative (l1): `steps` rounds of prune a "
                             "little more, fine-tune, on a gradual (cubic) schedule, with the epochs split between them",
                             choices=("oneshot", "iterative")),
    "steps": config.Field(int, 3, "iterative schedule: prune/fine-tune rounds", low=1, high=100),
    "norm": config.Field(int, 1, "ln_structured: n of the Ln norm that ranks filters (1 like the old scripts, or 2)",
                         choices=(1, 2)),
    # 16: AVX-512 kernels compute 16 channels at a time, AVX2 ones 8; a count between multiples saves MACs, not time
    "round_to": config.Field(int, 16, "ln_structured: channels kept per layer are rounded to a multiple of this (16 "
                             "suits AVX-512 CPU kernels, which compute 16 channels at a time)", low=1, high=1024),
    "include_stem": config.Field(bool, False, "also prune the first conv (3 input channels: little to gain, much to "
                                 "lose)"),
    "include_fc": config.Field(bool, True, "l1: also prune the classifier (last linear)"),
}
SENSITIVITY_AMOUNTS = config.Field(list, [0.5, 0.8, 0.9, 0.95], "amounts at which each layer is pruned alone (no "
                                   "fine-tuning) for the sensitivity analysis on the validation split; empty: skip it",
                                   validator=config.fractions(True, "amounts"))
CONFIG: dict[str, config.Field] = {
    **KEYS, "amount": config.Field(float, None, "share of the chosen weights zeroed (l1) or of the channels removed "
                                   "(ln_structured), in [0, 1)", low=0.0, high=1.0, high_open=True, required=True),
    "sensitivity_amounts": SENSITIVITY_AMOUNTS, **config.LINK_TRAINING}


def check_link(where: str, v: dict[str, Any], sensitivity_amounts: list[float]) -> None:
    """What spans keys of one pruning recipe (a variant, or a `prune` link)."""
    if v["method"] == "ln_structured" and v["scope"] == "sensitivity":
        raise config.ParamsError(f"{where}: scope 'sensitivity' derives per-layer amounts of weights; it works with method 'l1'")
    if v["method"] == "ln_structured" and v["schedule"] == "iterative":
        raise config.ParamsError(f"{where}: the iterative schedule is for method 'l1' (structured pruning here is one-shot)")
    if v["schedule"] == "iterative" and v["epochs"] < v["steps"]:
        raise config.ParamsError(f"{where}: {v['steps']} iterative steps need at least as many epochs, not {v['epochs']}")
    if v["scope"] == "sensitivity":
        if not sensitivity_amounts:
            raise config.ParamsError(f"{where}: scope 'sensitivity' needs the sensitivity analysis: set 'sensitivity_amounts'")
        amounts = v["amounts"] if "amounts" in v else [v["amount"]]
        if max(amounts) > max(sensitivity_amounts):
            raise config.ParamsError(f"{where}: amount {max(amounts)} exceeds the largest sensitivity amount "
                              f"{max(sensitivity_amounts)}; per-layer amounts are derived only within the measured range")


def _normalize(s: dict[str, Any]) -> dict[str, Any]:
    """Drop the settings that do not apply, so equivalent recipes share a run."""
    drop = ("schedule", "steps", "include_fc") if s["method"] == "ln_structured" else ("norm", "round_to")
    if s["scope"] != "sensitivity":
        drop += ("sensitivity_amounts",)
    return {k: v for k, v in s.items() if k not in drop}


def _check(where: str, s: dict[str, Any]) -> None:
    check_link(where, s, s["sensitivity_amounts"])


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
def _layer_amounts(step, s: dict[str, Any], layers: list) -> float | dict[str, float]:
    if s["scope"] != "sensitivity":
        return s["amount"]
    drops = analyse(step.ctx, step.parent, s["sensitivity_amounts"])
    sizes = {n: m.weight.numel() for n, m in layers}
    return amounts_from_sensitivity({n: {a: drops["val_acc"] - x for a, x in drops["acc"][n].items()} for n in sizes},
                                          sizes, s["amount"])


def _make(step) -> registry.Made:
    s, parent = step.settings, step.parent.model
    if s["method"] == "ln_structured":
        model, plan = structured(copy.deepcopy(parent), s["amount"], s["norm"], s["scope"], s["round_to"],
                                       s["include_stem"])
        before = step.accuracy(model)
        history = step.finetune(model)
        model = model.to("cpu", memory_format=torch.contiguous_format)
        return registry.Made(model, structured_arch(step.parent.row["arch"], model), before, history,
                          {"method": s["method"], "amount": s["amount"],
                           "removed_channels": {k: len(i) for k, i in plan.items()}})
    model = copy.deepcopy(parent)
    layers = prunable(model, s["include_stem"], s["include_fc"])
    target = _layer_amounts(step, s, layers)
    n = s["steps"] if s["schedule"] == "iterative" else 1
    amount = s["amount"]
    fractions = [f / amount for f in gradual(amount, n)] if amount > 0 else [1.0] * n
    epochs = [s["epochs"] // n + (1 if i < s["epochs"] % n else 0) for i in range(n)]
    before, history = None, []
    for i, (f, e) in enumerate(zip(fractions, epochs)):
        step_target = {k: a * f for k, a in target.items()} if isinstance(target, dict) else target * f
        model.to("cpu", memory_format=torch.contiguous_format)  # after fit: channels_last, maybe on the GPU
        unstructured(model, step_target, "global" if s["scope"] == "global" else "layer", layers)
        if before is None:
            before = step.accuracy(model)  # the first cut: what the first fine-tuning starts from
        part = step.finetune(model, epochs=e, checkpoint=f"checkpoint_{i}.pt")
        history += [{**r, "epoch": len(history) + r["epoch"], "step": i + 1} for r in part]  # one epoch count
    model = make_permanent(model).to("cpu", memory_format=torch.contiguous_format)
    return registry.Made(model, step.parent.row["arch"], before, history,
                      {"method": s["method"], "amount": amount, "layer_amounts": target if isinstance(target, dict) else None,
                       "step_sparsity": gradual(amount, n)})


def analyse(ctx, parent, amounts: list[float]) -> dict[str, Any]:
    """Validation accuracy of `parent` with one layer L1-pruned at each amount (validation: it chooses amounts),
    one view per image (a relative measure, twice as fast): {'layers', 'amounts', 'val_acc', 'acc': {layer: {amount: acc}}}."""
    def compute() -> dict[str, Any]:
        model = copy.deepcopy(parent.model)
        layers = [n for n, _ in prunable(model, True, True)]
        acc = sensitivity(model, layers, amounts, lambda m: ctx.protocol.accuracy(m, "val", flip=False), ctx.p["progress"])
        return {"layers": layers, "amounts": amounts, "val_acc": ctx.protocol.accuracy(model, "val", flip=False),
                "acc": {n: {str(a): v for a, v in d.items()} for n, d in acc.items()}}

    m = ctx.cached(ANALYSIS, {"kind": "sensitivity", "parent": parent.ref, "amounts": amounts}, compute)
    return {**m, "acc": {n: {float(a): v for a, v in d.items()} for n, d in m["acc"].items()}}



registry.register(registry.Technique(
    "prune", "04_pruning", "pruning", describe=name, make=_make, config=CONFIG, check=_check, trains=True,
    prunes=True, normalize=_normalize))
