"""FP16 / BF16: the trained model in half precision, BatchNorm kept in float32 (techniques `fp16`, `bf16`).

Nothing is trained: the weights are rounded once. The file holds the half-precision tensors (about half the
float32 size); `models.build` rebuilds the wrapper from the arch record's `precision`. On a CPU without
half-precision arithmetic (no avx512_fp16 / amx) the model runs slower than float32: 03 says which flags
the CPU has.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from .. import data as data_mod
from .. import models, registry, train


class Precision(models.Wrapper):
    """`model` run in `dtype` (float16 or bfloat16) with BatchNorm in float32; float32 in, float32 out.

    BatchNorm stays in float32 because its running variance and epsilon lose precision in half
    (and it costs nothing: it is a per-channel scale and shift). Its output is cast back to `dtype`.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype
        self.model = model.to(dtype)
        for m in self.model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(self.dtype)).float()


def half(model: nn.Module, dtype: torch.dtype = torch.float16) -> Precision:
    """A half-precision copy of `model` (its file is about half the float32 size)."""
    return Precision(copy.deepcopy(model), dtype).eval()


def half_arch(arch: dict, dtype: torch.dtype) -> dict:
    """The arch record of `half(model, dtype)` for a model of `arch`."""
    return {**arch, "precision": str(dtype).removeprefix("torch.")}


def _rebuild(model: nn.Module, precision: str) -> nn.Module:
    return model if precision == "float32" else Precision(model, getattr(torch, precision))


models.register_arch("precision", _rebuild, order=40)  # last: it wraps the whole network


def _make(dtype: torch.dtype):
    def make(step) -> registry.Made:
        extra = {}
        device = step.ctx.device
        if device.type == "cuda":  # also the float32 weights under autocast, as training ran
            test = data_mod.Batches(step.ctx.dataset.test, step.ctx.p["eval_batch_size"], device)
            parent = step.parent.model.to(device)
            extra["autocast_test_acc"] = train.evaluate(parent, test, dtype, step.ctx.bp["eval_flip"])["acc"]
            parent.to("cpu")
        return registry.Made(half(step.parent.model, dtype), half_arch(step.parent.row["arch"], dtype), extra=extra)
    return make


for _kind, _dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
    registry.register(registry.Technique(
        _kind, "03_quantization", "quantization", describe=lambda s, k=_kind: k.upper(), make=_make(_dtype),
        terminal=True))
