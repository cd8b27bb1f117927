"""Canary analysis: the policy's validation, each check's verdict on known figures, and the query windows."""

import logging
import math

import numpy as np
import pytest
from scipy import stats

from defectkit.delivery.analysis import FAIL, INCONCLUSIVE, PASS, CanaryPolicy, analyse, parse_steps
from defectkit.delivery.backend import VariantMetrics, metrics_by_variant
from defectkit.delivery.kserve.prometheus import (
    DEFAULT_SCRAPE_INTERVAL_S,
    PrometheusClient,
    PrometheusUnavailable,
    Sample,
    Variant,
    error_count_query,
    latency_quantile_query,
    query_window_s,
    request_count_query,
    score_buckets_query,
    scrape_health_query,
    variant_metrics,
)

POLICY = CanaryPolicy(min_requests=50, max_error_rate=0.01, max_p99_latency_s=0.5, max_score_shift=0.2, alpha=0.01)


def variant(requests=200, errors=0, p99=0.05, scores=None, seed=0) -> VariantMetrics:
    if scores is None:
        scores = np.random.default_rng(seed).beta(2, 5, size=int(requests))
    return VariantMetrics(requests=float(requests), errors=float(errors), p50_latency_s=p99 / 2, p99_latency_s=p99,
                          scores=tuple(float(s) for s in scores))


def checks(result) -> dict:
    return {c.name: c for c in result.checks}


def test_a_healthy_canary_passes_every_check():
    result = analyse(variant(seed=1), variant(seed=2), POLICY)
    assert result.verdict == PASS and result.passed
    assert set(checks(result)) == {"error_rate", "p99_latency", "score_shift"}
    assert all(c.passed for c in result.checks)
    assert "passed" in result.explain()


def test_error_rate_above_the_limit_fails():
    result = analyse(variant(), variant(requests=200, errors=3), POLICY)
    check = checks(result)["error_rate"]
    assert result.verdict == FAIL
    assert check.value == pytest.approx(0.015) and check.limit == 0.01 and not check.passed
    assert "1.50%" in check.detail
    # Exactly at the limit is still acceptable.
    assert checks(analyse(variant(), variant(requests=200, errors=2), POLICY))["error_rate"].passed


def test_absolute_p99_latency():
    result = analyse(variant(), variant(p99=0.74), POLICY)
    assert result.verdict == FAIL
    assert checks(result)["p99_latency"].value == pytest.approx(0.74)
    assert [c.name for c in result.failed_checks] == ["p99_latency"]


def test_p99_ratio_against_stable():
    policy = CanaryPolicy(max_p99_latency_s=None, max_p99_ratio=1.5, min_requests=50)
    assert analyse(variant(p99=0.10), variant(p99=0.14), policy).passed
    slow = analyse(variant(p99=0.10), variant(p99=0.20), policy)
    assert not slow.passed and checks(slow)["p99_ratio"].value == pytest.approx(2.0)


def test_comparisons_are_skipped_without_enough_stable_traffic():
    policy = CanaryPolicy(max_p99_ratio=1.5, min_requests=50)
    result = analyse(variant(requests=10), variant(requests=200), policy)
    assert result.passed
    for name in ("p99_ratio", "score_shift"):
        assert checks(result)[name].value is None and "not evaluated" in checks(result)[name].detail


def test_shifted_scores_fail_the_ks_check_with_scipys_statistic():
    rng = np.random.default_rng(3)
    stable_scores, canary_scores = rng.beta(2, 5, 400), np.clip(rng.beta(2, 5, 400) + 0.4, 0, 1)
    result = analyse(variant(scores=stable_scores, requests=400), variant(scores=canary_scores, requests=400), POLICY)
    check = checks(result)["score_shift"]
    expected = stats.ks_2samp(canary_scores, stable_scores)
    assert result.verdict == FAIL and not check.passed
    assert check.value == pytest.approx(expected.statistic) and check.value > 0.2
    assert "KS D=" in check.detail


def test_everything_called_defective_is_a_shift():
    result = analyse(variant(), variant(scores=[1.0] * 200), POLICY)
    assert checks(result)["score_shift"].value == pytest.approx(1.0)
    assert result.verdict == FAIL


