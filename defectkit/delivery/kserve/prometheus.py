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

Every query covers a range derived from the scrape interval and the canary's step interval
(:func:`query_window_s`): a range of one step alone holds no samples, or one, when steps
are as short as the scrapes are far apart, and ``increase`` needs two.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, field
from typing import Mapping

import requests

from defectkit.delivery.analysis import MetricsUnavailable
from defectkit.delivery.backend import BackendError, VariantMetrics, scores_from_buckets
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

# The Prometheus Operator's default `Prometheus.spec.scrapeInterval` ("30s", kubebuilder default in
# pkg/apis/monitoring/v1/prometheus_types.go), which kube-prometheus-stack keeps; a Prometheus
# configured by hand defaults to 1m (`global.scrape_interval`): set scrape_interval_s to match.
DEFAULT_SCRAPE_INTERVAL_S = 30.0
# increase() and rate() need two samples in their range; four scrape intervals still hold two when a
# scrape is missed or late (the same floor as Grafana's $__rate_interval).
MIN_WINDOW_SCRAPES = 4
# A sample shows the counters as they were when it was scraped, up to one interval ago: an analysis at
# the end of a step sees, at worst, only its first (interval - scrape interval). Below two scrape intervals that is
# less than half the step, and traffic would step up on figures mostly from the step before.
MIN_STEP_SCRAPES = 2


def query_window_s(scrape_interval_s: float, interval_s: float) -> float:
    """The range of the queries that judge one step held for ``interval_s`` while Prometheus scrapes
    every ``scrape_interval_s``: the step plus one scrape interval, and at least four scrape intervals.

    The extra scrape interval reaches back to the last sample taken before the step began, so
    that the step's first requests count (Grafana's ``$__rate_interval`` is the same rule).
    A step shorter than two scrape intervals is refused (ValueError): see ``MIN_STEP_SCRAPES``.
    From two to three scrape intervals the floor of four makes the window reach back into the
    previous step, so one stretch of bad traffic can fail two analyses in a row; that is
    allowed, with a warning.
    """
    for name, value in (("scrape_interval_s", scrape_interval_s), ("interval_s", interval_s)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"{name}={value!r} must be a positive number of seconds")
    if interval_s < MIN_STEP_SCRAPES * scrape_interval_s:
        raise ValueError(
            f"the canary interval_s={interval_s:g} is shorter than {MIN_STEP_SCRAPES} Prometheus scrape intervals "
            f"(scrape_interval_s={scrape_interval_s:g}): each analysis would judge mostly the step before it. "
            f"Hold each step for at least {MIN_STEP_SCRAPES * scrape_interval_s:g} s, or scrape the predictor "
            f"pods more often"
        )
    window = max(interval_s + scrape_interval_s, MIN_WINDOW_SCRAPES * scrape_interval_s)
    if window > interval_s + scrape_interval_s:
        _warn_overlap(scrape_interval_s, interval_s, window)
    return window


@functools.cache  # once per setting, not at every analysis
def _warn_overlap(scrape_interval_s: float, interval_s: float, window_s: float) -> None:
    log.warning(
        "canary interval_s=%g is shorter than %d scrape intervals (scrape_interval_s=%g): each analysis covers "
        "%g s, reaching %g s into the step before, so one stretch of bad traffic can fail two analyses; hold "
        "steps for at least %g s to judge each on its own", interval_s, MIN_WINDOW_SCRAPES - 1, scrape_interval_s,
        window_s, window_s - interval_s, (MIN_WINDOW_SCRAPES - 1) * scrape_interval_s)


class PrometheusError(BackendError):
    """Prometheus answered, but not with a usable result (a query it rejected fails the analysis: that is a
    configuration to fix, not missing data)."""


