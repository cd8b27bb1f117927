"""Prometheus: the PromQL behind canary analysis, and a small client for instant queries.

The model server exports (all labelled ``model_version``; the names live in
:mod:`defectkit.serving.metrics`) ``defectkit_requests_total{status}``,
``defectkit_request_latency_seconds`` (histogram) and ``defectkit_score`` (histogram).
On a cluster Prometheus scrapes them from each predictor pod, and the pod's Kubernetes
labels tell stable from canary:

- ``serving.kserve.io/inferenceservice=<name>`` and ``component=predictor`` select the
  InferenceService's predictor pods (KServe sets both);
- ``serving.knative.dev/revision=<revision>`` selects one revision (Knative sets it).
  The stable variant is the last rolled-out revision and the canary the latest one, as
  named in the InferenceService's ``status.components.predictor.traffic``.

Selecting by revision rather than by ``model_version`` keeps the split exactly the one
KServe routes, even if both revisions serve the same weights.

Scrape configs copy pod labels into series labels with dots and slashes turned into
underscores (kube-prometheus PodMonitors, or the annotation-based ``kubernetes-pods`` job
with ``labelmap: __meta_kubernetes_pod_label_(.+)``), giving the defaults of ``PodLabels``;
set other names there if your relabelling differs.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Mapping

import requests

from defectkit.delivery.backend import VariantMetrics, scores_from_buckets
from defectkit.retry import TRANSIENT_HTTP_STATUS, RetryableResponse, RetryPolicy, retry
from defectkit.serving.metrics import (
    ERROR_STATUS,
    LATENCY_METRIC,
    REQUESTS_METRIC,
    SCORE_METRIC,
    STATUS_LABEL,
    bucket_series,
    counter_series,
)

log = logging.getLogger(__name__)

# Server errors only: a 4xx is a bad request, which the canary is not to blame for.


class PrometheusError(RuntimeError):
    """Prometheus answered, but not with a usable result."""


@dataclass(frozen=True)
class PodLabels:
    """Series label names that carry the scraped pods' namespace and Kubernetes labels."""

    namespace: str = "namespace"
    inference_service: str = "serving_kserve_io_inferenceservice"
    component: str = "component"
    revision: str = "serving_knative_dev_revision"


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


@dataclass(frozen=True)
class Variant:
    """The predictor pods of one revision of one InferenceService."""

    namespace: str
    inference_service: str
    revision: str
    labels: PodLabels = field(default_factory=PodLabels)

    def selector(self, **extra: str) -> str:
        """A PromQL label matcher; ``extra`` values are regular expressions (``=~``)."""
        matchers = [
            f"{self.labels.namespace}={_quote(self.namespace)}",
            f"{self.labels.inference_service}={_quote(self.inference_service)}",
            f"{self.labels.component}=\"predictor\"",
            f"{self.labels.revision}={_quote(self.revision)}",
        ]
        matchers += [f"{name}=~{_quote(pattern)}" for name, pattern in extra.items()]
        return "{" + ",".join(matchers) + "}"


def _range(window_s: float) -> str:
    if not window_s >= 1:
        raise ValueError(f"window {window_s!r}s must be at least 1 s (and in practice several scrape intervals)")
    return f"[{int(round(window_s))}s]"


def request_count_query(variant: Variant, window_s: float) -> str:
    """Requests answered in the window, whatever their status."""
    return f"sum(increase({counter_series(REQUESTS_METRIC)}{variant.selector()}{_range(window_s)}))"


def error_count_query(variant: Variant, window_s: float) -> str:
    """Requests answered with a 5xx status in the window."""
    selector = variant.selector(**{STATUS_LABEL: ERROR_STATUS})
    return f"sum(increase({counter_series(REQUESTS_METRIC)}{selector}{_range(window_s)}))"


def latency_quantile_query(variant: Variant, window_s: float, quantile: float = 0.99) -> str:
    """The ``quantile`` of request latency in seconds, over all pods of the variant."""
    if not 0 < quantile < 1:
        raise ValueError(f"quantile {quantile!r} must be between 0 and 1, e.g. 0.99")
    buckets = f"rate({bucket_series(LATENCY_METRIC)}{variant.selector()}{_range(window_s)})"
    return f"histogram_quantile({quantile:g}, sum by (le) ({buckets}))"


