"""Quantization of the trained baseline: FP16/BF16 inference, INT8 post-training static quantization,
BinaryConnect training with a packed 1-bit export, and the 03_quantization stage that runs them.

- `half(model, dtype)`: the model in float16 or bfloat16, BatchNorm kept in float32.
- `int8(model, calibration)`: `torch.ao.quantization` FX graph mode, x86 engine (see `int8`).
- `binarize(model, ...)`, `clip_`: BinaryConnect (Courbariaux et al. 2015) as weight parametrizations.
- `save_binary` / `load_binary`: 1 bit per binarized weight, packed, and the model rebuilt from it.
"""
from __future__ import annotations

import contextlib
import copy
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from . import data as data_mod
from . import metrics, models, packed, runs, train
from . import params as params_mod

if TYPE_CHECKING:  # tables are built on demand; pandas is imported there
    import pandas as pd

# ---------------------------------------------------------------- FP16 / BF16


class Precision(nn.Module):
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
    """A half-precision copy of `model` (its state_dict is about half the float32 size)."""
    return Precision(copy.deepcopy(model), dtype).eval()


def load_half(path: str | os.PathLike, arch: dict, dtype: torch.dtype) -> Precision:
    model = Precision(models.build(arch), dtype)
    model.model.load_state_dict(runs.load_torch(path))
    return model.eval()


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


def load_int8(path: str | os.PathLike, arch: dict, backend: str = "x86") -> nn.Module:
    """Rebuild the quantized graph for `arch` and load its saved int8 state (scales, zero points, weights)."""
    from torch.ao.quantization.quantize_fx import convert_fx

    with _quiet_ao():
        model = convert_fx(_prepare_int8(models.build(arch), backend))
        model.load_state_dict(runs.load_torch(path))
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
    state, arch = packed.load(path)
    model = models.build(arch)
    model.load_state_dict(state)
    return model.eval()


# ---------------------------------------------------------------- the 03_quantization stage
@dataclass
class Result:
    baseline: train.BaselineResult
    rows: list[dict[str, Any]]  # FP32 first, then one per method (and BinaryConnect variant)
    models: dict[str, nn.Module]  # label -> CPU inference model taking and returning float32
    histories: dict[str, list[dict]]  # BinaryConnect label -> per-epoch history


def run(p: dict) -> Result:
    """Quantize the baseline of `p['baseline']` with every method in `p['methods']`; each method is a run
    in the store (reused when finished), reloaded from its saved file before it is measured."""
    base, bp = train.trained_baseline(p["baseline"], p)
    stage = _Stage(p, bp, base)
    fp32 = base.model.eval()
    rows = [stage.row("FP32 (baseline)", "fp32", fp32, stage.evaluate(fp32), base.run.path("model.pt"), base.run)]
    out = Result(base, rows, {rows[0]["label"]: fp32}, {})
    for method in p["methods"]:
        if method in ("fp16", "bf16"):
            stage.half(method, out)
        elif method == "int8":
            stage.int8(out)
        else:
            for variant in p["binaryconnect"]:
                stage.binary_connect(variant, out)
    return out


def bc_label(v: dict) -> str:
    extras = [v["mode"], f"{v['layers']} layers"] + (["α"] if v["scale"] else []) + (["from scratch"] if v["init"] == "scratch" else [])
    return f"BinaryConnect ({', '.join(extras)})"


def load(run: runs.Run) -> nn.Module:
    """The inference model of a finished quantization run (fp16, bf16, int8 or binaryconnect)."""
    m = run.metrics
    path = run.path(m["artifact"])
    if run.stage in ("fp16", "bf16"):
        return load_half(path, m["arch"], getattr(torch, {"fp16": "float16", "bf16": "bfloat16"}[run.stage]))
    if run.stage == "int8":
        return load_int8(path, m["arch"], m["backend"])
    if run.stage == "binaryconnect":
        return load_binary(path)
    raise ValueError(f"{run} is not a quantization run")


