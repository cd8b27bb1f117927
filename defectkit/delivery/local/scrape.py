"""The model servers' figures, read from their ``/metrics`` pages as Prometheus would.

Each server's ``/metrics`` is scraped every ``scrape_interval_s`` by a background thread;
the figures of a window are the differences between the newest scrape and the last one
taken at least ``window_s`` before it, as Prometheus' ``increase`` does. Latency quantiles
are interpolated within histogram buckets as ``histogram_quantile`` does, and scores are
sampled from the score histogram as the KServe backend samples them.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Sequence

from defectkit.delivery.analysis import MetricsUnavailable
from defectkit.delivery.backend import VariantMetrics
from defectkit.delivery.local.processes import ServerInfo

log = logging.getLogger(__name__)

HISTORY_S = 900.0

Buckets = tuple[tuple[float, float], ...]  # (le, cumulative count), ascending


@dataclass(frozen=True)
class Snapshot:
    """Cumulative counters of one server at one moment."""

    t: float
    requests: float
    errors: float
    latency: Buckets
    scores: Buckets


def parse_metrics(text: str, t: float) -> Snapshot:
    """The defectkit_* counters of a /metrics page, summed over model versions (one server is one variant)."""
    from prometheus_client.parser import text_string_to_metric_families

    from defectkit.serving import metrics as server_metrics

    requests = errors = 0.0
    latency: dict[float, float] = {}
    scores: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == server_metrics.REQUESTS_METRIC:
            for sample in family.samples:
                if sample.name == server_metrics.counter_series(family.name):
                    requests += sample.value
                    if re.fullmatch(server_metrics.ERROR_STATUS, sample.labels.get(server_metrics.STATUS_LABEL, "")):
                        errors += sample.value
        elif family.name in (server_metrics.LATENCY_METRIC, server_metrics.SCORE_METRIC):
            buckets = latency if family.name == server_metrics.LATENCY_METRIC else scores
            for sample in family.samples:
                if sample.name == server_metrics.bucket_series(family.name):
                    le = float(sample.labels["le"])
                    buckets[le] = buckets.get(le, 0.0) + sample.value
    return Snapshot(t, requests, errors, tuple(sorted(latency.items())), tuple(sorted(scores.items())))


def _bucket_increase(now: Buckets, base: Buckets) -> list[tuple[float, float]]:
    before = dict(base)
    return [(le, max(count - before.get(le, 0.0), 0.0)) for le, count in now]


def histogram_quantile(q: float, cumulative: Sequence[tuple[float, float]]) -> float | None:
    """Prometheus' histogram_quantile over (le, cumulative count) pairs; None when the histogram is empty."""
    buckets = sorted(cumulative)
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for index, (le, count) in enumerate(buckets):
        if count >= rank:
            if math.isinf(le):
                return buckets[index - 1][0] if index > 0 else None
            if count == below:
                return le
            return lower + (le - lower) * (rank - below) / (count - below)
        lower, below = le, count
    return buckets[-1][0]


def window_metrics(now: Snapshot, base: Snapshot) -> VariantMetrics:
    """What a server answered between two snapshots."""
    from defectkit.delivery.backend import scores_from_buckets

    # A counter lower than before means the server restarted; as Prometheus does, count from zero.
    reset = now.requests < base.requests
    if reset:
        base = Snapshot(base.t, 0.0, 0.0, (), ())
    latency = _bucket_increase(now.latency, base.latency)
    return VariantMetrics(
        requests=now.requests - base.requests,
        errors=max(now.errors - base.errors, 0.0),
        p50_latency_s=histogram_quantile(0.5, latency),
        p99_latency_s=histogram_quantile(0.99, latency),
        scores=tuple(scores_from_buckets(_bucket_increase(now.scores, base.scores))),
    )


class Scraper:
    """Scrapes the stable and canary servers in a background thread and keeps their recent snapshots."""

    def __init__(self, interval_s: float, timeout_s: float = 5.0) -> None:
        import httpx

        self.interval_s = interval_s
        self._client = httpx.Client(timeout=timeout_s)
        self._targets: dict[str, ServerInfo] = {}
        self._history: dict[tuple[int, float], deque[Snapshot]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def watch(self, targets: dict[str, ServerInfo | None]) -> None:
        with self._lock:
            self._targets = {role: info for role, info in targets.items() if info is not None}
            keep = {(info.pid, info.create_time) for info in self._targets.values()}
            self._history = {key: snaps for key, snaps in self._history.items() if key in keep}
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="scraper", daemon=True)
            self._thread.start()

    def scrape(self, info: ServerInfo) -> Snapshot:
        import httpx

        try:
            response = self._client.get(info.url + "/metrics")
            response.raise_for_status()
        except httpx.HTTPError as exc:
            # Missing figures; LocalBackend.metrics tells a dead server (the candidate's fault) from this.
            raise MetricsUnavailable(f"cannot scrape the {info.role} server's metrics at {info.url}/metrics: "
                                     f"{exc}") from exc
        snapshot = parse_metrics(response.text, time.monotonic())
        with self._lock:
            history = self._history.setdefault((info.pid, info.create_time),
                                               deque(maxlen=int(HISTORY_S / self.interval_s) + 2))
            history.append(snapshot)
        return snapshot

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            with self._lock:
                targets = list(self._targets.values())
            for info in targets:
                try:
                    self.scrape(info)
                except MetricsUnavailable as exc:
                    log.debug("%s", exc)

    def window(self, info: ServerInfo, window_s: float) -> VariantMetrics:
        """The server's figures over the last ``window_s`` (shorter when it has been scraped for less time)."""
        now = self.scrape(info)
        with self._lock:
            history = list(self._history.get((info.pid, info.create_time), ()))
        older = [s for s in history if s.t <= now.t - window_s]
        base = older[-1] if older else history[0]
        return window_metrics(now, base)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval_s + 5)
        self._client.close()