def test_a_small_but_significant_shift_is_tolerated():
    rng = np.random.default_rng(4)
    base = rng.beta(2, 5, 20000)
    shifted = np.clip(rng.beta(2, 5, 20000) + 0.03, 0, 1)
    d, p = stats.ks_2samp(shifted, base)
    assert p < 0.01 and d < 0.2  # significant with this many scores, yet small
    result = analyse(variant(scores=base, requests=20000), variant(scores=shifted, requests=20000), POLICY)
    assert checks(result)["score_shift"].passed


def test_a_large_but_insignificant_difference_is_tolerated():
    # Five scores each: D is large by chance, the p-value says so.
    policy = CanaryPolicy(min_requests=5)
    result = analyse(variant(requests=5, scores=[0.1, 0.2, 0.3, 0.4, 0.5]),
                     variant(requests=5, scores=[0.35, 0.45, 0.55, 0.6, 0.7]), policy)
    check = checks(result)["score_shift"]
    assert check.value > 0.2 and check.passed


def test_too_few_canary_requests_is_inconclusive():
    result = analyse(variant(), variant(requests=49, errors=49), POLICY)
    assert result.verdict == INCONCLUSIVE
    assert not result.passed and result.checks == ()
    assert "49 requests" in result.skipped_reason and "min_requests=50" in result.skipped_reason


def test_unknown_latency_fails_the_latency_check():
    canary = VariantMetrics(requests=100.0, errors=0.0, p50_latency_s=None, p99_latency_s=None, scores=())
    result = analyse(variant(), canary, POLICY)
    assert not checks(result)["p99_latency"].passed
    assert checks(result)["score_shift"].passed  # no canary scores: not evaluated


class CannedPrometheus:
    """Answers to the instant queries of one variant, keyed by their PromQL."""

    def __init__(self, values: dict[str, float | None], samples: dict[str, list[Sample]]) -> None:
        self.values, self.samples = values, samples

    def value(self, promql: str) -> float | None:
        return self.values[promql]

    def query(self, promql: str) -> list[Sample]:
        return self.samples[promql]


def test_kserve_figures_are_variant_metrics():
    revision = Variant("ml", "defect", "defect-predictor-00002")
    buckets = [Sample({"le": le}, n) for le, n in (("0.05", 0.0), ("0.15", 1.0), ("0.25", 2.0), ("+Inf", 2.0))]
    client = CannedPrometheus(
        values={scrape_health_query(revision, 60): 1.0,
                request_count_query(revision, 60): 12.5, error_count_query(revision, 60): 0.5,
                latency_quantile_query(revision, 60, 0.5): 0.01, latency_quantile_query(revision, 60, 0.99): math.inf},
        samples={score_buckets_query(revision, 60): buckets},
    )
    converted = variant_metrics(client, revision, 60)
    assert converted == VariantMetrics(12.5, 0.5, 0.01, None, (0.1, 0.2))  # a p99 beyond the last bucket is unknown
    assert converted.error_rate == pytest.approx(0.04)
    client.values[scrape_health_query(revision, 60)] = 0.0  # a scrape failed within the window
    with pytest.raises(PrometheusUnavailable, match="a failed scrape"):
        variant_metrics(client, revision, 60)
    with pytest.raises(TypeError, match="not VariantMetrics"):
        metrics_by_variant({"stable": converted, "canary": object.__new__(type("Partial", (), {"requests": 1}))})


@pytest.mark.parametrize("kwargs, message", [
    ({"steps": ()}, "non-empty"),
    ({"steps": (10, 10, 50)}, "increase strictly"),
    ({"steps": (0, 50)}, "from 1 to 100"),
    ({"steps": (10, 150)}, "from 1 to 100"),
    ({"interval_s": 0}, "interval_s"),
    ({"failure_threshold": 0}, "failure_threshold"),
    ({"max_error_rate": 1.5}, "max_error_rate"),
    ({"max_p99_latency_s": None, "max_p99_ratio": None}, "latency must be checked"),
    ({"max_score_shift": 0}, "max_score_shift"),
    ({"alpha": 1.0}, "alpha"),
    ({"min_requests": 0}, "min_requests"),
    ({"probe_tolerance": -1}, "probe_tolerance"),
])
def test_policy_validation_names_the_bad_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CanaryPolicy(**kwargs)


