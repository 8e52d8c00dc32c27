"""03_quantization: FP16/BF16, INT8, BinaryConnect and QAT registered as steps; the notebook's run and tables.

The methods apply to the start model: the baseline, or any model a chain of steps from it makes
(`start` in params, e.g. the structured-pruned model).
"""
from __future__ import annotations

import copy
import functools
from typing import TYPE_CHECKING, Any

import torch

from .. import data as data_mod
from .. import metrics, models, params, qat, quantize, registry, steps, train

if TYPE_CHECKING:
    import pandas as pd

STAGE = "quantization"


@functools.cache
def _stage_defaults() -> dict[str, Any]:
    """03's default params file: where a link's settings come from when a chain gives none."""
    return params.load(params.PARAMS_DIR / params.DEFAULT_FILES[STAGE], STAGE)


def recipe(p: dict[str, Any]) -> dict[str, Any]:
    return {k: p[k] for k in params.FINETUNE}


# ---------------------------------------------------------------- FP16 / BF16
def _make_half(dtype: torch.dtype):
    def make(step: steps.Step) -> steps.Made:
        extra = {}
        device = step.ctx.device
        if device.type == "cuda":  # also the float32 weights under autocast, as training ran
            test = data_mod.Batches(step.ctx.dataset.test, step.ctx.p["eval_batch_size"], device)
            parent = step.parent.model.to(device)
            extra["autocast_test_acc"] = train.evaluate(parent, test, dtype, step.ctx.bp["eval_flip"])["acc"]
            parent.to("cpu")
        return steps.Made(quantize.half(step.parent.model, dtype), quantize.half_arch(step.parent.row["arch"], dtype),
                          extra=extra)
    return make


for _kind, _dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
    registry.register(registry.Technique(
        _kind, "03_quantization", "quantization", describe=lambda s, k=_kind: k.upper(), make=_make_half(_dtype),
        terminal=True))


# ---------------------------------------------------------------- INT8
def _calibration(step: steps.Step) -> data_mod.Split:
    """The first `calibration_images` training images (not augmented) of a step's settings."""
    n, train_split = step.settings["calibration_images"], step.ctx.dataset.train
    return data_mod.Split(train_split.images[:n], train_split.labels[:n])


def _make_int8(step: steps.Step) -> steps.Made:
    s, calibration = step.settings, _calibration(step)
    parent = step.parent.model
    if qat.quantized_layers(parent):  # a W8A8 QAT model onto int8 kernels: its weights, ranges observed again
        parent = qat.float_model(parent)
    model = quantize.int8(parent, data_mod.Batches(calibration, 128, "cpu"), s["backend"])
    extra = {"backend": s["backend"], "calibration_images": len(calibration)}
    if step.parent.row["technique"] == "qat":  # how faithfully the int8 kernels compute the QAT model
        ours = step.ctx.predict(model, "test", cpu_only=True).argmax(1)  # the evaluation protocol the parent had
        extra["agreement_with_parent"] = 100.0 * float((ours == step.parent.run.predictions()["test"]).float().mean())
    return steps.Made(model, quantize.int8_arch(step.parent.row["arch"], s["backend"]), extra=extra)


def _int8_defaults() -> dict[str, Any]:
    p = _stage_defaults()
    return {"backend": p["int8_backend"], "calibration_images": p["calibration_images"]}


registry.register(registry.Technique(
    "int8", "03_quantization", "quantization",
    describe=lambda s: f"INT8 ({s['backend']}, {s['calibration_images']} calibration images)", make=_make_int8,
    save=quantize.save_int8, loader=lambda run: quantize.load_int8(run.path("int8.pt")), artifact="int8.pt",
    defaults=_int8_defaults, terminal=True, cpu_only=True))


# ---------------------------------------------------------------- BinaryConnect
def bc_name(s: dict[str, Any]) -> str:
    extras = [s["mode"], f"{s['layers']} layers"] + (["α"] if s["scale"] else []) + (["from scratch"] if s["init"] == "scratch" else [])
    return f"BinaryConnect ({', '.join(extras)})"


def _make_bc(step: steps.Step) -> steps.Made:
    s, arch = step.settings, step.parent.row["arch"]
    model = copy.deepcopy(step.parent.model) if s["init"] == "pretrained" else models.build(arch)
    names = quantize.binarize(model, s["layers"], s["mode"], s["scale"], keep_zeros=True)  # a pruned parent's zeros stay
    before = step.accuracy(model)
    history = step.finetune(model, after_step=lambda: quantize.clip_(model))
    return steps.Made(model, arch, before, history, {"binarized_layers": len(names)})


def _bc_defaults() -> dict[str, Any]:
    """A `binaryconnect` link's settings where a chain gives none (its fine-tuning recipe comes from the stage the
    chain is in)."""
    return {k: f.default for k, f in params.BC_KEYS.items()}


