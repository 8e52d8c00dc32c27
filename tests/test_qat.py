"""Quantization-aware training (LSQ fake quantization, frozen levels, bit-packed files) and knowledge distillation."""
import math

import pytest
import torch
import torch.nn.functional as F

from resnet_lab import metrics, models, packed, params, registry, runs, steps, train
from resnet_lab import techniques as T
from resnet_lab.stages import pruning, quantization

from conftest import copy_store, keep_only
from conftest import stage_params as _stage_params


@pytest.mark.parametrize("bits, signed", [(8, True), (4, True), (3, True), (2, True), (4, False), (8, False)])
def test_the_fake_quantizer_takes_at_most_2_to_the_bits_levels_per_channel(bits, signed):
    torch.manual_seed(0)
    w = torch.randn(6, 3, 3, 3) * torch.linspace(0.1, 3, 6).view(6, 1, 1, 1)
    step = torch.linspace(0.01, 0.5, 6).view(6, 1, 1, 1)
    out = T.qat.fake_quantize(w, step, bits, signed)
    q_min, q_max = T.qat.levels(bits, signed)
    for c in range(6):
        codes = torch.round(out[c] / step[c])
        assert torch.equal(codes * step[c], out[c]) and codes.min() >= q_min and codes.max() <= q_max  # integer levels
        assert torch.unique(out[c]).numel() <= 2**bits
    assert q_max - q_min + 1 == 2**bits


def test_the_gradient_passes_straight_through_inside_the_range_and_is_zero_outside():
    x = torch.tensor([-3.0, -0.26, -0.1, 0.0, 0.12, 0.37, 0.9, 5.0], requires_grad=True)
    step = torch.tensor([0.1], requires_grad=True)  # 4-bit signed: codes −8 … 7, i.e. −0.8 … 0.7
    out = T.qat.fake_quantize(x, step, 4, True, grad_scale=0.5)
    out.backward(torch.ones_like(out))
    inside = (x / 0.1 >= -8) & (x / 0.1 <= 7)
    assert torch.equal(x.grad, inside.float())  # 1 inside, 0 where the clamp cut
    # LSQ's step gradient (Esser et al. 2020, eq. 3): −x/s + round(x/s) inside, q_min or q_max outside; times the scale
    v = x.detach() / 0.1
    expected = torch.where(v < -8, torch.tensor(-8.0), torch.where(v > 7, torch.tensor(7.0), torch.round(v) - v)).sum() * 0.5
    assert step.grad.item() == pytest.approx(expected.item(), rel=1e-5)


def _qat_model(weight_bits=4, act_bits=4, first_last_bits=8, width=8):
    torch.manual_seed(0)
    model = models.resnet18(width)
    images = torch.randn(32, 3, 32, 32)
    q = T.qat.quantize(model, T.qat.layer_bits(model, weight_bits, act_bits, first_last_bits), images)
    return model, q, images


def test_the_steps_start_from_a_calibration_pass_and_signedness_follows_the_input():
    model, q, images = _qat_model()
    assert q.conv1.a_quant.signed and not q.layer1[0].conv1.a_quant.signed  # the image vs after a ReLU
    assert (q.conv1.w_quant.bits, q.linear.a_quant.bits, q.layer2[0].conv2.w_quant.bits) == (8, 8, 4)
    w = model.layer2[0].conv2.weight.detach()
    expected = 2 * w.abs().flatten(1).mean(1) / math.sqrt(7)
    assert torch.allclose(q.layer2[0].conv2.w_quant.step.detach(), expected)
    assert torch.equal(model.conv1.weight, models.resnet18(8).conv1.weight) is False  # the original is untouched
    assert type(model.conv1) is torch.nn.Conv2d


