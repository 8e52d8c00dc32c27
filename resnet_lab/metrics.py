"""What a model costs: parameters, MACs (dense and sparsity-aware), size on disk, measured speed.

MACs follow the original scripts' rules: Conv = H_out·W_out·k_h·k_w·(C_in/groups)·C_out,
Linear = in·out; BatchNorm, ReLU, pooling and bias are not counted. The sparsity-aware count
credits zero weights: each nonzero weight costs one MAC per output position.
"""
from __future__ import annotations

import ctypes
import io
import math
import os
import platform
import sys
import statistics
import time
from typing import Any

import torch
from torch import nn

from . import models, packed


def _stored(model: nn.Module) -> list[torch.Tensor]:
    """Every learned tensor: the parameters, plus the weights and biases that quantized layers keep packed
    outside `parameters()`."""
    tensors = list(model.parameters())
    for m in _layers(model):
        if callable(m.weight):  # a quantized conv/linear
            tensors += [t for t in (m.weight(), m.bias()) if t is not None]
    return tensors


def count_params(model: nn.Module) -> int:
    return sum(t.numel() for t in _stored(model))


def count_nonzero(model: nn.Module) -> int:
    return sum(int(torch.count_nonzero(t.dequantize() if t.is_quantized else t)) for t in _stored(model))


@torch.no_grad()
def count_macs(model: nn.Module, input_size: tuple[int, ...] = (1, 3, 32, 32)) -> dict[str, int]:
    """Conv+Linear MACs per image: {'macs': dense, 'sparse_macs': zeros not counted}."""
    totals = {"macs": 0, "sparse_macs": 0}

    def hook(module, inputs, output):
        positions = output[0].numel() // output.shape[1]  # per image: H_out·W_out (1 for Linear)
        w = _weight(module)
        totals["macs"] += positions * w.numel()
        totals["sparse_macs"] += positions * int(torch.count_nonzero(w.dequantize() if w.is_quantized else w))

    handles = [m.register_forward_hook(hook) for m in _layers(model)]
    was_training = model.training
    try:
        model.eval()
        p = next(model.parameters(), None)  # a quantized model has none: float32 on the CPU
        model(torch.zeros(input_size, device=p.device if p is not None else "cpu",
                          dtype=p.dtype if p is not None and p.is_floating_point() else torch.float32))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return totals


def saved_size(model_or_state_dict: nn.Module | dict) -> int:
    """Bytes of the state_dict as `torch.save` writes it to disk."""
    sd = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, nn.Module) else model_or_state_dict
    buf = io.BytesIO()
    torch.save(sd, buf)
    return buf.getbuffer().nbytes


_HEAP_KEPT = False


def keep_freed_memory() -> bool:
    """Stop glibc from handing freed activation memory back to the OS (once per process; Linux only).

    By default glibc serves blocks of megabytes with mmap and returns them on free, so every forward
    pass page-faults its activations (8 MB per tensor at batch 128, width 16) back in. On the 2-core
    VM this halved inference throughput in a fresh process (1,680 vs 2,650 img/s for the baseline)
    and hid part of a smaller model's speed-up; a process that trained first had already moved the
    thresholds and ran fast. Timings are taken in that steady state. Returns whether it applied.
    """
    global _HEAP_KEPT
    if not _HEAP_KEPT and sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL("libc.so.6")
            M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
            _HEAP_KEPT = bool(libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)) & bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))
        except (OSError, AttributeError):  # not glibc
            pass
    return _HEAP_KEPT


