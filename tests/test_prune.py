"""Pruning: masks, exact sparsity, channel removal equal to masking, counts by hand, the 04 stage."""
import copy

import pytest
import torch
from torch import nn

from resnet_lab import bench, metrics, models, packed, params, runs, steps, train
from resnet_lab import techniques as T
from resnet_lab.stages import pruning

from conftest import keep_only, stage_params


def _net(width=8, seed=0):
    """A ResNet18 with BatchNorm statistics and affine terms that are not the identity."""
    torch.manual_seed(seed)
    model = models.resnet18(width)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    return model.eval()


def _zeros(model, names):
    return sum(int((model.get_submodule(n).weight == 0).sum()) for n in names)


# ---------------------------------------------------------------- unstructured
def test_masked_weights_stay_zero_through_optimizer_steps_and_after_make_permanent():
    model = _net(4).train()
    layers = T.prune.prunable(model)
    T.prune.unstructured(model, 0.6, "global", layers)
    masks = {n: m.weight_mask.clone() for n, m in layers}
    before = {n: m.weight_orig.detach().clone() for n, m in layers}
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-3)
    for _ in range(3):
        loss = model(torch.randn(8, 3, 32, 32)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model(torch.randn(2, 3, 32, 32))  # the mask is applied at each forward
    for n, m in layers:
        assert torch.all(m.weight[masks[n] == 0] == 0)
        assert not torch.equal(m.weight_orig[masks[n] == 1], before[n][masks[n] == 1])  # the rest trained
    T.prune.make_permanent(model)
    for n, m in layers:
        assert not hasattr(m, "weight_mask") and isinstance(m.weight, nn.Parameter)
        assert torch.all(m.weight[masks[n] == 0] == 0)
    assert all(k.endswith(("weight", "bias", "running_mean", "running_var", "num_batches_tracked"))
               for k in model.state_dict())


@pytest.mark.parametrize("amount", [0.37, 0.8, 0.9])
def test_global_pruning_reaches_the_requested_sparsity_over_the_chosen_layers_exactly(amount):
    model = _net(8)
    layers = T.prune.prunable(model, include_stem=False, include_fc=True)
    names = [n for n, _ in layers]
    total = sum(m.weight.numel() for _, m in layers)
    T.prune.unstructured(model, amount, "global", layers)
    assert _zeros(model, names) == round(amount * total)
    assert _zeros(model, ["conv1"]) == 0  # the stem was not chosen
    per_layer = {n: T.prune.sparsity(model, [n]) for n in names}
    assert max(per_layer.values()) - min(per_layer.values()) > 0.05  # one threshold: layers differ


def test_layer_scope_and_repeated_calls_prune_each_layer_cumulatively():
    model = _net(8)
    layers = T.prune.prunable(model, include_stem=True, include_fc=False)
    T.prune.unstructured(model, 0.3, "layer", layers)
    first = {n: (m.weight == 0).clone() for n, m in layers}
    T.prune.unstructured(model, 0.6, "layer", layers)
    for n, m in layers:
        assert int((m.weight == 0).sum()) == round(0.6 * m.weight.numel())
        assert torch.all(m.weight[first[n]] == 0)  # earlier zeros stay
    assert "linear" not in dict(layers)


def test_gradual_schedule_rises_fast_then_slowly_to_the_target():
    s = T.prune.gradual(0.9, 3)
    assert s[-1] == pytest.approx(0.9) and s[0] < s[1] < s[2]
    assert s[0] > 0.9 / 3  # more than a linear share first


def test_sparsity_aware_macs_and_micronet_counts_equal_a_hand_count():
    net = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1, bias=False), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 3, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.linspace(0.1, 1.0, 54).view(2, 3, 3, 3))  # distinct values: 32-bit weights
        net[0].weight.view(-1)[:20] = 0  # 34 of 54 weights left
        net[3].weight.copy_(torch.linspace(0.2, 0.7, 6).view(3, 2))
        net[3].weight[0, 0] = 0  # 5 of 6 left
    counts = metrics.count_macs(net, (1, 3, 8, 8))
    assert counts["macs"] == 8 * 8 * 54 + 6
    assert counts["sparse_macs"] == 8 * 8 * 34 + 5
    m = metrics.micronet(net, (1, 3, 8, 8))
    # each tensor: its nonzero 32-bit values + a 1-bit mask over its shape (cheaper than the zeros it drops)
    assert m["micronet_params"] == pytest.approx((34 * 32 + 54) / 32 + (5 * 32 + 6) / 32)
    assert m["micronet_ops"] == pytest.approx(2 * (8 * 8 * 34 + 5))


