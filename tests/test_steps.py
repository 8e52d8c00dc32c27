"""The one step mechanism: chains of any registered techniques, runs keyed by their parent, the registry."""

import numpy as np
import pytest
import torch

from resnet_lab import baselines, metrics, models, packed, params, registry, results, runs, stats, steps, train
from resnet_lab import techniques as T
from resnet_lab.stages import factorization, pruning, quantization

from conftest import PARAMS, smoke_baseline
from conftest import stage_params as _stage_params


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """A smoke baseline in a run store of this module."""
    root = tmp_path_factory.mktemp("store") / "runs"
    smoke_baseline(root)
    return root


STRUCTURED = {"method": "ln_structured", "scope": "layer", "amounts": [0.5]}
INT8 = {"int8": {"calibration_images": 128}}
SVD_THEN_INT8 = [{"svd": {"rank": 0.5, "epochs": 1}}, INT8]


@pytest.fixture(scope="module")
def chains(baseline):
    """04 with a structured model followed by three chains, and 05 with an SVD model followed by INT8."""
    p = _stage_params("pruning_smoke.yaml", "pruning", baseline, epochs=1, sensitivity_amounts=[], curve_amounts=[],
                      variants=[{**STRUCTURED, "then": [INT8]}, {**STRUCTURED, "then": SVD_THEN_INT8},
                                {**STRUCTURED, "then": [{"binaryconnect": {"epochs": 1}}]}])
    s = _stage_params("svd_smoke.yaml", "svd", baseline, ranks=[0.5], variants=[], scratch_ranks=[], epochs=1, then=[INT8])
    return p, pruning.run(p), s, factorization.run(s)


def test_each_link_is_its_own_run_keyed_by_its_parent_and_named_by_its_lineage(chains, baseline):
    p, result, s, svd_result = chains
    structured = "L1 structured, layer, 50% of channels"
    int8 = "INT8 (x86, 128 calibration images)"
    assert result.names() == ["baseline (FP32, width 8)", structured, f"{structured} → {int8}",
                              f"{structured} → SVD 0.5 of full rank", f"{structured} → SVD 0.5 of full rank → {int8}",
                              f"{structured} → BinaryConnect (deterministic, inner layers)"]
    assert svd_result.names() == ["baseline (FP32, width 8)", "SVD 0.5 of full rank", f"SVD 0.5 of full rank → {int8}"]
    store = runs.RunStore(baseline)
    assert len(store.runs("prune")) == 1  # the structured model, made once for its three chains
    by_ref = {m.ref: m for m in result.models}
    for m in result.models[1:]:
        parent = by_ref[m.row["parent"]]
        assert m.run.params["parent"] == parent.ref  # the parent run's key is part of the child's identity
        assert m.row["lineage"] == parent.row["lineage"] + [m.row["technique"]]
        assert m.row["links"] == parent.row["links"] + 1 and m.row["reload_exact"]
    # the same INT8 link on two parents: two runs
    assert len(store.runs("int8")) == 3
    # structured -> SVD -> INT8 rebuilds from its record: fewer channels, factorized layers, int8 kernels
    last = result.models[4]
    assert set(last.row["arch"]) >= {"shapes", "factorized", "int8"}
    assert last.row["macs"] == result.models[3].row["macs"] < result.models[1].row["macs"] < result.models[0].row["macs"]
    assert metrics.bit_widths(last.model) == {"weight_bits": 8.0, "act_bits": 8.0}
    # below pruning, every link is scored against the unpruned baseline
    assert all(m.row["pruned"] and m.row["score_w"] == result.models[0].row["params"] for m in result.models[1:])
    assert not svd_result.models[2].row["pruned"]


def test_every_run_stores_one_byte_per_image_predictions_that_give_its_accuracy(chains):
    _, result, _, _ = chains
    labels = result.ctx.dataset.test.labels
    for m in result.models:
        with np.load(m.run.path("predictions.npz"), allow_pickle=False) as z:
            assert z["test"].dtype == np.uint8 and z["test"].shape == (len(labels),)
            assert len(z["val"]) == len(result.ctx.dataset.val)
        predicted = m.run.predictions()["test"]
        assert 100 * (predicted == labels).float().mean().item() == pytest.approx(m.row["test_acc"])


def test_stage_tables_pair_every_model_with_the_baseline_from_the_stored_predictions(chains):
    _, result, _, _ = chains
    table = steps.table(result)
    assert table[steps.VERDICT].iloc[0] == "reference" and table[steps.P_BASELINE].iloc[:1].isna().all()
    labels = result.ctx.dataset.test.labels.numpy()
    reference = stats.correct(result.models[0].run.predictions()["test"].numpy(), labels)
    pairs = [stats.mcnemar(stats.correct(m.run.predictions()["test"].numpy(), labels), reference)
             for m in result.models[1:]]
    assert list(table[steps.P_BASELINE].iloc[1:]) == pytest.approx(stats.adjusted([pr.p for pr in pairs]))
    assert list(table[steps.IMAGES].iloc[1:]) == [word for _, word in stats.verdicts(pairs)]
    # one seed: no recipe is replicated, so the verdict is these images' and says so
    assert set(table[steps.RECIPE].iloc[1:]) == {stats.NEEDS} and (table[steps.VERDICT] == table[steps.IMAGES]).all()
    for (name, row), m in zip(table.iterrows(), result.models):
        lo, hi = map(float, row[steps.ACC_CI].split("–"))
        assert lo - 0.05 <= m.row["test_acc"] <= hi + 0.05, name
    for column in (steps.ACC_CI, steps.IMAGES, steps.RECIPE):  # every stage shows both verdicts
        assert column in pruning.COLUMNS and column in factorization.COLUMNS and column in quantization.COLUMNS


