"""Low-rank factorization of convolutions by truncated SVD (technique `svd`; the transform is model in,
model out, `_make` fine-tunes through the shared step).

A k×k Conv2d (groups = 1) with weight W reshaped to (C_out, C_in·k·k) = U·S·Vᵀ becomes a k×k conv
C_in→r (weights √S_r·V_rᵀ, the original stride/padding/dilation) followed by a 1×1 conv r→C_out
(weights U_r·√S_r, the original bias). At full rank the pair computes the same function. The
square roots split the singular values evenly between the two factors, which keeps both equally
scaled for fine-tuning (putting all of S on one side, as the old scripts did, gives the same product).
"""
from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from .. import config, models, registry

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
    """The two-conv replacement of `conv` at `rank` (`models.low_rank_pair`); its weights from the
    truncated SVD when `init`."""
    pair = low_rank_pair(conv, rank)
    first, second = pair
    if init:
        with torch.no_grad():
            u, s, vh = torch.linalg.svd(conv.weight.detach().flatten(1).double(), full_matrices=False)
            root = s[:rank].sqrt()
            first.weight.copy_((root[:, None] * vh[:rank]).view(rank, *conv.weight.shape[1:]))
            second.weight.copy_((u[:, :rank] * root).view(conv.out_channels, rank, 1, 1))
            if conv.bias is not None:
                second.bias.copy_(conv.bias)
    return pair


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


def arch(parent: dict, model: nn.Module, ranks: dict[str, int]) -> dict:
    """The arch record of `model`, factorized at `ranks` from a model of arch record `parent` (whose own
    factorized layers and resized shapes it keeps: the shapes are taken again from `model`)."""
    out = {**parent, "factorized": {**parent.get("factorized", {}), **ranks}}
    if "shapes" in parent:
        out["shapes"] = models.shapes_of(model)
    return out


def low_rank_pair(conv: nn.Conv2d, rank: int) -> nn.Sequential:
    """The layout that replaces a k×k conv by a rank-`rank` factorization: a k×k conv C_in→rank (the
    original stride, padding, dilation) followed by a 1×1 conv rank→C_out (the original bias).
    Untrained; `factorize.split` fills it from the SVD."""
    first = nn.Conv2d(conv.in_channels, rank, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                      dilation=conv.dilation, bias=False, padding_mode=conv.padding_mode)
    return nn.Sequential(first, nn.Conv2d(rank, conv.out_channels, 1, bias=conv.bias is not None))


def _factorize_all(model: nn.Module, ranks: dict[str, int]) -> nn.Module:
    for name, rank in ranks.items():
        model.set_submodule(name, low_rank_pair(model.get_submodule(name), int(rank)))
    return model


models.register_arch("factorized", _factorize_all, order=10)  # before `shapes`, which resizes the pairs too


# ---------------------------------------------------------------- settings, names and the step
KEYS: dict[str, config.Field] = {
    "rank_rule": config.Field(str, "fraction", "how each layer's rank is chosen: a fixed rank, a fraction of the "
                              "layer's full rank, or the share of singular-value energy kept", choices=RULES),
    # 16: AVX-512 kernels compute 16 channels at a time, AVX2 ones 8; a rank between multiples saves MACs, not time
    "rank_multiple": config.Field(int, 16, "round every rank up to a multiple of this (CPU kernels compute channels "
                                  "in SIMD-wide blocks: 16 floats with AVX-512, 8 with AVX2; a smaller rank saves MACs, "
                                  "not time)", low=1, high=1024),
    "include_stem": config.Field(bool, False, "also factorize the first conv (3 input channels: little to gain)"),
    "include_1x1": config.Field(bool, False, "also factorize the 1x1 shortcut convs"),
}


def _rank_value(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise config.ParamsError(f"'{key}' = {config.bounded(repr(value))}: a rank value is a number > 0 (a whole rank for rank_rule 'fixed', "
                          f"a share in (0, 1] for 'fraction' and 'energy')")
    return value



CONFIG: dict[str, config.Field] = {
    **KEYS, "rank": config.Field(float, None, "the rank value under rank_rule", validator=_rank_value, required=True),
    "mode": config.Field(str, "posttraining", "posttraining: factorize the trained parent, then fine-tune; scratch: "
                         "train the same factorized architecture from random weights", choices=("posttraining", "scratch")),
    **config.LINK_TRAINING}


def check_rank_values(where: str, rule: str, values: list) -> None:
    for v in values:
        if rule == "fixed" and (not isinstance(v, int) or v < 1):
            raise config.ParamsError(f"{where}: rank value {v!r}: with rank_rule 'fixed' every value is a whole rank >= 1")
        if rule in ("fraction", "energy") and not 0 < v <= 1:
            raise config.ParamsError(f"{where}: rank value {v!r}: with rank_rule '{rule}' every value lies in (0, 1]")



def _check(where: str, s: dict) -> None:
    check_rank_values(where, s["rank_rule"], [s["rank"]])


def name(s: dict[str, Any]) -> str:
    rule, value = s["rank_rule"], s["rank"]
    what = {"fixed": f"rank {value:g}", "fraction": f"{value:g} of full rank", "energy": f"{value:.0%} energy"}[rule]
    return f"SVD {what}" + (" (from scratch)" if s["mode"] == "scratch" else "")


def _make(step) -> registry.Made:
    s = step.settings
    # ranks are chosen on the trained weights in both modes, so both train the same architecture
    model, ranks, skipped = svd(step.parent.model, s["rank_rule"], s["rank"], s["include_stem"],
                                s["include_1x1"], s["rank_multiple"])
    record = arch(step.parent.row["arch"], model, ranks)
    if s["mode"] == "scratch":
        torch.manual_seed(s["seed"])
        model = models.build(record)
    before = step.accuracy(model)
    history = step.finetune(model)
    return registry.Made(model, record, before, history, {"factorized": ranks, "skipped": skipped})



registry.register(registry.Technique(
    "svd", "05_svd", "factorization", describe=name, make=_make, config=CONFIG, check=_check, trains=True))
