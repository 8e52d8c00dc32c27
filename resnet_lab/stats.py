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

Two questions hide behind "is this model worse?", and the lab answers both:

- **this model, on these images**: the model against the baseline it was made from, paired image by image
  (`mcnemar`, adjusted over the table). It says nothing about another training run of the same recipe.
- **this recipe, over training seeds**: the recipe applied to several baselines (one per training seed) and/or
  fine-tuned with several seeds; each replicate's Δ is taken against its own parent baseline, so the baseline's
  seed luck cancels and what is left is the spread of the Δ itself. `pooled_sd` pools that spread over the
  recipes of a table (a randomized block design: the baseline seed is the block, the residual variance is
  shared, so two replicates per recipe already give many degrees of freedom); `recipe_p` is the t-test of one
  recipe's mean Δ against that pooled spread. A recipe with one replicate gets no verdict ("needs replicates"):
  never one borrowed from the baseline's absolute spread over seeds, which is far wider than the spread of a Δ
  (a child inherits its parent's luck).
- `spread`: mean, standard deviation and the 95% t-interval of the mean of values over seeds.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats as sp

LEVEL = 0.95
ALPHA = 0.05
BETTER, WORSE, SAME = "better", "worse", "no detectable difference"
NEEDS = "needs replicates"  # a recipe made once: its spread over seeds is not measured


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


def pooled_sd(groups: list[list[float]] | list[np.ndarray]) -> tuple[float, int]:
    """The standard deviation of a Δ pooled over recipes (each recipe's Δs about their own mean; the recipes with one
    replicate add nothing) and its degrees of freedom, Σ(n − 1): (nan, 0) when no recipe has two replicates."""
    sq, df = 0.0, 0
    for g in groups:
        d = np.asarray(g, float)
        if d.size >= 2:
            sq += float(((d - d.mean()) ** 2).sum())
            df += d.size - 1
    return (float(np.sqrt(sq / df)), df) if df else (float("nan"), 0)


def recipe_p(deltas: list[float] | np.ndarray, sd: float, df: int) -> float:
    """Two-sided p-value of the t-test that a recipe's mean Δ over its replicates is 0, with the pooled `sd` on
    `df` degrees of freedom (`pooled_sd`): t = mean / (sd / √n). nan below 2 replicates or without a pooled sd;
    with sd = 0 (every Δ exactly repeated): 1 for a mean of 0, else 0."""
    d = np.asarray(deltas, float)
    if d.size < 2 or df < 1 or np.isnan(sd):
        return float("nan")
    mean = float(d.mean())
    if sd == 0:
        return 1.0 if mean == 0 else 0.0
    return float(2 * sp.t.sf(abs(mean) / (sd / np.sqrt(d.size)), df))


def resolution(sd: float, df: int, n: int, alpha: float = ALPHA) -> float:
    """The smallest mean Δ (pt) a recipe on `n` replicates can be told apart from 0 with (before adjustment), with
    the pooled `sd` on `df` degrees of freedom: t(df) · sd / √n; nan without a pooled sd."""
    if df < 1 or np.isnan(sd):
        return float("nan")
    return float(sp.t.ppf(1 - alpha / 2, df) * sd / np.sqrt(n))


def signed(p: float, delta: float, alpha: float = ALPHA) -> str:
    """"better" / "worse" by the sign of `delta` when the (adjusted) p-value is below `alpha`, else "no detectable
    difference"."""
    if np.isnan(p) or p >= alpha or delta == 0:
        return SAME
    return BETTER if delta > 0 else WORSE
