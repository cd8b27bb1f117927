"""The paired tests against references: DeLong's AUROC test against scikit-learn's AUROC, the paper's definitions
computed pair by pair and a paired bootstrap of scikit-learn's AUROC; the F1 bootstrap against scikit-learn's F1 on
the same resamples."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import f1_score, roc_auc_score

from defectkit.significance import delong_test, paired_bootstrap_f1


def _pair(seed: int, n_good: int = 120, n_defect: int = 90, ties: bool = False):
    rng = np.random.default_rng(seed)
    labels = np.r_[np.zeros(n_good), np.ones(n_defect)].astype(int)
    latent = rng.normal(size=labels.size) + 1.3 * labels
    champion = latent + rng.normal(scale=0.6, size=labels.size)
    challenger = latent + rng.normal(scale=0.9, size=labels.size) - 0.2 * labels
    if ties:  # scores on a coarse grid, as thresholded or quantised models give
        champion, challenger = np.round(champion, 1), np.round(challenger, 1)
    return labels, champion, challenger


def _delong_by_definition(labels, a, b):
    """DeLong et al. (1988), section 2, with psi(X, Y) = 1, 1/2, 0 evaluated for every (defect, good) pair."""
    def components(scores):
        x, y = scores[labels == 1], scores[labels == 0]
        psi = (x[:, None] > y[None, :]) + 0.5 * (x[:, None] == y[None, :])
        return psi.mean(), psi.mean(axis=1), psi.mean(axis=0)

    (theta_a, v10_a, v01_a), (theta_b, v10_b, v01_b) = components(a), components(b)
    m, n = v10_a.size, v01_a.size
    s10 = np.array([[np.sum((p - p.mean()) * (q - q.mean())) / (m - 1) for q in (v10_a, v10_b)]
                    for p in (v10_a, v10_b)])
    s01 = np.array([[np.sum((p - p.mean()) * (q - q.mean())) / (n - 1) for q in (v01_a, v01_b)]
                    for p in (v01_a, v01_b)])
    s = s10 / m + s01 / n
    return theta_a - theta_b, np.sqrt(s[0, 0] + s[1, 1] - 2 * s[0, 1])


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_statistic_is_delongs_and_the_aurocs_are_scikit_learns(seed, ties):
    labels, a, b = _pair(seed, ties=ties)
    result = delong_test(labels, a, b)
    assert result.champion == pytest.approx(roc_auc_score(labels, a), abs=1e-12)
    assert result.challenger == pytest.approx(roc_auc_score(labels, b), abs=1e-12)
    difference, se = _delong_by_definition(labels, a, b)
    assert result.difference == pytest.approx(difference, abs=1e-12)
    assert result.standard_error == pytest.approx(se, rel=1e-9)
    assert result.p_value == pytest.approx(2 * norm.sf(abs(difference) / se), rel=1e-9)
    assert result.ci_low == pytest.approx(difference - norm.ppf(0.975) * se, rel=1e-9)
    assert result.ci_high == pytest.approx(difference + norm.ppf(0.975) * se, rel=1e-9)
    assert (result.n_defect, result.n_good) == (90, 120)


def test_the_standard_error_agrees_with_a_paired_bootstrap():
    labels, a, b = _pair(7)
    rng = np.random.default_rng(0)
    good, defect = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)
    differences = []
    for _ in range(2000):  # resampled within each class, as DeLong's variance conditions on the class sizes
        index = np.r_[rng.choice(good, good.size), rng.choice(defect, defect.size)]
        differences.append(roc_auc_score(labels[index], a[index]) - roc_auc_score(labels[index], b[index]))
    assert delong_test(labels, a, b).standard_error == pytest.approx(np.std(differences, ddof=1), rel=0.1)


def test_a_model_against_itself_differs_by_nothing():
    labels, a, _ = _pair(3)
    result = delong_test(labels, a, a)
    assert (result.difference, result.standard_error, result.p_value) == (0.0, 0.0, 1.0)
    assert result.ci_low == result.ci_high == 0.0


def test_a_clearly_worse_challenger_is_significant_and_a_wider_confidence_widens_the_interval():
    labels, a, _ = _pair(4)
    worse = np.random.default_rng(5).normal(size=labels.size) + 0.2 * labels
    at_95, at_99 = delong_test(labels, a, worse), delong_test(labels, a, worse, confidence=0.99)
    assert at_95.difference > 0 and at_95.ci_low > 0 and at_95.p_value < 0.01
    assert at_99.ci_low < at_95.ci_low and at_99.ci_high > at_95.ci_high
    assert "DeLong" in at_95.explain() and "95% CI" in at_95.explain()


@pytest.mark.parametrize("labels, a, b, message", [
    ([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3], "the challenger 3"),
    ([0, 0, 1, 2], [0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4], r"\[0, 1, 2\]"),
    ([0, 0, 0, 1], [0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4], "1 defect and 3 good"),
    ([0, 0, 1, 1], [0.1, np.nan, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4], "finite"),
])
def test_unusable_input_is_named(labels, a, b, message):
    with pytest.raises(ValueError, match=message):
        delong_test(np.array(labels), np.array(a), np.array(b))


# --------------------------------------------------------------------------- F1: paired bootstrap


def test_the_f1_bootstrap_is_scikit_learns_f1_on_the_same_resamples():
    labels, a, b = _pair(8)
    flags_a, flags_b = a >= 0.6, b >= 0.5  # each at its own threshold
    result = paired_bootstrap_f1(labels, flags_a, flags_b, resamples=300, seed=3)
    draws = np.random.default_rng(3).integers(0, labels.size, size=(300, labels.size))
    differences = np.array([f1_score(labels[i], flags_a[i], zero_division=0.0)
                            - f1_score(labels[i], flags_b[i], zero_division=0.0) for i in draws])
    assert result.champion == pytest.approx(f1_score(labels, flags_a), abs=1e-12)
    assert result.challenger == pytest.approx(f1_score(labels, flags_b), abs=1e-12)
    assert (result.ci_low, result.ci_high) == pytest.approx(tuple(np.quantile(differences, [0.025, 0.975])), abs=1e-12)
    assert result.standard_error == pytest.approx(np.std(differences, ddof=1), abs=1e-12)
    assert result.p_value == pytest.approx(2 * min(np.mean(differences <= 0), np.mean(differences >= 0)))


def test_the_f1_bootstrap_of_a_model_against_itself_and_of_a_clearly_worse_one():
    labels, a, _ = _pair(9)
    same = paired_bootstrap_f1(labels, a >= 0.6, a >= 0.6)
    assert (same.difference, same.ci_low, same.ci_high, same.p_value) == (0.0, 0.0, 0.0, 1.0)
    assert same.within(0.0)
    worse = paired_bootstrap_f1(labels, a >= 0.6, np.random.default_rng(1).random(labels.size) < 0.5)
    assert worse.ci_low > 0 and worse.p_value < 0.01 and not worse.within(0.05)
    assert "paired bootstrap, 2000 resamples" in worse.explain()


def test_within_is_the_upper_bound_of_the_drop_against_the_allowed_drop():
    labels, a, b = _pair(10)
    result = delong_test(labels, a, b)
    assert result.within(result.ci_high) and not result.within(result.ci_high - 0.001)


@pytest.mark.parametrize("labels, a, b, kwargs, message", [
    ([0, 1, 1], [0, 1, 1], [0, 1], {}, "the challenger 2"),
    ([1, 1, 1], [0, 1, 1], [0, 1, 1], {}, "3 defect and 0 good"),
    ([0, 1, 1], [0, 1, 1], [0, 1, 1], {"resamples": 10}, "resamples=10"),
    ([0, 1, 1], [0, 1, 1], [0, 1, 1], {"confidence": 1.0}, "confidence=1.0"),
])
def test_unusable_bootstrap_input_is_named(labels, a, b, kwargs, message):
    with pytest.raises(ValueError, match=message):
        paired_bootstrap_f1(np.array(labels), np.array(a), np.array(b), **kwargs)
