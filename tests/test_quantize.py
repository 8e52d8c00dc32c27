"""Quantization: BinaryConnect's invariants, the packed 1-bit export, FP16, INT8 and the 03 stage."""
import pytest
import torch
import torch.nn.functional as F

from resnet_lab import baselines, bench, data, metrics, models, params, runs, steps, train
from resnet_lab import techniques as T
from resnet_lab.stages import quantization

from conftest import PARAMS, keep_only, stage_params


@pytest.fixture(scope="module")
def trained(smoke_baselines):
    """The smoke baseline (trained once per test run: conftest's `smoke_baselines`), read back."""
    result, _ = baselines.trained("params/smoke.yaml", {"run_root": str(smoke_baselines), "progress": False})
    return result


def _net(width=4, seed=0):
    torch.manual_seed(seed)
    model = models.resnet18(width)
    with torch.no_grad():  # BatchNorm statistics that are not the identity
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
    return model


def _seen_weights(module, x, model):
    """The weight a layer computes with during a forward pass."""
    seen = []
    h = module.register_forward_pre_hook(lambda m, inp: seen.append(m.weight.detach().clone()))
    model(x)
    h.remove()
    return seen[0]


# ---------------------------------------------------------------- BinaryConnect
def test_forward_sees_only_plus_minus_one_and_sign_of_zero_is_plus_one():
    model = _net()
    names = T.binaryconnect.binarize(model, "inner")
    conv = model.layer1[0].conv1
    with torch.no_grad():
        conv.parametrizations.weight.original[0] = 0.0  # sign(0) must be +1, not a third value 0
    w = _seen_weights(conv, torch.randn(2, 3, 32, 32), model.train())
    assert set(w.unique().tolist()) == {-1.0, 1.0}
    assert (w[0] == 1).all()
    # inner: every conv/linear but the first conv and the last linear
    all_layers = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert names == all_layers[1:-1] and "conv1" not in names and "linear" not in names
    assert not torch.nn.utils.parametrize.is_parametrized(model.conv1)


def test_scaled_variant_uses_plus_minus_alpha_per_output_channel():
    model = _net()
    T.binaryconnect.binarize(model, "all", scale=True)
    conv = model.layer2[0].conv2
    real = conv.parametrizations.weight.original.detach()
    w = _seen_weights(conv, torch.randn(2, 3, 32, 32), model.eval())
    a = real.abs().mean(dim=(1, 2, 3))
    for c in range(w.shape[0]):
        assert set(w[c].abs().unique().tolist()) == {a[c].item()}
    assert torch.equal(torch.sign(w), torch.where(real >= 0, 1.0, -1.0))


def test_stochastic_binarization_follows_the_hard_sigmoid_in_training_only():
    model = _net()
    T.binaryconnect.binarize(model, "inner", mode="stochastic")
    conv = model.layer3[0].conv1
    with torch.no_grad():
        conv.parametrizations.weight.original.fill_(0.5)  # P(+1) = (0.5 + 1) / 2 = 0.75
    model.train()
    w = conv.weight
    assert set(w.unique().tolist()) == {-1.0, 1.0}
    assert (w == 1).float().mean().item() == pytest.approx(0.75, abs=0.02)
    model.eval()
    assert (conv.weight == 1).all()  # deterministic at test time, like the export


def test_gradient_reaches_real_weights_step_updates_them_and_clip_bounds_them():
    model = _net()
    T.binaryconnect.binarize(model, "inner")
    real = model.layer1[1].conv2.parametrizations.weight.original
    with torch.no_grad():
        real[0].fill_(0.95)
    model.train()
    F.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3])).backward()
    assert real.grad is not None and real.grad.abs().sum() > 0
    before, grad = real.detach().clone(), real.grad.clone()
    torch.optim.SGD(model.parameters(), lr=10.0).step()
    T.binaryconnect.clip_(model)
    after = real.detach()
    assert torch.allclose(after, (before - 10.0 * grad).clamp(-1, 1), atol=1e-6)  # stepped, then clipped
    assert after.abs().max() <= 1 and (after.abs() == 1).any()
    assert len(after.unique()) > 2  # real-valued, not left binarized


