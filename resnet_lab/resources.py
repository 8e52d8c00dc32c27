"""What a params file's sizes ask of memory, checked before any work.

A batch or a generated data set whose allocation cannot succeed on this machine is refused up front, with the key
named (`params.ParamsError`, exit 2 from the command line), instead of a traceback after minutes of training and a
run folder left behind. The need counted is a lower bound (the input batch and the activations a ResNet18 of the
run's width keeps per image, measured by one forward pass on torch's meta device, which allocates nothing), and the
ceiling is the machine's memory plus swap (the compute GPU's memory for what lives there): a refusal means the run
could not finish here, never that it would merely be slow.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

IMAGE_FLOATS = 3 * 32 * 32
FLOAT = 4  # bytes of a float32
GENERATED = IMAGE_FLOATS * 8 + 8  # bytes per image the synthetic source draws at once (float64 noise, int64 label)
# the most images a batch of `mini` or `cifar10` can hold: CIFAR-10's training set; its test set (validation is
# carved from training, at most half of it: a larger batch is cut to its split)
LARGEST_TRAIN, LARGEST_EVAL = 50_000, 25_000


@functools.lru_cache(maxsize=None)
def activation_floats(width: int) -> tuple[int, int]:
    """(floats every module of a width-`width` ResNet18 outputs for one image, in total; the largest single
    output): what training keeps for the backward pass, and a floor of what inference holds at once."""
    import torch

    from . import models

    with torch.device("meta"):
        model = models.resnet18(width)
        sizes: list[int] = []
        hooks = [m.register_forward_hook(lambda _m, _i, out: sizes.append(out.numel()))
                 for m in model.modules() if not list(m.children())]
        model(torch.empty(1, 3, 32, 32))
    for h in hooks:
        h.remove()
    return sum(sizes), max(sizes)


def memory_bytes() -> int:
    """This machine's memory plus swap, in bytes (0 where the system does not say)."""
    try:
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0
    swap = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("SwapTotal:"):
                swap = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return ram + swap


def gpu_bytes(device: str) -> int:
    """Memory of the GPU `device` ('auto', 'cuda') resolves to, or 0 when it resolves to the CPU."""
    import torch

    if device in ("auto", "cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory
    return 0


def _gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB"


def _device_exists(key: str, value: str) -> str:
    """A device named explicitly must exist on this machine: refused before any work, not after minutes of it."""
    import torch

    from .config import ParamsError

    if value == "cuda" and not torch.cuda.is_available():
        raise ParamsError(f"parameter '{key}' = 'cuda', but this machine has no CUDA GPU that torch can use "
                          f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}): run it on a machine "
                          "with a CUDA GPU (the full profile needs one), or set device 'auto' or 'cpu' to train here")
    if value == "mps" and not torch.backends.mps.is_available():
        raise ParamsError(f"parameter '{key}' = 'mps', but MPS is not available on this machine (use 'auto' or 'cpu')")
    return value


def check(values: dict[str, Any], model: dict[str, Any]) -> None:
    """Refuse (ParamsError, naming the key) a size in validated `values` whose allocation cannot succeed here.
    `model`: the `width`, `data` and synthetic sizes of the model the run trains or evaluates (the values
    themselves for a baseline, its baseline's for a stage); a key it lacks is assumed at its least demanding
    (width 1, the largest CIFAR-10 split), so the need stays a lower bound."""
    from .config import ParamsError

    _device_exists("device", values.get("device", "auto"))
    ram = memory_bytes()
    if not ram:
        return
    gpu = gpu_bytes(values.get("device", "cpu"))
    width = model.get("width")
    train_floats, peak_floats = activation_floats(max(1, width or 1))
    if model.get("data") == "synthetic":
        n_train, n_test = model.get("synthetic_train", 0), model.get("synthetic_test", 0)
        largest = {"training": n_train, "evaluation": max(n_test, n_train)}
    else:
        largest = {"training": LARGEST_TRAIN, "evaluation": LARGEST_EVAL}
    needs = {}
    if values.get("data") == "synthetic":  # generated at once, both splits; named by the larger
        key = max(("synthetic_train", "synthetic_test"), key=lambda k: values[k])
        needs[key] = ((values["synthetic_train"] + values["synthetic_test"]) * GENERATED, ram,
                      "generating the synthetic images")
    for key, floats, where in (
            ("batch_size", IMAGE_FLOATS + train_floats, "training"),
            ("eval_batch_size", IMAGE_FLOATS + 2 * peak_floats, "evaluation"),
            ("measure_batch_size", IMAGE_FLOATS + 2 * peak_floats, "CPU timing"),
            ("latency_batch_size", IMAGE_FLOATS + 2 * peak_floats, "CPU timing")):
        if key in values:
            images = values[key] if where == "CPU timing" else min(values[key], largest[where])
            needs[key] = (images * floats * FLOAT, ram if where == "CPU timing" or not gpu else gpu, where)
    for key, (need, have, what) in needs.items():
        if need > have:
            place = "this machine's memory and swap" if have == ram else "the GPU's memory"
            net = "" if key.startswith("synthetic") else f" (a width-{width or 1} ResNet18)"
            raise ParamsError(f"parameter '{key}' = {values[key]:,} cannot fit: {what}{net} needs at least "
                              f"{_gib(need)}, more than {place} ({_gib(have)}); lower it")