def test_micronet_score_of_dense_resnet18_is_the_course_reference():
    model = models.resnet18(64)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.bias.fill_(0.1)  # trained shifts are nonzero
    assert metrics.micronet(model)["micronet_score"] == pytest.approx(3.98, abs=0.01)
    assert metrics.micronet(T.half.half(model))["micronet_score"] == pytest.approx(1.99, abs=0.01)


# ---------------------------------------------------------------- sensitivity
def test_sensitivity_prunes_one_layer_at_a_time_and_restores_it():
    model = _net(4)
    ref = {n: m.weight.detach().clone() for n, m in T.prune.prunable(model, True, True)}
    seen = []
    acc = T.prune.sensitivity(model, ["layer1.0.conv1", "linear"], [0.5, 0.9],
                            lambda m: seen.append(_zeros(m, list(ref))) or float(len(seen)), progress=False)
    w = {"layer1.0.conv1": ref["layer1.0.conv1"].numel(), "linear": ref["linear"].numel()}
    assert seen == [round(0.5 * w["layer1.0.conv1"]), round(0.9 * w["layer1.0.conv1"]), round(0.5 * w["linear"]), round(0.9 * w["linear"])]
    assert acc == {"layer1.0.conv1": {0.5: 1.0, 0.9: 2.0}, "linear": {0.5: 3.0, 0.9: 4.0}}
    assert all(torch.equal(model.get_submodule(n).weight, w0) for n, w0 in ref.items())


def test_amounts_from_sensitivity_prune_robust_layers_more_and_hit_the_target():
    drops = {"robust": {0.5: 0.0, 0.9: 0.5, 0.98: 1.0}, "fragile": {0.5: 3.0, 0.9: 20.0, 0.98: 40.0}}
    sizes = {"robust": 1000, "fragile": 1000}
    amounts = T.prune.amounts_from_sensitivity(drops, sizes, 0.6)
    assert amounts["robust"] > amounts["fragile"]
    assert (amounts["robust"] * 1000 + amounts["fragile"] * 1000) / 2000 == pytest.approx(0.6, abs=1e-6)
    assert max(amounts.values()) <= 0.98
    with pytest.raises(ValueError, match="larger sensitivity_amounts"):
        T.prune.amounts_from_sensitivity(drops, sizes, 0.99)


# ---------------------------------------------------------------- structured
def test_compacted_model_has_the_planned_channels_and_the_masked_models_outputs(tmp_path):
    model = _net(8)
    plan = T.prune.plan_channels(model, 0.5, norm=1, scope="layer", include_stem=True)
    masked = T.prune.mask_channels(copy.deepcopy(model), plan)
    compacted = T.prune.compact(masked)  # found from the zeros alone
    planned = T.prune.remove_channels(copy.deepcopy(model), plan)
    for m in (compacted, planned):
        assert m.conv1.out_channels == m.layer1[0].conv1.in_channels == 4  # stem + layer1's residual stream
        assert m.layer1[0].conv1.out_channels == m.layer1[0].bn1.num_features == 4
        assert m.layer2[0].conv1.out_channels == m.layer2[0].shortcut[0].out_channels == 8
        assert m.layer4[1].conv2.out_channels == m.linear.in_features == 32
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        ref = masked(x)
        assert torch.allclose(compacted(x), ref, atol=1e-5) and torch.allclose(planned(x), ref, atol=1e-5)
        assert not torch.allclose(model(x), ref, atol=1e-3)  # masking did change the model
    assert metrics.count_macs(compacted)["macs"] < metrics.count_macs(model)["macs"] / 3.5

    # the compact model saves with its shapes and loads (weights_only) into the same function
    arch = {**models.arch_of(model), "shapes": models.shapes_of(compacted)}
    packed.save_model(compacted, tmp_path / "packed.pt", arch)
    loaded = packed.load_model(tmp_path / "packed.pt")
    with torch.no_grad():
        assert torch.equal(loaded(x), compacted(x))


