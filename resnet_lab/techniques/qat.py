"""Quantization-aware training (technique `qat`): learned-step-size fake quantization of conv/linear layers.

Each conv and linear layer is replaced by one that quantizes its weight per output channel (symmetric,
signed: the integers −2^(b−1) … 2^(b−1)−1 times a step per channel) and the activation entering it per
tensor (unsigned, 0 … 2^b−1, where calibration sees no negative input, i.e. after a ReLU; signed
otherwise, e.g. the normalized image entering the first conv). The steps are learned with LSQ (Esser et
al. 2020, "Learned Step Size Quantization"): x̂ = round(clamp(x/s, q_min, q_max))·s with the rounding's
gradient passed straight through (so the gradient is 1 inside the range and 0 outside, where the clamp
cuts it) and the step's gradient scaled by 1/√(N·q_max); each step starts at LSQ's 2·mean|x|/√q_max,
measured on a calibration pass over training images. Built on torch's autograd only (no
`torch.ao.quantization` flow).

`freeze` ends training: each weight becomes its quantized value (integer levels times the step), so the
model computes the same without the weight quantizer, and `arch_record` describes the layers for
`models.build` (the arch key `qat`); `save` stores such a weight at its real width through `packed` (b bits
per entry plus a step per channel). The first conv and the last linear stay at `first_last_bits` (8), as
most QAT papers keep them.
Sub-8-bit models are simulated: the arithmetic is float32 on float32 levels (no int4 CPU kernels).
"""
from __future__ import annotations

import copy
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from .. import config, models, packed, registry
from .. import data as data_mod

WEIGHT_BITS = (8, 4, 3, 2)
ACT_BITS = (8, 4)