@torch.inference_mode()
def speed(model: nn.Module, batch_size: int = 128, device: str | torch.device = "cpu", warmup: int = 3,
          repeats: int = 10, dtype: torch.dtype = torch.float32, channels_last: bool = False) -> dict[str, float]:
    """Inference throughput (img/s) and latency (ms per batch, median of `repeats`) on random input."""
    device = torch.device(device)
    keep_freed_memory()
    was_training = model.training
    model.eval()
    x = torch.randn(batch_size, 3, 32, 32, device=device, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    times = []
    try:
        for i in range(warmup + repeats):
            sync(device)
            t0 = time.perf_counter()
            model(x)
            sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    finally:
        model.train(was_training)
    latency = statistics.median(times)
    return {"latency_ms": latency * 1e3, "throughput_img_s": batch_size / latency, "batch_size": batch_size,
            "threads": torch.get_num_threads(), "speed_device": str(device)}


def compare_speed(models: dict[str, nn.Module], batch_size: int = 128, rounds: int = 5, repeats: int = 5,
                  channels_last: bool = True) -> dict[str, dict[str, float]]:
    """CPU speed of several models measured side by side: rounds interleave the models, so a change of
    machine load hits them alike; each gets the median over all its timed batches.

    Every model takes float32 NCHW input and converts it itself (quantized models quantize it), so
    conversion costs are included. A model with a `settle_s` attribute (`export.OrtModel`) is followed by that
    many seconds of pause, so that its spinning threads are not timed with the next model.
    """
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            r = speed(model, batch_size, "cpu", warmup=1, repeats=repeats, channels_last=channels_last)
            times[name].append(r["latency_ms"])
            if getattr(model, "settle_s", 0):
                time.sleep(model.settle_s)  # an engine whose threads spin after a run (ONNX Runtime) lets them stop
    out = {}
    for name, t in times.items():
        latency = statistics.median(t)
        out[name] = {"latency_ms": latency, "throughput_img_s": batch_size / latency * 1e3, "batch_size": batch_size,
                     "threads": torch.get_num_threads(), "speed_device": "cpu", "rounds_ms": t}
    return out


def speedup(model: dict[str, Any], reference: dict[str, Any]) -> tuple[float, float, float]:
    """How many times faster `model` ran than `reference` (two entries of one `compare_speed`, or two engines
    timed in the same rounds): the median over the rounds of the ratio within each round (the two timed minutes
    apart at most, under the same load), and the lowest and highest of those ratios — the spread a reader can
    hold a speed-up to."""
    ratios = [r / m for r, m in zip(reference["rounds_ms"], model["rounds_ms"])]
    return statistics.median(ratios), min(ratios), max(ratios)


def spread_text(up: tuple[float, float, float]) -> str:
    """A speed-up with its spread over the rounds: "1.52× (1.47–1.58)"; one round: no spread to give."""
    return f"{up[0]:.2f}×" + (f" ({up[1]:.2f}–{up[2]:.2f})" if up[2] > up[1] else "")


def speed_columns(speed: dict[str, dict], name: str, reference: str, mac_reduction: float) -> dict[str, Any]:
    """Table columns of model `name` from `compare_speed`'s result: throughput, speed-up over `reference` timed in
    the same rounds with its spread over them, and how much of its MAC reduction the speed-up realizes."""
    s = speed[name]
    up = speedup(s, speed[reference])
    return {f"CPU throughput (img/s, batch {s['batch_size']})": s["throughput_img_s"], "speed-up (×)": up[0],
            "speed-up over rounds (×)": spread_text(up), "speed-up ÷ MAC reduction": up[0] / mac_reduction}


# ---------------------------------------------------------------- bit widths and the scores
def _layers(model: nn.Module) -> list[nn.Module]:
    from torch.ao.nn import quantized as nnq

    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear, nnq.Conv2d, nnq.Linear))]


def _weight(m: nn.Module) -> torch.Tensor:
    return m.weight() if callable(m.weight) else m.weight  # quantized modules expose weight()


# A layer that computes on an integer grid it simulates in float (a technique's fake-quantized layer) exposes
# `grid_weight()` (the weight it computes with) and `input_bits` (the bits of the activation entering it).
def _simulated(m: nn.Module) -> bool:
    return callable(getattr(m, "grid_weight", None))


def _levels_weight(m: nn.Module) -> bool:
    """The layer's weight is on an integer grid (torch's quantized tensors, or a simulated grid): a zero in it is
    rounding, not pruning."""
    return _simulated(m) or _weight(m).is_quantized


def layer_weight_bits(m: nn.Module) -> float:
    """Bits per weight of a conv/linear layer: for a simulated grid, measured from its weights, log2 of the most
    distinct levels any output channel holds (rounded up); else `weight_bits` of its storage."""
    if _simulated(m):
        w = m.grid_weight().detach().flatten(1)
        most = max(int(torch.unique(row).numel()) for row in w)
        return float(max(1, math.ceil(math.log2(most))))
    return weight_bits(_weight(m))


