"""INT8: post-training static quantization onto the CPU's int8 kernels (technique `int8`).

Weights per channel, activations per tensor, ranges observed on `calibration_images` training images (not
augmented); Conv+BN(+ReLU) fused first, the residual `add + relu` a quantized add_relu. The model runs on the
CPU, takes float32 input and returns float32 logits. A W8A8 QAT model can follow into it (its frozen weights
as plain layers, BatchNorm folded, ranges observed again). The file holds the quantized state with the arch
record its graph is rebuilt from.
"""
from __future__ import annotations

import contextlib
import copy
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from .. import data as data_mod
from .. import models, registry, runs
from ..config import Field

BACKENDS = ("x86", "fbgemm", "onednn", "qnnpack")

CONFIG: dict[str, Field] = {
    "backend": Field(str, "x86", "quantized engine of the INT8 model (x86: fbgemm + oneDNN)", choices=BACKENDS),
    "calibration_images": Field(int, 1024, "training images (not augmented) that calibrate the INT8 activation "
                                "ranges; a stage's own `calibration_images` sets it for every INT8 link it makes",
                                low=1, high=50_000),
}


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


def quantize(model: nn.Module, calibration: data_mod.Batches, backend: str = "x86") -> nn.Module:
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


FORMAT = "resnet-lab/int8/1"


def arch(arch: dict, backend: str) -> dict:
    """The arch record of `quantize(model, …, backend)` for a float model of `arch`: the float model's record
    (its graph is rebuilt from it) and the engine."""
    return {**{k: v for k, v in arch.items() if k != "qat"}, "int8": backend}  # a QAT parent: its float layers


def save(model: nn.Module, path: str | os.PathLike, arch: dict) -> Path:
    """Write a `quantize`d model: its quantized state (int8 weights, scales, zero points) with its arch record."""
    return runs.save_torch(path, {"format": FORMAT, "arch": arch, "state": model.state_dict()})


def load(path: str | os.PathLike) -> nn.Module:
    """Rebuild the quantized graph from the file's arch record and load its saved int8 state."""
    from torch.ao.quantization.quantize_fx import convert_fx

    with _quiet_ao():
        blob = runs.load_torch(path)
        if not isinstance(blob, dict) or blob.get("format") != FORMAT:
            raise runs.RunStoreError(f"{path} is not a resnet-lab INT8 file ({FORMAT})")
        try:
            arch = blob["arch"]
            model = convert_fx(_prepare_int8(models.build({k: v for k, v in arch.items() if k != "int8"}), arch["int8"]))
            model.load_state_dict(blob["state"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise runs.RunStoreError(f"{path} is a damaged INT8 file: {type(e).__name__}: "
                                     f"{str(e).splitlines()[0] if str(e) else ''}") from None
    return model


# ---------------------------------------------------------------- the step
def calibration_split(step) -> data_mod.Split:
    """The first `calibration_images` training images (not augmented) of a step's settings."""
    n, train_split = step.settings["calibration_images"], step.ctx.dataset.train
    return data_mod.Split(train_split.images[:n], train_split.labels[:n])


def _make(step) -> registry.Made:
    s, calibration = step.settings, calibration_split(step)
    parent = step.parent.model
    simulated = [n for n, m in parent.named_modules() if hasattr(m, "as_plain")]
    if simulated:  # layers that simulate integer weights (a W8A8 QAT model): their frozen weights as plain layers
        parent = copy.deepcopy(parent)
        for n in simulated:
            parent.set_submodule(n, parent.get_submodule(n).as_plain())
    model = quantize(parent, data_mod.Batches(calibration, 128, "cpu"), s["backend"])
    extra = {"backend": s["backend"], "calibration_images": len(calibration)}
    if simulated:  # how faithfully the int8 kernels compute the simulated model
        ours = step.ctx.protocol.predict(model, "test", cpu_only=True).argmax(1)  # the evaluation protocol the parent had
        extra["agreement_with_parent"] = 100.0 * float((ours == step.parent.run.predictions()["test"]).float().mean())
    return registry.Made(model, arch(step.parent.row["arch"], s["backend"]), extra=extra)


registry.register(registry.Technique(
    "int8", "03_quantization", "quantization",
    describe=lambda s: f"INT8 ({s['backend']}, {s['calibration_images']} calibration images)", make=_make,
    save=save, loader=lambda run: load(run.path("int8.pt")), artifact="int8.pt", config=CONFIG,
    inherit={"calibration_images": "calibration_images", "backend": "int8_backend"}, terminal=True, cpu_only=True))