def test_chains_are_reused_when_finished(chains, monkeypatch):
    p, result, s, svd_result = chains

    def no_work(*a, **k):
        raise AssertionError("a finished run was recomputed")

    monkeypatch.setattr(train, "fit", no_work)
    monkeypatch.setattr(T.int8, "quantize", no_work)
    again = pruning.run(p)
    assert [m.ref for m in again.models] == [m.ref for m in result.models]
    assert [m.row["test_acc"] for m in again.models] == [m.row["test_acc"] for m in result.models]


def test_a_step_that_cannot_follow_is_refused_before_any_work(baseline, tmp_path):
    for then, expect in (([INT8, "fp16"], "must be the last step"), ([{"svd": {"rank": 1.5}}], "lies in (0, 1]")):
        p = _stage_params("pruning_smoke.yaml", "pruning", baseline, variants=[{**STRUCTURED, "then": then}])
        before = sorted(str(r) for r in runs.RunStore(baseline).runs())
        with pytest.raises(params.ParamsError, match=expect.replace("(", r"\(").replace(")", r"\)").replace("]", r"\]")):
            pruning.run(p)
        assert sorted(str(r) for r in runs.RunStore(baseline).runs()) == before  # nothing created


def test_a_fine_tune_torch_cannot_schedule_is_refused_before_its_run_folder(baseline):
    # Before: a batch as large as the training set (448 smoke images: one step per epoch) made OneCycleLR divide by
    # zero mid-training, after the step's run folder existed (issue 17, item 4).
    p = _stage_params("pruning_smoke.yaml", "pruning", baseline, batch_size=448, epochs=4, sensitivity_amounts=[],
                      curve_amounts=[], variants=[STRUCTURED])
    before = {str(r) for r in runs.RunStore(baseline).runs()}
    with pytest.raises(params.ParamsError, match="scheduler 'onecycle' cannot warm up over exactly one step"):
        pruning.run(p)
    new = [r for r in runs.RunStore(baseline).runs() if str(r) not in before]
    assert all(r.done for r in new) and not [r for r in new if r.stage == "prune"]  # analyses finished, no orphan


def test_seeds_give_one_run_per_seed_told_apart_by_name(baseline):
    qp = _stage_params("quantization_smoke.yaml", "quantization", baseline, methods=["binaryconnect"], epochs=1,
                       binaryconnect=[{"seeds": [0, 1]}])
    result = quantization.run(qp)
    a, b = result.models[1:]
    assert (a.row["seed"], b.row["seed"]) == (0, 1) and a.run.key != b.run.key
    assert {k: v for k, v in a.run.params.items() if k != "seed"} == {k: v for k, v in b.run.params.items() if k != "seed"}
    assert result.names()[1:] == [f"{a.name}, seed 0", f"{a.name}, seed 1"]


def test_a_stage_replicated_over_baseline_seeds_reads_each_model_against_its_own_seed(baseline):
    bp = params.load(PARAMS / "smoke.yaml", "baseline")
    bp.update(run_root=str(baseline), progress=False)
    baselines.train(bp, 1)  # the smoke baseline's replicate of seed 1
    s = _stage_params("svd_smoke.yaml", "svd", baseline, ranks=[0.5], variants=[], scratch_ranks=[], epochs=1, then=[],
                      baseline_seeds=[0, 1])
    result = factorization.run(s)
    assert result.replicated() and len(result.roots()) == 2
    assert [m.row["seed"] for m in result.models] == [0, 0, 1, 1]
    # one naming rule with 06's (`results.names`): the reference seed's lineage plain, a replicate's with its seed
    assert result.names() == ["baseline (FP32, width 8)", "SVD 0.5 of full rank",
                              "baseline (FP32, width 8), seed 1", "SVD 0.5 of full rank, seed 1"]
    roots = [result.root_of(m) for m in result.models]
    assert [r.row["seed"] for r in roots] == [0, 0, 1, 1]
    df = steps.table(result)
    for (name, row), root in zip(df.iterrows(), roots):
        assert row[steps.DELTA] == pytest.approx(result.models[list(df.index).index(name)].row["test_acc"] - root.row["test_acc"])
    assert df[steps.VERDICT].iloc[[0, 2]].tolist() == ["reference", "seed 1"]
    spread = result.seeds_table()
    assert list(spread["n"]) == [2, 2] and list(spread["technique"]) == ["baseline", "svd"]
    deltas = [m.row["test_acc"] - r.row["test_acc"] for m, r in zip(result.models, roots) if m.row["technique"] == "svd"]
    assert spread.iloc[1]["Δ mean (pt)"] == pytest.approx(np.mean(deltas))
    assert spread.iloc[1][steps.RECIPE] in (stats.BETTER, stats.WORSE, stats.SAME)
    assert df[steps.BASIS].iloc[1] == "recipe over 2 seeds" and df[steps.VERDICT].iloc[1] == spread.iloc[1][steps.RECIPE]
    assert result.verdicts().spread.n == 2  # the baseline's seeds found in the store: the seed noise is measured
    assert "training seeds" in results.noise(result.verdicts())
    # the replicate's runs are keyed by its own baseline: a rerun reuses all of them
    again = factorization.run(s)
    assert [m.run.key for m in again.models] == [m.run.key for m in result.models]


