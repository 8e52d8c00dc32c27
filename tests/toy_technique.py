"""A toy technique in one file, as a user would add one: its settings, transform, file format, bit count, name
and registration, and nothing anywhere else (tests/test_toy_technique.py shows the lab taking it up).

`toy`: the classifier's weights rounded to `bits` bits per output channel (symmetric levels times a step), kept in
a layer that exposes what `metrics` reads of a layer on an integer grid (`grid_weight`, `input_bits`), stored in a
file format of its own: the codes as uint8 beside a JSON-able header, loaded with `weights_only=True`.
"""
from __future__ import annotations

import torch
from torch import nn

from resnet_lab import config, models, registry, runs

FORMAT = "toy/1"
CONFIG = {"bits": config.Field(int, 4, "bits of each classifier weight", low=2, high=8)}


class RoundedLinear(nn.Linear):
    """A linear layer whose weight holds `bits`-bit levels times a step per output channel."""

    def __init__(self, in_features: int, out_features: int, bits: int):
        super().__init__(in_features, out_features)
        self.bits = bits

    def grid_weight(self) -> torch.Tensor:
        return self.weight

    input_bits = 32


def _levels(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    q = 2 ** (bits - 1) - 1
    step = (w.abs().amax(1, keepdim=True) / q).clamp_min(1e-12)
    return torch.clamp(torch.round(w / step), -q, q), step


def _rounded(model: nn.Module, bits: int) -> nn.Module:
    old = model.linear
    new = RoundedLinear(old.in_features, old.out_features, bits)
    with torch.no_grad():
        codes, step = _levels(old.weight, bits)
        new.weight.copy_(codes * step)
        new.bias.copy_(old.bias)
    model.linear = new
    return model


def _make(step) -> registry.Made:
    import copy

    bits = step.settings["bits"]
    model = _rounded(copy.deepcopy(step.parent.model), bits)
    return registry.Made(model, {**step.parent.row["arch"], "toy": bits}, extra={"toy_bits": bits})


def save(model: nn.Module, path, arch: dict):
    state = dict(model.state_dict())
    codes, step = _levels(state.pop("linear.weight"), arch["toy"])
    return runs.save_torch(path, {"format": FORMAT, "arch": arch, "codes": (codes + 128).to(torch.uint8),
                                  "step": step, "state": state})


def load(run: runs.Run) -> nn.Module:
    blob = runs.load_torch(run.path("toy.pt"))
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise runs.RunStoreError(f"{run.path('toy.pt')} is not a {FORMAT} file")
    model = models.build(blob["arch"])
    model.load_state_dict({**blob["state"], "linear.weight": (blob["codes"].float() - 128) * blob["step"]})
    return model.eval()


def _rebuild(model: nn.Module, bits: int) -> nn.Module:
    old = model.linear
    model.linear = RoundedLinear(old.in_features, old.out_features, int(bits))
    return model


models.register_arch("toy", _rebuild, order=35)
registry.register(registry.Technique(
    "toy", "04_pruning", "quantization", describe=lambda s: f"toy {s['bits']}-bit classifier", make=_make,
    save=save, loader=load, artifact="toy.pt", config=CONFIG))
