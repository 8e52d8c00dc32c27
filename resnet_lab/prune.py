"""Pruning: unstructured L1 magnitude (masks), structured Ln filter pruning with physical channel
removal, layer sensitivity. Model in, model out; the 04_pruning stage that fine-tunes and measures
them is `stages.pruning`.

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

from . import models


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
