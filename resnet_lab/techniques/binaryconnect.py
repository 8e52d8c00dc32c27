"""BinaryConnect (Courbariaux et al. 2015, "BinaryConnect: Training Deep Neural Networks with binary weights
during propagations"): technique `binaryconnect`.

The real-valued weights stay the trained parameters; the forward and backward passes see sign(w) (±1, or ±α
per output channel with `scale`, XNOR-Net); after each optimizer step the real weights are clipped to
[−1, 1]. sign(0) = +1, so a weight takes exactly two values (the old scripts' sign(0) = 0 made a third);
a pruned parent's zeros stay zero. The file holds 1 bit per binarized weight (`packed`), not the
full-precision weights the old scripts saved.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

from .. import config, models, packed, registry

LAYER_CHOICES = ("inner", "all")

KEYS: dict[str, config.Field] = {
    "init": config.Field(str, "pretrained", "start from the parent's trained weights or from scratch (its "
                         "architecture, random weights)", choices=("pretrained", "scratch")),
    "layers": config.Field(str, "inner", "binarized layers: every conv/linear except the first conv and the last "
                           "linear, or all of them", choices=LAYER_CHOICES),
    "mode": config.Field(str, "deterministic", "sign (sign(0) = +1) or stochastic (hard-sigmoid probability)",
                         choices=("deterministic", "stochastic")),
    "scale": config.Field(bool, False, "multiply the signs by α = mean |w| per output channel (XNOR-Net)"),
}
CONFIG: dict[str, config.Field] = {**KEYS, **config.LINK_TRAINING}


class _SignSTE(torch.autograd.Function):
    """Binarize in the forward pass; pass the gradient straight through to the real weights."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, stochastic: bool) -> torch.Tensor:
        if stochastic:  # +1 with probability hard_sigmoid(w) = clip((w + 1) / 2, 0, 1)
            keep = torch.rand_like(w) < ((w + 1) / 2).clamp(0, 1)
        else:
            keep = w >= 0  # sign(0) = +1: exactly two values
        return keep.to(w.dtype) * 2 - 1

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class Binarize(nn.Module):
    """BinaryConnect weight parametrization: the layer computes with ±1 (or ±α per output channel).

    The real-valued weights stay the trained parameters (`parametrizations.weight.original`); the
    binarized ones exist only during forward and backward, so "binarize, forward, backward,
    restore" is what autograd does. `clip_` keeps the real weights in [-1, 1] after each step.
    With `scale`, α = mean |w| per output channel (XNOR-Net). In eval mode the stochastic variant
    binarizes deterministically, as the exported model does. With a `mask` (a pruned layer), the
    masked weights stay exactly zero: the layer computes with {-1, 0, +1} (or {-α, 0, +α}).
    """

    def __init__(self, stochastic: bool = False, scale: bool = False, mask: torch.Tensor | None = None):
        super().__init__()
        self.stochastic, self.scale = stochastic, scale
        self.register_buffer("mask", mask)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        b = _SignSTE.apply(w, self.stochastic and self.training)
        if self.mask is not None:
            b = b * self.mask
        return b * alpha(w, self.mask) if self.scale else b


def alpha(w: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean |w| per output channel (over the unmasked weights when a mask is given)."""
    dims = tuple(range(1, w.dim()))
    if mask is None:
        return w.abs().mean(dim=dims, keepdim=True)
    return (w.abs() * mask).sum(dim=dims, keepdim=True) / mask.sum(dim=dims, keepdim=True).clamp(min=1)


LAYER_CHOICES = ("inner", "all")


def binarize(model: nn.Module, layers: str = "inner", mode: str = "deterministic", scale: bool = False,
             keep_zeros: bool = False) -> list[str]:
    """Register BinaryConnect on the model's conv and linear layers (in place); return their names.

    layers='inner' leaves the first conv and the last linear in float32: the stem sees 3 input
    channels (27 weights per filter, too few for signs to carry the image) and the classifier maps
    straight to the logits; together they hold well under 1% of the weights (the usual choice since
    XNOR-Net and DoReFa). layers='all' binarizes them too, like the old scripts.
    """
    if layers not in LAYER_CHOICES:
        raise ValueError(f"layers must be one of {LAYER_CHOICES}, not {layers!r}")
    candidates = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if layers == "inner":
        candidates = candidates[1:-1]
    for _, m in candidates:
        zeros = m.weight == 0
        mask = (~zeros).to(m.weight.dtype) if keep_zeros and bool(zeros.any()) else None
        parametrize.register_parametrization(m, "weight", Binarize(mode == "stochastic", scale, mask))
    return [n for n, _ in candidates]


def binarized(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules()
            if parametrize.is_parametrized(m, "weight") and isinstance(m.parametrizations.weight[0], Binarize)]


@torch.no_grad()
def clip_(model: nn.Module) -> None:
    """Clip the real-valued weights of the binarized layers to [-1, 1] (after each optimizer step)."""
    for _, m in binarized(model):
        m.parametrizations.weight.original.clamp_(-1, 1)


# ---------------------------------------------------------------- packed 1-bit export
@torch.no_grad()
def plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state_dict of a binarized model as a plain model holds it: each binarized layer's `weight` is
    the binarized tensor (±1, ±α, 0), the latent real weights and masks are left out.

    (Removing the parametrizations from a deep copy would not do: the copy shares the parametrized
    class with the original, and removal deletes the `weight` property from that class.)
    """
    was_training = model.training
    model.eval()  # a stochastic layer binarizes deterministically
    try:
        layers = dict(binarized(model))
        state = {}
        for key, t in model.state_dict().items():
            name, sep, rest = key.partition(".parametrizations.weight.")
            if sep and name in layers:
                if rest == "original":
                    state[f"{name}.weight"] = layers[name].weight.detach().clone()
                continue  # the mask buffer
            state[key] = t
        return state
    finally:
        model.train(was_training)


def save(model: nn.Module, path: str | os.PathLike, arch: dict) -> Path:
    """Write `model` with 1 bit per binarized weight (plus a 1-bit mask where pruned), α, BatchNorm and
    float layers (`packed`); it loads with `torch.load(weights_only=True)`."""
    return packed.save(plain_state(model), path, arch)


def load(path: str | os.PathLike) -> nn.Module:
    """Rebuild a plain float32 model whose binarized layers hold ±1 (or ±α): the same predictions."""
    return packed.load_model(path)


# ---------------------------------------------------------------- the step
def name(s: dict) -> str:
    extras = [s["mode"], f"{s['layers']} layers"] + (["α"] if s["scale"] else []) + (["from scratch"] if s["init"] == "scratch" else [])
    return f"BinaryConnect ({', '.join(extras)})"


def _make(step) -> registry.Made:
    s, arch = step.settings, step.parent.row["arch"]
    model = copy.deepcopy(step.parent.model) if s["init"] == "pretrained" else models.build(arch)
    names = binarize(model, s["layers"], s["mode"], s["scale"], keep_zeros=True)  # a pruned parent's zeros stay
    before = step.accuracy(model)
    history = step.finetune(model, after_step=lambda: clip_(model))
    return registry.Made(model, arch, before, history, {"binarized_layers": len(names)})


registry.register(registry.Technique(
    "binaryconnect", "03_quantization", "quantization", describe=name, make=_make, save=save, config=CONFIG,
    trains=True))