def test_channel_plan_ranks_by_filter_norm_and_rounds_kept_channels_up():
    model = _net(16)
    with torch.no_grad():
        model.layer3[0].conv1.weight[[3, 7, 11]] *= 1e-3  # the weakest filters of a block-internal group
    plan = T.prune.plan_channels(model, 3 / 64, norm=2, scope="layer")
    assert plan["layer3.0.conv1"] == [3, 7, 11]
    plan = T.prune.plan_channels(model, 0.3, scope="layer", round_to=16)
    kept = {name: model.get_submodule(name).out_channels - len(idxs) for name, idxs in plan.items()}
    assert kept and all(k % 16 == 0 for k in kept.values())
    assert all(k >= 0.7 * model.get_submodule(n).out_channels for n, k in kept.items())  # never more than asked
    assert "conv1" not in plan  # the stem's group is left alone unless asked


def test_global_channel_plan_removes_the_requested_share_of_all_channels():
    model = _net(8)
    plan = T.prune.plan_channels(model, 0.4, scope="global")
    total = sum(len(T.prune._filter_norms(g, 1)) for g in T.prune._groups(model, T.prune._graph(model), False).values())
    assert sum(len(i) for i in plan.values()) == round(0.4 * total)
    shares = [len(i) / model.get_submodule(n).out_channels for n, i in plan.items()]
    assert max(shares) - min(shares) > 0.05  # one ranking: groups lose different shares


# ---------------------------------------------------------------- packed files
def test_packed_files_round_trip_exactly_and_store_sparse_and_binary_tensors_small(tmp_path):
    model = _net(16)
    layers = T.prune.prunable(model)
    T.prune.unstructured(model, 0.8, "global", layers)
    T.prune.make_permanent(model)
    arch = models.arch_of(model)
    dense_size = packed.nbytes(_net(16).state_dict(), arch)
    sparse_path = packed.save(model.state_dict(), tmp_path / "sparse.pt", arch)
    state, arch2 = packed.load(sparse_path)
    assert arch2 == arch and all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert sparse_path.stat().st_size < 0.3 * dense_size  # 20% of the values + 1 bit per weight

    half = T.half.half(model)
    path = packed.save_model(half, tmp_path / "half.pt", {**arch, "precision": "float16"})
    loaded = packed.load_model(path)
    ref = half.model.state_dict()
    assert all(torch.equal(t, ref[k]) for k, t in loaded.model.state_dict().items())
    assert path.stat().st_size < 0.6 * sparse_path.stat().st_size

    T.binaryconnect.binarize(model, keep_zeros=True)
    T.binaryconnect.save(model, tmp_path / "bc.pt", arch)
    assert (tmp_path / "bc.pt").stat().st_size < dense_size / 20