class _Stage:
    def __init__(self, p: dict, bp: dict, base: train.BaselineResult):
        self.p, self.bp, self.base = p, bp, base
        self.store = runs.RunStore(p["run_root"])
        self.arch = models.arch_of(base.model)
        self.device = train.pick_device(p["device"])

    def evaluate(self, model: nn.Module, device: torch.device | str = "cpu") -> dict[str, float]:
        """Test and validation accuracy with the baseline's protocol (eval_flip), float32 input."""
        out = {}
        for split in ("test", "val"):
            r = train.evaluate_split(model, getattr(self.base.dataset, split), self.p["eval_batch_size"],
                                     self.bp["eval_flip"], device)
            out[f"{split}_acc"], out[f"{split}_loss"] = r["acc"], r["loss"]
        return out

    def row(self, label: str, method: str, model: nn.Module, acc: dict, artifact: Path, run: runs.Run,
            **extra) -> dict[str, Any]:
        return {"label": label, "method": method, **metrics.course_inputs(model), **acc, "params": metrics.count_params(model),
                "macs": metrics.count_macs(model)["macs"], "size_bytes": artifact.stat().st_size, "artifact": artifact.name,
                "arch": self.arch, "run": str(run), **extra}

    def _stage_run(self, stage: str, values: dict) -> runs.Run:
        return self.store.run(stage, {"baseline": self.base.run.key, "device": self.p["device"],
                                      "eval_batch_size": self.p["eval_batch_size"], **values})

    def _finish(self, run: runs.Run, row: dict, out: Result, model: nn.Module) -> None:
        run.finish(row)
        out.rows.append(row)
        out.models[row["label"]] = model

    def _reuse(self, run: runs.Run, out: Result) -> bool:
        if not (run.done and self.p["reuse"]):
            return False
        row = run.metrics
        out.rows.append(row)
        out.models[row["label"]] = load(run)
        return True

    def half(self, method: str, out: Result) -> None:
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[method]
        run = self._stage_run(method, {"dtype": str(dtype)})
        with run.lock():
            if self._reuse(run, out):
                return
            model = half(self.base.model, dtype)
            runs.save_torch(run.path("model.pt"), model.model.state_dict())
            # evaluated in half on the compute device (float16 convolutions on a CPU are slow, see the report)
            model = load_half(run.path("model.pt"), self.arch, dtype)
            acc = self.evaluate(model, self.device)
            label = {"fp16": "FP16", "bf16": "BF16"}[method] + " (BatchNorm in FP32)"
            extra = {}
            if self.device.type == "cuda":  # also the float32 weights under autocast, as training ran
                test = data_mod.Batches(self.base.dataset.test, self.p["eval_batch_size"], self.device)
                extra["autocast_test_acc"] = train.evaluate(self.base.model.to(self.device), test, dtype,
                                                            self.bp["eval_flip"])["acc"]
                self.base.model.to("cpu")
            self._finish(run, self.row(label, method, model, acc, run.path("model.pt"), run,
                                       eval_device=str(self.device), **extra), out, model)

    def int8(self, out: Result) -> None:
        backend, n = self.p["int8_backend"], self.p["calibration_images"]
        run = self._stage_run("int8", {"backend": backend, "calibration_images": n})
        with run.lock():
            if self._reuse(run, out):
                return
            train_split = self.base.dataset.train
            calib = data_mod.Split(train_split.images[:n], train_split.labels[:n])
            model = int8(self.base.model, data_mod.Batches(calib, 128, "cpu"), backend)
            runs.save_torch(run.path("model.pt"), model.state_dict())
            model = load_int8(run.path("model.pt"), self.arch, backend)
            acc = self.evaluate(model)
            row = self.row(f"INT8 (FX, {backend}, {len(calib)} calibration images)", "int8", model, acc,
                           run.path("model.pt"), run, backend=backend, eval_device="cpu")
            self._finish(run, row, out, model)

    def binary_connect(self, variant: dict, out: Result) -> None:
        recipe = {k: self.p[k] for k in params_mod.FINETUNE} | {k: variant[k] for k in ("epochs", "lr") if k in variant}
        v = {k: variant[k] for k in ("init", "layers", "mode", "scale")}
        run = self._stage_run("binaryconnect", {**v, **recipe, "seed": self.p["seed"]})
        label = bc_label(v)
        with run.lock():
            if self._reuse(run, out):
                out.histories[label] = run.read_json("history.json")
                return
            torch.manual_seed(self.p["seed"])
            model = copy.deepcopy(self.base.model) if v["init"] == "pretrained" else models.build(self.arch)
            names = binarize(model, v["layers"], v["mode"], v["scale"])
            before = self.evaluate(model)["test_acc"]
            if self.p["progress"]:
                print(f"{label}: training into {run}", flush=True)
            fit_p = {**self.bp, **recipe, "seed": self.p["seed"], "device": self.p["device"], "progress": self.p["progress"]}
            history = train.fit(model, self.base.dataset, fit_p, checkpoint=run.path("checkpoint.pt"),
                                after_step=lambda: clip_(model))
            model = model.to("cpu", memory_format=torch.contiguous_format).eval()
            acc = self.evaluate(model)
            save_binary(model, run.path("binary.pt"), self.arch)
            exported = load_binary(run.path("binary.pt"))
            test = data_mod.Batches(self.base.dataset.test, self.p["eval_batch_size"], "cpu")
            exact = bool(torch.equal(train.predict(model, test), train.predict(exported, test)))
            run.write_json("history.json", history)
            row = self.row(label, "binaryconnect", exported, acc, run.path("binary.pt"), run,
                           variant=v, binarized_layers=len(names), test_acc_before_training=before,
                           train_time_s=sum(r["train_time_s"] for r in history), export_exact=exact,
                           fp32_size_bytes=self.base.run.path("model.pt").stat().st_size)
            self._finish(run, row, out, exported)
            out.histories[label] = history
            run.path("checkpoint.pt").unlink(missing_ok=True)


