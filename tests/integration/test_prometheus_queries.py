"""The KServe backend's PromQL against a real Prometheus scraping real model servers on 127.0.0.1.

Prometheus scrapes, every second, three ``defectkit serve`` processes labelled like three
revisions of one InferenceService's predictor pods: the stable version, a good candidate
(the stable weights with the defect logit moved by 1e-4: a new version that scores alike)
and a bad candidate (the good one with fault injection: half its model calls fail with
500, the rest score 1). Skipped where no ``prometheus`` binary is on PATH. Every process
is stopped by PID.
"""

from __future__ import annotations

import bisect
import concurrent.futures
import json
import math
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import torch

from defectkit.data import Manifest
from defectkit.delivery.analysis import FAIL, PASS, CanaryPolicy, analyse
from defectkit.delivery.backend import VariantMetrics, infer_request
from defectkit.delivery.kserve.prometheus import PrometheusClient, Variant, query_window_s, variant_metrics
from defectkit.delivery.local.scrape import Snapshot, parse_metrics, window_metrics
from defectkit.delivery.traffic import LoadGenerator
from defectkit.models import ModelMetadata, build_model, save_model
from defectkit.preprocess import PreprocessSpec
from defectkit.serving.metrics import LATENCY_BUCKETS, SCORE_BUCKETS
from tests.conftest import TINY_IMAGE_SIZE
from tests.servers import PodTarget, ServerProcess, free_port, start_server

ROOT = Path(__file__).resolve().parents[2]
SCRAPE_INTERVAL_S = 1.0
NAMESPACE, NAME = "ml", "defect"
REVISIONS = {"stable": f"{NAME}-predictor-00001", "good": f"{NAME}-predictor-00002", "bad": f"{NAME}-predictor-00003"}
# The breaker stays shut so that every faulty call reaches the model: half fail, the rest are scored.
BAD_ARGS = ("--fault-error-rate", "0.5", "--fault-score-shift", "1.0", "--breaker-failures", "100000")
INFER = "/v2/models/defectkit/infer"
SENT = 40  # requests per server in the measured window
WARM_UP_LIMIT = 30
QUIET_SCRAPES = 5
LOAD_RATE = 10.0
MAX_ANALYSES = 8
POLICY = CanaryPolicy(steps=(50, 100), interval_s=2.0, failure_threshold=2, min_requests=10, max_error_rate=0.01,
                      max_p99_latency_s=1.0)


