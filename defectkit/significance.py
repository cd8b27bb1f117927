"""Is the challenger really better? Paired tests of two models on one frozen test set.

Both models score the same images, so their figures are correlated and a paired
test is the right one. AUROC: DeLong's test. F1 at each model's own threshold: a
paired bootstrap (Efron and Tibshirani 1993, ch. 13, percentile interval), since
F1 has no closed-form variance.

DeLong, DeLong and Clarke-Pearson (1988), "Comparing the
areas under two or more correlated receiver operating characteristic curves: a
nonparametric approach", Biometrics 44(3):837-845; computed from midranks in
O(n log n) as in Sun and Xu (2014), "Fast implementation of DeLong's algorithm
for comparing the areas under correlated receiver operating characteristic
curves", IEEE Signal Processing Letters 21(11):1389-1393.

GPU-safe: numpy and the standard library only.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from statistics import NormalDist

import numpy as np


@dataclass(frozen=True)
class PairedComparison:
    """Champion minus challenger on one test set, with a two-sided confidence interval and p-value."""

    metric: str
    champion: float
    challenger: float
    difference: float  # champion - challenger: positive when the challenger is worse
    standard_error: float
    ci_low: float
    ci_high: float
    confidence: float
    p_value: float  # of "no difference", two-sided
    n_defect: int
    n_good: int
    method: str

    def to_json(self) -> dict:
        return asdict(self)

    def within(self, allowed_drop: float) -> bool:
        """Non-inferiority: the challenger is at most ``allowed_drop`` worse at this confidence (the interval's
        upper bound of champion - challenger does not exceed it)."""
        return self.ci_high <= allowed_drop + 1e-9  # figures from counts: a tie with the margin is not a miss

    def explain(self) -> str:
        return (f"{self.metric} champion {self.champion:.4f} - challenger {self.challenger:.4f} = "
                f"{self.difference:+.4f}, {self.confidence:.0%} CI [{self.ci_low:+.4f}, {self.ci_high:+.4f}], "
                f"p = {self.p_value:.3g} ({self.method}, {self.n_defect} defect and {self.n_good} good images)")


def _midranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x`` with ties given the mean of the ranks they span."""
    order = np.argsort(x, kind="mergesort")
    ordered = x[order]
    # Each run of equal values [start, end) gets the rank (start + end + 1) / 2.
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    ends = np.r_[starts[1:], ordered.size]
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def _structural_components(labels: np.ndarray, scores: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """AUROC and DeLong's placement values: V10 per defect image, V01 per good image (ties count one half)."""
    positive, negative = scores[labels == 1], scores[labels == 0]
    m, n = positive.size, negative.size
    rank_all = _midranks(np.concatenate([positive, negative]))
    rank_positive, rank_negative = _midranks(positive), _midranks(negative)
    v10 = (rank_all[:m] - rank_positive) / n  # share of good images each defect image outscores
    v01 = 1.0 - (rank_all[m:] - rank_negative) / m  # share of defect images that outscore each good image
    return float(v10.mean()), v10, v01


def delong_test(labels: np.ndarray, champion_scores: np.ndarray, challenger_scores: np.ndarray,
                confidence: float = 0.95) -> PairedComparison:
    """DeLong's paired test of image AUROC, champion minus challenger, on the same images in the same order."""
    labels = np.asarray(labels).astype(np.int64).ravel()
    champion_scores = np.asarray(champion_scores, dtype=np.float64).ravel()
    challenger_scores = np.asarray(challenger_scores, dtype=np.float64).ravel()
    _check_paired(labels, champion_scores, challenger_scores, "AUROC test")
    if not set(np.unique(labels).tolist()) <= {0, 1}:
        raise ValueError(f"labels must be 0 (good) or 1 (defect), got {sorted(set(labels.tolist()))}")
    m, n = int(labels.sum()), int(labels.size - labels.sum())
    if m < 2 or n < 2:
        raise ValueError(f"a paired AUROC test needs at least two defect and two good images; the test set has "
                         f"{m} defect and {n} good")
    if not (np.all(np.isfinite(champion_scores)) and np.all(np.isfinite(challenger_scores))):
        raise ValueError("scores must be finite for a paired AUROC test")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence!r} must be in (0, 1)")
    auc_a, v10_a, v01_a = _structural_components(labels, champion_scores)
    auc_b, v10_b, v01_b = _structural_components(labels, challenger_scores)
    s10 = np.cov(np.vstack([v10_a, v10_b]))  # unbiased (m - 1), as in DeLong et al.
    s01 = np.cov(np.vstack([v01_a, v01_b]))
    covariance = s10 / m + s01 / n
    variance = max(0.0, float(covariance[0, 0] + covariance[1, 1] - 2 * covariance[0, 1]))
    difference = auc_a - auc_b
    se = math.sqrt(variance)
    z_crit = NormalDist().inv_cdf(0.5 + confidence / 2)
    if se == 0.0:  # both rank every pair alike: no evidence of any difference either way
        p_value = 1.0 if difference == 0 else 0.0
    else:
        p_value = 2.0 * NormalDist().cdf(-abs(difference) / se)
    return PairedComparison("image AUROC", auc_a, auc_b, difference, se, difference - z_crit * se,
                            difference + z_crit * se, confidence, p_value, m, n, "DeLong")


