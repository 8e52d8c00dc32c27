"""Training and evaluation, and the baseline stage that stores its result in the run store."""
from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm  # plain text bars: no widget dependency, readable in the HTML reports

from . import data as data_mod
from . import runs
from .config import ParamsError


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; nothing of the diverged epoch is kept."""


# ---------------------------------------------------------------- device and precision
def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was requested but no CUDA GPU is available")
    if name == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError("device 'mps' was requested but MPS is not available")
    return torch.device(name)


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype to train with, or None for full precision (AMP is used on CUDA only)."""
    if device.type != "cuda" or amp == "off":
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def channels_last(device: torch.device) -> bool:
    """NHWC convolutions are faster on CUDA tensor cores and on x86 CPUs (oneDNN); see `make bench`."""
    return device.type in ("cuda", "cpu")


# oneDNN's CPU kernel for the weight gradient of a strided 1x1 convolution on NHWC input writes past its
# workspace when the input has fewer channels than its SIMD block (8 floats with AVX2, 16 with AVX-512):
# training hangs, corrupts the heap or gets wrong gradients (oneDNN issue #6035; seen here on an AVX2 EPYC
# with a width-4 ResNet18's first shortcut). NCHW input takes another kernel.
UNSAFE_1X1_CHANNELS = 16


def train_channels_last(device: torch.device, model: nn.Module) -> bool:
    """Whether to train `model` in NHWC on `device`: `channels_last`, except on the CPU for a model with a strided
    1x1 convolution of fewer than 16 input channels (see UNSAFE_1X1_CHANNELS), which trains in NCHW."""
    if device.type == "cpu" and any(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and max(m.stride) > 1
                                    and m.in_channels < UNSAFE_1X1_CHANNELS for m in model.modules()):
        return False
    return channels_last(device)


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()


# ---------------------------------------------------------------- optimizer and schedule
def make_optimizer(model: nn.Module, p: dict) -> torch.optim.Optimizer:
    # No weight decay on BatchNorm and biases (the usual practice for ResNets).
    decay = [w for w in model.parameters() if w.ndim > 1]
    no_decay = [w for w in model.parameters() if w.ndim <= 1]
    groups = [{"params": decay, "weight_decay": p["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    if p["optimizer"] == "sgd":
        return torch.optim.SGD(groups, lr=p["lr"], momentum=p["momentum"], nesterov=p["nesterov"] and p["momentum"] > 0)
    cls = torch.optim.Adam if p["optimizer"] == "adam" else torch.optim.AdamW
    return cls(groups, lr=p["lr"], betas=(p["momentum"], 0.999))


def check_schedule(p: dict, steps_per_epoch: int) -> None:
    """Refuse (ParamsError) a one-cycle schedule whose warm-up is exactly one step: torch's OneCycleLR then divides
    by zero in the middle of training (e.g. batch_size as large as the training set, 4 epochs, warmup 0.25)."""
    total = p["epochs"] * steps_per_epoch
    if p["scheduler"] == "onecycle" and float(p["warmup_fraction"] * total) - 1 == 0:  # OneCycleLR's own arithmetic
        raise ParamsError(
            f"scheduler 'onecycle' cannot warm up over exactly one step (torch's OneCycleLR divides by zero): "
            f"warmup_fraction {p['warmup_fraction']:g} × {total} steps ({p['epochs']} epochs × {steps_per_epoch} "
            f"batches of {p['batch_size']}) = 1; change batch_size, epochs or warmup_fraction")


def steps_per_epoch(p: dict, n_train: int) -> int:
    """Optimizer steps of one training epoch (incomplete last batches are dropped; a batch larger than the
    training set is the whole set)."""
    return n_train // max(1, min(p["batch_size"], n_train)) if n_train else 0


def make_scheduler(opt: torch.optim.Optimizer, p: dict, steps_per_epoch: int):
    """A per-step schedule; `step` drops every `step_size` epochs like StepLR on epochs."""
    check_schedule(p, steps_per_epoch)
    total = p["epochs"] * steps_per_epoch
    if p["scheduler"] == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=p["lr"], total_steps=total, pct_start=p["warmup_fraction"],
            cycle_momentum=p["optimizer"] == "sgd", base_momentum=0.85 * p["momentum"], max_momentum=p["momentum"])
    if p["scheduler"] == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    if p["scheduler"] == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=p["step_size"] * steps_per_epoch, gamma=p["gamma"])
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)


# ---------------------------------------------------------------- evaluation
@torch.inference_mode()
def predict(model: nn.Module, batches: data_mod.Batches, amp: torch.dtype | None = None,
            flip: bool = False) -> torch.Tensor:
    """Logits (float32, on the CPU) for every image of `batches`, in order."""
    model.eval()
    out = []
    for x, _ in batches:
        with autocast(batches.device, amp):
            logits = model(x)
            if flip:
                logits = logits + model(x.flip(3))
        out.append(logits.float().cpu())
    return torch.cat(out) if out else torch.empty(0, 10)


def evaluate(model: nn.Module, batches: data_mod.Batches, amp: torch.dtype | None = None,
             flip: bool = False) -> dict[str, float]:
    """Cross-entropy loss and accuracy (%) over a split."""
    if len(batches.labels) == 0:
        return {"loss": float("nan"), "acc": float("nan")}
    return score(predict(model, batches, amp, flip), batches.labels.cpu())


