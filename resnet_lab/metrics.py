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
        p = next(model.parameters())
        model(torch.zeros(input_size, device=p.device, dtype=p.dtype))
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
