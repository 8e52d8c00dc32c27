"""The statistics every accuracy and every difference is read with (resnet_lab/stats.py), on hand-made cases."""
import dataclasses
import math

import numpy as np
import pytest

from resnet_lab import results, stats


def _wilson_by_formula(k, n, z=1.959963984540054):
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return 100 * (centre - half), 100 * (centre + half)


def test_wilson_interval_matches_the_closed_form_and_a_published_value():
    # Newcombe (1998), Statistics in Medicine 17:857, example 81/263: Wilson 0.2553 to 0.3662
    lo, hi = stats.wilson(81, 263)
    assert (round(lo / 100, 4), round(hi / 100, 4)) == (0.2553, 0.3662)
    for k, n in ((746, 1017), (0, 50), (50, 50), (1, 3)):
        assert stats.wilson(k, n) == pytest.approx(_wilson_by_formula(k, n), abs=1e-9)
    lo, hi = stats.wilson(746, 1017)  # the baseline's accuracy on the mini test set: about ±2.7 pt
    assert 2.5 < (hi - lo) / 2 < 2.9
    assert stats.wilson(0, 50)[0] == 0 and stats.wilson(50, 50)[1] == pytest.approx(100)
    with pytest.raises(ValueError):
        stats.wilson(0, 0)


def test_identical_predictions_show_no_difference_with_p_1():
    right = np.random.default_rng(0).random(1017) < 0.73
    pair = stats.mcnemar(right, right.copy())
    assert pair.p == 1.0 and pair.a_only == pair.b_only == 0 and pair.delta == 0
    assert stats.verdict(pair) == stats.SAME


def test_a_model_right_on_60_more_images_and_wrong_on_none_is_better():
    labels = np.arange(1017) % 10
    b = labels.copy()
    b[:300] = (labels[:300] + 1) % 10  # B wrong on the first 300 images
    a = b.copy()
    a[:60] = labels[:60]  # A right on 60 of them, wrong nowhere B is right
    pair = stats.mcnemar(stats.correct(a, labels), stats.correct(b, labels))
    assert (pair.a_only, pair.b_only) == (60, 0)
    assert pair.p < 0.001 and pair.p == pytest.approx(2 * 0.5 ** 60)
    assert pair.delta == pytest.approx(100 * 60 / 1017)
    assert stats.verdict(pair) == stats.BETTER
    assert stats.verdict(stats.mcnemar(stats.correct(b, labels), stats.correct(a, labels))) == stats.WORSE


def test_a_balanced_disagreement_is_no_detectable_difference():
    a = np.zeros(1000, bool)
    b = np.zeros(1000, bool)
    a[:30], b[30:55] = True, True  # 30 images only A gets right, 25 only B: +0.5 pt, far from significant
    pair = stats.mcnemar(a, b)
    assert 0.5 < pair.p < 1 and stats.verdict(pair) == stats.SAME


def test_a_table_of_comparisons_is_adjusted_together():
    # Benjamini-Hochberg by hand: sorted 0.01, 0.03, 0.04, 0.2 → 0.04, 0.0533, 0.0533, 0.2
    assert stats.adjusted([0.01, 0.04, 0.03, 0.2]) == pytest.approx([0.04, 0.16 / 3, 0.16 / 3, 0.2])
    assert stats.adjusted([]) == []
    # 20 images only A gets right against 7 only B (p = 0.019): "better" alone, not among twenty comparisons of
    # which the other nineteen show nothing (adjusted: min(20 p, 1) = 0.38)
    a, b = np.zeros(1000, bool), np.zeros(1000, bool)
    a[:20], b[20:27] = True, True
    alone = stats.mcnemar(a, b)
    assert alone.p == pytest.approx(0.0191573, rel=1e-5) and stats.verdict(alone) == stats.BETTER
    (q, word), *rest = stats.verdicts([alone] + [stats.mcnemar(a, a)] * 19)
    assert q == pytest.approx(20 * alone.p) and word == stats.SAME
    assert rest == [(1.0, stats.SAME)] * 19


def test_models_scored_on_different_images_are_refused():
    with pytest.raises(ValueError, match="same test set"):
        stats.correct(np.zeros(10), np.zeros(12))
    with pytest.raises(ValueError, match="same images"):
        stats.mcnemar(np.zeros(10, bool), np.zeros(12, bool))