registry.register(registry.Technique(
    "binaryconnect", "03_quantization", "quantization", describe=bc_name, make=_make_bc, save=quantize.save_binary,
    defaults=_bc_defaults, trains=True))


# ---------------------------------------------------------------- quantization-aware training
def qat_name(s: dict[str, Any]) -> str:
    edges = f", first/last {s['first_last_bits']}-bit" if s["first_last_bits"] != max(s["weight_bits"], s["act_bits"]) else ""
    return f"QAT W{s['weight_bits']}A{s['act_bits']} (LSQ{edges}, simulated)"


def _make_qat(step: steps.Step) -> steps.Made:
    s, parent, calibration = step.settings, step.parent.model, _calibration(step)
    images, _ = next(iter(data_mod.Batches(calibration, len(calibration), "cpu")))  # one batch, normalized
    model = qat.quantize(parent, qat.layer_bits(parent, s["weight_bits"], s["act_bits"], s["first_last_bits"]), images)
    before = step.accuracy(model)
    after_step = None
    if step.parent.row["pruned"]:  # a pruned parent's zeros stay zero (a zero weight quantizes to level 0)
        kept = [(m.weight, m.weight.detach() != 0) for m in qat.quantized_layers(model).values()]

        @torch.no_grad()
        def after_step():
            for w, mask in kept:
                w.mul_(mask.to(w.device))
    history = step.finetune(model, after_step=after_step)
    qat.freeze(model.cpu())
    arch = {**step.parent.row["arch"], "qat": qat.arch_record(model)}
    return steps.Made(model, arch, before, history, {"simulated": True, "calibration_images": len(calibration)})


def _qat_defaults() -> dict[str, Any]:
    return {k: f.default for k, f in params.QAT_KEYS.items()}


registry.register(registry.Technique(
    "qat", "03_quantization", "quantization", describe=qat_name, make=_make_qat, defaults=_qat_defaults, trains=True,
    followed_by=("int8",)))


# ---------------------------------------------------------------- the 03 stage
def run(p: dict[str, Any]) -> steps.Result:
    """Apply every method of `p['methods']` to the start model (the baseline, or the end of `p['start']`);
    each is a run in the store (reused when finished), reloaded from its saved file before it is measured."""
    def one(ctx: steps.Context, first: bool) -> steps.Result:
        q = ctx.p
        [start_links] = _one_chain(ctx, q)
        chain = ctx.chain(ctx.root, start_links)
        start = chain[-1] if chain else ctx.root
        result = steps.Result(ctx, [start])
        for method in q["methods"]:
            if method in ("fp16", "bf16"):
                links = [ctx.link(method, {})]
            elif method == "int8":
                links = [ctx.link("int8", {"backend": q["int8_backend"], "calibration_images": q["calibration_images"]})]
            else:
                keys = params.BC_KEYS if method == "binaryconnect" else params.QAT_KEYS
                links = [ctx.link(method, {**{k: v[k] for k in keys}, **recipe(q),
                                           **{k: v[k] for k in ("epochs", "lr", "distill") if k in v}}, seed)
                         for v in q[method] for seed in v.get("seeds") or [q["seed"]]]
            for link in links:
                made = ctx.apply(start, link)
                result.add(made)
                if link.kind == "qat" and {link.settings[k] for k in params.QAT_KEYS if k.endswith("bits")} == {8}:
                    # a W8A8 model ends on int8 CPU kernels, beside 03's post-training INT8
                    result.add(ctx.apply(made, ctx.link("int8", {"backend": q["int8_backend"],
                                                                 "calibration_images": q["calibration_images"]})))
        return result

    return steps.replicated(p, one)


def _one_chain(ctx: steps.Context, p: dict[str, Any]) -> list[list[steps.Link]]:
    chains = ctx.links(p["start"], "start")
    if len(chains) != 1:
        raise params.ParamsError(f"'start' must name one model, but its seeds make {len(chains)}; give one seed")
    return chains


COLUMNS = [steps.BITS, steps.ACC, steps.ACC_CI, steps.VAL, steps.DELTA_PARENT, steps.DELTA, steps.VERDICT, steps.PARAMS, steps.MACS, steps.SIZE,
           steps.SIZE_RATIO, steps.THROUGHPUT, steps.SPEEDUP, steps.COURSE, steps.MICRONET]


def histories(result: steps.Result, technique: str) -> dict[str, list[dict]]:
    """The training history of each model of `technique` (binaryconnect, qat), by its name."""
    return {name: m.history for name, m in zip(result.names(), result.models) if m.row["technique"] == technique}


