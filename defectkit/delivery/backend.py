"""Backend: what the delivery controller needs from a serving platform, and the figures it reads back.

Two implementations: :class:`defectkit.delivery.local.LocalBackend` (model servers on
127.0.0.1 behind a weighted router, the embedded default) and
:class:`defectkit.delivery.kserve.KServeBackend` (a KServe InferenceService).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Protocol

STABLE = "stable"
CANARY = "canary"
VARIANTS = (STABLE, CANARY)


class BackendError(RuntimeError):
    """The serving platform did not do what was asked (a server died, the router refused, a scrape failed)."""


@dataclass(frozen=True)
class VariantMetrics:
    """What one variant (stable or canary) answered over an analysis window.

    ``requests`` and ``errors`` (5xx answers) are floats because Prometheus extrapolates
    counter increases; latencies are None when the variant answered nothing.
    ``scores`` is a sample of the defect scores it returned, for distribution tests.
    """

    requests: float
    errors: float
    p50_latency_s: float | None
    p99_latency_s: float | None
    scores: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        for name in ("requests", "errors"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"VariantMetrics.{name}={value!r} must be a finite number >= 0")

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests > 0 else None

    def summary(self) -> dict[str, Any]:
        """The figures without the score sample, for records and logs."""
        return {
            "requests": round(self.requests, 3),
            "errors": round(self.errors, 3),
            "error_rate": None if self.error_rate is None else round(self.error_rate, 6),
            "p50_latency_s": self.p50_latency_s,
            "p99_latency_s": self.p99_latency_s,
            "scores": len(self.scores),
            "mean_score": round(sum(self.scores) / len(self.scores), 6) if self.scores else None,
        }

    def to_json(self) -> dict[str, Any]:
        return {"requests": self.requests, "errors": self.errors, "p50_latency_s": self.p50_latency_s,
                "p99_latency_s": self.p99_latency_s, "scores": list(self.scores)}

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> VariantMetrics:
        return cls(requests=float(record["requests"]), errors=float(record["errors"]),
                   p50_latency_s=record.get("p50_latency_s"), p99_latency_s=record.get("p99_latency_s"),
                   scores=tuple(float(s) for s in record.get("scores") or ()))


EMPTY = VariantMetrics(requests=0.0, errors=0.0, p50_latency_s=None, p99_latency_s=None, scores=())


def _latency(value: Any) -> float | None:
    # A quantile Prometheus cannot place (NaN, +Inf) is as unknown as a missing one.
    return None if value is None or not math.isfinite(float(value)) else float(value)


def from_stats(stats: Any) -> VariantMetrics:
    """A VariantMetrics from anything with its fields, such as ``prometheus.VariantStats`` of the KServe backend."""
    if isinstance(stats, VariantMetrics):
        return stats
    try:
        return VariantMetrics(
            requests=float(stats.requests),
            errors=float(stats.errors),
            p50_latency_s=_latency(stats.p50_latency_s),
            p99_latency_s=_latency(stats.p99_latency_s),
            scores=tuple(float(s) for s in stats.scores),
        )
    except AttributeError as exc:
        raise TypeError(f"{type(stats).__name__} is not variant metrics: it lacks {exc.name!r} (needs requests, "
                        f"errors, p50_latency_s, p99_latency_s, scores)") from None


def metrics_by_variant(raw: Mapping[str, Any]) -> dict[str, VariantMetrics]:
    """A backend's ``metrics()`` answer as VariantMetrics for "stable" and "canary"."""
    missing = [v for v in VARIANTS if v not in raw]
    if missing:
        raise BackendError(f"the backend's metrics lack {', '.join(missing)} (got {sorted(raw)})")
    return {variant: from_stats(raw[variant]) for variant in VARIANTS}


class Backend(Protocol):
    """A stable model version taking traffic, and at most one candidate beside it.

    Every method is idempotent, so that a delivery resumed after a crash can repeat the
    call it was making when it stopped.
    """

    def deploy_candidate(self, model_uri: str) -> None:
        """Start serving ``model_uri`` beside the stable version at 0% traffic; return once it is ready."""

    def set_traffic(self, canary_percent: int) -> None:
        """Send ``canary_percent`` of requests to the candidate; return only once the actual split is that."""

    def traffic(self) -> int:
        """The percent of requests the candidate gets now, read back from the platform."""

    def promote(self) -> None:
        """Make the candidate the stable version with all traffic."""

    def rollback(self) -> None:
        """Send all traffic to the stable version; the stable version is left as it was."""

    def metrics(self, window_s: float) -> Mapping[str, Any]:
        """``{"stable": ..., "canary": ...}`` over the last ``window_s`` (VariantMetrics or the same fields)."""

    def probe(self, images: list[bytes]) -> list[float]:
        """Defect scores for encoded ``images`` from the candidate itself, whatever the traffic split."""
