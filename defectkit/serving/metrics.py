"""Prometheus metrics of the model server, every one labelled with the model version that answered.

They live in prometheus_client's default registry, which KServe's model
server exposes at ``GET /metrics``; the delivery controller compares a
canary with the stable version on them (error rate, latency percentiles,
score distribution and defect rate).

The names the delivery backends read live here as constants: the local
scraper finds them on ``/metrics`` pages, the PromQL client asks
Prometheus for them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping

import numpy as np
from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from defectkit.serving.breaker import CLOSED, HALF_OPEN, OPEN

LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0)
SCORE_BUCKETS = tuple(round(0.05 * i, 2) for i in range(1, 21))
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
BREAKER_STATE_VALUES = {CLOSED: 0, OPEN: 1, HALF_OPEN: 2}

REQUESTS_METRIC = "defectkit_requests"
LATENCY_METRIC = "defectkit_request_latency_seconds"
SCORE_METRIC = "defectkit_score"
STATUS_LABEL = "status"
SAMPLES_DRAWN_METRIC = "defectkit_samples_drawn"
SAMPLES_WRITTEN_METRIC = "defectkit_samples_written"
SAMPLES_DROPPED_METRIC = "defectkit_samples_dropped"
SAMPLES_PENDING_METRIC = "defectkit_samples_pending"
REASON_LABEL = "reason"
# Why a drawn sample was not written: the queue to the writer was full (storage slower than the sample rate),
# or the writer could not store it (storage down, disk full, refused; or the sample did not encode).
DROPPED_QUEUE_FULL = "queue_full"
DROPPED_WRITE_FAILED = "write_failed"
# The status values that count as errors: a regular expression, as PromQL's =~ takes it.
ERROR_STATUS = "5.."

REQUESTS = Counter(REQUESTS_METRIC, "Inference requests by HTTP status code", ["model_version", STATUS_LABEL])
LATENCY = Histogram(LATENCY_METRIC, "Inference request latency, body received to response",
                    ["model_version"], buckets=LATENCY_BUCKETS)
SCORES = Histogram(SCORE_METRIC, "Defect scores returned", ["model_version"], buckets=SCORE_BUCKETS)
PREDICTIONS = Counter("defectkit_predictions", "Images labelled, by label (defect rate = defect / all)",
                      ["model_version", "label"])
BATCH_SIZE = Histogram("defectkit_batch_size", "Images per model forward (micro-batching)", ["model_version"],
                       buckets=BATCH_BUCKETS)
MODEL_FAILURES = Counter("defectkit_model_failures", "Model calls that raised or timed out",
                         ["model_version", "kind"])
BREAKER_STATE = Gauge("defectkit_breaker_state", "Circuit breaker of the primary model: 0 closed, 1 open, 2 half-open",
                      ["model_version"])
MODEL_INFO = Gauge("defectkit_model_info", "Models loaded by this server (value 1)",
                   ["model_version", "role", "architecture", "image_size", "weights_sha256"])


def counter_series(counter: str) -> str:
    """The series a counter's value is exported as: the exposition format adds ``_total`` to its name."""
    return counter + "_total"


def bucket_series(histogram: str) -> str:
    """The series of a histogram's cumulative bucket counts, one per ``le`` bound."""
    return histogram + "_bucket"


def request_done(model_version: str, status: int, seconds: float) -> None:
    REQUESTS.labels(model_version, str(status)).inc()
    LATENCY.labels(model_version).observe(seconds)


def predictions(model_version: str, scores: np.ndarray, defect: np.ndarray) -> None:
    histogram = SCORES.labels(model_version)
    for score in scores.tolist():
        histogram.observe(score)
    n_defect = int(np.count_nonzero(defect))
    if n_defect:
        PREDICTIONS.labels(model_version, "defect").inc(n_defect)
    if n_defect < len(scores):
        PREDICTIONS.labels(model_version, "good").inc(len(scores) - n_defect)


def batch(model_version: str, size: int) -> None:
    BATCH_SIZE.labels(model_version).observe(size)


def model_failure(model_version: str, kind: str) -> None:
    MODEL_FAILURES.labels(model_version, kind).inc()


def breaker_state(model_version: str, state: str) -> None:
    BREAKER_STATE.labels(model_version).set(BREAKER_STATE_VALUES[state])


def model_loaded(model_version: str, role: str, architecture: str, image_size: int, weights_sha256: str) -> None:
    MODEL_INFO.labels(model_version, role, architecture, str(image_size), weights_sha256).set(1)


class _SamplingCollector:
    """The production sampler's counts, read from the sampler when ``/metrics`` is scraped.

    The sampler keeps its own counts (it is used without a server, too); reading them at scrape
    time keeps the request path free of a second set of counters. Every drawn sample is written,
    dropped with a reason, or pending: drawn = written + dropped + pending.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sources: dict[str, Callable[[], Mapping[str, int]]] = {}

    def watch(self, model_version: str, stats: Callable[[], Mapping[str, int]]) -> None:
        with self._lock:
            self._sources[model_version] = stats

    def forget(self, model_version: str) -> None:
        with self._lock:
            self._sources.pop(model_version, None)

    def describe(self) -> Iterator[Metric]:
        return iter(self._families())

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            sources = dict(self._sources)
        families = self._families()
        drawn, written, dropped, pending = families
        for version, stats in sources.items():
            counts = stats()
            drawn.add_metric([version], counts["sampled"])
            written.add_metric([version], counts["written"])
            dropped.add_metric([version, DROPPED_QUEUE_FULL], counts["dropped"])
            dropped.add_metric([version, DROPPED_WRITE_FAILED], counts["failed"])
            pending.add_metric([version], counts["sampled"] - counts["written"] - counts["dropped"] - counts["failed"])
        return iter(families)

    @staticmethod
    def _families() -> list[Metric]:
        return [
            CounterMetricFamily(SAMPLES_DRAWN_METRIC, "Served images drawn for production sampling",
                                labels=["model_version"]),
            CounterMetricFamily(SAMPLES_WRITTEN_METRIC, "Sampled images stored with their answers",
                                labels=["model_version"]),
            CounterMetricFamily(SAMPLES_DROPPED_METRIC, "Sampled images not stored, by reason: queue_full "
                                "(storage slower than the sample rate) or write_failed (storage refused or down, "
                                "disk full, or the image did not encode)", labels=["model_version", REASON_LABEL]),
            GaugeMetricFamily(SAMPLES_PENDING_METRIC, "Sampled images queued or being written",
                              labels=["model_version"]),
        ]


_SAMPLING = _SamplingCollector()
REGISTRY.register(_SAMPLING)


def watch_sampling(model_version: str, stats: Callable[[], Mapping[str, int]]) -> None:
    """Export a sampler's counts (``Sampler.stats``) on ``/metrics``, labelled with the serving model version."""
    _SAMPLING.watch(model_version, stats)


def forget_sampling(model_version: str) -> None:
    _SAMPLING.forget(model_version)
