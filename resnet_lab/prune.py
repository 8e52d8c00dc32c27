"""Pruning: unstructured L1 magnitude (masks), structured Ln filter pruning with physical channel
removal, layer sensitivity, and the 04_pruning stage that fine-tunes and measures them.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch_pruning as tp
from torch import nn
from torch.nn.utils import prune as torch_prune
from tqdm import tqdm

from . import metrics, models, packed, quantize, runs, train
from . import params as params_mod

if TYPE_CHECKING:  # tables are built on demand; pandas is imported there
    import pandas as pd


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


# ---------------------------------------------------------------- saving
def save(model: nn.Module, path, arch: dict) -> Path:
    """Write a pruned model (plain or half precision) packed: masks and nonzero values for sparse tensors;
    the arch record (with the shapes of removed channels) inside the file."""
    inner = model.model if isinstance(model, quantize.Precision) else model
    return packed.save(inner.state_dict(), path, arch)


def load_file(path) -> nn.Module:
    """The inference model of a packed pruning file (float32 in, float32 out)."""
    state, arch = packed.load(path)
    model = models.build(arch)
    precision = arch.get("precision", "float32")
    if precision != "float32":
        model = quantize.Precision(model, getattr(torch, precision))
    try:
        (model.model if precision != "float32" else model).load_state_dict(state)
    except RuntimeError as e:
        raise runs.RunStoreError(f"{path} does not match its own architecture record: {str(e).splitlines()[0]}") from None
    return model.eval()


def load(run: runs.Run) -> nn.Module:
    """The model of a finished pruning run."""
    return load_file(run.path(run.metrics["artifact"]))


# ---------------------------------------------------------------- the 04_pruning stage
_THEN = {"none": "", "fp16": " → FP16", "bf16": " → BF16", "binaryconnect": " + BinaryConnect"}


def _parts(v: dict, amount: float | None) -> list[str]:
    """The pieces of a model's name; without `amount`, those of its method's curve."""
    if v["method"] == "l1":
        parts = ["L1 unstructured", v["scope"]] + ([f"{amount:.0%}"] if amount is not None else [])
        return parts + ([f"{v['steps']} steps"] if v["schedule"] == "iterative" else [])
    return [f"L{v['norm']:g} structured", v["scope"]] + ([f"{amount:.0%} of channels"] if amount is not None else [])


def label(v: dict, amount: float) -> str:
    """A model's name in tables and plots, e.g. 'L1 unstructured, global, 80%' or '… → FP16'."""
    return ", ".join(_parts(v, amount)) + _THEN[v["then"]]


def family(v: dict) -> str:
    """The curve a model belongs to (method and scope, and the step that follows)."""
    return ", ".join(_parts(v, None)) + _THEN[v["then"]]


@dataclass
class Result:
    baseline: train.BaselineResult
    rows: list[dict[str, Any]]  # the baseline first, then one per (variant, amount)
    models: dict[str, nn.Module]  # label -> CPU inference model
    histories: dict[str, list[dict]]
    sensitivity: dict[str, Any] | None = None  # {'layers', 'amounts', 'val_acc', 'acc': {layer: {amount: acc}}}
    curves: list[dict[str, Any]] = field(default_factory=list)  # right after pruning, no fine-tuning


def run(p: dict) -> Result:
    """Prune the baseline of `p['baseline']` with every variant at every amount, fine-tune, measure; each
    model is a run in the store (reused when finished), reloaded from its saved file before it is measured."""
    base, bp = train.trained_baseline(p["baseline"], p)
    stage = _Stage(p, bp, base)
    out = Result(base, [stage.baseline_row()], {"baseline (dense)": base.model.eval()}, {})
    variants = p["variants"]
    if p["sensitivity_amounts"]:
        out.sensitivity = stage.sensitivity()
    out.curves = stage.curves(variants)
    for v in variants:
        for amount in v["amounts"]:
            pruned = stage.pruned(v, amount, out)
            if v["then"] != "none":
                stage.then(v, amount, pruned, out)
    return out