def input_bits(m: nn.Module, x: torch.Tensor) -> int:
    """Bits of the activation entering a layer: its input quantizer's (a simulated grid), else the input's storage
    type."""
    bits = getattr(m, "input_bits", None)
    return int(bits) if bits is not None else x.element_size() * 8


def weight_bits(w: torch.Tensor) -> int:
    """Bits per weight: 1 where every output channel holds one magnitude with signs (binary weights: ±1 or ±α,
    zeros allowed), else the storage type's (32, 16, 8 for torch's quantized tensors)."""
    if not w.is_quantized and packed.sign_magnitudes(w) is not None:
        return 1
    return w.element_size() * 8


def _trace(model: nn.Module, layers: list[nn.Module], input_size: tuple[int, ...]) -> dict[nn.Module, tuple[int, int]]:
    """For each layer, (bits of its input activation, output positions per image: H_out·W_out, 1 for a
    linear layer), seen during one forward pass."""
    seen: dict[nn.Module, tuple[int, int]] = {}

    def hook(m, inputs, output):
        seen[m] = (input_bits(m, inputs[0]), output[0].numel() // output.shape[1])

    handles = [m.register_forward_hook(hook) for m in layers]
    was_training = model.training
    try:
        model.eval()
        with torch.inference_mode():
            model(torch.zeros(input_size))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return seen


def bit_widths(model: nn.Module, input_size: tuple[int, ...] = (2, 3, 32, 32)) -> dict[str, float]:
    """Weight and activation bits measured from the model, as the course score needs them.

    weight_bits: mean `layer_weight_bits` over the conv/linear weights, weighted by their number.
    act_bits: the widest activation entering a conv/linear layer during a forward pass (a simulated layer's input
    quantizer's bits; so a W4A4 model whose first conv and last linear stay at 8 bits has act_bits 8).
    """
    layers = _layers(model)
    weights = [(_weight(m).numel(), layer_weight_bits(m)) for m in layers]
    total = sum(n for n, _ in weights)
    return {"weight_bits": sum(n * b for n, b in weights) / total,
            "act_bits": float(max(bits for bits, _ in _trace(model, layers, input_size).values()))}


# Reference counts of both scores: ResNet18's parameters and MACs counted at 16 bits.
SCORE_PARAMS = 5.6e6
SCORE_MACS = 2.8e8


def course_score(p_s: float, p_u: float, q_w: float, q_a: float, w: int, f: int) -> float:
    """score = [1 − (p_s + p_u)]·(q_w/32)·w/5.6e6 + (1 − p_s)·(max(q_w, q_a)/32)·f/2.8e8 (lower is better)."""
    return (1 - (p_s + p_u)) * (q_w / 32) * w / SCORE_PARAMS + (1 - p_s) * (max(q_w, q_a) / 32) * f / SCORE_MACS


def course_inputs(model: nn.Module, pruned_from: nn.Module | None = None) -> dict[str, float]:
    """The course score with its inputs measured from the model.

    pruned_from: the unpruned model this one was pruned from; p_s is then the share of its parameters
    removed (channels) and w, f are its counts, as the formula intends. None: the model is scored as its
    own architecture (quantized, factorized or dense): p_s = 0, w and f its own counts. p_u is the share
    of w held by zeros in float conv/linear weights (a zero of a quantized tensor is rounding, not pruning).
    """
    params = count_params(model)
    w, f = (count_params(pruned_from), count_macs(pruned_from)["macs"]) if pruned_from is not None else (params, count_macs(model)["macs"])
    zeros = sum(int(_weight(m).numel() - torch.count_nonzero(_weight(m))) for m in _layers(model) if not _levels_weight(m))
    bits = bit_widths(model)
    p_s, p_u = 1 - params / w, zeros / w
    return {**bits, "p_s": p_s, "p_u": p_u, "score_w": w, "score_f": f,
            "score": course_score(p_s, p_u, bits["weight_bits"], bits["act_bits"], w, f)}


def _kept_weights(model: nn.Module) -> dict[str, tuple[int, int]]:
    """{layer name: (weights, weights kept)} of every conv/linear layer, named as in the float model (a
    half-precision wrapper's prefix dropped); kept = nonzero for float weights, all for quantized ones
    (a quantized zero is rounding, not pruning)."""
    layers, out = set(_layers(model)), {}
    for name, m in models.unwrap(model).named_modules():
        if m in layers:
            w = _weight(m)
            out[name] = (w.numel(), w.numel() if _levels_weight(m) else int(torch.count_nonzero(w)))
    return out


def sparsity(model: nn.Module, root: nn.Module) -> dict[str, Any]:
    """The share of `root`'s conv/linear weights that `model` no longer has (zeroed or removed): in total
    (`weight_sparsity`) and per layer of the root that `model` still has under the same name."""
    mine, ref = _kept_weights(model), _kept_weights(root)
    total = sum(n for n, _ in ref.values())
    return {"weight_sparsity": 1 - sum(k for _, k in mine.values()) / total,
            "per_layer_sparsity": {name: 1 - kept / ref[name][0] for name, (_, kept) in mine.items() if name in ref}}


def micronet(model: nn.Module, input_size: tuple[int, ...] = (1, 3, 32, 32)) -> dict[str, float]:
    """MicroNet-challenge-style counts (NeurIPS 2019 rules), in 32-bit equivalents, lower is better.

    Parameters: each tensor's entries at bits/32 (1-bit signs = 1/32, 16-bit = 1/2); a tensor with zeros
    costs its nonzeros plus a 1-bit mask over its whole shape when that is cheaper. Ops: per conv/linear
    layer, one multiply and one add per nonzero weight per output position (pruned weights shorten
    the dot products), each weighted by max(weight bits, input bits)/32; BatchNorm, ReLU, pooling and
    biases are not counted, as in `count_macs`. score = params/5.6e6 + ops/5.6e8: the same references
    as the course score (ResNet18 at 16 bits), so a dense FP32 ResNet18 scores ≈ 3.98 on both.
    """
    layers = _layers(model)
    trace = _trace(model, layers, input_size)
    conv_weights = {id(_weight(m)) for m in layers if not callable(m.weight)}
    tensors = [(_weight(m), layer_weight_bits(m)) for m in layers]
    tensors += [(p, p.element_size() * 8) for name, p in model.named_parameters()  # BatchNorm, biases
                if id(p) not in conv_weights and ".parametrizations." not in name]  # not a weight's latent copy
    tensors += [(m.bias(), 32) for m in layers if callable(m.bias) and m.bias() is not None]  # quantized layers
    params = 0.0
    for t, bits in tensors:
        n, nonzero = t.numel(), int(torch.count_nonzero(t.dequantize() if t.is_quantized else t))
        params += min(n * bits, nonzero * bits + n) / 32
    ops = 0.0
    for m in layers:
        w = _weight(m)
        nonzero = int(torch.count_nonzero(w.dequantize() if w.is_quantized else w))
        in_bits, positions = trace[m]
        ops += 2 * positions * nonzero * max(layer_weight_bits(m), in_bits) / 32
    return {"micronet_params": params, "micronet_ops": ops,
            "micronet_score": params / SCORE_PARAMS + ops / (2 * SCORE_MACS)}


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so a timer measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(model: nn.Module, batch_size: int = 128, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Every cost figure of a model in one dict (speed measured on `device`, float32)."""
    was_device = next(model.parameters()).device
    model.to(device)
    try:
        out = {"params": count_params(model), "nonzero_params": count_nonzero(model), **count_macs(model),
               "size_bytes": saved_size(model), **speed(model, batch_size, device)}
    finally:
        model.to(was_device)
    return out


def confusion_matrix(labels: torch.Tensor, preds: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Counts[i, j] = images of true class i predicted as j."""
    idx = labels.long() * num_classes + preds.long()
    return torch.bincount(idx, minlength=num_classes**2).view(num_classes, num_classes)


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            return set(next(line for line in f if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        return set()


# the flags that decide which kernels a speed figure came from: SIMD width, bf16/fp16 arithmetic, int8 dot products
SPEED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8")


def machine() -> str:
    """One line naming the hardware the figures were measured on, with the CPU flags that decide its kernels."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    flags = cpu_flags()
    have = [f for f in SPEED_FLAGS if f in flags]
    text = f"{cpu} ({', '.join(have) or 'no AVX2'}; lacks {', '.join(f for f in SPEED_FLAGS if f not in flags) or 'none of those'}), "
    text += f"{os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} threads"
    if torch.cuda.is_available():
        text += f"; GPU {torch.cuda.get_device_name()}"
    return text
