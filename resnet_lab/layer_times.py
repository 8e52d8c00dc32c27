"""Where a model's CPU time goes: torch.profiler's per-op times attributed to layers and kinds of work, next to
each layer's share of the MACs — why a model with half the MACs is not twice as fast.

For one model and one batch size, `profile`:

1. runs one forward with a `record_function` annotation around every layer (hooks on each conv, linear,
   normalization, activation and every other leaf module), to learn which layer each top-level op belongs to;
2. then, in one profiler session, times `rounds × repeats` pairs of forwards: one with the profiler's collection
   switched off (`toggle_collection_dynamic`: the unprofiled latency, timed by the clock) and, right after it, one
   recorded without the hooks (whose own cost would inflate small batches). Each pair shares the state of the
   machine, so a stall or a slower minute of a shared VM moves both; the first recorded forward warms the profiler
   up and is dropped. Each recorded op is paired with the op at the same place of the annotated forward (the op
   sequence of a forward is fixed, so the pairing is exact; checked by op name);
3. sums each op's inclusive time into its kind: the convolutions by ResNet stage (stem, stages 1–4; a fused
   conv + ReLU of INT8 counts as conv), the linear layer, BatchNorm / ReLU / residual add / pooling,
   quantize / dequantize / dtype casts, other ops; *framework overhead* is the rest of the profiled forward
   (Python module calls and the dispatcher between ops).

The profiler costs one to two microseconds per op it records (hundreds per forward: 10-30% of a one-image
forward): `event_cost` measures it on a width-1 ResNet18 (the models' kinds of ops, each too small to take time of
its own), and it is taken off every op (times the ops it recorded) and off the forward. The profiled forward's total
is reported next to the unprofiled latency, so the breakdown can be checked against what a user measures
(`total ÷ measured`).
"""
from __future__ import annotations

import contextlib
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.profiler import ProfilerActivity, record_function
from torch.profiler import profile as torch_profile

from . import metrics, models

FORWARD = "resnet_lab::forward"
LAYER = "layer::"
STAGES = ("conv · stem", "conv · stage 1", "conv · stage 2", "conv · stage 3", "conv · stage 4")
LINEAR = "linear"
ELEMENTWISE = "BatchNorm / ReLU / add / pool"
CONVERT = "quantize / dequantize / casts"
OTHER = "other ops"
OVERHEAD = "framework overhead"
CATEGORIES = (*STAGES, LINEAR, ELEMENTWISE, CONVERT, OTHER, OVERHEAD)

_ELEMENTWISE_OPS = ("batch_norm", "relu", "add", "max_pool", "avg_pool", "adaptive_avg_pool", "mean", "hardtanh")
_CONVERT_OPS = ("quantize_per_tensor", "quantize_per_channel", "dequantize", "aten::to", "_to_copy", "copy_",
                "contiguous", "clone")


@dataclass
class Profile:
    """One model at one batch size: the profiled forward's mean total and the unprofiled forward's mean latency
    (ms per batch, measured in the same interleaved rounds; each the mean of its fastest 80% of forwards), ms per kind of work, and per conv/linear layer its MACs per image and its ms per batch."""
    batch_size: int
    total_ms: float
    measured_ms: float
    categories: dict[str, float]
    layers: list[dict[str, Any]] = field(default_factory=list)
    event_cost_us: float = 0.0  # the profiler's own cost per recorded op, taken off every op and the forward

    @property
    def ratio(self) -> float:
        """The profiled total over the measured latency (1 = the breakdown accounts for exactly what is measured)."""
        return self.total_ms / self.measured_ms


def stage_of(name: str, module: nn.Module) -> str:
    """The kind of a conv/linear layer from its name: a ResNet stage (`layerK.`), the stem, or the classifier."""
    m = re.search(r"(?:^|\.)layer(\d)\.", name)
    if m:
        return STAGES[int(m.group(1))]
    return LINEAR if "linear" in type(module).__name__.lower() else STAGES[0]