@dataclass
class Platform:
    servers: dict[str, ServerProcess]
    prometheus: PrometheusClient

    def infer_url(self, name: str) -> str:
        return self.servers[name].url + INFER

    def metrics(self, name: str, window_s: float) -> VariantMetrics:
        return variant_metrics(self.prometheus, Variant(NAMESPACE, NAME, REVISIONS[name]), window_s)

    def scraped_after(self, t: float, timeout_s: float = 30.0) -> None:
        """Return once Prometheus holds a sample of every server taken after ``t``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            # timestamp() gives a sample's own time only when applied to a selector: hence two queries.
            up = self.prometheus.query('up{job="kubernetes-pods"}')
            scraped = self.prometheus.query('timestamp(up{job="kubernetes-pods"})')
            if (len(up) == len(scraped) == len(self.servers) and all(s.value == 1 for s in up)
                    and min(s.value for s in scraped) > t):
                return
            time.sleep(SCRAPE_INTERVAL_S / 4)
        raise TimeoutError(f"Prometheus scraped no sample of every server after {t} within {timeout_s} s")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def images(dataset_dir) -> list[bytes]:
    return [(dataset_dir / e.path).read_bytes() for e in Manifest.read(dataset_dir).entries[:20]]


@pytest.fixture(scope="module")
def bodies(images) -> list[bytes]:
    return [json.dumps(infer_request([image])).encode() for image in images]


@pytest.fixture(scope="module")
def platform(prometheus, tmp_path_factory):
    root = tmp_path_factory.mktemp("prometheus-platform")
    torch.manual_seed(0)
    module = build_model("resnet18")
    metadata = ModelMetadata(architecture="resnet18", classes=("good", "crack"),
                             preprocess=PreprocessSpec(image_size=TINY_IMAGE_SIZE), threshold=0.5,
                             threshold_policy={"kind": "max_f1"})
    stable_model = save_model(module, metadata, root / "stable")
    with torch.no_grad():
        module.fc.bias.add_(1e-4)
    candidate_model = save_model(module, metadata, root / "candidate")
    plans = {"stable": (stable_model,), "good": (candidate_model,), "bad": (candidate_model, *BAD_ARGS)}

    def start(name: str, model: Path, *args: str) -> ServerProcess:
        port = free_port()
        return start_server(
            [sys.executable, "-m", "defectkit", "serve", "--model", str(model), "--port", str(port), "--threads", "1",
             *args],
            url=f"http://127.0.0.1:{port}", health_path="/v2/health/ready", log_path=root / f"{name}.log",
            env={"PYTHONPATH": str(ROOT)}, timeout=120,
        )

    with concurrent.futures.ThreadPoolExecutor(len(plans)) as pool:
        futures = {name: pool.submit(start, name, *plan) for name, plan in plans.items()}
    servers = {name: f.result() for name, f in futures.items() if f.exception() is None}
    try:
        for future in futures.values():
            if future.exception() is not None:
                raise future.exception()
        targets = [
            PodTarget(address=server.url.removeprefix("http://"), namespace=NAMESPACE,
                      pod=f"{REVISIONS[name]}-deployment-0",
                      labels={"serving.kserve.io/inferenceservice": NAME, "component": "predictor",
                              "serving.knative.dev/revision": REVISIONS[name],
                              "serving.knative.dev/service": f"{NAME}-predictor"})
            for name, server in servers.items()
        ]
        server = prometheus(targets, SCRAPE_INTERVAL_S)
        started = Platform(servers, PrometheusClient(server.url, scrape_interval_s=SCRAPE_INTERVAL_S))
        started.scraped_after(time.time())
        yield started
    finally:
        for server in servers.values():
            server.stop()


# --------------------------------------------------------------------------- helpers


def send(session: requests.Session, url: str, bodies: list[bytes], count: int) -> Counter:
    """Statuses of ``count`` requests sent one after another."""
    statuses: Counter = Counter()
    for i in range(count):
        response = session.post(url, data=bodies[i % len(bodies)], headers={"content-type": "application/json"},
                                timeout=30)
        statuses[response.status_code] += 1
    return statuses


def warm_up(session: requests.Session, url: str, bodies: list[bytes], statuses: set[int]) -> None:
    """Send until every status in ``statuses`` has been answered: their series exist from then on."""
    seen: set[int] = set()
    for i in range(WARM_UP_LIMIT):
        seen |= set(send(session, url, bodies[i:i + 1], 1))
        if statuses <= seen:
            return
    raise AssertionError(f"{url} answered {sorted(seen)} in {WARM_UP_LIMIT} requests, not all of {sorted(statuses)}")


def snapshot(session: requests.Session, server: ServerProcess) -> Snapshot:
    return parse_metrics(session.get(server.url + "/metrics", timeout=10).text, time.time())


def bucket(value: float, bounds: tuple[float, ...]) -> int:
    return bisect.bisect_left(bounds, value)


def slowest_bound(server: Snapshot) -> float:
    """The least latency bucket bound that every request the server ever answered lies within."""
    total = server.latency[-1][1]
    return min(le for le, count in server.latency if count == total)


def report(capsys, text: str) -> None:
    with capsys.disabled():
        print(f"\n[delivery] {text}", flush=True)


# --------------------------------------------------------------------------- tests


def test_variant_metrics_match_what_each_revision_answered(platform, bodies):
    session = requests.Session()
    # Every series a query reads exists before the window opens, so all of the window's traffic lies between
    # two samples inside it; the bad candidate has answered both a 200 and a 500.
    for name in platform.servers:
        warm_up(session, platform.infer_url(name), bodies, {200, 500} if name == "bad" else {200})
    warmed = time.time()
    platform.scraped_after(warmed)
    # Quiet scrapes before the traffic: the window, in whole seconds, may start up to a second late, and the
    # longer it is, the less increase() extrapolates (see below).
    time.sleep(QUIET_SCRAPES * SCRAPE_INTERVAL_S)
    before = {name: snapshot(session, server) for name, server in platform.servers.items()}
    sent = {name: send(session, platform.infer_url(name), bodies, SENT) for name in platform.servers}
    after = {name: snapshot(session, server) for name, server in platform.servers.items()}
    platform.scraped_after(time.time())
    # Whole seconds, rounded down: the window must not reach back into the warm-up.
    window_s = math.floor(time.time() - warmed)
    figures = {name: platform.metrics(name, window_s) for name in platform.servers}

    # increase() extrapolates the increase between the first and last samples in the range towards the range's
    # edges, by at most 1.1 average sample intervals on each side; those samples lie within a scrape interval
    # (and some jitter) of the edges.
    extrapolation = 1 + 2.2 * SCRAPE_INTERVAL_S / (window_s - 2.5 * SCRAPE_INTERVAL_S)
    assert sent["stable"] == sent["good"] == Counter({200: SENT})
    assert 0 < sent["bad"][500] < SENT and sent["bad"][200] + sent["bad"][500] == SENT
    for name, got in figures.items():
        exact = window_metrics(after[name], before[name])
        assert exact.requests == SENT and exact.errors == sent[name][500]
        assert SENT <= got.requests <= SENT * extrapolation, (name, got.summary())
        errors = sent[name][500]
        assert errors <= got.errors <= errors * extrapolation, (name, got.summary())
        # Each bucket series is extrapolated on its own (by how far its first sample is from zero), so the quantiles
        # move by up to a bucket; p99 can go no higher than the slowest bucket the server has ever filled.
        assert abs(bucket(got.p50_latency_s, LATENCY_BUCKETS) - bucket(exact.p50_latency_s, LATENCY_BUCKETS)) <= 1, \
            (name, got.p50_latency_s, exact.p50_latency_s)
        lowest = LATENCY_BUCKETS[max(bucket(exact.p99_latency_s, LATENCY_BUCKETS) - 2, 0)]
        assert lowest <= got.p99_latency_s <= slowest_bound(after[name]), (name, got.p99_latency_s, exact.p99_latency_s)
        assert len(exact.scores) == sent[name][200]
        assert len(exact.scores) <= len(got.scores) <= len(exact.scores) * extrapolation + len(set(exact.scores)) / 2
        mean, exact_mean = sum(got.scores) / len(got.scores), sum(exact.scores) / len(exact.scores)
        assert abs(mean - exact_mean) <= SCORE_BUCKETS[0], (name, mean, exact_mean)
    assert set(figures["bad"].scores) == {0.975}  # every score shifted to 1: the midpoint of the top bucket
    assert max(figures["stable"].scores) < 0.975

    failed = analyse(figures["stable"], figures["bad"], POLICY)
    assert failed.verdict == FAIL, failed.explain()
    assert {c.name for c in failed.failed_checks} == {"error_rate", "score_shift"}, failed.explain()
    passed = analyse(figures["stable"], figures["good"], POLICY)
    assert passed.verdict == PASS, passed.explain()


def test_time_for_the_analysis_to_roll_back_a_bad_candidate(platform, images, capsys):
    """The controller's cadence: analyse every interval_s over the derived window; failure_threshold failures
    roll back."""
    window_s = query_window_s(platform.prometheus.scrape_interval_s, POLICY.interval_s)
    assert window_s == 4 * SCRAPE_INTERVAL_S  # a 2 s step is two scrapes: the four-scrape floor applies
    time.sleep(window_s + SCRAPE_INTERVAL_S)  # earlier tests' traffic out of the window
    verdicts: list[tuple[float, str]] = []
    with LoadGenerator(platform.infer_url("stable"), images, LOAD_RATE) as stable_load:
        first_traffic = time.time()
        with LoadGenerator(platform.infer_url("bad"), images, LOAD_RATE) as bad_load:
            next_analysis = first_traffic + POLICY.interval_s
            while len(verdicts) < MAX_ANALYSES:
                time.sleep(max(next_analysis - time.time(), 0.0))
                result = analyse(platform.metrics("stable", window_s), platform.metrics("bad", window_s), POLICY)
                verdicts.append((time.time() - first_traffic, result.verdict))
                if sum(v == FAIL for _, v in verdicts) >= POLICY.failure_threshold:
                    break
                next_analysis += POLICY.interval_s
    failures = [t for t, v in verdicts if v == FAIL]
    assert len(failures) == POLICY.failure_threshold, verdicts
    assert PASS not in [v for _, v in verdicts], verdicts
    decided = failures[-1]
    sent = len(stable_load.results) + len(bad_load.results)
    report(capsys, f"kserve metrics from a real Prometheus (scrape {SCRAPE_INTERVAL_S:g} s, interval "
                   f"{POLICY.interval_s:g} s, query window {window_s:g} s): rollback decided {decided:.2f} s "
                   f"({decided / POLICY.interval_s:.2f} intervals) after the bad candidate got traffic; verdicts "
                   + ", ".join(f"{v} at {t:.2f} s" for t, v in verdicts) + f"; {sent} requests")


def test_the_dashboards_queries_answer_by_model_version(platform, bodies):
    """deploy/grafana/defectkit-dashboard.json, each query as Grafana sends it with "All" chosen, against the
    servers' real series: every one is valid PromQL, and the serving and quality panels show each version."""
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "defectkit-dashboard.json").read_text())
    session = requests.Session()
    for name in platform.servers:
        send(session, platform.infer_url(name), bodies, 10)
    # rate() needs two samples of a series: one more scrape after the first that saw the requests.
    platform.scraped_after(time.time() + SCRAPE_INTERVAL_S)
    versions = {s.labels["model_version"] for s in platform.prometheus.query("defectkit_model_info")}
    assert len(versions) == 2  # the good and bad candidates serve the same weights
    # Grafana's $__rate_interval is at least four scrape intervals.
    values = {"$namespace": ".*", "$model_version": ".*", "$__rate_interval": f"{4 * SCRAPE_INTERVAL_S:g}s"}
    answered = {}
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in values.items():
                expr = expr.replace(variable, value)
            samples = platform.prometheus.query(expr)  # raises on a query Prometheus refuses
            answered.setdefault(panel["title"], set()).update(
                s.labels.get("model_version") for s in samples if not math.isnan(s.value))
    # Nothing was dropped and no breaker changed state here: those panels may be empty, but their queries ran.
    for title in ("Requests per second", "Server errors (5xx)", "Latency p50 / p99", "Images per forward pass",
                  "Defect rate", "Mean defect score", "Circuit breaker"):
        assert answered[title] == versions, (title, answered[title])
    assert "Production samples" in answered
