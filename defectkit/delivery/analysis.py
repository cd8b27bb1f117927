"""Canary analysis: the rollout policy, and the checks that judge one window of canary traffic.

Vocabulary as in Flagger: traffic moves through ``steps`` (canary percent), each held for
``interval_s``; at the end of every interval the metrics of that window are checked, and
``failure_threshold`` failed analyses roll the canary back.

Checks on the canary, each against a limit:

- ``error_rate``: share of 5xx answers (4xx are the client's fault, not the model's);
- ``p99_latency``: 99th percentile latency in seconds (absolute limit);
- ``p99_ratio``: canary p99 / stable p99 in the same window (relative limit);
- ``score_shift``: two-sample Kolmogorov-Smirnov statistic D between the canary's and the
  stable version's defect scores in the same window. A shift counts only when it is both
  significant (p-value < ``alpha``) and large (D > ``max_score_shift``): with thousands of
  requests a negligible shift is significant, with a few dozen a large D can be chance.

A window in which the canary answered fewer than ``min_requests`` requests is
inconclusive: neither a failure nor a pass. So is a window whose figures could not be read
(:class:`MetricsUnavailable`: Prometheus down, a scrape failing while the server runs):
missing data is evidence neither against the candidate nor for it, so it holds the step,
and ``max_inconclusive`` such windows in a row roll the candidate back. Comparative checks need ``min_requests`` from
the stable version too and are skipped (passed, with the reason) without them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping

from defectkit.delivery.backend import BackendError, VariantMetrics

# Five times the largest bf16 deviation measured (see CanaryPolicy.probe_tolerance_for).
BF16_PROBE_TOLERANCE = 0.02

PASS = "pass"
FAIL = "fail"
INCONCLUSIVE = "inconclusive"


class MetricsUnavailable(BackendError):
    """The figures of a window could not be read, while nothing says the candidate is at fault (the metrics
    store is down or a scrape failed); :func:`unavailable` is the verdict on such a window. A backend that knows
    the candidate itself is down raises a plain BackendError instead, which fails the analysis."""


@dataclass(frozen=True)
class CanaryPolicy:
    """How a canary is stepped and judged.

    A step of 100 is the promotion itself: the canary reaches 100% by ``promote()``, not by
    an analysed step, because with no stable traffic left there is nothing to compare with,
    and KServe cannot send traffic back once a revision has had 100% of it.
    ``max_inconclusive`` bounds how many inconclusive windows in a row one step may see
    (too little traffic, or figures that could not be read) before the delivery gives up and rolls back.
    """

    steps: tuple[int, ...] = (10, 25, 50, 100)
    interval_s: float = 60.0  # two scrapes at the common 30 s interval (kserve.prometheus.query_window_s)
    failure_threshold: int = 2
    max_error_rate: float = 0.01
    max_p99_latency_s: float | None = 0.5
    max_p99_ratio: float | None = None
    max_score_shift: float = 0.2
    alpha: float = 0.01
    min_requests: int = 50
    probe_tolerance: float = 1e-4
    max_inconclusive: int = 10

    def __post_init__(self) -> None:
        steps = tuple(self.steps)
        if not steps or not all(isinstance(s, int) and not isinstance(s, bool) for s in steps):
            raise ValueError(f"steps {self.steps!r} must be a non-empty list of integer percents, e.g. 10,25,50,100")
        if any(not 1 <= s <= 100 for s in steps) or any(b <= a for a, b in zip(steps, steps[1:])):
            raise ValueError(f"steps {list(steps)} must increase strictly, each from 1 to 100")
        object.__setattr__(self, "steps", steps)
        _positive("interval_s", self.interval_s)
        _count("failure_threshold", self.failure_threshold)
        _count("min_requests", self.min_requests)
        _count("max_inconclusive", self.max_inconclusive)
        if not (_number(self.max_error_rate) and 0 <= self.max_error_rate <= 1):
            raise ValueError(f"max_error_rate={self.max_error_rate!r} must be a fraction from 0 to 1, e.g. 0.01")
        if self.max_p99_latency_s is None and self.max_p99_ratio is None:
            raise ValueError("set max_p99_latency_s (seconds), max_p99_ratio (canary/stable) or both; "
                             "latency must be checked one way or another")
        if self.max_p99_latency_s is not None:
            _positive("max_p99_latency_s", self.max_p99_latency_s)
        if self.max_p99_ratio is not None:
            _positive("max_p99_ratio", self.max_p99_ratio)
        if not (_number(self.max_score_shift) and 0 < self.max_score_shift <= 1):
            raise ValueError(f"max_score_shift={self.max_score_shift!r} is a KS statistic limit: from 0 to 1, e.g. 0.2")
        if not (_number(self.alpha) and 0 < self.alpha < 1):
            raise ValueError(f"alpha={self.alpha!r} is a significance level: between 0 and 1, e.g. 0.01")
        if not (_number(self.probe_tolerance) and self.probe_tolerance >= 0):
            raise ValueError(f"probe_tolerance={self.probe_tolerance!r} must be a number >= 0, e.g. 1e-4")

    def probe_tolerance_for(self, golden_precision: str, served_precision: str) -> float:
        """How far a served golden score may be from the offline one, given the precisions that computed them.

        fp32 against fp32 reproduces to ``probe_tolerance``. bf16 (a GPU serves in it) keeps 8 bits of
        mantissa: on the sample's test set, bf16 moved scores by 0.0043 at most and 0.00016 on average,
        while a wrong model, a wrong normalisation or a wrong resize moves them by tenths.
        """
        if golden_precision == served_precision == "fp32":
            return self.probe_tolerance
        return max(self.probe_tolerance, BF16_PROBE_TOLERANCE)

    @property
    def analysed_steps(self) -> tuple[int, ...]:
        """The steps held and analysed: all but a final 100, which promotion reaches."""
        return self.steps[:-1] if self.steps[-1] == 100 else self.steps

    def to_json(self) -> dict[str, Any]:
        record = asdict(self)
        record["steps"] = list(self.steps)
        return record

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> CanaryPolicy:
        unknown = set(record) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown canary policy keys {sorted(unknown)}")
        values = dict(record)
        if "steps" in values:
            values["steps"] = tuple(values["steps"])
        return cls(**values)


def parse_steps(text: str) -> tuple[int, ...]:
    """``"10,25,50,100"`` -> (10, 25, 50, 100)."""
    try:
        return tuple(int(part) for part in text.replace(" ", "").split(",") if part)
    except ValueError:
        raise ValueError(f"steps {text!r} must be comma-separated integer percents, e.g. 10,25,50,100") from None


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive(name: str, value: object) -> None:
    if not (_number(value) and value > 0):
        raise ValueError(f"{name}={value!r} must be a positive number")


def _count(name: str, value: object) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        raise ValueError(f"{name}={value!r} must be a whole number of at least 1")


@dataclass(frozen=True)
class Check:
    """One metric against its limit. ``value`` is None when the check could not be evaluated (see detail)."""

    name: str
    value: float | None
    limit: float | None
    passed: bool
    detail: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> Check:
        return cls(**record)


@dataclass(frozen=True)
class Analysis:
    """The verdict on one window: passed, failed (a check failed), or inconclusive (``skipped_reason`` set)."""

    passed: bool
    checks: tuple[Check, ...]
    skipped_reason: str | None = None

    @property
    def verdict(self) -> str:
        if self.skipped_reason is not None:
            return INCONCLUSIVE
        return PASS if self.passed else FAIL

    @property
    def failed_checks(self) -> tuple[Check, ...]:
        return tuple(c for c in self.checks if not c.passed)

    def explain(self) -> str:
        if self.skipped_reason is not None:
            return f"inconclusive: {self.skipped_reason}"
        if self.passed:
            return "passed: " + "; ".join(c.detail for c in self.checks)
        return "failed: " + "; ".join(c.detail for c in self.failed_checks)

    def to_json(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "passed": self.passed, "skipped_reason": self.skipped_reason,
                "checks": [c.to_json() for c in self.checks]}


def unavailable(error: MetricsUnavailable) -> Analysis:
    """The inconclusive verdict on a window whose figures could not be read."""
    return Analysis(False, (), f"metrics unavailable: {error}")


def ks_test(a: tuple[float, ...], b: tuple[float, ...]) -> tuple[float, float]:
    """(D, p-value) of the two-sample Kolmogorov-Smirnov test."""
    # scipy takes a second to import; only analysis needs it.
    from scipy.stats import ks_2samp

    result = ks_2samp(a, b)
    return float(result.statistic), float(result.pvalue)


def analyse(stable: VariantMetrics, canary: VariantMetrics, policy: CanaryPolicy) -> Analysis:
    """Judge the canary's window against the policy, comparing with the stable version where needed."""
    if canary.requests < policy.min_requests:
        return Analysis(False, (), f"the canary answered {canary.requests:g} requests in the window, fewer than "
                                   f"min_requests={policy.min_requests}")
    stable_enough = stable.requests >= policy.min_requests
    no_stable = (f"stable answered {stable.requests:g} requests, fewer than min_requests={policy.min_requests}, "
                 f"so there is nothing to compare with")
    checks = [_error_rate(canary, policy)]
    if policy.max_p99_latency_s is not None:
        checks.append(_p99_latency(canary, policy.max_p99_latency_s))
    if policy.max_p99_ratio is not None:
        checks.append(_p99_ratio(stable, canary, policy.max_p99_ratio) if stable_enough else
                      Check("p99_ratio", None, policy.max_p99_ratio, True, f"p99 ratio not evaluated: {no_stable}"))
    checks.append(_score_shift(stable, canary, policy) if stable_enough else
                  Check("score_shift", None, policy.max_score_shift, True, f"score shift not evaluated: {no_stable}"))
    return Analysis(all(c.passed for c in checks), tuple(checks))