def predict_split(model: nn.Module, split: data_mod.Split, batch_size: int, flip: bool = False,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """`predict` on one split, run on `device` (channels_last where it pays); the model ends on the CPU."""
    device = torch.device(device)
    cl = channels_last(device)
    model.to(device, memory_format=torch.channels_last if cl else torch.preserve_format)
    try:
        return predict(model, data_mod.Batches(split, batch_size, device, channels_last=cl), flip=flip)
    finally:
        model.to("cpu", memory_format=torch.contiguous_format)


def score(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    return {"loss": F.cross_entropy(logits, labels).item(), "acc": 100.0 * (logits.argmax(1) == labels).float().mean().item()}


# ---------------------------------------------------------------- training
def fit(model: nn.Module, dataset: data_mod.Dataset, p: dict, checkpoint: str | Path | None = None,
        on_epoch: Callable[[dict], None] | None = None, after_step: Callable[[], None] | None = None,
        teacher: nn.Module | None = None) -> list[dict]:
    """Train `model` with the recipe in `p`; return the per-epoch history.

    `teacher`: with `p['distill']` set, the model whose logits on the same augmented batch the loss also
    matches (`distillation_loss`); it is not trained.

    `on_epoch(record)` is called after each epoch (Optuna reports and prunes through it);
    `after_step()` after each optimizer step (BinaryConnect clips its weights, pruning re-applies masks).

    After every epoch the full training state is written atomically to `checkpoint`; if that file
    exists when `fit` starts, training resumes after its last complete epoch with the same
    batches, so the history equals an uninterrupted run's.
    """
    device = pick_device(p["device"])
    cl = train_channels_last(device, model)
    dtype = amp_dtype(p["amp"], device)
    model.to(device, memory_format=torch.channels_last if cl else torch.contiguous_format)
    train = data_mod.Batches(dataset.train, p["batch_size"], device, train=True, seed=p["seed"], channels_last=cl)
    val = data_mod.Batches(dataset.val, p["eval_batch_size"], device, channels_last=cl)
    test = data_mod.Batches(dataset.test, p["eval_batch_size"], device, channels_last=cl)
    opt = make_optimizer(model, p)
    sched = make_scheduler(opt, p, len(train))
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=p["label_smoothing"])
    distill = p.get("distill") or {}
    if distill and teacher is None:
        raise ValueError("distill is set but no teacher model was given")
    if distill:
        teacher = teacher.to(device, memory_format=torch.channels_last if cl else torch.contiguous_format).eval()

    history: list[dict] = []
    if checkpoint and Path(checkpoint).is_file():
        state = runs.load_torch(checkpoint, map_location=device)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        history = list(state["history"])

    for epoch in range(len(history), p["epochs"]):
        t0 = time.perf_counter()
        train.set_epoch(epoch)
        model.train()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        seen = 0
        bar = tqdm(train, desc=f"epoch {epoch + 1}/{p['epochs']}", leave=False, disable=not p["progress"])
        for step, (x, y) in enumerate(bar):
            with autocast(device, dtype):
                logits = model(x)
                if distill:
                    with torch.no_grad():
                        taught = teacher(x)
                    loss = distillation_loss(logits, taught, y, distill["alpha"], distill["temperature"], loss_fn)
                else:
                    loss = loss_fn(logits, y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            if after_step:
                after_step()
            sched.step()
            loss_sum += loss.detach() * len(y)
            correct += (logits.argmax(1) == y).sum()
            seen += len(y)
            if step % 10 == 0 or step == len(train) - 1:  # sync with the device only now and then
                running = loss_sum.item() / seen
                if not math.isfinite(running):
                    raise TrainingDiverged(
                        f"training loss became {running} at epoch {epoch + 1}, step {step + 1} "
                        f"(lr {opt.param_groups[0]['lr']:.3g}); lower the learning rate. "
                        f"Nothing from this epoch was saved.")
                bar.set_postfix(loss=f"{running:.3f}")
        record = {"epoch": epoch + 1, "lr": opt.param_groups[0]["lr"],
                  "train_loss": loss_sum.item() / seen, "train_acc": 100.0 * correct.item() / seen,
                  "train_time_s": time.perf_counter() - t0}
        for name, batches in (("val", val), ("test", test if p["test_each_epoch"] else None)):
            if batches is not None and len(batches.labels):
                r = evaluate(model, batches, dtype)  # single view per epoch; eval_flip is for the final figures
                record[f"{name}_loss"], record[f"{name}_acc"] = r["loss"], r["acc"]
        record["epoch_time_s"] = time.perf_counter() - t0
        history.append(record)
        if on_epoch:
            on_epoch(record)
        if p["progress"]:
            tqdm.write(_describe(record, p["epochs"]))
        if checkpoint:
            runs.save_torch(checkpoint, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                         "scheduler": sched.state_dict(), "scaler": scaler.state_dict(),
                                         "history": history})
    return history


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, alpha: float,
                      temperature: float, ce: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy
                      ) -> torch.Tensor:
    """Knowledge distillation (Hinton et al. 2015): (1 − α)·CE(student, labels) + α·T²·KL(p_teacher^T ‖ p_student^T),
    the softmaxes at temperature T (T² keeps the soft term's gradient on the scale of the hard one's); batch mean."""
    hard = ce(student, labels)
    if alpha == 0:
        return hard
    soft = F.kl_div(F.log_softmax(student.float() / temperature, 1), F.log_softmax(teacher.float() / temperature, 1),
                    reduction="batchmean", log_target=True)
    return (1 - alpha) * hard + alpha * temperature**2 * soft


def _describe(r: dict, epochs: int) -> str:
    parts = [f"epoch {r['epoch']}/{epochs}", f"train {r['train_acc']:.1f}%"]
    parts += [f"{k} {r[f'{k}_acc']:.1f}%" for k in ("val", "test") if f"{k}_acc" in r]
    return " · ".join(parts + [f"{r['epoch_time_s']:.1f} s"])


# ---------------------------------------------------------------- the baseline stage