@pytest.mark.parametrize("weight_bits, act_bits", [(8, 8), (4, 4), (2, 4), (3, 4)])
def test_a_frozen_qat_model_round_trips_its_bit_packed_file_exactly(tmp_path, weight_bits, act_bits):
    model, q, images = _qat_model(weight_bits, act_bits)
    q.train()
    q(images).logsumexp(1).mean().backward()  # gradients reach the steps and the latent weights
    assert q.layer1[0].conv1.w_quant.step.grad is not None and q.layer1[0].conv1.a_quant.step.grad is not None
    q.eval()
    with torch.no_grad():
        before = q(images)
    T.qat.freeze(q)
    with torch.no_grad():
        assert torch.equal(q(images), before)  # freezing changes nothing the model computes
    arch = {**models.arch_of(model), "qat": T.qat.arch_record(q)}
    path = T.qat.save(q, tmp_path / "qat.pt", arch)
    back = packed.load_model(path)
    with torch.no_grad():
        assert torch.equal(back(images), before)
    blob = runs.load_torch(path)
    levels = [e for e in blob["layout"] if e["kind"] == "levels"]
    assert len(levels) == len(T.qat.quantized_layers(q))  # every weight stored at its width
    inner = sum(q.get_submodule(e["name"].removesuffix(".weight")).weight.numel() for e in levels
                if e["bits"] == weight_bits)
    edges = sum(q.get_submodule(e["name"].removesuffix(".weight")).weight.numel() for e in levels
                if e["bits"] == 8 and weight_bits != 8)  # the first conv and the last linear
    masks = sum(math.ceil(math.prod(e["shape"]) / 8) for e in blob["layout"] if e.get("mask", -1) >= 0)
    codes = sum(math.ceil(math.prod(e["shape"]) * e["bits"] / 8) for e in levels)
    assert blob["bits"].numel() == codes + masks  # the file holds b bits per weight, no more
    assert codes == pytest.approx((inner * weight_bits + edges * 8) / 8, abs=len(levels))
    # the bits the scores use are measured from the model
    bits = metrics.bit_widths(back)
    assert bits["weight_bits"] <= weight_bits + 0.1 if weight_bits != 8 else bits["weight_bits"] <= 8
    assert bits["act_bits"] == 8  # first conv and last linear keep 8-bit inputs


def test_low_bit_weights_and_activations_move_both_terms_of_the_scores():
    scores = {}
    for wb, ab, fl in ((8, 8, 8), (4, 4, 8), (4, 4, 4)):
        _, q, _ = _qat_model(wb, ab, fl)
        T.qat.freeze(q)
        scores[(wb, ab, fl)] = {**metrics.course_inputs(q), **metrics.micronet(q)}
    dense = metrics.course_inputs(models.resnet18(8))
    w8, w4, w4e = scores[(8, 8, 8)], scores[(4, 4, 8)], scores[(4, 4, 4)]
    assert w4e["weight_bits"] <= 4 and w4e["act_bits"] == 4 and w4["act_bits"] == 8
    assert dense["score"] > w8["score"] > w4["score"] > w4e["score"]
    assert w8["micronet_score"] > w4["micronet_score"] > w4e["micronet_score"]
    assert w4["p_u"] == 0  # a weight rounded to level 0 is quantization, not pruning


def test_the_distillation_loss_is_the_formula_and_cross_entropy_at_alpha_zero():
    student = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
    teacher = torch.tensor([[1.0, 1.5, -0.5], [2.0, -1.0, 0.0]])
    labels = torch.tensor([0, 2])
    t, a = 3.0, 0.7
    ce = -(F.log_softmax(student, 1)[0, 0] + F.log_softmax(student, 1)[1, 2]) / 2
    p_t, log_p_s = F.softmax(teacher / t, 1), F.log_softmax(student / t, 1)
    kl = (p_t * (p_t.log() - log_p_s)).sum() / 2
    expected = (1 - a) * ce + a * t**2 * kl
    assert train.distillation_loss(student, teacher, labels, a, t).item() == pytest.approx(expected.item(), rel=1e-6)
    assert torch.equal(train.distillation_loss(student, teacher, labels, 0.0, t), F.cross_entropy(student, labels))