def _kind(op: str, layer: str | None, kinds: dict[str, str]) -> str:
    if layer in kinds:
        return kinds[layer]
    low = op.lower()
    if any(k in low for k in _CONVERT_OPS):
        return CONVERT
    if any(k in low for k in _ELEMENTWISE_OPS):
        return ELEMENTWISE
    return OTHER


@contextlib.contextmanager
def _profiler():
    """torch.profiler on the CPU, with the lines its C++ side prints to stderr at every start and stop (hundreds
    in a report) sent to /dev/null; Python errors still propagate."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                yield prof
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _events(e) -> int:
    """How many events the profiler recorded for op `e`: itself and every op it called."""
    return 1 + sum(_events(c) for c in e.cpu_children)


def _pairs(model: nn.Module, x: torch.Tensor, n: int) -> tuple[list[float], Any]:
    """`n` pairs of forwards in one profiler session: the first of each with collection off, timed by the clock
    (µs), the second recorded inside a `FORWARD` annotation; one recorded forward before them warms the profiler.
    Returns the unprofiled times and the profiler's events."""
    plain = []
    with _profiler() as prof:
        with record_function(FORWARD):
            model(x)
        for _ in range(n):
            prof.toggle_collection_dynamic(False, [ProfilerActivity.CPU])
            t0 = time.perf_counter()
            model(x)
            plain.append((time.perf_counter() - t0) * 1e6)
            prof.toggle_collection_dynamic(True, [ProfilerActivity.CPU])
            with record_function(FORWARD):
                model(x)
    return plain, prof.events()


def _forwards(events) -> list:
    """The recorded `FORWARD` annotations in the order they ran."""
    return sorted((e for e in events if e.name == FORWARD), key=lambda e: e.time_range.start)


