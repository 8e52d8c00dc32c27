"""The statistics every accuracy and every difference is read with (resnet_lab/stats.py), on hand-made cases."""
import math

import numpy as np
import pytest

from resnet_lab import stats


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


def test_the_seed_band_grows_with_the_baseline_spread_and_shrinks_with_the_model_seeds():
    base = stats.spread([72.0, 74.0, 76.0])  # sd 2 over 3 seeds
    assert stats.seed_band(base) == pytest.approx(4.302653 * 2 * math.sqrt(2), rel=1e-5)
    assert stats.seed_band(base, n=2) == pytest.approx(4.302653 * 2, rel=1e-5)
    assert math.isnan(stats.seed_band(stats.spread([73.0])))  # one seed: the seed noise is not measured


def test_a_test_set_verdict_stands_only_when_the_seeds_support_it():
    # 60 more images right: the paired test says better ...
    pair = stats.mcnemar(np.r_[np.ones(60, bool), np.zeros(940, bool)], np.zeros(1000, bool))
    assert stats.verdict(pair) == stats.BETTER
    # ... but a +6 pt Δ inside a ±11 pt seed band is no finding
    assert stats.overall(stats.BETTER, 6.0, band=11.3) == stats.SAME
    assert stats.overall(stats.BETTER, 6.0, band=3.0) == stats.BETTER
    assert stats.overall(stats.WORSE, -6.0) == stats.WORSE  # no seed spread measured: the test set alone
    assert stats.overall(stats.SAME, 6.0, band=0.1) == stats.SAME  # the test set never supported it
    # with the model on several seeds, their t-test decides the seed side
    assert stats.overall(stats.BETTER, 6.0, band=11.3, seed_p=0.01) == stats.BETTER
    assert stats.overall(stats.BETTER, 6.0, band=0.1, seed_p=0.2) == stats.SAME


def test_the_seed_t_test_and_the_pooled_paired_test():
    assert stats.seed_test([-3.1, -2.9, -3.0]) < 0.001  # consistently worse on every seed
    assert stats.seed_test([-3.0, 2.5, 0.4]) > 0.5  # the sign flips with the seed
    assert stats.seed_test([0.0, 0.0]) == 1.0 and math.isnan(stats.seed_test([1.0]))
    a = np.r_[np.ones(20, bool), np.zeros(80, bool)]
    b = np.r_[np.zeros(10, bool), np.ones(10, bool), np.zeros(80, bool)]
    one = stats.mcnemar(a, b)  # 10 images only a gets right, none only b
    both = stats.pooled([one, one])
    assert (both.a_only, both.b_only) == (20, 0) and both.p < one.p
    assert both.acc_a == pytest.approx(20.0) and both.acc_b == pytest.approx(10.0)


def test_a_seeds_table_is_adjusted_together_and_needs_both_tests():
    right = np.zeros(1000, bool)
    better = np.r_[np.ones(60, bool), np.zeros(940, bool)]  # 60 more images right on every seed
    consistent = stats.over_seeds([76.0, 76.1, 75.9], [6.0, 6.1, 5.9], [stats.mcnemar(better, right)] * 3)
    erratic = stats.over_seeds([79.0, 70.0, 76.0], [9.0, 0.1, 6.0], [stats.mcnemar(better, right)] * 3)
    rows = [{"model": "baseline"}, {"model": "a", **consistent}, {"model": "b", **erratic}]
    stats.adjust_over_seeds(rows, "verdict")
    assert "verdict" not in rows[0] and "_pooled" not in rows[1]
    assert rows[1]["verdict"] == stats.BETTER  # both the pooled test and the seeds agree
    assert rows[2]["verdict"] == stats.SAME  # the test images agree, the seeds do not
    assert rows[2]["p (seeds, t-test)"] >= stats.seed_test([9.0, 0.1, 6.0])  # adjusted, never smaller