def test_quantization_starts_from_the_model_its_params_name(baseline, chains):
    _, pruned, _, _ = chains
    link = {"prune": {"method": "ln_structured", "scope": "layer", "amount": 0.5, "round_to": 1, "epochs": 1,
                      "batch_size": 32}}
    qp = _stage_params("quantization_smoke.yaml", "quantization", baseline, start=[link], methods=["int8"])
    result = quantization.run(qp)
    start, int8 = result.models
    assert start.row["technique"] == "prune" and int8.row["parent"] == start.ref
    assert int8.name == f"{start.name} → INT8 (x86, 128 calibration images)"
    assert metrics.count_macs(int8.model)["macs"] == start.row["macs"]


def test_a_link_in_a_chain_resolves_like_the_notebooks_own_recipe():
    """A `prune` link given in 03's `start` resolves to the settings 04 gives the same recipe (the default files share
    their fine-tuning recipe), so both find one run; a link fine-tunes with its stage's recipe unless it sets its own."""
    p = params.load(PARAMS / "pruning.yaml", "pruning")
    variant = next(v for v in p["variants"] if v["method"] == "ln_structured")
    tech = registry.get("prune")
    given = {"method": "ln_structured", "scope": "global", "amount": 0.6, "epochs": variant["epochs"], "lr": variant["lr"]}
    q = params.load(PARAMS / "quantization.yaml", "quantization")
    assert tech.normalize(steps.link_settings("prune", given, q)) == tech.normalize(pruning.link_settings(variant, 0.6, p))
    bc = steps.link_settings("binaryconnect", {"lr": 0.01}, p)
    assert bc["epochs"] == p["epochs"] and bc["optimizer"] == p["optimizer"] and bc["lr"] == 0.01 and bc["layers"] == "inner"
    assert steps.link_settings("int8", {}, p) == {"backend": q["int8_backend"], "calibration_images": q["calibration_images"]}


@pytest.mark.parametrize("profile", ["", "_full", "_smoke"])
def test_every_int8_of_a_profile_calibrates_on_one_number_of_images(profile):
    """03's INT8 and the INT8 links at the end of 04's and 05's chains take the stage's `calibration_images`
    (Technique.inherit), and each profile's three stage files agree on it: the full profile once calibrated
    03's on 2,048 images and the chains' on 1,024."""
    sizes = set()
    for stage, file in (("quantization", "quantization"), ("pruning", "pruning"), ("svd", "svd")):
        p = params.validate(params.read_yaml(PARAMS / f"{file}{profile}.yaml"), stage)
        sizes.add(steps.link_settings("int8", {}, p)["calibration_images"])
        sizes.add(p["calibration_images"])
        assert steps.link_settings("int8", {}, {**p, "calibration_images": 256})["calibration_images"] == 256
        assert steps.link_settings("int8", {"calibration_images": 64}, p)["calibration_images"] == 64  # a link may say
    assert len(sizes) == 1


def test_models_build_rebuilds_any_order_of_structural_steps(tmp_path):
    torch.manual_seed(0)
    model = models.resnet18(8).eval()
    arch = models.arch_of(model)
    x = torch.randn(2, 3, 32, 32)
    small, _ = T.prune.structured(model, 0.5, scope="layer")
    small_arch = T.prune.structured_arch(arch, small)
    then_svd, ranks, _ = T.svd.svd(small, "fraction", 0.5)
    svd_first, ranks2, _ = T.svd.svd(model, "fraction", 0.5)
    svd_arch = T.svd.arch(arch, svd_first, ranks2)
    svd_then_pruned, _ = T.prune.structured(svd_first, 0.5, scope="layer")
    for made, record in ((then_svd, T.svd.arch(small_arch, then_svd, ranks)),
                         (svd_then_pruned, T.prune.structured_arch(svd_arch, svd_then_pruned)),
                         (T.half.half(then_svd), T.half.half_arch(T.svd.arch(small_arch, then_svd, ranks), torch.float16))):
        path = packed.save_model(made, tmp_path / "m.pt", record)
        with torch.inference_mode():
            assert torch.equal(packed.load_model(path)(x), made.eval()(x))