@torch.inference_mode()
def event_cost(pairs: int = 200) -> float:
    """The profiler's own cost per recorded op (µs): a width-1 ResNet18 on one 8×8 image (every kind of op the
    models run, each too small to take time of its own), each recorded forward less the unrecorded one next to it,
    over the ops recorded; the median of `pairs` pairs."""
    torch.manual_seed(0)
    net = models.resnet18(width=1).eval()
    x = torch.randn(1, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    for _ in range(3):
        net(x)
    plain, events = _pairs(net, x, pairs)
    recorded = _forwards(events)[1:]
    return statistics.median((f.cpu_time_total - us) / max(_events(f) - 1, 1) for us, f in zip(plain, recorded))


def _top_ops(events, cost: float = 0.0) -> tuple[list[list[tuple[str, str | None, float]]], list[float]]:
    """Per forward: its top-level ops in order as (op name, innermost layer annotation, inclusive µs); and each
    forward's total µs; both less the profiler's own cost (`cost` µs per recorded op)."""
    forwards = _forwards(events)
    out: list[list[tuple[str, str | None, float]]] = [[] for _ in forwards]
    index = {id(f): i for i, f in enumerate(forwards)}
    for e in events:
        if e.name == FORWARD or e.name.startswith(LAYER):
            continue
        parent, layer = e.cpu_parent, None
        while parent is not None and parent.name.startswith(LAYER):  # annotations are not ops
            layer = layer or parent.name[len(LAYER):]
            parent = parent.cpu_parent
        if parent is not None and id(parent) in index:  # an op called by the forward, not by another op
            out[index[id(parent)]].append((e.time_range.start, e.name, layer, e.cpu_time_total - cost * _events(e)))
    ordered = [[(name, layer, us) for _, name, layer, us in sorted(ops, key=lambda o: o[0])] for ops in out]
    recorded = [sum(_events(c) for c in f.cpu_children) for f in forwards]
    return ordered, [f.cpu_time_total - cost * n for f, n in zip(forwards, recorded)]


def _annotate(model: nn.Module) -> list:
    """Hooks that open a `record_function` named after each leaf module (and each conv/linear) around its call."""
    stack: list = []
    handles = []

    def enter(name):
        def pre(module, inputs):
            rf = record_function(LAYER + name)
            rf.__enter__()
            stack.append(rf)
        return pre

    def leave(module, inputs, output):
        stack.pop().__exit__(None, None, None)

    layers = set(metrics._layers(model))
    for name, module in model.named_modules():
        if name and (module in layers or not any(True for _ in module.children())):
            handles += [module.register_forward_pre_hook(enter(name)), module.register_forward_hook(leave)]
    return handles


def _layer_macs(model: nn.Module, x: torch.Tensor) -> dict[str, dict[str, Any]]:
    """Each conv/linear layer's kind and MACs per image, in the order the forward calls them."""
    names = {m: n for n, m in model.named_modules()}
    out: dict[str, dict[str, Any]] = {}

    def hook(module, inputs, output):
        positions = output[0].numel() // output.shape[1]
        w = metrics._weight(module)
        out[names[module]] = {"layer": names[module], "kind": stage_of(names[module], module), "macs": positions * w.numel()}

    handles = [m.register_forward_hook(hook) for m in metrics._layers(model)]
    try:
        model(x[:1])
    finally:
        for h in handles:
            h.remove()
    return out


def _short(names: list[str]) -> dict[str, str]:
    """Layer names without a prefix every one shares (a wrapper's, like FP16's `model.`), so that the layers of
    different models line up."""
    prefix = os.path.commonprefix(names) if len(names) > 1 else ""
    prefix = prefix[: prefix.rfind(".") + 1]
    return {n: n[len(prefix):] for n in names}


@torch.inference_mode()
def profile(model: nn.Module, batch_size: int, rounds: int = 3, repeats: int = 5, warmup: int = 2,
            channels_last: bool = True, cost: float | None = None) -> Profile:
    """Profile `model` (float32 input, on the CPU, as `metrics.compare_speed` times it) at `batch_size`; `cost` is
    the profiler's own cost per recorded op in µs (`event_cost()`, measured here when not given: measure it once
    for many models, since it is itself a noisy timing)."""
    metrics.keep_freed_memory()
    model.eval()
    x = torch.randn(batch_size, 3, 32, 32)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    layers = _layer_macs(model, x)
    kinds = {name: row["kind"] for name, row in layers.items()}
    for _ in range(warmup):
        model(x)
    handles = _annotate(model)
    try:
        with _profiler() as prof:
            with record_function(FORWARD):
                model(x)
    finally:
        for h in handles:
            h.remove()
    (reference,), _ = _top_ops(prof.events())
    cost = event_cost() if cost is None else cost
    measured, profiled = [], []  # ms per unprofiled forward; (total, {kind: ms}, {layer: ms}) per profiled one
    plain, events = _pairs(model, x, rounds * repeats)
    forwards, forward_us = _top_ops(events, cost)
    for us_plain, ops, us in zip(plain, forwards[1:], forward_us[1:]):  # the first one warmed the profiler up
        if [o[0] for o in ops] != [o[0] for o in reference]:
            raise RuntimeError(f"the ops of a forward at batch {batch_size} differ from the annotated forward's; "
                               "the model's forward is not deterministic, so its ops cannot be paired with layers")
        kinds_ms, layers_ms = {c: 0.0 for c in CATEGORIES}, {name: 0.0 for name in layers}
        for (op, _, op_us), (_, layer, _) in zip(ops, reference):
            kinds_ms[_kind(op, layer, kinds)] += op_us / 1e3
            if layer in layers_ms:
                layers_ms[layer] += op_us / 1e3
        kinds_ms[OVERHEAD] += (us - sum(o[2] for o in ops)) / 1e3
        measured.append(us_plain / 1e3)
        profiled.append((us / 1e3, kinds_ms, layers_ms))
    # the fastest 80% of each: a stall of the machine (another process, a page fault) hits one forward, not the model
    kept = sorted(profiled, key=lambda f: f[0])[: max(1, round(0.8 * len(profiled)))]
    fast = sorted(measured)[: max(1, round(0.8 * len(measured)))]
    categories = {c: statistics.fmean(f[1][c] for f in kept) for c in CATEGORIES}
    short = _short(list(layers))
    rows = [{**row, "layer": short[name], "ms": statistics.fmean(f[2][name] for f in kept)} for name, row in layers.items()]
    return Profile(batch_size, statistics.fmean(f[0] for f in kept), statistics.fmean(fast), categories, rows, cost)