class PrometheusUnavailable(PrometheusError, MetricsUnavailable):
    """Prometheus could not be reached, or kept answering with a server error: the window's figures are
    missing, so the analysis is inconclusive rather than failed."""


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
        raise ValueError(f"window {window_s!r}s must be at least 1 s; derive it with query_window_s()")
    # Up, never down: a shorter range could hold fewer than the samples query_window_s() provided for.
    return f"[{math.ceil(window_s)}s]"


def request_count_query(variant: Variant, window_s: float) -> str:
    """Requests answered in the window, whatever their status."""
    return f"sum(increase({counter_series(REQUESTS_METRIC)}{variant.selector()}{_range(window_s)}))"


def error_count_query(variant: Variant, window_s: float) -> str:
    """Requests answered with a 5xx status in the window (a 4xx is a bad request: not the canary's fault)."""
    selector = variant.selector(**{STATUS_LABEL: ERROR_STATUS})
    return f"sum(increase({counter_series(REQUESTS_METRIC)}{selector}{_range(window_s)}))"


def latency_quantile_query(variant: Variant, window_s: float, quantile: float = 0.99) -> str:
    """The ``quantile`` of request latency in seconds, over all pods of the variant."""
    if not 0 < quantile < 1:
        raise ValueError(f"quantile {quantile!r} must be between 0 and 1, e.g. 0.99")
    buckets = f"rate({bucket_series(LATENCY_METRIC)}{variant.selector()}{_range(window_s)})"
    return f"histogram_quantile({quantile:g}, sum by (le) ({buckets}))"


def scrape_health_query(variant: Variant, window_s: float) -> str:
    """1 when every scrape of the variant's pods in the window succeeded; less, or no data, when one failed.

    Prometheus records each scrape's success in ``up``, with the target's labels, so the variant's selector
    finds it. Counters that stop moving because their scrape broke look like a quiet, healthy server.
    """
    return f"min(min_over_time(up{variant.selector()}{_range(window_s)}))"


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
    """Instant queries against the Prometheus HTTP API (``/api/v1/query``).

    ``scrape_interval_s`` is how often that Prometheus scrapes the predictor pods (its
    ``scrape_interval``, or the PodMonitor's ``interval``); query windows are derived from it.
    """

    def __init__(
        self,
        url: str,
        *,
        scrape_interval_s: float = DEFAULT_SCRAPE_INTERVAL_S,
        timeout_s: float = 10.0,
        headers: Mapping[str, str] | None = None,
        verify: bool | str = True,
        retry_policy: RetryPolicy = RetryPolicy(attempts=4, initial_delay_s=0.5),
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"Prometheus URL {url!r} must start with http:// or https://")
        if not (isinstance(scrape_interval_s, (int, float)) and math.isfinite(scrape_interval_s)
                and scrape_interval_s > 0):
            raise ValueError(f"scrape_interval_s={scrape_interval_s!r} must be Prometheus' scrape interval for the "
                             f"predictor pods in seconds, e.g. {DEFAULT_SCRAPE_INTERVAL_S:g}")
        self.url = url.rstrip("/")
        self.scrape_interval_s = float(scrape_interval_s)
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
            raise PrometheusUnavailable(
                f"Prometheus at {self.url} answered HTTP {exc.response.status_code} to "
                f"{self.retry_policy.attempts} attempts: {exc.response.text[:200]!r}") from None
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise PrometheusUnavailable(f"Prometheus at {self.url} is unreachable: {exc}") from exc

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
    """Requests, 5xx errors, latency quantiles and a score sample of ``variant`` over the last ``window_s``
    (for a canary step: ``query_window_s(client.scrape_interval_s, interval_s)``).

    Raises :class:`PrometheusUnavailable` when a scrape of the variant failed within the window: figures read
    from part of a window must not pass a candidate.
    """
    scraped = client.value(scrape_health_query(variant, window_s))
    if scraped is None or scraped < 1:
        state = "no scrape at all" if scraped is None else "a failed scrape"
        raise PrometheusUnavailable(f"Prometheus holds {state} of {variant.selector()} in the last {window_s:.1f} s: "
                                    f"the window's figures are incomplete")
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