def _error_rate(canary: VariantMetrics, policy: CanaryPolicy) -> Check:
    rate = canary.errors / canary.requests
    passed = rate <= policy.max_error_rate
    return Check("error_rate", rate, policy.max_error_rate, passed,
                 f"error rate {rate:.2%} ({canary.errors:g} 5xx of {canary.requests:g}) "
                 f"{'<=' if passed else '>'} {policy.max_error_rate:.2%}")


def _p99_latency(canary: VariantMetrics, limit: float) -> Check:
    p99 = canary.p99_latency_s
    if p99 is None:
        return Check("p99_latency", None, limit, False, "p99 latency unknown: the canary reported no latencies")
    passed = p99 <= limit
    return Check("p99_latency", p99, limit, passed,
                 f"p99 latency {p99 * 1000:.1f} ms {'<=' if passed else '>'} {limit * 1000:.1f} ms")


def _p99_ratio(stable: VariantMetrics, canary: VariantMetrics, limit: float) -> Check:
    if canary.p99_latency_s is None or not stable.p99_latency_s:
        return Check("p99_ratio", None, limit, False,
                     f"p99 ratio unknown: canary p99 {canary.p99_latency_s}, stable p99 {stable.p99_latency_s}")
    ratio = canary.p99_latency_s / stable.p99_latency_s
    passed = ratio <= limit
    return Check("p99_ratio", ratio, limit, passed,
                 f"p99 {canary.p99_latency_s * 1000:.1f} ms is {ratio:.2f}x stable's "
                 f"{stable.p99_latency_s * 1000:.1f} ms ({'<=' if passed else '>'} {limit:g}x)")


def _score_shift(stable: VariantMetrics, canary: VariantMetrics, policy: CanaryPolicy) -> Check:
    limit = policy.max_score_shift
    if not canary.scores or not stable.scores:
        missing = "canary" if not canary.scores else "stable"
        return Check("score_shift", None, limit, True, f"score shift not evaluated: no {missing} scores in the window")
    d, p = ks_test(canary.scores, stable.scores)
    shifted = p < policy.alpha and d > limit
    mean_c, mean_s = sum(canary.scores) / len(canary.scores), sum(stable.scores) / len(stable.scores)
    return Check("score_shift", d, limit, not shifted,
                 f"KS D={d:.3f} ({'>' if d > limit else '<='} {limit:g}), p={p:.2g} "
                 f"({'<' if p < policy.alpha else '>='} alpha {policy.alpha:g}); mean score {mean_c:.3f} vs stable "
                 f"{mean_s:.3f} over {len(canary.scores)} and {len(stable.scores)} scores")
