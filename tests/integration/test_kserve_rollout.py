"""The controller driving the KServe backend: a Kubernetes API stand-in and a Prometheus stand-in on 127.0.0.1."""

from __future__ import annotations

import re

import pytest

from defectkit.delivery.analysis import CanaryPolicy
from defectkit.delivery.controller import Controller
from defectkit.delivery.kserve.api import KubeApi
from defectkit.delivery.kserve.backend import KServeBackend, read_traffic
from defectkit.delivery.kserve.manifest import ServiceConfig
from defectkit.delivery.state import PROMOTED, ROLLED_BACK
from defectkit.retry import RetryPolicy
from tests.kube_api import KubeApiStandIn
from tests.stand_ins import JsonServer, ManualClock

NAMESPACE, NAME = "ml", "defect"
STABLE_URI, CANDIDATE_URI = "gs://defectkit-models/defect/1", "gs://defectkit-models/defect/2"
CONFIG = ServiceConfig(name=NAME, namespace=NAMESPACE, image="ghcr.io/defectkit/serve:0.1.0", storage_uri=STABLE_URI)
POLICY = CanaryPolicy(steps=(10, 50, 100), interval_s=30.0, failure_threshold=2, min_requests=50)
_REVISION = re.compile(r'serving_knative_dev_revision="([^"]+)"')


class Prometheus:
    """Answers the controller's queries from per-revision figures: requests, 5xx, p99, score histogram."""

    def __init__(self) -> None:
        self.figures: dict[str, dict] = {}
        self._server = JsonServer(
            lambda method, path, query, body: (200, {"status": "success", "data": self.answer(query["query"][0])}))
        self.url = self._server.url

    def answer(self, query: str) -> dict:
        revision = _REVISION.search(query).group(1)
        f = self.figures.get(revision, {"requests": 0, "errors": 0, "p99": None, "scores": {}})
        if query.startswith("histogram_quantile"):
            value = f["p99"] if "0.99" in query else (f["p99"] and f["p99"] / 2)
            samples = [({}, value)] if value is not None else []
        elif "defectkit_score_bucket" in query:
            samples = [({"le": le}, n) for le, n in f["scores"].items()]
        elif 'status=~"5.."' in query:
            samples = [({}, f["errors"])]
        else:
            samples = [({}, f["requests"])]
        return {"resultType": "vector", "result": [{"metric": m, "value": [0, str(v)]} for m, v in samples]}

    def close(self) -> None:
        self._server.close()


def figures(requests: int, errors: int = 0, p99: float = 0.05) -> dict:
    return {"requests": requests, "errors": errors, "p99": p99,
            "scores": {"0.25": requests * 0.6, "0.5": requests * 0.9, "1.0": requests, "+Inf": requests}}


@pytest.fixture
def platform():
    prometheus = Prometheus()
    with KubeApiStandIn(status_delay_s=0.01) as kube:
        api = KubeApi(kube.url, retry_policy=RetryPolicy(attempts=3, initial_delay_s=0.01, max_delay_s=0.05))
        backend = KServeBackend(api, NAMESPACE, NAME, prometheus.url, poll_interval_s=0.01, traffic_timeout_s=5.0,
                                ready_timeout_s=5.0)
        backend.ensure_exists(CONFIG)
        yield kube, prometheus, backend
        assert kube.internal_errors == []
    prometheus.close()


def run(backend, tmp_path):
    clock = ManualClock()
    return Controller(backend, POLICY, tmp_path / "state.json", candidate=CANDIDATE_URI, backend_name="kserve",
                      clock=clock, sleep=clock.sleep).run()


def test_a_healthy_revision_is_stepped_and_promoted(platform, tmp_path):
    kube, prometheus, backend = platform
    prometheus.figures = {f"{NAME}-predictor-00001": figures(900), f"{NAME}-predictor-00002": figures(400)}
    state = run(backend, tmp_path)
    assert state.phase == PROMOTED, state.reason
    assert [a["weight"] for a in state.analyses] == [10, 50]
    split = read_traffic(backend.get())
    assert split.candidate_revision == f"{NAME}-predictor-00002" and split.candidate_percent == 100
    assert "canaryTrafficPercent" not in kube.stored(NAMESPACE, NAME)["spec"]["predictor"]
    assert state.weight == backend.traffic() == 100


def test_a_failing_revision_is_rolled_back_and_the_rolled_out_one_keeps_all_traffic(platform, tmp_path):
    kube, prometheus, backend = platform
    prometheus.figures = {f"{NAME}-predictor-00001": figures(900), f"{NAME}-predictor-00002": figures(400, errors=40)}
    state = run(backend, tmp_path)
    assert state.phase == ROLLED_BACK and state.failed_checks == 2
    assert all(a["weight"] == 10 for a in state.analyses)
    split = read_traffic(backend.get())
    assert split.candidate_percent == 0 and split.stable_percent == 100
    assert split.rolled_out_revision == f"{NAME}-predictor-00001"
    assert state.weight == backend.traffic() == 0