def bc_table(result: steps.Result) -> pd.DataFrame:
    """BinaryConnect details: layers binarized, accuracy before/after training, export check and size."""
    import pandas as pd

    parents = {m.ref: m.row for m in result.models}
    rows = [{"variant": name, "binarized layers": m.row["binarized_layers"],
             "test accuracy before training (%)": m.row["test_acc_before_finetune"], "after (%)": m.row["test_acc"],
             "validation accuracy (%)": m.row["val_acc"], "training time (s)": m.row["train_time_s"],
             "packed file (KB)": m.row["size_bytes"] / 1e3,
             "parent's file / packed file": parents[m.row["parent"]]["size_bytes"] / m.row["size_bytes"],
             "rebuilt model gives identical logits": m.row["reload_exact"]}
            for name, m in zip(result.names(), result.models) if m.row["technique"] == "binaryconnect"]
    return pd.DataFrame(rows).set_index("variant")


def qat_table(result: steps.Result) -> pd.DataFrame:
    """QAT details: measured bits, accuracy before/after the fine-tune, the bit-packed file against the parent's,
    the exact reload, and, for a W8A8 model, its INT8-kernel child (accuracy, agreement with the QAT model)."""
    import pandas as pd

    names = dict(zip((m.ref for m in result.models), result.names()))
    parents = {m.ref: m.row for m in result.models}
    children = {m.row["parent"]: m.row for m in result.models if m.row["technique"] == "int8" and m.row.get("parent")}
    rows = []
    for m in result.models:
        if m.row["technique"] != "qat":
            continue
        r, child = m.row, children.get(m.ref, {})
        rows.append({"variant": names[m.ref], "bits (weights / activations), measured": f"{r['weight_bits']:.2f} / {r['act_bits']:.0f}",
                     "test accuracy before training (%)": r["test_acc_before_finetune"], "after (%)": r["test_acc"],
                     "validation accuracy (%)": r["val_acc"], "packed file (KB)": r["size_bytes"] / 1e3,
                     "parent's file / packed file": parents[r["parent"]]["size_bytes"] / r["size_bytes"],
                     "rebuilt model gives identical logits": r["reload_exact"],
                     "on int8 kernels: test accuracy (%)": child.get("test_acc"),
                     "on int8 kernels: agreement with the QAT model (%)": child.get("agreement_with_parent")})
    return pd.DataFrame(rows).set_index("variant") if rows else pd.DataFrame()


def describe(table: pd.DataFrame, result: steps.Result) -> str:
    """What half precision and INT8 cost on this CPU (and under CUDA autocast), in words, from the measured table."""
    if steps.SPEEDUP not in table:
        return ""
    flags = metrics.cpu_flags()
    lines = [f"**{name}** under CUDA autocast (float32 weights): test accuracy {m.row['autocast_test_acc']:.2f}%."
             for name, m in zip(result.names(), result.models) if "autocast_test_acc" in m.row]
    for technique, flag in (("fp16", "avx512_fp16"), ("bf16", "avx512_bf16"), ("int8", "avx512_vnni")):
        for name, r in table[table["technique"] == technique].iterrows():
            native = "has" if flag in flags or "amx_" + technique in flags else "lacks"
            lines.append(f"**{name}** on this CPU ({native} `{flag}`): {r[steps.SPEEDUP]:.2f}× the start model's "
                         f"throughput, accuracy {r[steps.DELTA]:+.2f} pt vs the baseline, file {r[steps.SIZE_RATIO]:.2f}× the "
                         f"baseline's size.")
    lines.append("BinaryConnect's rebuilt model runs float32 convolutions with ±1 (or ±α) weights: without "
                 "binary kernels its gain is the file size, not speed.")
    if (table["technique"] == "qat").any():
        lines.append("QAT models are simulated: float32 convolutions on weights and inputs rounded to their levels "
                     "(the rounding costs time: no int4 CPU kernels exist); their file holds each weight at its bits.")
    return "  \n".join(lines)


def headline(table: pd.DataFrame) -> str:
    """One line of results; every Δ is against the baseline (a chained model's parent is another model)."""
    parts = []
    for technique in ("int8", "fp16", "bf16"):
        for name, r in table[table["technique"] == technique].iterrows():
            speed = f", {r[steps.SPEEDUP]:.1f}× CPU throughput" if steps.SPEEDUP in r else ""
            parts.append(f"{name} {r[steps.DELTA]:+.2f} pt{speed}")
    for name, r in table[table["technique"] == "qat"].iterrows():
        parts.append(f"{name} {r[steps.ACC]:.1f}% ({r[steps.DELTA]:+.1f} pt), bits {r[steps.BITS]}")
    bc = table[table["technique"] == "binaryconnect"]
    if len(bc):
        best = bc[steps.VAL].idxmax()  # chosen on validation
        r = bc.loc[best]
        parts.append(f"{best} {r[steps.ACC]:.1f}% ({r[steps.DELTA]:+.1f} pt) in 1/{1 / r[steps.SIZE_RATIO]:.0f} "
                     f"of the baseline's file")
    return " · ".join(parts)
