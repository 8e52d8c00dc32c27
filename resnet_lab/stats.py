"""How far an accuracy, and a difference of two accuracies on the same test images, can be read.

One seed on 1,017 test images puts about ±2.6 pt (95%) on a single accuracy, but two models scored on the same
images are compared more sharply by pairing them image by image: only the images on which they disagree carry
information. Here:

- `wilson`: the 95% Wilson score interval of an accuracy (scipy's `binomtest(...).proportion_ci`), which stays
  inside [0, 100] and keeps its coverage near 0% and 100%, unlike the normal approximation;
- `mcnemar`: McNemar's exact test on per-image correctness of two models (an exact binomial test of the
  discordant images: right by one and wrong by the other), two-sided;
- `verdicts`: one plain word per comparison, "better", "worse" or "no detectable difference", with the p-values
  of a table adjusted together (Benjamini-Hochberg, scipy's `false_discovery_control`), so that a table of twenty
  comparisons does not name a winner by chance.

The test set is one source of noise; the training seed is the other (another seed, or another CPU's rounding,
gives another trajectory). With the baseline trained on several seeds:

- `spread`: mean, standard deviation and the 95% t-interval of the mean of one model's accuracies over seeds;
- `seed_band`: how far a model's Δ against the baseline moves by seed noise alone (95%), from the baseline's
  spread over its seeds, assuming a compressed model varies over seeds as much as the baseline does;
- `seed_test`: with the model itself trained on ≥ 2 seeds, each paired with the baseline of its own seed, the
  one-sample t-test of those Δs;
- `overall`: a difference is "better" or "worse" only when the test-set test *and* the seed noise both say so.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats as sp

LEVEL = 0.95
ALPHA = 0.05
BETTER, WORSE, SAME = "better", "worse", "no detectable difference"


def wilson(correct: int, n: int, level: float = LEVEL) -> tuple[float, float]:
    """The Wilson score interval (in %) of `correct` right answers out of `n`."""
    if n <= 0:
        raise ValueError("an accuracy needs at least one image")
    ci = sp.binomtest(int(correct), int(n)).proportion_ci(confidence_level=level, method="wilson")
    return 100 * ci.low, 100 * ci.high


@dataclass(frozen=True)
class Paired:
    """Model A against model B on the same images: accuracies (%), the discordant counts, the exact p-value."""

    acc_a: float
    acc_b: float
    a_only: int  # images A gets right and B wrong
    b_only: int  # images B gets right and A wrong
    p: float

    @property
    def delta(self) -> float:
        """A's accuracy minus B's, in points."""
        return self.acc_a - self.acc_b


def correct(predictions: np.ndarray | list, labels: np.ndarray | list) -> np.ndarray:
    """Per-image correctness of predicted classes."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if predictions.shape != labels.shape:
        raise ValueError(f"{predictions.shape[0] if predictions.ndim else 0} predictions for {labels.shape[0]} images: "
                         "the two were not made on the same test set")
    return predictions == labels


def mcnemar(right_a: np.ndarray, right_b: np.ndarray) -> Paired:
    """McNemar's exact test of two models' per-image correctness on the same images (two-sided; p = 1 when
    they never disagree)."""
    right_a, right_b = np.asarray(right_a, bool), np.asarray(right_b, bool)
    if right_a.shape != right_b.shape or right_a.ndim != 1:
        raise ValueError("the two models must be scored on the same images")
    a_only, b_only = int((right_a & ~right_b).sum()), int((right_b & ~right_a).sum())
    p = sp.binomtest(a_only, a_only + b_only, 0.5).pvalue if a_only + b_only else 1.0
    n = len(right_a)
    return Paired(100 * right_a.mean() if n else float("nan"), 100 * right_b.mean() if n else float("nan"),
                  a_only, b_only, float(min(p, 1.0)))


def pooled(pairs: list[Paired]) -> Paired:
    """The paired comparisons of one model against its baseline over several seeds pooled: accuracies averaged,
    discordant images summed, McNemar's exact test on the sums."""
    a, b = sum(pr.a_only for pr in pairs), sum(pr.b_only for pr in pairs)
    p = sp.binomtest(a, a + b, 0.5).pvalue if a + b else 1.0
    return Paired(float(np.mean([pr.acc_a for pr in pairs])), float(np.mean([pr.acc_b for pr in pairs])), a, b,
                  float(min(p, 1.0)))


def adjusted(p_values: list[float]) -> list[float]:
    """Benjamini-Hochberg adjusted p-values of one table's comparisons (the false discovery rate)."""
    if not p_values:
        return []
    return [float(q) for q in sp.false_discovery_control(np.asarray(p_values, float), method="bh")]


def verdict(pair: Paired, p: float | None = None, alpha: float = ALPHA) -> str:
    """"better" / "worse" when the (adjusted) p-value is below `alpha`, else "no detectable difference"."""
    p = pair.p if p is None else p
    if p >= alpha or pair.a_only == pair.b_only:
        return SAME
    return BETTER if pair.a_only > pair.b_only else WORSE


def verdicts(pairs: list[Paired], alpha: float = ALPHA) -> list[tuple[float, str]]:
    """For each comparison of one table: its adjusted p-value and its verdict."""
    qs = adjusted([pr.p for pr in pairs])
    return [(q, verdict(pr, q, alpha)) for pr, q in zip(pairs, qs)]


def interval(right: np.ndarray) -> tuple[float, float]:
    """The Wilson interval (in %) of an accuracy given as per-image correctness."""
    return wilson(int(np.sum(right)), len(right))


