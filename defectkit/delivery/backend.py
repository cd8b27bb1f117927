"""Backend: what the delivery controller needs from a serving platform, the figures it reads back, and the
inference request that probes (and replayed traffic) send.

Two implementations: :class:`defectkit.delivery.local.LocalBackend` (model servers on
127.0.0.1 behind a weighted router, the embedded default) and
:class:`defectkit.delivery.kserve.backend.KServeBackend` (a KServe InferenceService).
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass
from typing import Any, Mapping, Protocol, Sequence

from defectkit.serving.contract import IMAGE_INPUT, PRECISION_PARAMETER, SCORE_OUTPUT

STABLE = "stable"
CANARY = "canary"
VARIANTS = (STABLE, CANARY)
PROBE_BATCH = 16


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


def validate_percent(value: int) -> int:
    """``value`` if it is a canary traffic percent: an integer from 0 to 100."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 100:
        raise ValueError(f"canary traffic percent {value!r} must be an integer from 0 to 100")
    return value


def metrics_by_variant(raw: Mapping[str, VariantMetrics]) -> dict[str, VariantMetrics]:
    """A backend's ``metrics()`` answer, checked to hold VariantMetrics for "stable" and "canary"."""
    missing = [v for v in VARIANTS if v not in raw]
    if missing:
        raise BackendError(f"the backend's metrics lack {', '.join(missing)} (got {sorted(raw)})")
    for variant in VARIANTS:
        if not isinstance(raw[variant], VariantMetrics):
            raise TypeError(f"the backend's {variant} metrics are a {type(raw[variant]).__name__}, not VariantMetrics")
    return {variant: raw[variant] for variant in VARIANTS}


def infer_request(images: Sequence[bytes], outputs: Sequence[str] = ()) -> dict[str, Any]:
    """An Open Inference Protocol v2 REST request carrying encoded images as base64 BYTES elements; the answer
    holds ``outputs`` only, or every output when none are named.

    JSON BYTES elements are strings, so raw image bytes travel base64-encoded. The binary
    tensor extension is no way round it: KServe 0.21's REST server re-encodes binary BYTES
    inputs as UTF-8 text and answers 500 for any image that is not valid UTF-8.
    """
    request: dict[str, Any] = {
        "inputs": [{"name": IMAGE_INPUT, "shape": [len(images)], "datatype": "BYTES",
                    "data": [base64.b64encode(image).decode("ascii") for image in images]}],
    }
    if outputs:
        request["outputs"] = [{"name": name} for name in outputs]
    return request


@dataclass(frozen=True)
class ProbeAnswer:
    """The candidate's scores for the golden images, and the precision it computed them in."""

    scores: tuple[float, ...]
    precision: str


def probe_answers(bodies: Sequence[Mapping[str, Any]], counts: Sequence[int], where: str) -> ProbeAnswer:
    """One :class:`ProbeAnswer` from the model server's answers to probe batches of ``counts`` images each."""
    scores: list[float] = []
    precisions = set()
    for body, count in zip(bodies, counts, strict=True):
        outputs = {output.get("name"): output for output in body.get("outputs") or []}
        data = outputs.get(SCORE_OUTPUT, {}).get("data")
        if not isinstance(data, list) or len(data) != count:
            raise BackendError(f"probe {where} returned no {SCORE_OUTPUT!r} per image: {str(body)[:300]}")
        scores += [float(s) for s in data]
        # A server that does not say ran fp32: the only precision before answers carried it.
        precisions.add((body.get("parameters") or {}).get(PRECISION_PARAMETER, "fp32"))
    if len(precisions) > 1:
        raise BackendError(f"probe {where} answered in several precisions {sorted(precisions)}; one server, one "
                           f"precision")
    return ProbeAnswer(tuple(scores), precisions.pop() if precisions else "fp32")


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

    def metrics(self, window_s: float) -> Mapping[str, VariantMetrics]:
        """``{"stable": ..., "canary": ...}`` over the last ``window_s``."""

    def probe(self, images: list[bytes]) -> ProbeAnswer:
        """Defect scores for encoded ``images`` from the candidate itself, whatever the traffic split."""


def scores_from_buckets(cumulative: Sequence[tuple[float, float]], max_points: int = 2000) -> list[float]:
    """A sample of scores shaped like a histogram, for distribution tests.

    ``cumulative`` holds (upper bound ``le``, cumulative count) pairs. Each bucket's scores
    are placed at the bucket's midpoint (the +Inf bucket at its lower bound), so the sample
    is exact up to the bucket width; counts are scaled down to at most ``max_points``.
    """
    ordered = sorted(cumulative)
    total = ordered[-1][1] if ordered else 0.0
    if total <= 0:
        return []
    scale = min(1.0, max_points / total)
    sample: list[float] = []
    lower, seen = 0.0, 0.0
    for upper, count in ordered:
        in_bucket = max(count - seen, 0.0)
        point = lower if math.isinf(upper) else (lower + upper) / 2
        sample += [point] * int(round(in_bucket * scale))
        lower, seen = (lower if math.isinf(upper) else upper), max(count, seen)
    return sample