def _check_paired(labels: np.ndarray, champion: np.ndarray, challenger: np.ndarray, what: str) -> None:
    if not champion.size == challenger.size == labels.size:
        raise ValueError(f"the champion scored {champion.size} images, the challenger {challenger.size}, the test "
                         f"set holds {labels.size}: a paired {what} needs both models' answers for the same images")


def _f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    denominator = 2 * tp + fp + fn
    return np.divide(2 * tp, denominator, out=np.zeros(tp.shape, dtype=np.float64), where=denominator > 0)


def paired_bootstrap_f1(labels: np.ndarray, champion_flags: np.ndarray, challenger_flags: np.ndarray, *,
                        confidence: float = 0.95, resamples: int = 2000, seed: int = 0) -> PairedComparison:
    """F1 of the champion minus F1 of the challenger, each flagging defects at its own threshold, with a paired
    bootstrap: the same resampled images for both, ``resamples`` times (seeded: the same verdict every run)."""
    labels = np.asarray(labels).astype(np.int64).ravel()
    a = np.asarray(champion_flags, dtype=bool).ravel()
    b = np.asarray(challenger_flags, dtype=bool).ravel()
    _check_paired(labels, a, b, "bootstrap")
    if not set(np.unique(labels).tolist()) <= {0, 1}:
        raise ValueError(f"labels must be 0 (good) or 1 (defect), got {sorted(set(labels.tolist()))}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence!r} must be in (0, 1)")
    if resamples < 100:
        raise ValueError(f"resamples={resamples} is too few for a {confidence:.0%} interval; use at least 100")
    m, n = int(labels.sum()), int(labels.size - labels.sum())
    if m < 1 or n < 1:
        raise ValueError(f"a paired F1 test needs defect and good images; the test set has {m} defect and {n} good")
    actual = labels == 1
    # Counts per resample from how often each image was drawn: (resamples, images) @ (images,) indicators.
    draws = np.random.default_rng(seed).integers(0, labels.size, size=(resamples, labels.size))
    counts = np.zeros((resamples, labels.size), dtype=np.float64)
    np.add.at(counts, (np.repeat(np.arange(resamples), labels.size), draws.ravel()), 1.0)

    def f1_of(flags: np.ndarray) -> tuple[float, np.ndarray]:
        tp, fp, fn = (flags & actual), (flags & ~actual), (~flags & actual)
        point = _f1(np.array([tp.sum()]), np.array([fp.sum()]), np.array([fn.sum()]))[0]
        return float(point), _f1(counts @ tp, counts @ fp, counts @ fn)

    f1_a, boot_a = f1_of(a)
    f1_b, boot_b = f1_of(b)
    differences = boot_a - boot_b
    tail = (1 - confidence) / 2
    low, high = np.quantile(differences, [tail, 1 - tail])
    # Two-sided: twice the share of resamples on the far side of zero (Efron and Tibshirani, ch. 15.4).
    p_value = 1.0 if not differences.any() else min(1.0, 2 * min(float(np.mean(differences <= 0)),
                                                                 float(np.mean(differences >= 0))))
    return PairedComparison("F1", f1_a, f1_b, f1_a - f1_b, float(differences.std(ddof=1)), float(low), float(high),
                            confidence, p_value, m, n, f"paired bootstrap, {resamples} resamples")