def test_distillation_settings_are_checked_and_off_keeps_the_keys_runs_had():
    base = params.load(params.PARAMS_DIR / "quantization_smoke.yaml", "quantization")
    assert base["distill"] == {}
    on = params.validate({**base, "distill": {"alpha": 0.3}}, "quantization")["distill"]
    assert on == {"alpha": 0.3, "temperature": 4.0, "teacher": "baseline"}
    for bad, message in (({"alpha": 1.5}, "distill.alpha"), ({"temprature": 2}, "did you mean 'temperature'"),
                         ("yes", "parameter 'distill' = 'yes' has type str")):
        with pytest.raises(params.ParamsError, match=message):
            params.validate({**base, "distill": bad}, "quantization")
    without = {k: v for k, v in base.items() if k != "distill"}
    assert runs.run_key("prune", base) == runs.run_key("prune", without)  # stores made before the key stay valid
    assert runs.run_key("prune", {**base, "distill": on}) != runs.run_key("prune", base)


@pytest.fixture(scope="module")
def store(smoke_baselines, tmp_path_factory):
    """A run store of this module holding the smoke baseline (conftest's `smoke_baselines`, copied)."""
    return copy_store(smoke_baselines, tmp_path_factory.mktemp("qat") / "runs")


def test_qat_is_a_step_of_03_and_a_link_of_any_chain_with_distillation(store):
    structured = {"prune": {"method": "ln_structured", "scope": "layer", "amount": 0.5, "epochs": 1}}
    q = _stage_params("quantization_smoke.yaml", "quantization", store, methods=["qat"], epochs=1, start=[structured],
                      qat=[{"weight_bits": 4, "act_bits": 4}], distill={"alpha": 0.5, "temperature": 2.0})
    result = quantization.run(q)
    start, made = result.models
    assert start.row["technique"] == "prune" and made.row["technique"] == "qat"
    assert made.row["lineage"] == ["prune", "qat"] and made.row["reload_exact"]
    assert made.name.endswith("QAT W4A4 (LSQ, first/last 8-bit, simulated) + KD (α 0.5, T 2)")
    assert made.row["settings"]["distill"] == {"alpha": 0.5, "temperature": 2.0, "teacher": "baseline"}
    assert made.row["weight_bits"] <= 4.2 and made.row["act_bits"] == 8 and made.row["simulated"]
    assert made.row["size_bytes"] < start.row["size_bytes"] / 4  # 4-bit levels against float32
    assert made.row["score"] < start.row["score"] and made.row["micronet_score"] < start.row["micronet_score"]
    # the chain form in another stage's params: the same link, the same run
    chain = registry.check_chain("then", [{"qat": {"weight_bits": 4, "act_bits": 4, "epochs": 1,
                                                 "distill": {"alpha": 0.5, "temperature": 2.0}}}])
    again = result.ctx.chain(start, steps.links(chain, result.ctx.p)[0])
    assert again[0].run.key == made.run.key
    # a teacher named by the params file of a finished baseline run: here the same baseline, so the same logits
    named, own = result.ctx.teacher("params/smoke.yaml"), result.ctx.teacher("baseline")
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(named.eval()(x), own.eval()(x)) and own is not result.ctx.root.model


def test_a_w8a8_qat_model_ends_on_int8_kernels_that_agree_with_its_fake_quantized_self(smoke_store):
    # the smoke profile's 03 makes this W8A8 model and its INT8 one (conftest's `smoke_reports`): read back here
    q = _stage_params("quantization_smoke.yaml", "quantization", smoke_store("03_quantization"), methods=["qat"],
                      qat=[{"weight_bits": 8, "act_bits": 8, "epochs": 1}], calibration_images=128)
    result = quantization.run(q)
    fake, real = result.models[1:]
    assert fake.row["technique"] == "qat" and real.row["lineage"] == ["qat", "int8"]
    assert real.row["parent"] == fake.ref and real.row["eval_device"] == "cpu"
    assert any(m.weight().is_quantized for m in real.model.modules() if hasattr(m, "weight") and callable(m.weight))
    agree = 100.0 * float((real.run.predictions()["test"] == fake.run.predictions()["test"]).float().mean())
    assert real.row["agreement_with_parent"] == pytest.approx(agree) and agree >= 95.0
    assert (real.row["weight_bits"], real.row["act_bits"]) == (8.0, 8.0)