def test_binaryconnect_on_a_pruned_model_keeps_its_zeros_and_exports_exactly(tmp_path):
    model = _net(8).train()
    layers = T.prune.prunable(model)
    T.prune.unstructured(model, 0.7, "global", layers)
    T.prune.make_permanent(model)
    zero = {n: (m.weight == 0).clone() for n, m in layers}
    names = T.binaryconnect.binarize(model, "inner", keep_zeros=True)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(2):
        loss = model(torch.randn(8, 3, 32, 32)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        T.binaryconnect.clip_(model)
    model.eval()
    for n in names:
        w = model.get_submodule(n).weight
        assert torch.all(w[zero[n]] == 0) and set(w.unique().tolist()) <= {-1.0, 0.0, 1.0}
    path = T.binaryconnect.save(model, tmp_path / "bc.pt", models.arch_of(model))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(T.binaryconnect.load(path)(x), model(x))
    assert metrics.bit_widths(T.binaryconnect.load(path))["weight_bits"] < 2  # ±1 with zeros counts 1 bit


def test_a_packed_file_of_another_kind_or_damaged_is_refused(tmp_path):
    runs.save_torch(tmp_path / "plain.pt", {"conv.weight": torch.zeros(2)})
    with pytest.raises(runs.RunStoreError, match="not a resnet-lab packed weights file"):
        packed.load_model(tmp_path / "plain.pt")
    blob = packed.pack(_net(4).state_dict(), models.arch_of(_net(4)))
    blob["layout"][0]["offset"] = 10**9  # points past the values
    runs.save_torch(tmp_path / "bad.pt", blob)
    with pytest.raises(runs.RunStoreError):
        packed.load_model(tmp_path / "bad.pt")


# ---------------------------------------------------------------- params
@pytest.mark.parametrize("values, expect", [
    ({"amounts": [1.0]}, "lies in [0, 1)"),
    ({"amounts": [], "variants": []}, "at least one amount"),  # the top-level keys as the one recipe
    ({"method": "l2"}, "one of 'l1', 'ln_structured'"),
    ({"variants": [{"methd": "l1"}]}, "did you mean 'method'"),
    ({"variants": [{"method": "ln_structured", "scope": "sensitivity"}]}, "works with method 'l1'"),
    ({"variants": [{"schedule": "iterative", "steps": 4, "epochs": 3}]}, "at least as many epochs"),
    ({"scope": "sensitivity", "amounts": [0.99], "variants": []}, "exceeds the largest sensitivity amount"),
    ({"scope": "sensitivity", "sensitivity_amounts": [], "variants": []}, "needs the sensitivity analysis"),
    ({"then": "int9"}, "unknown step 'int9' (did you mean 'int8'?)"),
    ({"then": [{"int8": {"backnd": "x86"}}]}, "did you mean 'backend'"),
    ({"then": [{"prune": {"method": "l1"}}]}, "needs 'amount'"),
    ({"then": [{"binaryconnect": {"seed": 1, "seeds": [2]}}]}, "both 'seed' and 'seeds'"),
    ({"norm": 3}, "one of 1, 2"),
])
def test_pruning_params_are_checked_before_any_work(values, expect):
    with pytest.raises(params.ParamsError) as e:
        params.validate(values, "pruning")
    assert expect in str(e.value)


def test_variants_take_the_top_level_keys_they_leave_out():
    p = params.validate({"epochs": 7, "variants": [{"method": "ln_structured", "amounts": [0.5]}, {"then": "fp16"}]}, "pruning")
    assert [v["method"] for v in p["variants"]] == ["ln_structured", "l1"]
    assert all(v["epochs"] == 7 for v in p["variants"]) and p["variants"][1]["then"] == [{"fp16": {}}]
    assert params.validate({"amounts": [0.3], "variants": []}, "pruning")["variants"][0]["amounts"] == [0.3]


# ---------------------------------------------------------------- the stage
def test_stage_prunes_every_variant_then_reuses_them(smoke_store, monkeypatch):
    # every variant was pruned by the smoke report's 04 notebook with this params file (conftest's `smoke_reports`):
    # the stage finds each run finished in this copy of its store
    store = smoke_store("04_pruning")
    p = stage_params("pruning_smoke.yaml", "pruning", store)
    result = pruning.run(p)
    keep_only(store, result.reads())  # the store of 04 alone: bench below times every run of its baseline
    rows = dict(zip(result.names(), result.rows()))
    bc_name = "L1 unstructured, global, 50% → BinaryConnect (deterministic, inner layers)"
    assert list(rows) == ["baseline (FP32, width 8)", "L1 unstructured, global, 50%", "L1 unstructured, global, 50%, 2 steps",
                          "L1 unstructured, sensitivity, 50%", "L1 unstructured, global, 50% → FP16", bc_name,
                          "L1 structured, layer, 50% of channels",
                          "L1 structured, layer, 50% of channels + KD (α 0.5, T 4)"]
    models_ = result.inference_models()
    base = rows["baseline (FP32, width 8)"]
    chosen = [n for n, _ in T.prune.prunable(models_["baseline (FP32, width 8)"])]
    chosen_size = sum(models_["baseline (FP32, width 8)"].get_submodule(n).weight.numel() for n in chosen)
    for name in ("L1 unstructured, global, 50%", "L1 unstructured, global, 50%, 2 steps"):
        model = models_[name]  # reloaded from its packed file: the zeros are permanent
        assert _zeros(model, chosen) == round(0.5 * chosen_size)
        assert rows[name]["p_u"] == pytest.approx(round(0.5 * chosen_size) / base["params"])
        assert rows[name]["size_bytes"] < base["size_bytes"]
    assert len(result.histories()["L1 unstructured, global, 50%, 2 steps"]) == p["epochs"]
    fp16 = rows["L1 unstructured, global, 50% → FP16"]
    assert fp16["weight_bits"] == 16 and fp16["score"] < rows["L1 unstructured, global, 50%"]["score"]
    # the chain's links start from the pruned run, which is made once for both chains
    assert fp16["parent"] == rows[bc_name]["parent"] == f"prune/{result.models[1].run.key}"
    bc = rows[bc_name]
    assert bc["weight_bits"] < 2 and bc["p_u"] > 0.4 and bc["size_bytes"] < base["size_bytes"] / 10
    struct = rows["L1 structured, layer, 50% of channels"]
    assert struct["p_s"] > 0.5 and struct["p_u"] == 0 and struct["macs"] < base["macs"] / 2
    sens = result.extras["sensitivity"]
    assert sens["layers"][0] == "conv1" and len(sens["acc"]["linear"]) == 2
    assert {c["family"] for c in result.extras["curves"]} == {"L1 unstructured, global", "L1 structured, layer"}

    speed = metrics.compare_speed(result.inference_models(), 8, rounds=1, repeats=1)
    table = pruning.table(result, speed)
    assert table.loc["baseline (FP32, width 8)", steps.SPEEDUP] == 1.0
    assert set(pruning.score_inputs(result).columns) >= {"p_s", "p_u", "q_w (bits)", "q_a (bits)", "w", "f"}
    assert "lowest course score within 2 pt and not found worse" in pruning.headline(table)
    assert pruning.sensitivity_table(result).shape == (len(sens["layers"]), 2)
    pruned_rows = sum(r["technique"] == "prune" for r in result.rows())
    assert len(pruning.curve_table(result)) == len(result.extras["curves"]) + pruned_rows

    bench_p = params.validate({"baseline": "params/smoke.yaml", "run_root": str(store), "rounds": 1,
                               "measure_batch_size": 8}, "bench")
    assert set(bench.inference(bench_p)) == set(rows) - {"baseline (FP32, width 8)"} | {"FP32 (baseline)"}

    monkeypatch.setattr(train, "fit", lambda *a, **k: pytest.fail("a finished run was recomputed"))
    again = pruning.run(p)
    assert [r["test_acc"] for r in again.rows()] == [r["test_acc"] for r in result.rows()]


def _headline_table(names_and_fields):
    """A 04 table by hand: (name, technique, method, sparsity %, Δ pt, MAC reduction, course score); the columns
    of today's table and, for the old headline, of the table before the fields existed."""
    import pandas as pd

    rows = []
    for name, technique, method, sparsity, delta, reduction, score in names_and_fields:
        rows.append({"model": name, "technique": technique, "method": method, steps.SPARSITY: sparsity,
                     steps.DELTA: delta, steps.MAC_REDUCTION: reduction, "MAC reduction (×, dense)": reduction,
                     steps.COURSE: score})
    return pd.DataFrame(rows).set_index("model")


def test_pruning_headline_picks_models_by_their_method_never_by_their_name():
    # With norm 1 a structured model's name starts with "L1", and "unstructured" contains "structured": a
    # headline that selects by name calls the structured model the sparsest unstructured one.
    table = _headline_table([
        ("baseline (FP32)", "baseline", None, 0.0, 0.0, 1.0, 0.25),
        ("L1 unstructured, global, 80%", "prune", "l1", 80.0, -1.0, 1.0, 0.15),
        ("L1 structured, global, 60% of channels", "prune", "ln_structured", 85.0, -1.5, 2.2, 0.06),
        ("L1 unstructured, global, 95%", "prune", "l1", 95.0, -6.0, 1.0, 0.12),
    ])
    text = pruning.headline(table)
    unstructured_part, structured_part = text.split(" · ")[:2]
    assert unstructured_part.startswith("L1 unstructured, global, 80%: ")
    assert structured_part.startswith("L1 structured, global, 60% of channels: 2.2× fewer MACs")
