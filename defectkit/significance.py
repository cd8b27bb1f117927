"""Is the challenger really better? DeLong's test for two correlated AUROCs on one frozen test set.

Both models score the same images, so their AUROCs are correlated and a paired
test is the right one. DeLong, DeLong and Clarke-Pearson (1988), "Comparing the
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
    if not champion_scores.size == challenger_scores.size == labels.size:
        raise ValueError(f"the champion scored {champion_scores.size} images, the challenger "
                         f"{challenger_scores.size}, the test set holds {labels.size}: a paired test needs "
                         f"both models' scores of the same images")
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