levels = packed.int_range  # (q_min, q_max) of a `bits`-bit integer grid, signed or not


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward (the straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def _grad_scaled(s: torch.Tensor, scale: float) -> torch.Tensor:
    """`s` forward, its gradient times `scale` backward (LSQ's step-size gradient scale)."""
    return s * scale + (s - s * scale).detach()


def fake_quantize(x: torch.Tensor, step: torch.Tensor, bits: int, signed: bool, grad_scale: float = 1.0) -> torch.Tensor:
    """round(clamp(x/step, q_min, q_max))·step with straight-through rounding; `step` broadcasts against `x`
    (one per output channel, or one per tensor)."""
    q_min, q_max = levels(bits, signed)
    if not (torch.is_grad_enabled() and (x.requires_grad or step.requires_grad)):  # inference: exact levels
        return torch.clamp(torch.round(x / step), q_min, q_max) * step
    s = _grad_scaled(step, grad_scale)
    return _round_ste(torch.clamp(x / s, q_min, q_max)) * s


class LSQ(nn.Module):
    """A learned-step quantizer: one step per tensor, or per output channel (`channels`, along dim 0)."""

    def __init__(self, bits: int, signed: bool, channels: int = 1):
        super().__init__()
        self.bits, self.signed, self.channels = int(bits), bool(signed), int(channels)
        self.step = nn.Parameter(torch.ones(channels))

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={self.signed}, channels={self.channels}"

    def _shaped(self, x: torch.Tensor) -> torch.Tensor:
        return self.step.view(-1, *([1] * (x.dim() - 1))) if self.channels > 1 else self.step

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """LSQ's start: 2·mean|x|/√q_max (per channel for a weight), from a calibration tensor."""
        self.start(x.abs().flatten(1).mean(1) if self.channels > 1 else x.abs().mean().view(1))

    @torch.no_grad()
    def start(self, mean_abs: torch.Tensor) -> None:
        """LSQ's start from mean|x| (one per step): 2·mean|x|/√q_max."""
        q_max = levels(self.bits, self.signed)[1]
        self.step.copy_((2 * mean_abs / math.sqrt(q_max)).clamp_min(1e-8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q_max = levels(self.bits, self.signed)[1]
        n = x[0].numel()  # what one step covers: a channel's weights, or one sample's features
        return fake_quantize(x, self._shaped(x), self.bits, self.signed, 1 / math.sqrt(n * q_max))

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """The integers x quantizes to (int16)."""
        q_min, q_max = levels(self.bits, self.signed)
        return torch.clamp(torch.round(x / self._shaped(x)), q_min, q_max).to(torch.int16)


class _Quantized:
    """What the QAT conv and linear layers share: a weight quantizer, an input quantizer, and after `freeze`
    a weight that already holds its levels."""
    w_quant: LSQ
    a_quant: LSQ
    frozen: bool

    def _attach(self, weight_bits: int, act_bits: int, act_signed: bool) -> None:
        self.w_quant = LSQ(weight_bits, True, self.weight.shape[0])
        self.a_quant = LSQ(act_bits, act_signed)
        self.frozen = False

    def quantized_weight(self) -> torch.Tensor:
        return self.weight if self.frozen else self.w_quant(self.weight)

    # what `metrics` reads of a layer that computes on an integer grid (it names no technique)
    def grid_weight(self) -> torch.Tensor:
        return self.quantized_weight()

    @property
    def input_bits(self) -> int:
        return self.a_quant.bits

    def as_plain(self) -> nn.Module:
        """This frozen layer as a plain conv/linear holding its quantized weight, without the input quantizer
        (what INT8 takes to put a W8A8 model on int8 kernels)."""
        if not self.frozen:
            raise ValueError("the layer is not frozen: freeze the QAT model first")
        m = copy.deepcopy(self)
        m.__class__ = nn.Conv2d if isinstance(self, nn.Conv2d) else nn.Linear
        del m.w_quant, m.a_quant, m.frozen
        return m


class QConv2d(_Quantized, nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.a_quant(x), self.quantized_weight(), self.bias)


class QLinear(_Quantized, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.a_quant(x), self.quantized_weight(), self.bias)


def _quantized_copy(m: nn.Module, weight_bits: int, act_bits: int, act_signed: bool) -> nn.Module:
    if isinstance(m, nn.Conv2d):
        q = QConv2d(m.in_channels, m.out_channels, m.kernel_size, stride=m.stride, padding=m.padding,
                    dilation=m.dilation, groups=m.groups, bias=m.bias is not None, padding_mode=m.padding_mode)
    else:
        q = QLinear(m.in_features, m.out_features, bias=m.bias is not None)
    q._attach(weight_bits, act_bits, act_signed)
    loaded = q.load_state_dict(m.state_dict(), strict=False)  # the quantizers' steps are new
    if loaded.unexpected_keys or any(not k.endswith(".step") for k in loaded.missing_keys):
        raise ValueError(f"cannot quantize a {type(m).__name__} holding {sorted(m.state_dict())}")
    return q.to(m.weight.device)


def layer_bits(model: nn.Module, weight_bits: int, act_bits: int, first_last_bits: int) -> dict[str, list[int]]:
    """{layer name: [weight bits, activation bits]} of every conv/linear layer: the first conv (the one that sees
    the image) and the last linear at `first_last_bits`, every other at (`weight_bits`, `act_bits`)."""
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    edges = {names[0], names[-1]}
    return {n: [first_last_bits, first_last_bits] if n in edges else [weight_bits, act_bits] for n in names}


def quantize(model: nn.Module, bits: dict[str, list[int]], calibration: torch.Tensor) -> nn.Module:
    """`model` with each layer of `bits` replaced by its QAT layer, the steps initialised from one forward pass
    of `calibration` (normalized training images): weights per channel, each layer's input per tensor (its
    signedness from whether that input goes negative). A new model; `model` is untouched."""
    import copy

    model = copy.deepcopy(model).eval()
    seen: dict[str, tuple[torch.Tensor, bool]] = {}  # layer -> (mean |input|, whether its input goes negative)

    def observe(name: str, x: torch.Tensor) -> None:
        seen[name] = (x.detach().abs().mean().view(1).float(), bool((x < 0).any()))

    layers = {n: model.get_submodule(n) for n in bits}
    hooks = [m.register_forward_pre_hook(lambda m, args, n=n: observe(n, args[0])) for n, m in layers.items()]
    with torch.no_grad():
        model(calibration)
    for h in hooks:
        h.remove()
    for name, (wb, ab) in bits.items():
        mean_abs, negative = seen[name]
        q = _quantized_copy(layers[name], wb, ab, act_signed=negative)
        q.w_quant.initialize(q.weight.detach())
        q.a_quant.start(mean_abs)
        model.set_submodule(name, q)
    return model


def quantized_layers(model: nn.Module) -> dict[str, _Quantized]:
    return {n: m for n, m in model.named_modules() if isinstance(m, _Quantized)}


@torch.no_grad()
def freeze(model: nn.Module) -> nn.Module:
    """End of training, in place: every weight replaced by its quantized value, the weight quantizer no longer
    applied (the model computes the same); the input quantizers stay."""
    for m in quantized_layers(model).values():
        if not m.frozen:
            m.weight.copy_(m.w_quant.codes(m.weight).to(m.weight.dtype) * m.w_quant._shaped(m.weight))
            m.frozen = True
    return model


def arch_record(model: nn.Module) -> dict[str, list]:
    """{layer: [weight bits, activation bits, activation signed]} of a QAT model (for `models.build`)."""
    return {n: [m.w_quant.bits, m.a_quant.bits, m.a_quant.signed] for n, m in quantized_layers(model).items()}


def rebuild(model: nn.Module, record: dict[str, list]) -> nn.Module:
    """The frozen QAT layers of `record` put into an untrained `model` (what `models.build` calls)."""
    for name, (wb, ab, signed) in record.items():
        q = _quantized_copy(model.get_submodule(name), int(wb), int(ab), bool(signed))
        q.frozen = True
        model.set_submodule(name, q)
    return model


models.register_arch("qat", rebuild, order=30)  # after the layers are resized


# ---------------------------------------------------------------- settings, file and the step
KEYS: dict[str, config.Field] = {
    "weight_bits": config.Field(int, 4, "bits of every conv/linear weight (per output channel, symmetric, learned "
                                "step)", choices=WEIGHT_BITS),
    "act_bits": config.Field(int, 4, "bits of the activation entering every conv/linear layer (per tensor, learned "
                             "step; unsigned after a ReLU)", choices=ACT_BITS),
    "first_last_bits": config.Field(int, 8, "bits of the first conv and the last linear, weights and input (the "
                                    "layers most sensitive to quantization)", choices=(8, 4)),
    "calibration_images": config.Field(int, 512, "training images (not augmented) whose forward pass sets the "
                                       "initial steps", low=1, high=50_000),
}
CONFIG: dict[str, config.Field] = {**KEYS, **config.LINK_TRAINING}


def save(model: nn.Module, path: str | os.PathLike, arch: dict) -> os.PathLike:
    """The model packed, each frozen weight at its bits (its integer codes, the step per channel beside them)."""
    levels = {f"{layer}.weight": (int(bits[0]), f"{layer}.w_quant.step") for layer, bits in arch.get("qat", {}).items()}
    return packed.save(models.unwrap(model).state_dict(), path, arch, levels)


def name(s: dict) -> str:
    edges = f", first/last {s['first_last_bits']}-bit" if s["first_last_bits"] != max(s["weight_bits"], s["act_bits"]) else ""
    return f"QAT W{s['weight_bits']}A{s['act_bits']} (LSQ{edges}, simulated)"


def _make(step) -> registry.Made:
    s, parent = step.settings, step.parent.model
    n, train_split = s["calibration_images"], step.ctx.dataset.train
    calibration = data_mod.Split(train_split.images[:n], train_split.labels[:n])
    images, _ = next(iter(data_mod.Batches(calibration, len(calibration), "cpu")))  # one batch, normalized
    model = quantize(parent, layer_bits(parent, s["weight_bits"], s["act_bits"], s["first_last_bits"]), images)
    before = step.accuracy(model)
    after_step = None
    if step.parent.row["pruned"]:  # a pruned parent's zeros stay zero (a zero weight quantizes to level 0)
        kept = [(m.weight, m.weight.detach() != 0) for m in quantized_layers(model).values()]

        @torch.no_grad()
        def after_step():
            for w, mask in kept:
                w.mul_(mask.to(w.device))
    history = step.finetune(model, after_step=after_step)
    freeze(model.cpu())
    arch = {**step.parent.row["arch"], "qat": arch_record(model)}
    return registry.Made(model, arch, before, history, {"simulated": True, "calibration_images": len(calibration)})


def _deployed(s: dict) -> tuple[str, ...]:
    """A model whose every layer is at 8 bits ends on int8 CPU kernels, beside the post-training INT8."""
    return ("int8",) if {s[k] for k in KEYS if k.endswith("bits")} == {8} else ()


registry.register(registry.Technique(
    "qat", "03_quantization", "quantization", describe=name, make=_make, save=save, config=CONFIG, trains=True,
    followed_by=("int8",), follow=_deployed))
