"""SVD factorization: exactness at full rank, counts against the formula, rank rules, the 05 stage."""
import pytest
import torch
from torch import nn

from resnet_lab import metrics, models, params, steps, train
from resnet_lab import techniques as T
from resnet_lab.stages import factorization

from conftest import stage_params


@pytest.mark.parametrize("stride, padding, dilation, bias", [(1, 1, 1, False), (2, 1, 1, True), (1, 2, 2, True)])
def test_full_rank_factorization_reproduces_the_layer(stride, padding, dilation, bias):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 10, 3, stride=stride, padding=padding, dilation=dilation, bias=bias)
    pair = T.svd.split(conv, T.svd.full_rank(conv))
    x = torch.randn(2, 6, 9, 9)
    assert torch.allclose(pair(x), conv(x), atol=1e-4)
    assert pair[0].stride == conv.stride and pair[0].padding == conv.padding and pair[0].dilation == conv.dilation


def test_full_rank_factorization_keeps_the_network_predictions():
    torch.manual_seed(0)
    model = models.resnet18(8).eval()
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        for name, conv in T.svd.candidates(model, include_stem=True, include_1x1=True):
            model.set_submodule(name, T.svd.split(conv, T.svd.full_rank(conv)))
        out = model(x)
    assert torch.allclose(out, ref, atol=1e-4) and torch.equal(out.argmax(1), ref.argmax(1))


def test_params_and_macs_of_a_factorized_layer_match_the_formula():
    conv = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=True)
    r = 5
    pair = T.svd.split(conv, r)
    assert metrics.count_params(pair) == r * (8 * 9 + 16) + 16 == T.svd.factorized_params(conv, r)
    h_out = w_out = 4  # 8x8 input, stride 2
    assert metrics.count_macs(pair, (1, 8, 8, 8))["macs"] == h_out * w_out * (r * 8 * 9 + 16 * r)


def _conv_with_singular_values(values):
    """A 4-output 3x3 conv (weight 4 x 18) whose singular values are `values`."""
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(4, 4, dtype=torch.double))
    v, _ = torch.linalg.qr(torch.randn(18, 4, dtype=torch.double))
    conv = nn.Conv2d(2, 4, 3, bias=False)
    with torch.no_grad():
        conv.weight.copy_((u @ torch.diag(torch.tensor(values, dtype=torch.double)) @ v.T).view(4, 2, 3, 3))
    return conv


@pytest.mark.parametrize("energy, rank", [(0.5, 1), (0.53, 1), (0.54, 2), (0.8, 2), (0.9, 3), (0.97, 4), (1.0, 4)])
def test_energy_rule_picks_the_smallest_rank_reaching_the_energy(energy, rank):
    conv = _conv_with_singular_values([4.0, 3.0, 2.0, 1.0])  # energy shares 16, 25, 29, 30 of 30
    assert T.svd.choose_rank(conv, "energy", energy) == rank


def test_fixed_and_fraction_rules_clamp_and_round_to_the_multiple():
    conv = nn.Conv2d(64, 128, 3)  # full rank min(128, 576) = 128
    assert T.svd.choose_rank(conv, "fixed", 500) == 128
    assert T.svd.choose_rank(conv, "fixed", 5) == 5
    assert T.svd.choose_rank(conv, "fraction", 0.25) == 32
    assert T.svd.choose_rank(conv, "fraction", 0.1) == 13  # rounded up
    assert T.svd.choose_rank(conv, "fraction", 0.1, multiple=16) == 16
    assert T.svd.choose_rank(conv, "fixed", 120, multiple=16) == 128  # never above the full rank


def test_layers_that_would_not_save_parameters_are_left_alone():
    model = models.resnet18(8)
    same, ranks, skipped = T.svd.svd(model, "fraction", 1.0)
    assert ranks == {} and len(skipped) == 16  # every 3x3 conv but the stem: 2 per block x 8 blocks
    small, ranks, skipped = T.svd.svd(model, "fraction", 0.25)
    assert skipped == [] and len(ranks) == 16
    assert metrics.count_params(small) < metrics.count_params(model) / 2
    assert "conv1" not in ranks and not any("shortcut" in n for n in ranks)
    rebuilt = models.build(T.svd.arch(models.arch_of(model), small, ranks))
    assert [tuple(t.shape) for t in rebuilt.state_dict().values()] == [tuple(t.shape) for t in small.state_dict().values()]


@pytest.mark.parametrize("values, expect", [
    ({"rank_rule": "fixed", "ranks": [8, 2.5]}, "whole rank"),
    ({"variants": [{"rank_rule": "fixed", "ranks": [0.5]}]}, "the recipe: rank value 0.5: with rank_rule 'fixed'"),
    ({"then": [{"svd": {}}]}, "needs 'rank'"),
    ({"rank_rule": "fraction", "ranks": [1.5], "variants": []}, "(0, 1]"),  # the top-level keys as the one recipe
    ({"rank_rule": "energy", "ranks": [0.9], "scratch_ranks": [2]}, "(0, 1]"),
    ({"ranks": [], "variants": []}, "at least one"),
    ({"ranks": [0.5, 0.5]}, "twice"),
    ({"rank_rule": "svd"}, "one of 'fixed'"),
    ({"rank_multiple": 0}, "out of range"),
])
def test_svd_params_are_checked_before_any_work(values, expect):
    with pytest.raises(params.ParamsError) as e:
        params.validate(values, "svd")
    assert expect in str(e.value)


def test_stage_factorizes_fine_tunes_trains_from_scratch_then_reuses(smoke_store, monkeypatch):
    # each model was factorized, fine-tuned or trained from scratch by the smoke report's 05 notebook with this
    # params file (conftest's `smoke_reports`): the stage finds each run finished in this copy of its store
    store = smoke_store("05_svd")
    p = stage_params("svd_smoke.yaml", "svd", store)
    result = factorization.run(p)
    int8 = "INT8 (x86, 128 calibration images)"
    assert result.names() == ["baseline (FP32, width 8)", "SVD 0.5 of full rank", f"SVD 0.5 of full rank → {int8}",
                              "SVD 0.25 of full rank", f"SVD 0.25 of full rank → {int8}",
                              "SVD 0.25 of full rank (from scratch)"]
    base, half, half8, quarter, quarter8, scratch = result.rows()
    assert half8["parent"] == result.models[1].ref and half8["macs"] == half["macs"] and half8["weight_bits"] == 8
    assert base["params"] > half["params"] > quarter["params"] == scratch["params"]
    assert quarter["factorized"] == scratch["factorized"]  # same architecture in both modes
    histories = result.histories()
    assert len(histories["SVD 0.25 of full rank"]) == p["epochs"]
    assert len(histories["SVD 0.25 of full rank (from scratch)"]) == p["scratch_epochs"]
    x = torch.randn(4, 3, 32, 32)
    with torch.inference_mode():  # the reloaded model is the trained one
        assert result.inference_models()["SVD 0.25 of full rank"](x).shape == (4, 10)
    speed = metrics.compare_speed(result.inference_models(), 8, rounds=1, repeats=1)
    table = factorization.table(result, speed)
    assert table.loc["baseline (FP32, width 8)", steps.SPEEDUP] == 1.0
    assert list(table["mode"].fillna("")) == ["", "posttraining", "", "posttraining", "", "scratch"]
    assert "fewer parameters" in factorization.headline(table)

    monkeypatch.setattr(train, "fit", lambda *a, **k: pytest.fail("a finished run was recomputed"))
    again = factorization.run(p)
    assert [r["test_acc"] for r in again.rows()] == [r["test_acc"] for r in result.rows()]