def against(reference: np.ndarray, models: dict[str, np.ndarray], alpha: float = ALPHA) -> dict[str, tuple[float, str]]:
    """Each model paired with the reference on the same images (McNemar), the p-values of them all adjusted
    together: {name: (adjusted p, verdict)}."""
    names = list(models)
    return dict(zip(names, verdicts([mcnemar(models[n], reference) for n in names], alpha)))


def interval_text(lo: float, hi: float) -> str:
    return f"{lo:.1f}–{hi:.1f}"


@dataclass(frozen=True)
class Spread:
    """Values over seeds: how many, their mean, their sample standard deviation (nan below 2) and the 95%
    t-interval of the mean (nan below 2)."""
    n: int
    mean: float
    sd: float
    low: float
    high: float

    def text(self, digits: int = 2) -> str:
        if self.n < 2:
            return f"{self.mean:.{digits}f} (1 seed)"
        return f"{self.mean:.{digits}f} ± {self.sd:.{digits}f} (n={self.n})"


def spread(values: list[float] | np.ndarray, level: float = LEVEL) -> Spread:
    v = np.asarray(values, float)
    if v.size == 0:
        raise ValueError("a spread needs at least one value")
    mean = float(v.mean())
    if v.size < 2:
        return Spread(1, mean, float("nan"), float("nan"), float("nan"))
    sd = float(v.std(ddof=1))
    half = float(sp.t.ppf(0.5 + level / 2, v.size - 1)) * sd / np.sqrt(v.size)
    return Spread(int(v.size), mean, sd, mean - half, mean + half)


def seed_band(baseline: Spread, n: int = 1, level: float = LEVEL) -> float:
    """Half-width (pt) of the band within which the mean over `n` seeds of a model's Δ against the baseline (each
    Δ against a baseline of another seed, or of the same seed's replicate) falls by seed noise alone, at `level`:
    t(k−1) · sd · √(2/n), with `baseline` the spread of the baseline over its k seeds (the model assumed to vary
    over seeds like the baseline). nan when the baseline has fewer than 2 seeds (the spread is not measured)."""
    if baseline.n < 2:
        return float("nan")
    return float(sp.t.ppf(0.5 + level / 2, baseline.n - 1)) * baseline.sd * float(np.sqrt(2 / n))


def seed_test(deltas: list[float] | np.ndarray) -> float:
    """Two-sided p-value of the one-sample t-test that a model's Δs over seeds (each against the baseline of its
    own seed) have mean 0; nan below 2 seeds, 1 when every Δ is 0."""
    d = np.asarray(deltas, float)
    if d.size < 2:
        return float("nan")
    if np.allclose(d, d[0]):
        return 1.0 if d[0] == 0 else 0.0
    return float(sp.ttest_1samp(d, 0.0).pvalue)


def overall(test_verdict: str, delta: float, band: float = float("nan"), seed_p: float = float("nan"),
            alpha: float = ALPHA) -> str:
    """The verdict of a Δ read against both sources of noise: the test-set verdict (paired test) stands only if
    the seeds agree: with the model on ≥ 2 seeds, their t-test (`seed_p`) is below `alpha`; else, with the
    baseline's spread measured, |Δ| exceeds the seed band. Neither measured: the test-set verdict alone."""
    if test_verdict not in (BETTER, WORSE):
        return test_verdict
    if not np.isnan(seed_p):
        return test_verdict if seed_p < alpha else SAME
    if not np.isnan(band):
        return test_verdict if abs(delta) > band else SAME
    return test_verdict


def over_seeds(accs: list[float], deltas: list[float], pairs: list[Paired]) -> dict[str, object]:
    """One recipe over its seeds: its test accuracies, its Δs (each against the baseline of its own seed) and
    those paired comparisons: the figures of a row of a seeds table (p-values raw; `adjust_over_seeds` adjusts a
    table's and gives each row its verdict)."""
    a, d = spread(accs), spread(deltas)
    pooled_pair = pooled(pairs)
    return {"n": a.n, "test mean ± sd (%)": a.text(), "test mean (%)": a.mean, "test sd (pt)": a.sd,
            "Δ mean ± sd (pt)": d.text(), "Δ mean (pt)": d.mean, "Δ sd (pt)": d.sd,
            "Δ 95% interval (pt)": interval_text(d.low, d.high), "p (seeds, t-test)": seed_test(deltas),
            "p (pooled test images)": pooled_pair.p, "_pooled": pooled_pair}


def adjust_over_seeds(rows: list[dict], verdict_key: str, alpha: float = ALPHA) -> None:
    """The rows of one seeds table (from `over_seeds`; a row without a Δ, the baseline's, is left alone): both
    p-value columns adjusted over the table (Benjamini–Hochberg), and each row's verdict: "better" / "worse" only
    when the pooled paired test and the seeds' t-test both fall below `alpha`."""
    judged = [r for r in rows if "_pooled" in r]
    for col in ("p (seeds, t-test)", "p (pooled test images)"):
        ps = [r[col] for r in judged]
        finite = [i for i, p in enumerate(ps) if not np.isnan(p)]
        for i, q in zip(finite, adjusted([ps[i] for i in finite])):
            judged[i][col] = q
    for r in judged:
        pair = r.pop("_pooled")
        r[verdict_key] = overall(verdict(pair, r["p (pooled test images)"], alpha), r["Δ mean (pt)"],
                                 seed_p=r["p (seeds, t-test)"], alpha=alpha)
