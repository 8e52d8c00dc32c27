"""What a model costs: parameters, MACs (dense and sparsity-aware), size on disk, measured speed.

MACs follow the original scripts' rules: Conv = H_out·W_out·k_h·k_w·(C_in/groups)·C_out,
Linear = in·out; BatchNorm, ReLU, pooling and bias are not counted. The sparsity-aware count
credits zero weights: each nonzero weight costs one MAC per output position.
"""
from __future__ import annotations

import io
import os
import platform
import statistics
import time
from typing import Any

import torch
from torch import nn


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_nonzero(model: nn.Module) -> int:
    return sum(int(torch.count_nonzero(p)) for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, input_size: tuple[int, ...] = (1, 3, 32, 32)) -> dict[str, int]:
    """Conv+Linear MACs per image: {'macs': dense, 'sparse_macs': zeros not counted}."""
    totals = {"macs": 0, "sparse_macs": 0}

    def hook(module, inputs, output):
        positions = output[0].numel() // output.shape[1]  # per image: H_out·W_out (1 for Linear)
        totals["macs"] += positions * module.weight.numel()
        totals["sparse_macs"] += positions * int(torch.count_nonzero(module.weight))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
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


@torch.inference_mode()
def speed(model: nn.Module, batch_size: int = 128, device: str | torch.device = "cpu", warmup: int = 3,
          repeats: int = 10, dtype: torch.dtype = torch.float32, channels_last: bool = False) -> dict[str, float]:
    """Inference throughput (img/s) and latency (ms per batch, median of `repeats`) on random input."""
    device = torch.device(device)
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
    conversion costs are included.
    """
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            r = speed(model, batch_size, "cpu", warmup=1, repeats=repeats, channels_last=channels_last)
            times[name].append(r["latency_ms"])
    out = {}
    for name, t in times.items():
        latency = statistics.median(t)
        out[name] = {"latency_ms": latency, "throughput_img_s": batch_size / latency * 1e3, "batch_size": batch_size,
                     "threads": torch.get_num_threads(), "speed_device": "cpu"}
    return out


# ---------------------------------------------------------------- bit widths and the course score
def bit_widths(model: nn.Module, input_size: tuple[int, ...] = (2, 3, 32, 32)) -> dict[str, float]:
    """Weight and activation bits measured from the model, as the course score needs them.

    weight_bits: mean bits per conv/linear weight, weighted by the number of weights. A layer
    whose every output channel holds at most two distinct values (BinaryConnect's ±α) counts 1 bit;
    otherwise the storage type's bits (32, 16, 8 for quantized int8).
    act_bits: the widest dtype entering a conv/linear layer during a forward pass.
    """
    weights: list[tuple[int, int]] = []  # (count, bits)
    act: list[int] = []

    def hook(module, inputs, output):
        act.append(inputs[0].element_size() * 8)

    layers = [m for m in model.modules() if _is_conv_or_linear(m)]
    for m in layers:
        w = m.weight() if callable(m.weight) else m.weight  # quantized modules expose weight()
        weights.append((w.numel(), 1 if _binary(w) else w.element_size() * 8))
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
    total = sum(n for n, _ in weights)
    return {"weight_bits": sum(n * b for n, b in weights) / total, "act_bits": float(max(act))}


def _is_conv_or_linear(m: nn.Module) -> bool:
    from torch.ao.nn import quantized as nnq

    return isinstance(m, (nn.Conv2d, nn.Linear, nnq.Conv2d, nnq.Linear))


def _binary(w: torch.Tensor) -> bool:
    """Every output channel holds at most two distinct values (and has more than two weights)."""
    if w.is_quantized or w.dim() < 2 or w.shape[1:].numel() < 3:
        return False
    rows = w.detach().flatten(1).sort(1).values
    distinct = 1 + (rows.diff(dim=1) != 0).sum(1)
    return bool((distinct <= 2).all())


# Reference counts of the course score: ResNet18's parameters and MACs counted at 16 bits.
SCORE_PARAMS = 5.6e6
SCORE_MACS = 2.8e8


def course_score(p_s: float, p_u: float, q_w: float, q_a: float, w: int, f: int) -> float:
    """score = [1 − (p_s + p_u)]·(q_w/32)·w/5.6e6 + (1 − p_s)·(max(q_w, q_a)/32)·f/2.8e8 (lower is better)."""
    return (1 - (p_s + p_u)) * (q_w / 32) * w / SCORE_PARAMS + (1 - p_s) * (max(q_w, q_a) / 32) * f / SCORE_MACS


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


def machine() -> str:
    """One line naming the hardware the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    text = f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} threads"
    if torch.cuda.is_available():
        text += f"; GPU {torch.cuda.get_device_name()}"
    return text