def test_straight_through_gradient_equals_the_gradient_of_the_binarized_weight():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3, bias=False)
    torch.nn.utils.parametrize.register_parametrization(conv, "weight", T.binaryconnect.Binarize())
    x = torch.randn(2, 3, 6, 6)
    conv(x).square().sum().backward()
    wb = torch.where(conv.parametrizations.weight.original >= 0, 1.0, -1.0).detach().requires_grad_()
    F.conv2d(x, wb).square().sum().backward()
    assert torch.allclose(conv.parametrizations.weight.original.grad, wb.grad)


# ---------------------------------------------------------------- packed export
@pytest.mark.parametrize("layers, scale", [("inner", False), ("inner", True), ("all", False)])
def test_packed_export_round_trip_is_exact(tmp_path, layers, scale):
    model = _net(width=8)
    T.binaryconnect.binarize(model, layers, scale=scale)
    with torch.no_grad():  # the trained state: real weights anywhere in [-1, 1]
        for _, m in T.binaryconnect.binarized(model):
            m.parametrizations.weight.original.uniform_(-1, 1)
    model.eval()
    path = T.binaryconnect.save(model, tmp_path / "binary.pt", models.arch_of(model))
    rebuilt = T.binaryconnect.load(path)
    x = torch.randn(16, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(model(x), rebuilt(x))
    bits = metrics.bit_widths(rebuilt)["weight_bits"]
    assert bits == 1.0 if layers == "all" else 1.0 < bits < 2.0


def test_packed_file_is_a_twentieth_of_the_float32_file_at_the_default_width(tmp_path):
    model = _net(width=16)
    fp32 = runs.save_torch(tmp_path / "fp32.pt", model.state_dict()).stat().st_size
    T.binaryconnect.binarize(model, "inner", scale=True)
    packed = T.binaryconnect.save(model, tmp_path / "binary.pt", models.arch_of(model)).stat().st_size
    assert packed <= fp32 / 20


def test_a_file_that_is_not_a_binary_export_is_refused(tmp_path):
    path = runs.save_torch(tmp_path / "x.pt", {"format": "something else"})
    with pytest.raises(runs.RunStoreError, match="not a resnet-lab packed weights file"):
        T.binaryconnect.load(path)


# ---------------------------------------------------------------- FP16, INT8, bits and score
def _acc(model, split):
    return train.evaluate(model, data.Batches(split, 256, "cpu"))["acc"]


def test_fp16_and_bf16_keep_accuracy_and_halve_the_file(trained):
    result = trained
    test = result.dataset.test
    fp32 = _acc(result.model, test)
    for dtype in (torch.float16, torch.bfloat16):
        h = T.half.half(result.model, dtype)
        assert abs(_acc(h, test) - fp32) <= 0.5
        assert all(t.dtype == torch.float32 for k, t in h.model.state_dict().items() if k.startswith("bn1.") and t.is_floating_point())
        ratio = metrics.saved_size(h.model) / metrics.saved_size(result.model)
        assert 0.45 < ratio < 0.56
        assert metrics.bit_widths(h) == {"weight_bits": 16.0, "act_bits": 16.0}


def test_int8_agrees_with_fp32_and_reloads_identically(trained, tmp_path):
    result = trained
    split = result.dataset.train
    calib = data.Batches(data.Split(split.images[:128], split.labels[:128]), 64, "cpu")
    q = T.int8.quantize(result.model, calib)
    test = data.Batches(result.dataset.test, 256, "cpu")
    agree = (train.predict(q, test).argmax(1) == train.predict(result.model, test).argmax(1)).float().mean()
    assert agree >= 0.9
    assert metrics.bit_widths(q) == {"weight_bits": 8.0, "act_bits": 8.0}
    # its packed weights are counted: the same MACs; BatchNorm folded into one bias per channel
    channels = sum(m.num_features for m in result.model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert metrics.count_macs(q)["macs"] == metrics.count_macs(result.model)["macs"]
    assert metrics.count_params(q) == metrics.count_params(result.model) - channels
    inputs = metrics.course_inputs(q)
    assert inputs["p_u"] == 0 and inputs["p_s"] == 0  # int8 zeros are rounding, not pruning
    assert metrics.count_nonzero(q) < metrics.count_params(q)  # ... though some weights do round to 0
    path = T.int8.save(q, tmp_path / "int8.pt", T.int8.arch(models.arch_of(result.model), "x86"))
    again = T.int8.load(path)
    assert torch.equal(train.predict(q, test), train.predict(again, test))


def test_course_score_of_dense_resnet18_matches_the_course():
    model = models.resnet18(64)
    w, f = metrics.count_params(model), metrics.count_macs(model)["macs"]
    bits = metrics.bit_widths(model)
    assert bits == {"weight_bits": 32.0, "act_bits": 32.0}
    assert metrics.course_score(0, 0, 32, 32, w, f) == pytest.approx(3.98, abs=0.01)
    assert metrics.course_score(0, 0, 16, 16, w, f) == pytest.approx(1.99, abs=0.01)
    assert metrics.course_inputs(model)["score"] == pytest.approx(3.98, abs=0.01)
    assert metrics.course_inputs(T.half.half(model))["score"] == pytest.approx(1.99, abs=0.01)


def test_course_inputs_measure_structured_and_unstructured_pruning_against_the_unpruned_model():
    model = models.resnet18(8)
    w, f = metrics.count_params(model), metrics.count_macs(model)["macs"]
    sparse = models.resnet18(8)
    T.prune.unstructured(sparse, 0.5, "global")
    T.prune.make_permanent(sparse)
    zeros = sum(int((m.weight == 0).sum()) for m in sparse.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
    r = metrics.course_inputs(sparse, pruned_from=model)
    assert r["p_s"] == 0 and r["p_u"] == pytest.approx(zeros / w) and (r["score_w"], r["score_f"]) == (w, f)
    assert r["score"] == pytest.approx(metrics.course_score(0, zeros / w, 32, 32, w, f))
    small, _ = T.prune.structured(models.resnet18(8), 0.5, scope="layer")
    r = metrics.course_inputs(small, pruned_from=model)
    assert r["p_s"] == pytest.approx(1 - metrics.count_params(small) / w) and r["p_u"] == 0
    # scored as its own architecture instead: its own counts, nothing pruned
    own = metrics.course_inputs(small)
    assert (own["p_s"], own["score_w"], own["score_f"]) == (0, metrics.count_params(small), metrics.count_macs(small)["macs"])


# ---------------------------------------------------------------- the stage
def test_stage_runs_every_method_then_reuses_them(smoke_store, monkeypatch, tmp_path):
    # every method was run by the smoke report's 03 notebook with this params file (conftest's `smoke_reports`): the
    # stage finds each run finished in this copy of its store
    store = smoke_store("03_quantization")
    qp = stage_params("quantization_smoke.yaml", "quantization", store)
    out = quantization.run(qp)
    keep_only(store, out.reads())  # the store of 03 alone: bench below times every run of its baseline
    rows = out.rows()
    assert [r["technique"] for r in rows] == ["baseline", "fp16", "bf16", "int8", "binaryconnect", "binaryconnect",
                                              "qat", "int8", "qat"]
    # every method starts from the start model; the W8A8 QAT model then goes onto int8 kernels
    assert all(r["parent"] == out.models[0].ref for i, r in enumerate(rows[1:], 1) if i != 7)
    assert rows[7]["parent"] == out.models[6].ref and rows[7]["lineage"] == ["qat", "int8"]
    for r in rows:
        assert 0 <= r["test_acc"] <= 100 and r["size_bytes"] > 0 and r["score"] > 0
    assert all(r["reload_exact"] for r in rows[1:])  # each file gives the logits of the model that was made
    bc = [r for r in rows if r["technique"] == "binaryconnect"]
    assert all(r["size_bytes"] * 8 < rows[0]["size_bytes"] for r in bc)
    assert set(quantization.histories(out, "binaryconnect")) == {r["label"] for r in bc}
    speed = metrics.compare_speed(out.inference_models(), 8, rounds=1, repeats=1)
    table = steps.table(out, speed)
    assert table.loc[out.names()[0], steps.SPEEDUP] == 1.0
    assert "INT8" in quantization.headline(table) and "BinaryConnect" in quantization.headline(table)
    text = quantization.describe(table, out)
    assert "**FP16** on this CPU" in text and "**INT8 (x86" in text
    assert ("under CUDA autocast" in text) == torch.cuda.is_available()  # FP32 weights under autocast: CUDA only
    # the chained QAT W8A8 -> INT8 is put in words against the baseline, like every other row (not against its parent)
    chained = table.iloc[7]
    assert f"{table.index[7]} {chained[steps.DELTA]:+.2f} pt" in quantization.headline(table)
    assert f"accuracy {chained[steps.DELTA]:+.2f} pt vs the baseline" in text

    # `make bench` finds every run of this baseline in the store and times it beside the baseline
    bp = params.validate({"baseline": "params/smoke.yaml", "run_root": qp["run_root"], "rounds": 1,
                          "measure_batch_size": 8}, "bench")
    inference = bench.inference(bp)
    assert set(inference) == {r["label"] for r in rows[1:]} | {"FP32 (baseline)"}
    assert inference["FP32 (baseline)"]["speedup_vs_fp32"] == 1.0
    # and in ONNX Runtime, the same models exported, timed in the same rounds against the eager PyTorch baseline
    assert all(r["onnxruntime_throughput_img_s"] > 0 for r in inference.values())
    assert "ONNX Runtime" in bench.describe_inference(inference)
    assert bench.inference(dict(bp, run_root=str(tmp_path / "empty"))) is None

    def no_training(*a, **k):
        raise AssertionError("a finished run was recomputed")

    monkeypatch.setattr(train, "fit", no_training)
    monkeypatch.setattr(T.int8, "quantize", no_training)
    again = quantization.run(qp)
    assert [r["test_acc"] for r in again.rows()] == [r["test_acc"] for r in rows]


def test_stage_without_its_baseline_says_which_notebook_produces_it(tmp_path):
    qp = params.load(PARAMS / "quantization_smoke.yaml", "quantization")
    qp.update(run_root=str(tmp_path / "empty"))
    with pytest.raises(baselines.UpstreamMissing) as e:
        quantization.run(qp)
    msg = str(e.value)
    assert "papermill notebooks/01_baseline.ipynb" in msg and "params/smoke.yaml" in msg and "run_root" in msg
    assert not (tmp_path / "empty").exists()  # a lookup creates nothing


@pytest.mark.parametrize("values, expect", [
    ({"methods": ["fp16", "int4"]}, "unknown method 'int4'"),
    ({"methods": []}, "non-empty list"),
    ({"binaryconnect": [{"scale": True, "mod": "stochastic"}]}, "did you mean 'mode'"),
    ({"binaryconnect": [{"layers": "some"}]}, "one of 'inner', 'all'"),
    ({"binaryconnect": [{"epochs": 0}]}, "binaryconnect[0].epochs"),
    ({"calibration_images": 0}, "out of range"),
    ({"width": 16}, "unknown parameter 'width'"),
])
def test_quantization_params_are_checked_before_any_work(values, expect):
    with pytest.raises(params.ParamsError) as e:
        params.validate(values, "quantization")
    assert expect in str(e.value)