def test_only_int8_may_follow_qat(store):
    p = _stage_params("pruning_smoke.yaml", "pruning", store, sensitivity_amounts=[], curve_amounts=[], epochs=1,
                      variants=[{"method": "ln_structured", "scope": "layer", "amounts": [0.5],
                                 "then": [{"qat": {"epochs": 1}}, "fp16"]}])
    before = {str(r) for r in runs.RunStore(store).runs()}
    with pytest.raises(params.ParamsError, match="only int8 may follow it, not fp16"):
        pruning.run(p)
    assert {str(r) for r in runs.RunStore(store).runs()} == before  # refused before any work


def test_the_summary_pairs_each_model_fine_tuned_with_and_without_distillation(smoke_store):
    from resnet_lab import summary

    # the smoke profile's 04 fine-tunes this pair (conftest's `smoke_reports`): read back, then summarized alone
    store = smoke_store("04_pruning")
    structured = {"method": "ln_structured", "scope": "layer", "amounts": [0.5], "epochs": 2}
    p = _stage_params("pruning_smoke.yaml", "pruning", store, sensitivity_amounts=[], curve_amounts=[],
                      variants=[structured, {**structured, "distill": {"alpha": 0.5, "temperature": 4.0}}])
    result = pruning.run(p)
    keep_only(store, result.reads())
    off, on = [m for m in result.models if m.row["technique"] == "prune"]
    assert off.run.key != on.run.key and not off.run.params["distill"] and on.run.params["distill"]["alpha"] == 0.5
    assert on.name == off.name + " + KD (α 0.5, T 4)"
    sp = _stage_params("summary_smoke.yaml", "summary", store, onnx=False, profile_groups=[])
    s = summary.run(sp)
    kd = summary.distillation(s)
    names = {r["run"]: r["model"] for r in s.rows}  # the summary's names (a suffix where two share a lineage)
    row = kd.loc[names[str(off.run)]]
    assert row["with distillation"] == names[str(on.run)] and row["distillation"] == "α 0.5, T 4, teacher baseline"
    assert (row["validation without (%)"], row["validation with (%)"]) == (off.row["val_acc"], on.row["val_acc"])
    assert row["test with (%)"] - row["test without (%)"] == pytest.approx(row["Δ test (pt)"])
    assert row["chosen on validation"] == ("with" if on.row["val_acc"] > off.row["val_acc"] else "without")
    assert 0 <= row["p, test (paired)"] <= 1 and len(kd) == len(kd.index.unique())
    assert names[str(off.run)] in summary.distillation_text(kd)


def test_the_distillation_sentences_compare_the_test_move_with_the_validation_move():
    import pandas as pd

    from resnet_lab import summary

    cols = ["Δ validation (pt)", "Δ test (pt)", "chosen on validation", "p, test (paired)"]
    kd = pd.DataFrame([[1.5, 0.4, "with", 1.0], [1.5, -0.4, "with", 1.0], [-0.7, 0.0, "without", 1.0],
                       [0.0, 0.1, "without", 1.0]], columns=cols, index=["a", "b", "c", "d"])
    text = summary.distillation_text(kd).split("\n")
    assert [line.split("(")[-1].rstrip() for line in text] == [
        "the same direction; paired p = 1, adjusted).", "the other direction; paired p = 1, adjusted).",
        "unchanged; paired p = 1, adjusted).", "validation did not move; paired p = 1, adjusted)."]