def test_the_baseline_report_gives_each_accuracy_its_interval():
    from resnet_lab import plots

    m = {"test_acc": 100 * 746 / 1017, "val_acc": 100 * 304 / 407, "test_loss": 1.0, "params": 1, "nonzero_params": 1,
         "macs": 1, "size_bytes": 1, "batch_size": 128, "throughput_img_s": 1.0, "latency_ms": 1.0, "train_time_s": 1.0,
         "train_and_eval_time_s": 1.0, "train_device": "cpu"}
    table = plots.metrics_table(m, 1017, 407)
    lo, hi = stats.wilson(746, 1017)
    assert table.loc["test accuracy (%)", "value"] == f"73.35 (95%: {lo:.1f}–{hi:.1f}, 1,017 images)"
    assert "407 images" in table.loc["validation accuracy (%)", "value"]


def test_models_paired_with_one_reference_are_judged_together():
    reference = np.zeros(1000, bool)
    better, same = reference.copy(), reference.copy()
    better[:60] = True
    judged = stats.against(reference, {"better": better, "same": same})
    assert judged["same"] == (1.0, stats.SAME)
    assert judged["better"][1] == stats.BETTER and judged["better"][0] == pytest.approx(2 * 2 * 0.5 ** 60)
    assert stats.interval(better) == stats.wilson(60, 1000)


def test_a_spread_over_seeds_gives_mean_sample_sd_and_the_t_interval():
    s = stats.spread([72.0, 74.0, 76.0])
    assert (s.n, s.mean, s.sd) == (3, 74.0, 2.0)
    # t(2, 0.975) = 4.3027: mean ± 4.3027 · 2 / √3
    assert (s.low, s.high) == pytest.approx((74 - 4.96837, 74 + 4.96837), abs=1e-4)
    assert s.text() == "74.00 ± 2.00 (n=3)"
    one = stats.spread([73.5])
    assert one.n == 1 and math.isnan(one.sd) and one.text() == "73.50 (1 seed)"
    with pytest.raises(ValueError):
        stats.spread([])


def test_the_pooled_spread_of_a_delta_by_hand():
    # recipe a: Δs -5.2, -4.8 (mean -5, squares 0.04 + 0.04); recipe b: 0.5, -0.5, 0 (mean 0, squares 0.25 + 0.25 + 0);
    # recipe c: one replicate adds nothing
    sd, df = stats.pooled_sd([[-5.2, -4.8], [0.5, -0.5, 0.0], [1.0]])
    assert df == 3 and sd == pytest.approx(math.sqrt(0.58 / 3))
    assert stats.pooled_sd([[1.0], [2.0]]) == (pytest.approx(float("nan"), nan_ok=True), 0)


def test_the_recipe_test_against_scipy():
    from scipy import stats as sp

    deltas = [-3.1, -2.9, -3.4, -2.6]
    sd, df = stats.pooled_sd([deltas])
    # one recipe: the pooled test is the one-sample t-test
    assert stats.recipe_p(deltas, sd, df) == pytest.approx(sp.ttest_1samp(deltas, 0.0).pvalue, rel=1e-9)
    # pooled with another recipe's spread: t = mean / (sd / √n) on the pooled degrees of freedom, by hand
    other = [0.3, -0.3, 0.1]
    sd, df = stats.pooled_sd([deltas, other])
    t = abs(np.mean(deltas)) / (sd / math.sqrt(4))
    assert df == 5 and stats.recipe_p(deltas, sd, df) == pytest.approx(2 * sp.t.sf(t, 5), rel=1e-9)
    assert math.isnan(stats.recipe_p([1.0], sd, df)) and math.isnan(stats.recipe_p([1.0, 2.0], float("nan"), 0))
    assert stats.recipe_p([0.0, 0.0], 0.0, 1) == 1.0 and stats.recipe_p([-1.0, -1.0], 0.0, 1) == 0.0


def _row(name, technique, origin, seed, acc, correct, recipe):
    return results.Row(name, technique, "g", origin, seed, acc, correct, recipe)


def _seeds_case(deltas_a, deltas_b, images=1000, seeds=(0, 1, 2)):
    """Baselines of three seeds; recipes a and b made on each, with these Δs (pt) and the images they lose or gain
    taken from the first images (identical predictions where Δ = 0)."""
    rng = np.random.default_rng(0)
    rows, bases = [], []
    for i, s in enumerate(seeds):
        base = rng.random(images) < 0.75
        b = _row(f"base {s}", "baseline", f"k{s}", s, 100 * base.mean(), base, "baseline")
        bases.append(b)
        rows.append(b)
        for recipe, d in (("a", deltas_a[i]), ("b", deltas_b[i])):
            right = base.copy()
            k = round(abs(d) * images / 100)
            flip = np.flatnonzero(right if d < 0 else ~right)[:k]
            right[flip] = d > 0
            rows.append(_row(f"{recipe} {s}", recipe, f"k{s}", s, 100 * right.mean(), right, recipe))
    return rows, bases