def test_policy_round_trips_and_a_final_100_is_the_promotion():
    policy = CanaryPolicy(steps=parse_steps("5, 20,100"), interval_s=2.5, max_p99_ratio=2.0)
    assert policy.steps == (5, 20, 100) and policy.analysed_steps == (5, 20)
    assert CanaryPolicy.from_json(policy.to_json()) == policy
    assert CanaryPolicy(steps=(10, 50)).analysed_steps == (10, 50)
    with pytest.raises(ValueError, match="comma-separated"):
        parse_steps("10;20")


@pytest.mark.parametrize("scrape_interval_s, interval_s, window_s", [
    (30, 60, 120),   # a step of two scrapes: the floor of four scrapes
    (30, 90, 120),   # three scrapes: the step plus the sample before it is exactly four
    (30, 300, 330),  # long steps: the step plus one scrape interval
    (15, 60, 75),
    (60, 120, 240),  # Prometheus' own default scrape interval
    (1, 2, 4),
])
def test_query_window_covers_the_step_and_the_sample_before_it_and_at_least_four_scrapes(
        scrape_interval_s, interval_s, window_s):
    assert query_window_s(scrape_interval_s, interval_s) == window_s
    assert window_s >= 4 * scrape_interval_s and window_s >= interval_s + scrape_interval_s


def test_query_windows_fit_the_promql_range_without_shrinking():
    revision = Variant("ml", "defect", "defect-predictor-00002")
    assert request_count_query(revision, query_window_s(30, 60)).endswith("[120s]))")
    # Never rounded down below what the rule asked for.
    assert request_count_query(revision, 3.2).endswith("[4s]))")


@pytest.mark.parametrize("scrape_interval_s, interval_s", [(30, 30), (30, 59.9), (60, 90), (1, 1.5)])
def test_a_step_shorter_than_two_scrape_intervals_is_refused_naming_both(scrape_interval_s, interval_s):
    with pytest.raises(ValueError) as caught:
        query_window_s(scrape_interval_s, interval_s)
    message = str(caught.value)
    assert f"interval_s={interval_s:g}" in message and f"scrape_interval_s={scrape_interval_s:g}" in message
    assert f"at least {2 * scrape_interval_s:g} s" in message


def test_a_window_reaching_into_the_previous_step_is_warned_about_once(caplog):
    with caplog.at_level(logging.WARNING, logger="defectkit.delivery.kserve.prometheus"):
        assert query_window_s(20, 50) == 80
        assert query_window_s(20, 50) == 80
        assert query_window_s(20, 60) == 80  # three scrapes: no overlap beyond the sample before the step
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1
    assert "interval_s=50" in warnings[0] and "scrape_interval_s=20" in warnings[0]
    assert "80 s, reaching 30 s into the step before" in warnings[0] and "at least 60 s" in warnings[0]


@pytest.mark.parametrize("scrape_interval_s, interval_s, name", [
    (0, 60, "scrape_interval_s"), (30, -1, "interval_s"), (math.nan, 60, "scrape_interval_s"),
    (30, math.inf, "interval_s"),
])
def test_query_window_inputs_must_be_positive_seconds(scrape_interval_s, interval_s, name):
    with pytest.raises(ValueError, match=f"^{name}="):
        query_window_s(scrape_interval_s, interval_s)


def test_the_client_carries_the_scrape_interval():
    assert PrometheusClient("http://127.0.0.1:9").scrape_interval_s == DEFAULT_SCRAPE_INTERVAL_S == 30
    assert PrometheusClient("http://127.0.0.1:9", scrape_interval_s=15).scrape_interval_s == 15
    with pytest.raises(ValueError, match="scrape_interval_s=0 must be Prometheus' scrape interval"):
        PrometheusClient("http://127.0.0.1:9", scrape_interval_s=0)