def score_buckets_query(variant: Variant, window_s: float) -> str:
    """Per-bucket (cumulative) counts of defect scores observed in the window."""
    return f"sum by (le) (increase({bucket_series(SCORE_METRIC)}{variant.selector()}{_range(window_s)}))"


@dataclass(frozen=True)
class Sample:
    labels: Mapping[str, str]
    value: float


def _transient(exc: BaseException) -> bool:
    return isinstance(exc, (RetryableResponse, requests.ConnectionError, requests.Timeout))


class PrometheusClient:
    """Instant queries against the Prometheus HTTP API (``/api/v1/query``)."""

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 10.0,
        headers: Mapping[str, str] | None = None,
        verify: bool | str = True,
        retry_policy: RetryPolicy = RetryPolicy(attempts=4, initial_delay_s=0.5),
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"Prometheus URL {url!r} must start with http:// or https://")
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.retry_policy = retry_policy
        self._session = requests.Session()
        self._session.headers.update(headers or {})
        self._session.verify = verify

    def _get(self, params: dict[str, str]) -> requests.Response:
        def get() -> requests.Response:
            response = self._session.get(f"{self.url}/api/v1/query", params=params, timeout=self.timeout_s)
            if response.status_code in TRANSIENT_HTTP_STATUS:
                raise RetryableResponse(response, response.status_code, response.headers)
            return response

        try:
            return retry(get, "Prometheus query", self.retry_policy, transient=_transient)
        except RetryableResponse as exc:
            return exc.response
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise PrometheusError(f"Prometheus at {self.url} is unreachable: {exc}") from exc

    def query(self, promql: str, at: float | None = None) -> list[Sample]:
        """The samples of an instant query; a scalar result comes back as one unlabelled sample."""
        params = {"query": promql}
        if at is not None:
            params["time"] = f"{at:.3f}"
        response = self._get(params)
        try:
            body = response.json()
        except ValueError:
            raise PrometheusError(
                f"Prometheus at {self.url} answered HTTP {response.status_code} without JSON: {response.text[:200]!r}"
            ) from None
        if body.get("status") != "success":
            raise PrometheusError(
                f"Prometheus rejected {promql!r}: {body.get('errorType', 'error')}: {body.get('error', body)}"
            )
        data = body["data"]
        if data["resultType"] == "scalar":
            return [Sample({}, float(data["result"][1]))]
        if data["resultType"] != "vector":
            raise PrometheusError(f"{promql!r} gave a {data['resultType']}; an instant vector or scalar was expected")
        return [Sample(item["metric"], float(item["value"][1])) for item in data["result"]]

    def value(self, promql: str) -> float | None:
        """The single value of an aggregated query; None when it has no data (empty or NaN)."""
        samples = self.query(promql)
        if not samples:
            return None
        if len(samples) > 1:
            raise PrometheusError(f"{promql!r} gave {len(samples)} series; aggregate it to one")
        value = samples[0].value
        return None if math.isnan(value) else value


def variant_metrics(client: PrometheusClient, variant: Variant, window_s: float) -> VariantMetrics:
    """Requests, 5xx errors, latency quantiles and a score sample of ``variant`` over the last ``window_s``."""
    buckets = client.query(score_buckets_query(variant, window_s))
    cumulative = [(float(s.labels["le"]), s.value) for s in buckets if "le" in s.labels and not math.isnan(s.value)]
    return VariantMetrics(
        requests=client.value(request_count_query(variant, window_s)) or 0.0,
        errors=client.value(error_count_query(variant, window_s)) or 0.0,
        p50_latency_s=_latency_quantile(client, variant, window_s, 0.5),
        p99_latency_s=_latency_quantile(client, variant, window_s, 0.99),
        scores=tuple(scores_from_buckets(cumulative)),
    )


def _latency_quantile(client: PrometheusClient, variant: Variant, window_s: float, quantile: float) -> float | None:
    value = client.value(latency_quantile_query(variant, window_s, quantile))
    # histogram_quantile answers +Inf when the quantile lies beyond the last finite bucket: no usable latency either.
    return value if value is not None and math.isfinite(value) else None