def test_a_recipe_losing_5_pt_on_every_seed_is_worse_at_both_levels():
    rows, bases = _seeds_case([-5.0, -5.5, -4.5], [0.5, -0.5, 0.0])
    v = results.judge(rows, bases)
    for s in (0, 1, 2):
        a, b = v[f"a {s}"], v[f"b {s}"]
        assert a.images == stats.WORSE and a.recipe.verdict == stats.WORSE and a.verdict == stats.WORSE
        assert a.basis == "recipe over 3 seeds"
        # Δ = 0 ± 0.5: no detectable difference at either level
        assert b.images == stats.SAME and b.recipe.verdict == stats.SAME
    assert v.df == 4 and v["a 0"].recipe.deltas == pytest.approx([-5.0, -5.5, -4.5])
    assert v.sd == pytest.approx(0.5)  # (0.5 + 0.5) / 4 degrees of freedom
    # what 3 seeds resolve with that spread: t(4, 0.975) = 2.776445 · 0.5 / √3
    assert results.resolution(v).loc[3].iloc[0] == pytest.approx(2.776445 * 0.5 / math.sqrt(3), rel=1e-6)
    assert v["base 0"].images == "reference" and v["base 1"].images == "seed 1" and v["base 1"].recipe is None


def test_identical_predictions_give_p_1_and_one_replicate_needs_replicates():
    right = np.r_[np.ones(700, bool), np.zeros(300, bool)]
    base = _row("base", "baseline", "k0", 0, 70.0, right, "baseline")
    same = _row("int8", "int8", "k0", 0, 70.0, right.copy(), "int8")
    v = results.judge([base, same], [base])
    assert v["int8"].p == 1.0 and v["int8"].images == stats.SAME
    assert v["int8"].recipe.verdict == stats.NEEDS and v["int8"].verdict == stats.SAME
    assert v["int8"].basis == "these test images" and "needs replicates" in results.noise(v)


def test_no_verdict_is_borrowed_from_the_baselines_absolute_spread():
    # two baselines 3.4 pt apart (the default's two seeds), a recipe 5 pt down on each: the Δ's own spread is 0.2 pt
    rows, bases = _seeds_case([-5.1, -4.9], [0.1, -0.1], seeds=(0, 1))
    v = results.judge(rows, bases, seed_accs=[76.89, 73.45])
    assert v["a 1"].recipe.verdict == stats.WORSE and v["b 1"].recipe.verdict == stats.SAME
    assert v.spread.n == 2 and "is not the noise of a Δ" in results.noise(v)
    table = results.seeds_table(rows, v)
    assert list(table["n"]) == [2, 2, 2] and table.loc["a 0", results.RECIPE] == stats.WORSE
    assert table.loc["a 0", "Δ mean (pt)"] == pytest.approx(-5.0)


def test_each_stage_pools_its_own_recipes_so_06_says_what_the_stage_said():
    # Before: 06 pooled every recipe of the store (sd 0.56 pt), 03 only its own (sd ~0.2 pt), so BinaryConnect was
    # "worse" in 03 and "no detectable difference" in 06. Recipe a (-1 pt, steady) pooled with b (0 ± 0.2) in stage
    # "03"; recipes c, d of stage "04" spread by 3 pt: pooled with them a would not be called worse.
    rows, bases = _seeds_case([-1.0, -1.1, -0.9], [0.2, -0.2, 0.0])
    noisy, _ = _seeds_case([3.0, -3.0, 0.0], [-3.0, 3.0, 0.0])
    noisy = [dataclasses.replace(r, name=r.name.replace("a", "c").replace("b", "d"), recipe=r.recipe.replace("a", "c").replace("b", "d"),
                                 pool="04") for r in noisy if r.technique != "baseline"]
    alone = results.judge(rows, bases)
    rows = [dataclasses.replace(r, pool="03") for r in rows]
    both = results.judge(rows + noisy, bases)
    assert alone["a 0"].recipe.verdict == both["a 0"].recipe.verdict == stats.WORSE
    assert both["a 0"].recipe.p == pytest.approx(alone["a 0"].recipe.p)  # 04's spread left it alone
    assert set(both.pools) == {"03", "04"} and both.pools["03"] == pytest.approx((alone.sd, alone.df))
    one = results.judge([dataclasses.replace(r, pool="") for r in rows + noisy], bases)  # one pool: a is lost
    assert one["a 0"].recipe.verdict == stats.SAME
    assert "03: sd" in both.spreads() and "04: sd" in both.spreads()
    assert list(results.resolution(both).columns) == ["smallest mean Δ called (pt), 03", "smallest mean Δ called (pt), 04"]