def table(result: Result, speed: dict[str, dict] | None = None) -> pd.DataFrame:
    """The comparison table: one row per method; speed columns from `metrics.compare_speed` if given."""
    import pandas as pd

    fp32 = result.rows[0]
    rows = []
    for r in result.rows:
        row = {"method": r["label"], "bits (weights / activations)": f"{r['weight_bits']:.2f} / {r['act_bits']:.0f}",
               "test accuracy (%)": r["test_acc"], "Δ vs FP32 (pt)": r["test_acc"] - fp32["test_acc"],
               "parameters": r["params"], "MACs": r["macs"], "size on disk (KB)": r["size_bytes"] / 1e3,
               "size ratio vs FP32": r["size_bytes"] / fp32["size_bytes"]}
        if speed:
            s, s32 = speed[r["label"]], speed[fp32["label"]]
            row |= {f"CPU throughput (img/s, batch {s['batch_size']}, {s['threads']} threads)": s["throughput_img_s"],
                    "CPU latency (ms per batch)": s["latency_ms"], "speed-up vs FP32": s["throughput_img_s"] / s32["throughput_img_s"]}
        row["course score"] = r["score"]
        rows.append(row)
    return pd.DataFrame(rows).set_index("method")


def bc_table(result: Result) -> pd.DataFrame:
    """BinaryConnect details: layers binarized, accuracy before/after training, export check and size."""
    import pandas as pd

    rows = [{"variant": r["label"], "binarized layers": r["binarized_layers"],
             "test accuracy before training (%)": r["test_acc_before_training"], "after (%)": r["test_acc"],
             "validation accuracy (%)": r["val_acc"], "training time (s)": r["train_time_s"],
             "packed file (KB)": r["size_bytes"] / 1e3, "FP32 file / packed file": r["fp32_size_bytes"] / r["size_bytes"],
             "rebuilt model gives identical logits": r["export_exact"]}
            for r in result.rows if r["method"] == "binaryconnect"]
    return pd.DataFrame(rows).set_index("variant")


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return set(next(line for line in f if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        return set()


def describe(summary: pd.DataFrame, result: Result | None = None) -> str:
    """What half precision costs on this CPU (and under CUDA autocast), in words, from the measured table."""
    speed = "speed-up vs FP32"
    if speed not in summary:
        return ""
    lines = [f"**{r['label']}** under CUDA autocast (float32 weights): test accuracy {r['autocast_test_acc']:.2f}%."
             for r in (result.rows if result else []) if "autocast_test_acc" in r]
    for name, flag in (("FP16", "avx512_fp16"), ("BF16", "avx512_bf16")):
        hit = [m for m in summary.index if m.startswith(name)]
        if hit:
            r = summary.loc[hit[0]]
            native = "has" if flag in _cpu_flags() or "amx_" + name.lower() in _cpu_flags() else "lacks"
            lines.append(f"**{name}** on this CPU ({native} `{flag}`): {r[speed]:.2f}× the FP32 throughput, "
                         f"accuracy {r['Δ vs FP32 (pt)']:+.2f} pt, file {r['size ratio vs FP32']:.2f}× the FP32 size.")
    int8 = [m for m in summary.index if m.startswith("INT8")]
    if int8:
        r = summary.loc[int8[0]]
        lines.append(f"**INT8**: {r[speed]:.2f}× the FP32 throughput, accuracy {r['Δ vs FP32 (pt)']:+.2f} pt, "
                     f"file {r['size ratio vs FP32']:.2f}× the FP32 size.")
    lines.append("BinaryConnect's rebuilt model runs float32 convolutions with ±1 (or ±α) weights: without "
                 "binary kernels its gain is the file size, not speed.")
    return "  \n".join(lines)


def headline(summary: pd.DataFrame) -> str:
    parts = []
    for prefix in ("INT8", "FP16", "BF16"):
        hit = [m for m in summary.index if m.startswith(prefix)]
        if hit:
            r = summary.loc[hit[0]]
            speed = f", {r['speed-up vs FP32']:.1f}× FP32 CPU throughput" if "speed-up vs FP32" in r else ""
            parts.append(f"{prefix} {r['Δ vs FP32 (pt)']:+.2f} pt{speed}")
    bc = summary[summary.index.str.startswith("BinaryConnect")]
    if len(bc):
        best = bc["test accuracy (%)"].idxmax()
        r = bc.loc[best]
        parts.append(f"BinaryConnect {r['test accuracy (%)']:.1f}% ({r['Δ vs FP32 (pt)']:+.1f} pt) "
                     f"in 1/{1 / r['size ratio vs FP32']:.0f} of the FP32 file")
    return " · ".join(parts)