class _Stage:
    def __init__(self, p: dict, bp: dict, base: train.BaselineResult):
        self.p, self.bp, self.base = p, bp, base
        self.store = runs.RunStore(p["run_root"])
        self.model = base.model.eval()
        self.arch = models.arch_of(self.model)
        self.shapes = {n: m.weight.numel() for n, m in prunable(self.model, True, True)}

    # -- evaluation and measurement
    def accuracy(self, model: nn.Module, split: str = "test", flip: bool | None = None) -> float:
        flip = self.bp["eval_flip"] if flip is None else flip
        return train.evaluate_split(model, getattr(self.base.dataset, split), self.p["eval_batch_size"], flip,
                                    train.pick_device(self.p["device"]))["acc"]

    def describe(self, model: nn.Module, size_bytes: int) -> dict[str, Any]:
        """Every cost figure of `model` and the score inputs, measured (p_s and p_u against the baseline)."""
        inner = model.model if isinstance(model, quantize.Precision) else model
        nonzero = self._nonzero_weights(inner)
        return {"params": metrics.count_params(inner), "nonzero_params": metrics.count_nonzero(inner), **metrics.count_macs(inner),
                "size_bytes": size_bytes, "per_layer_sparsity": {n: 1 - k / self.shapes[n] for n, k in nonzero.items()},
                "weight_sparsity": self.weight_sparsity(inner), **metrics.course_inputs(model, pruned_from=self.model),
                **metrics.micronet(model)}

    def baseline_row(self) -> dict[str, Any]:
        size = packed.nbytes(self.model.state_dict(), self.arch)  # the same file format as the pruned models
        return {"label": "baseline (dense)", "family": "baseline", "amount": 0.0, **self.describe(self.model, size),
                "test_acc": self.base.metrics["test_acc"], "test_acc_before_finetune": self.base.metrics["test_acc"],
                "val_acc": self.base.metrics["val_acc"], "train_time_s": 0.0, "run": str(self.base.run)}

    # -- analyses without fine-tuning
    def _analysis_run(self, kind: str, values: dict) -> runs.Run:
        return self.store.run("prune_analysis", {"kind": kind, "baseline": self.base.run.key, "device": self.p["device"],
                                                 "eval_batch_size": self.p["eval_batch_size"], **values})

    def sensitivity(self) -> dict[str, Any]:
        """Validation accuracy with one layer L1-pruned at each amount (validation: it chooses amounts)."""
        amounts = self.p["sensitivity_amounts"]
        run = self._analysis_run("sensitivity", {"amounts": amounts})
        with run.lock():
            if not (run.done and self.p["reuse"]):
                model = copy.deepcopy(self.model)
                layers = [n for n, _ in prunable(model, True, True)]
                # one view per image (no flip): a relative measure, twice as fast
                acc = sensitivity(model, layers, amounts, lambda m: self.accuracy(m, "val", flip=False), self.p["progress"])
                run.finish({"layers": layers, "amounts": amounts, "val_acc": self.accuracy(model, "val", flip=False),
                            "acc": {n: {str(a): v for a, v in d.items()} for n, d in acc.items()}})
            m = run.metrics
        m["acc"] = {n: {float(a): v for a, v in d.items()} for n, d in m["acc"].items()}
        return m

    def curves(self, variants: list[dict]) -> list[dict[str, Any]]:
        """Test accuracy right after one-shot pruning (no fine-tuning) at `curve_amounts`, for each method
        and scope of the variants: what fine-tuning has to recover."""
        kinds = []
        for v in variants:
            k = {key: v[key] for key in ("method", "scope", "norm", "round_to", "include_stem", "include_fc")}
            if k not in kinds and v["scope"] != "sensitivity":
                kinds.append(k)
        rows = []
        for k in kinds:
            run = self._analysis_run("curve", {**k, "amounts": self.p["curve_amounts"]})
            with run.lock():
                if not (run.done and self.p["reuse"]):
                    points = []
                    for a in tqdm(self.p["curve_amounts"], desc=f"{k['method']} {k['scope']} right after pruning",
                                  disable=not self.p["progress"]):
                        model = self._prune(k, a)
                        points.append({"amount": a, "test_acc": self.accuracy(model),
                                       "weight_sparsity": self.weight_sparsity(model), **metrics.count_macs(model)})
                    run.finish({"points": points})
                for pt in run.metrics["points"]:
                    rows.append({"family": family({**k, "schedule": "oneshot", "steps": 1, "then": "none"}), **pt})
        return rows

    def _nonzero_weights(self, model: nn.Module) -> dict[str, int]:
        return {n: int(torch.count_nonzero(m.weight)) for n, m in prunable(model, True, True)}

    def weight_sparsity(self, model: nn.Module) -> float:
        """Share of the baseline's conv and linear weights that are zero or removed in `model`."""
        return 1 - sum(self._nonzero_weights(model).values()) / sum(self.shapes.values())

    # -- pruning
    def _prune(self, v: dict, amount: float, drops: dict | None = None) -> nn.Module:
        """A pruned copy of the baseline, one shot (no fine-tuning); L1 keeps its masks."""
        model = copy.deepcopy(self.model)
        if v["method"] == "ln_structured":
            return structured(model, amount, v["norm"], v["scope"], v["round_to"], v["include_stem"])[0]
        layers = prunable(model, v["include_stem"], v["include_fc"])
        unstructured(model, self._amounts(v, amount, layers, drops), "global" if v["scope"] == "global" else "layer", layers)
        return model

    def _amounts(self, v: dict, amount: float, layers: list, drops: dict | None) -> float | dict[str, float]:
        if v["scope"] != "sensitivity":
            return amount
        sizes = {n: m.weight.numel() for n, m in layers}
        acc = drops["acc"]
        return amounts_from_sensitivity({n: {a: drops["val_acc"] - x for a, x in acc[n].items()} for n in sizes}, sizes, amount)

    def _finetune_params(self, v: dict, epochs: int, lr: float) -> dict:
        recipe = {k: self.p[k] for k in params_mod.FINETUNE} | {"epochs": epochs, "lr": lr}
        return {**self.bp, **recipe, "seed": self.p["seed"], "device": self.p["device"], "progress": self.p["progress"]}

    def _identity(self, v: dict, amount: float) -> dict:
        keys = ("method", "scope", "schedule", "steps", "norm", "round_to", "include_stem", "include_fc", "epochs", "lr")
        ident = {k: v[k] for k in keys} | {"amount": amount, "baseline": self.base.run.key, "seed": self.p["seed"],
                                            "device": self.p["device"], "eval_batch_size": self.p["eval_batch_size"]}
        ident |= {k: self.p[k] for k in params_mod.FINETUNE if k not in ("epochs", "lr")}
        if v["method"] == "ln_structured":  # no masks, no schedule
            ident.pop("schedule"), ident.pop("steps"), ident.pop("include_fc")
        else:
            ident.pop("norm"), ident.pop("round_to")
        if v["scope"] == "sensitivity":
            ident["sensitivity_amounts"] = self.p["sensitivity_amounts"]
        return ident

    def pruned(self, v: dict, amount: float, out: Result) -> runs.Run:
        """The fine-tuned pruned model of variant `v` at `amount` (its `then` step excluded)."""
        v0 = {**v, "then": "none"}
        name = label(v0, amount)
        run = self.store.run("prune", self._identity(v, amount))
        with run.lock():
            model = None
            if not (run.done and self.p["reuse"]):
                model = self._prune_and_finetune(run, v, amount, name, out.sensitivity)
            self._collect(run, out, model)
        return run

    def _prune_and_finetune(self, run: runs.Run, v: dict, amount: float, name: str, drops: dict | None) -> nn.Module:
        if self.p["progress"]:
            print(f"{name}: pruning and fine-tuning into {run}", flush=True)
        history: list[dict] = []
        if v["method"] == "ln_structured":
            torch.manual_seed(self.p["seed"])
            model, plan = structured(copy.deepcopy(self.model), amount, v["norm"], v["scope"], v["round_to"], v["include_stem"])
            before = self.accuracy(model)
            history = train.fit(model, self.base.dataset, self._finetune_params(v, v["epochs"], v["lr"]),
                                checkpoint=run.path("checkpoint.pt"))
            extra = {"removed_channels": {k: len(i) for k, i in plan.items()}}
        else:
            model = copy.deepcopy(self.model)
            layers = prunable(model, v["include_stem"], v["include_fc"])
            target = self._amounts(v, amount, layers, drops)
            steps = v["steps"] if v["schedule"] == "iterative" else 1
            fractions = [f / amount for f in gradual(amount, steps)] if amount > 0 else [1.0] * steps
            epochs = [v["epochs"] // steps + (1 if i < v["epochs"] % steps else 0) for i in range(steps)]
            before = None
            for i, (f, e) in enumerate(zip(fractions, epochs)):
                step_target = {n: a * f for n, a in target.items()} if isinstance(target, dict) else target * f
                model.to("cpu", memory_format=torch.contiguous_format)  # after fit: channels_last, maybe on the GPU
                unstructured(model, step_target, "global" if v["scope"] == "global" else "layer", layers)
                if before is None:
                    before = self.accuracy(model)  # the first cut: what the first fine-tuning starts from
                step = train.fit(model, self.base.dataset, self._finetune_params(v, e, v["lr"]),
                                 checkpoint=run.path(f"checkpoint_{i}.pt"))
                history += [{**r, "epoch": len(history) + r["epoch"], "step": i + 1} for r in step]  # one epoch count
            model = make_permanent(model)
            extra = {"layer_amounts": target if isinstance(target, dict) else None, "step_sparsity": gradual(amount, steps)}
        model = model.to("cpu", memory_format=torch.contiguous_format).eval()
        arch = {**self.arch, "shapes": models.shapes_of(model)} if v["method"] == "ln_structured" else self.arch
        save(model, run.path("packed.pt"), arch)
        return self._finish(run, v, amount, before, history, extra)

    def _finish(self, run: runs.Run, v: dict, amount: float, before: float, history: list[dict], extra: dict) -> nn.Module:
        """Measure the saved artifact, record the run as finished; return the artifact's model."""
        model = load_file(run.path("packed.pt"))
        run.write_json("history.json", history)
        row = {"label": label(v, amount), "family": family(v), "variant": v, "amount": amount, "method": v["method"],
               **self.describe(model, run.path("packed.pt").stat().st_size), "test_acc_before_finetune": before,
               "test_acc": self.accuracy(model), "val_acc": self.accuracy(model, "val"),
               "train_time_s": sum(r["train_time_s"] for r in history), "artifact": "packed.pt", "run": str(run), **extra}
        run.finish(row)
        for f in run.dir.glob("checkpoint*.pt"):
            f.unlink()
        return model

    def _collect(self, run: runs.Run, out: Result, model: nn.Module | None = None) -> None:
        """Add a finished run to the result (`model`: its artifact, when just loaded)."""
        row = run.metrics
        if row["label"] in out.models:  # a pruned model shared by variants that differ in their `then` step
            return
        out.rows.append(row)
        out.models[row["label"]] = model if model is not None else load(run)
        out.histories[row["label"]] = run.read_json("history.json")

    def then(self, v: dict, amount: float, pruned: runs.Run, out: Result) -> None:
        """FP16/BF16 of the pruned model, or BinaryConnect training that keeps its zeros."""
        ident = {"baseline": self.base.run.key, "pruned": pruned.key, "then": v["then"],
                 "eval_batch_size": self.p["eval_batch_size"], "device": self.p["device"]}
        if v["then"] == "binaryconnect":
            ident |= {"epochs": v["then_epochs"], "lr": v["then_lr"], "seed": self.p["seed"],
                      **{k: self.p[k] for k in params_mod.FINETUNE if k not in ("epochs", "lr")}}
        run = self.store.run("prune_then", ident)
        with run.lock():
            done = None
            if not (run.done and self.p["reuse"]):
                model = load(pruned)
                before = pruned.metrics["test_acc"]
                history: list[dict] = []
                if v["then"] in ("fp16", "bf16"):
                    model = quantize.half(model, {"fp16": torch.float16, "bf16": torch.bfloat16}[v["then"]])
                    arch = {**self._arch_of(pruned), "precision": str(model.dtype).removeprefix("torch.")}
                    save(model, run.path("packed.pt"), arch)
                else:
                    if self.p["progress"]:
                        print(f"{label(v, amount)}: training into {run}", flush=True)
                    torch.manual_seed(self.p["seed"])
                    quantize.binarize(model, "inner", "deterministic", scale=False, keep_zeros=True)
                    before = self.accuracy(model)  # binarized, before its training
                    history = train.fit(model, self.base.dataset, self._finetune_params(v, v["then_epochs"], v["then_lr"]),
                                        checkpoint=run.path("checkpoint.pt"), after_step=lambda: quantize.clip_(model))
                    model = model.to("cpu", memory_format=torch.contiguous_format).eval()
                    quantize.save_binary(model, run.path("packed.pt"), self._arch_of(pruned))
                done = self._finish(run, v, amount, before, history, {"pruned_run": str(pruned)})
            self._collect(run, out, done)

    def _arch_of(self, pruned: runs.Run) -> dict:
        return packed.load(pruned.path("packed.pt"))[1]


# ---------------------------------------------------------------- tables for the report
def table(result: Result, speed: dict[str, dict] | None = None) -> pd.DataFrame:
    """One row per model: accuracy before/after fine-tuning, sparsity, sizes, MACs, speed, both scores."""
    import pandas as pd

    base = result.rows[0]
    rows = []
    for r in result.rows:
        row = {"model": r["label"], "weight sparsity (%)": 100 * r["weight_sparsity"],
               "parameters": r["params"], "nonzero parameters": r["nonzero_params"],
               "MACs (dense)": r["macs"], "MACs (sparse)": r["sparse_macs"], "MAC reduction (×, dense)": base["macs"] / r["macs"],
               "size on disk (KB)": r["size_bytes"] / 1e3, "size vs baseline": r["size_bytes"] / base["size_bytes"],
               "test acc. before fine-tuning (%)": r["test_acc_before_finetune"], "test accuracy (%)": r["test_acc"],
               "Δ vs baseline (pt)": r["test_acc"] - base["test_acc"]}
        if speed:
            row |= metrics.speed_columns(speed, r["label"], base["label"], row["MAC reduction (×, dense)"])
        row |= {"course score": r["score"], "MicroNet score": r["micronet_score"], "fine-tuning time (s)": r["train_time_s"]}
        rows.append(row)
    return pd.DataFrame(rows).set_index("model")


def score_inputs(result: Result) -> pd.DataFrame:
    """The measured inputs of the course score and the MicroNet counts, per model."""
    import pandas as pd

    return pd.DataFrame([{"model": r["label"], "p_s": r["p_s"], "p_u": r["p_u"], "q_w (bits)": r["weight_bits"],
                          "q_a (bits)": r["act_bits"], "w": r["score_w"], "f": r["score_f"], "course score": r["score"],
                          "MicroNet params (32-bit eq.)": r["micronet_params"], "MicroNet ops (32-bit eq.)": r["micronet_ops"],
                          "MicroNet score": r["micronet_score"]} for r in result.rows]).set_index("model")


def per_layer(result: Result, labels: list[str] | None = None) -> pd.DataFrame:
    """Long table: layer, model, share of the baseline layer's weights gone (zeroed or removed)."""
    import pandas as pd

    return pd.DataFrame([{"layer": layer, "model": r["label"], "sparsity (%)": 100 * s}
                         for r in result.rows[1:] if labels is None or r["label"] in labels
                         for layer, s in r["per_layer_sparsity"].items()])


def sensitivity_table(result: Result) -> pd.DataFrame:
    """Layers × amounts: validation accuracy drop (pt) with only that layer pruned."""
    import pandas as pd

    s = result.sensitivity
    return pd.DataFrame({f"{a:.0%}": {n: s["val_acc"] - s["acc"][n][a] for n in s["layers"]} for a in s["amounts"]})


def curve_table(result: Result) -> pd.DataFrame:
    """Accuracy against sparsity and MACs: right after pruning (the curves) and after fine-tuning (each run)."""
    import pandas as pd

    rows = [{**c, "stage": "right after pruning"} for c in result.curves]
    rows += [{"family": r["family"], "amount": r["amount"], "test_acc": r["test_acc"], "weight_sparsity": r["weight_sparsity"],
              "macs": r["macs"], "sparse_macs": r["sparse_macs"], "stage": "after fine-tuning"} for r in result.rows[1:]]
    df = pd.DataFrame(rows)
    df["weight sparsity (%)"] = 100 * df["weight_sparsity"]
    df["MACs (millions)"] = df["macs"] / 1e6
    df["sparse MACs (millions)"] = df["sparse_macs"] / 1e6
    return df.rename(columns={"test_acc": "test accuracy (%)", "family": "method"})


def headline(summary: pd.DataFrame) -> str:
    """The sparsest unstructured model within 2 pt and the structured model with the largest MAC reduction
    within 5 pt, with the best course score."""
    parts = []
    unstructured_ = summary[summary.index.str.startswith("L1") & ~summary.index.str.contains("→|\\+")]
    ok = unstructured_[unstructured_["Δ vs baseline (pt)"] >= -2]
    if len(ok):
        name = ok["weight sparsity (%)"].idxmax()
        parts.append(f"{name}: {ok.loc[name, 'Δ vs baseline (pt)']:+.1f} pt")
    struct = summary[summary.index.str.contains("structured") & ~summary.index.str.contains("→|\\+")]
    ok = struct[struct["Δ vs baseline (pt)"] >= -5]
    if len(ok):
        name = ok["MAC reduction (×, dense)"].idxmax()
        r = ok.loc[name]
        speed = f", {r['speed-up (×)']:.2f}× CPU throughput" if "speed-up (×)" in r else ""
        parts.append(f"{name}: {r['MAC reduction (×, dense)']:.1f}× fewer MACs{speed}, {r['Δ vs baseline (pt)']:+.1f} pt")
    best = summary["course score"].idxmin()
    parts.append(f"best course score {summary.loc[best, 'course score']:.3f} ({best})")
    return " · ".join(parts)
