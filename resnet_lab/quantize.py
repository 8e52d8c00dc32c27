"""Quantization transforms and their file formats: FP16/BF16, INT8 post-training static quantization,
BinaryConnect with a packed 1-bit export. Model in, model out; no run store, no fine-tuning here
(the shared step mechanism in `steps` runs them; `stages.quantization` registers them).

- `half(model, dtype)`: the model in float16 or bfloat16, BatchNorm kept in float32.
- `int8(model, calibration)`: `torch.ao.quantization` FX graph mode, x86 engine (see `int8`);
  `save_int8` / `load_int8`: its file.
- `binarize(model, ...)`, `clip_`: BinaryConnect (Courbariaux et al. 2015) as weight parametrizations;
  `save_binary`: 1 bit per binarized weight, packed (`packed.load_model` rebuilds it).
"""
from __future__ import annotations

import contextlib
import copy
import os
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

from . import data as data_mod
from . import models, packed, runs

# ---------------------------------------------------------------- FP16 / BF16
Precision = models.Precision  # the half-precision form of a model (BatchNorm in float32)


def half(model: nn.Module, dtype: torch.dtype = torch.float16) -> models.Precision:
    """A half-precision copy of `model` (its file is about half the float32 size)."""
    return models.Precision(copy.deepcopy(model), dtype).eval()


def half_arch(arch: dict, dtype: torch.dtype) -> dict:
    """The arch record of `half(model, dtype)` for a model of `arch`."""
    return {**arch, "precision": str(dtype).removeprefix("torch.")}


# ---------------------------------------------------------------- INT8
# torch.ao.quantization is deprecated in favour of torchao's PT2E flow, whose CPU speed comes from
# lowering through torch.compile/Inductor (a C++ toolchain and minutes of compilation). The FX flow
# runs eagerly on the fbgemm/oneDNN int8 kernels and works on torch 2.14, so it is the one used here.
@contextlib.contextmanager
def _quiet_ao():
    """Silence the FX flow's deprecation notices (the choice is explained above), nothing else."""
    with warnings.catch_warnings():
        for pattern in (r".*torch\.ao\.quantization is deprecated.*", r".*reduce_range will be deprecated.*",
                        r".*quantized tensor creation functions.*", r".*must run observer before calling calculate_qparams.*",
                        r".*TypedStorage is deprecated.*"):  # the last: loading quantized tensors
            warnings.filterwarnings("ignore", message=pattern)
        yield


def _prepare_int8(model: nn.Module, backend: str) -> nn.Module:
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_fx

    torch.backends.quantized.engine = backend
    model = copy.deepcopy(model).cpu().to(memory_format=torch.contiguous_format).eval()
    return prepare_fx(model, get_default_qconfig_mapping(backend), example_inputs=(torch.zeros(1, 3, 32, 32),))


def int8(model: nn.Module, calibration: data_mod.Batches, backend: str = "x86") -> nn.Module:
    """Post-training static INT8 (weights per channel, activations per tensor), calibrated on `calibration`.

    Conv+BN(+ReLU) are fused first; the residual `add + relu` becomes a quantized add_relu. The
    result runs on the CPU, takes float32 input and returns float32 logits.
    """
    from torch.ao.quantization.quantize_fx import convert_fx

    with _quiet_ao():
        prepared = _prepare_int8(model, backend)
        with torch.inference_mode():
            for x, _ in calibration:
                prepared(x.cpu().contiguous())
        return convert_fx(prepared)


INT8_FORMAT = "resnet-lab/int8/1"


def int8_arch(arch: dict, backend: str) -> dict:
    """The arch record of `int8(model, …, backend)` for a float model of `arch`: the float model's record
    (its graph is rebuilt from it) and the engine."""
    return {**{k: v for k, v in arch.items() if k != "qat"}, "int8": backend}  # a QAT parent: its float layers


def save_int8(model: nn.Module, path: str | os.PathLike, arch: dict) -> Path:
    """Write an `int8` model: its quantized state (int8 weights, scales, zero points) with its arch record."""
    return runs.save_torch(path, {"format": INT8_FORMAT, "arch": arch, "state": model.state_dict()})


def load_int8(path: str | os.PathLike) -> nn.Module:
    """Rebuild the quantized graph from the file's arch record and load its saved int8 state."""
    from torch.ao.quantization.quantize_fx import convert_fx

    with _quiet_ao():
        blob = runs.load_torch(path)
        if not isinstance(blob, dict) or blob.get("format") != INT8_FORMAT:
            raise runs.RunStoreError(f"{path} is not a resnet-lab INT8 file ({INT8_FORMAT})")
        try:
            arch = blob["arch"]
            model = convert_fx(_prepare_int8(models.build(arch), arch["int8"]))
            model.load_state_dict(blob["state"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise runs.RunStoreError(f"{path} is a damaged INT8 file: {type(e).__name__}: "
                                     f"{str(e).splitlines()[0] if str(e) else ''}") from None
    return model


# ---------------------------------------------------------------- BinaryConnect
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


def save_binary(model: nn.Module, path: str | os.PathLike, arch: dict) -> Path:
    """Write `model` with 1 bit per binarized weight (plus a 1-bit mask where pruned), α, BatchNorm and
    float layers (`packed`); it loads with `torch.load(weights_only=True)`."""
    return packed.save(plain_state(model), path, arch)


def load_binary(path: str | os.PathLike) -> nn.Module:
    """Rebuild a plain float32 model whose binarized layers hold ±1 (or ±α): the same predictions."""
    return packed.load_model(path)
