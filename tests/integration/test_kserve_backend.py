"""The KServe backend against a Kubernetes API stand-in, a Prometheus stand-in and a real KServe model server."""

from __future__ import annotations

import sys
import time

import pytest
import yaml

from defectkit.delivery.kserve import prometheus as prom
from defectkit.delivery.kserve.api import KubeApi, KubeApiError
from defectkit.delivery.kserve.backend import KServeBackend, RolloutTimeout, read_traffic
from defectkit.delivery.kserve.canary import patch_for_canary
from defectkit.delivery.kserve.manifest import ServiceConfig
from defectkit.retry import RetryPolicy
from tests.crd import assert_valid
from tests.kube_api import PREFIX, KubeApiStandIn
from tests.servers import free_port, start_server
from tests.stand_ins import JsonServer

NAMESPACE, NAME = "ml", "defect"
TOKEN = "s3cr3t"
STABLE_URI = "gs://defectkit-models/defect/1"
CANDIDATE_URI = "gs://defectkit-models/defect/2"
FAST_RETRY = RetryPolicy(attempts=4, initial_delay_s=0.01, max_delay_s=0.05)
CONFIG = ServiceConfig(name=NAME, namespace=NAMESPACE, image="ghcr.io/defectkit/serve:0.1.0", storage_uri=STABLE_URI)
REVISION_1, REVISION_2, REVISION_3 = (f"{NAME}-predictor-0000{i}" for i in (1, 2, 3))


def make_backend(kube: KubeApiStandIn, prometheus_url: str = "http://127.0.0.1:9", **kwargs) -> KServeBackend:
    api = KubeApi(kube.url, token=TOKEN, retry_policy=FAST_RETRY)
    options = {"poll_interval_s": 0.01, "traffic_timeout_s": 5.0, "ready_timeout_s": 5.0, **kwargs}
    return KServeBackend(api, NAMESPACE, NAME, prometheus_url, **options)


@pytest.fixture
def kube():
    with KubeApiStandIn(token=TOKEN, status_delay_s=0.02) as stand_in:
        yield stand_in
        assert stand_in.internal_errors == []
        for obj in stand_in.objects.values():
            assert_valid(obj)


@pytest.fixture
def deployed(kube):
    """An InferenceService serving STABLE_URI, created through the backend."""
    backend = make_backend(kube)
    assert backend.ensure_exists(CONFIG) is True
    return backend


def traffic_entries(kube: KubeApiStandIn) -> dict[str, int]:
    status = kube.stored(NAMESPACE, NAME)["status"]["components"]["predictor"]
    return {entry["revisionName"]: entry["percent"] for entry in status["traffic"]}


def test_canary_steps_are_read_back_then_promoted(kube, deployed):
    assert deployed.traffic() == 100 and traffic_entries(kube) == {REVISION_1: 100}
    assert deployed.ensure_exists(CONFIG) is False

    deployed.deploy_candidate(CANDIDATE_URI)
    assert deployed.traffic() == 0
    assert traffic_entries(kube) == {REVISION_2: 0, REVISION_1: 100}
    for percent in (10, 25, 50):
        deployed.set_traffic(percent)
        assert deployed.traffic() == percent
        assert traffic_entries(kube) == {REVISION_2: percent, REVISION_1: 100 - percent}
    # At 100 KServe's ksvc reconciler gives the latest revision the only entry.
    deployed.set_traffic(100)
    assert deployed.traffic() == 100 and traffic_entries(kube) == {REVISION_2: 100}

    deployed.promote()
    stored = kube.stored(NAMESPACE, NAME)
    assert "canaryTrafficPercent" not in stored["spec"]["predictor"]
    assert traffic_entries(kube) == {REVISION_2: 100}
    predictor = stored["status"]["components"]["predictor"]
    assert predictor["latestRolledoutRevision"] == REVISION_2
    assert predictor["previousRolledoutRevision"] == REVISION_1
    assert deployed.traffic() == 100

    patches = kube.calls("PATCH")
    assert [r.body["spec"]["predictor"].get("canaryTrafficPercent") for r in patches] == [0, 10, 25, 50, 100, None]
    assert all(r.headers["Content-Type"] == "application/merge-patch+json" for r in patches)
    assert all(r.query == {"fieldValidation": "Strict"} for r in patches)
    assert all(r.headers["Authorization"] == f"Bearer {TOKEN}" for r in kube.requests)


def test_rollback_returns_all_traffic_to_the_stable_revision(kube, deployed):
    deployed.deploy_candidate(CANDIDATE_URI)
    deployed.set_traffic(10)
    deployed.set_traffic(25)
    deployed.rollback()
    assert deployed.traffic() == 0
    assert traffic_entries(kube) == {REVISION_2: 0, REVISION_1: 100}
    assert kube.stored(NAMESPACE, NAME)["spec"]["predictor"]["canaryTrafficPercent"] == 0

    # The next candidate is measured against the revision that still serves, not the rolled-back one.
    deployed.deploy_candidate("gs://defectkit-models/defect/3")
    assert traffic_entries(kube) == {REVISION_3: 0, REVISION_1: 100}


def test_rollback_after_full_rollout_is_refused(deployed):
    deployed.deploy_candidate(CANDIDATE_URI)
    deployed.set_traffic(100)
    with pytest.raises(RuntimeError, match=f"{REVISION_2} is already the rolled-out one"):
        deployed.rollback()


def test_waits_for_a_delayed_status(kube, deployed):
    deployed.deploy_candidate(CANDIDATE_URI)
    kube.status_delay_s = 0.4
    gets_before = len(kube.calls("GET"))
    started = time.monotonic()
    deployed.set_traffic(25)
    assert time.monotonic() - started >= 0.4
    assert deployed.traffic() == 25
    # It read the stale status (still 0%) several times before the controller caught up.
    assert len(kube.calls("GET")) - gets_before > 3


def test_a_status_that_never_converges_times_out_clearly(kube, deployed):
    deployed.deploy_candidate(CANDIDATE_URI)
    kube.reconciling = False
    backend = make_backend(kube, traffic_timeout_s=0.3)
    with pytest.raises(RolloutTimeout) as caught:
        backend.set_traffic(10)
    message = str(caught.value)
    assert f"InferenceService {NAMESPACE}/{NAME} did not report the candidate ready with 10% of traffic" in message
    assert f"newest {REVISION_2} 0%, {REVISION_1} 100%" in message


def test_a_candidate_that_never_gets_ready_times_out_and_rolls_back(kube, deployed):
    kube.failing_uris.add(CANDIDATE_URI)
    backend = make_backend(kube, ready_timeout_s=0.3)
    with pytest.raises(RolloutTimeout, match="RevisionFailed.*model failed to load"):
        backend.deploy_candidate(CANDIDATE_URI)
    assert backend.traffic() == 0  # KServe routes nothing to a revision that is not ready
    backend.rollback()
    assert traffic_entries(kube) == {REVISION_1: 100}


def test_redeploying_the_same_candidate_resumes(kube, deployed):
    deployed.deploy_candidate(CANDIDATE_URI)
    deployed.set_traffic(10)
    deployed.deploy_candidate(CANDIDATE_URI)  # as a resumed delivery does: same URI, no new revision
    assert traffic_entries(kube) == {REVISION_2: 0, REVISION_1: 100}
    deployed.promote()
    with pytest.raises(ValueError, match="already the rolled-out model"):
        deployed.deploy_candidate(CANDIDATE_URI)


def test_strict_field_validation_rejects_a_typo(kube, deployed):
    before = kube.stored(NAMESPACE, NAME)
    with pytest.raises(KubeApiError) as caught:
        deployed._patch({"spec": {"predictor": {"canaryTrafficPercentt": 10}}})
    assert caught.value.status == 400 and caught.value.reason == "BadRequest"
    assert 'unknown field "spec.predictor.canaryTrafficPercentt"' in str(caught.value)
    assert kube.stored(NAMESPACE, NAME) == before
    assert len(kube.calls("PATCH")) == 1  # a refusal is final: no retry

    # Without strict validation the API server drops the field and only warns: why the backend asks for Strict.
    api = KubeApi(kube.url, token=TOKEN)
    api.request("PATCH", deployed._path, body={"spec": {"predictor": {"canaryTrafficPercentt": 10}}},
                content_type="application/merge-patch+json")
    assert "canaryTrafficPercentt" not in kube.stored(NAMESPACE, NAME)["spec"]["predictor"]


def test_schema_violation_is_422(deployed):
    with pytest.raises(KubeApiError) as caught:
        deployed._patch({"spec": {"predictor": {"canaryTrafficPercent": "ten"}}})
    assert caught.value.status == 422 and caught.value.reason == "Invalid"
    assert "spec.predictor.canaryTrafficPercent" in caught.value.api_message


def test_transient_errors_are_retried_and_others_are_not(kube, deployed):
    deployed.deploy_candidate(CANDIDATE_URI)
    kube.fail_next("PATCH", 503, count=2)
    kube.fail_next("GET", 500)
    deployed.set_traffic(10)
    assert deployed.traffic() == 10
    assert len(kube.calls("PATCH")) == 1 + 3

    kube.token = "rotated"
    with pytest.raises(KubeApiError, match="HTTP 401 Unauthorized.*bearer token"):
        deployed.set_traffic(25)
    assert len(kube.calls("PATCH")) == 1 + 3 + 1


def test_a_create_whose_answer_was_lost_is_not_an_error(kube):
    kube.fail_next("POST", 503, after_applying=True)
    backend = make_backend(kube)
    assert backend.ensure_exists(CONFIG) is True
    # The retry met AlreadyExists.
    assert [r.method for r in kube.requests if r.path.startswith(PREFIX)][:3] == ["GET", "POST", "POST"]
    assert traffic_entries(kube) == {REVISION_1: 100}


def test_a_conflicting_write_is_reread_and_reapplied(kube, deployed):
    start = len(kube.requests)
    kube.fail_next("PATCH", 409)
    deployed.deploy_candidate(CANDIDATE_URI)
    methods = [r.method for r in kube.requests[start:] if r.path.startswith(PREFIX)]
    assert methods[:5] == ["GET", "GET", "PATCH", "GET", "PATCH"]  # read, refused, reread, patched again
    assert all("resourceVersion" in r.body["metadata"] for r in kube.calls("PATCH"))
    assert traffic_entries(kube) == {REVISION_2: 0, REVISION_1: 100}


def test_a_stale_resource_version_is_a_conflict(kube, deployed):
    live = deployed.get()
    kube.edit(NAMESPACE, NAME, {"metadata": {"labels": {"team": "vision"}}})
    with pytest.raises(KubeApiError) as caught:
        deployed._patch(patch_for_canary(live, CANDIDATE_URI), precondition=True)
    assert caught.value.status == 409 and "the object has been modified" in str(caught.value)


def test_autoscaling_the_clusters_default_mode_cannot_do_is_refused_before_anything_is_created():
    with KubeApiStandIn(token=TOKEN, default_mode="RawDeployment") as kube:
        backend = make_backend(kube)
        rps = ServiceConfig(**{**CONFIG.__dict__, "scale_metric": "rps", "scale_target": 20})
        with pytest.raises(ValueError, match="needs Knative's autoscaler"):
            backend.ensure_exists(rps)
        assert kube.calls("POST") == []
        cpu = ServiceConfig(**{**CONFIG.__dict__, "scale_metric": "cpu", "scale_target": 80, "max_replicas": 6})
        assert backend.ensure_exists(cpu) is True
        predictor = kube.stored(NAMESPACE, NAME)["spec"]["predictor"]
        assert (predictor["scaleMetric"], predictor["scaleTarget"], predictor["maxReplicas"]) == ("cpu", 80, 6)


def test_missing_service_says_how_to_create_it(kube):
    with pytest.raises(KubeApiError, match="HTTP 404 NotFound.*creates a missing InferenceService itself"):
        make_backend(kube).deploy_candidate(CANDIDATE_URI)


def test_credentials_from_a_kubeconfig(kube, tmp_path):
    kubeconfig = {
        "apiVersion": "v1", "kind": "Config", "current-context": "lab",
        "clusters": [{"name": "lab", "cluster": {"server": kube.url}}],
        "users": [{"name": "pipeline", "user": {"token": TOKEN}}],
        "contexts": [{"name": "lab", "context": {"cluster": "lab", "user": "pipeline", "namespace": NAMESPACE}}],
    }
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(kubeconfig))
    api = KubeApi.from_kubeconfig(str(path), retry_policy=FAST_RETRY)
    backend = KServeBackend(api, NAMESPACE, NAME, "http://127.0.0.1:9", poll_interval_s=0.01)
    assert backend.ensure_exists(CONFIG) is True
    assert kube.requests[-1].headers["Authorization"] == f"Bearer {TOKEN}"


class PrometheusStandIn:
    """Answers /api/v1/query with canned results keyed by the exact query text; anything else is bad_data."""

    def __init__(self, answers: dict[str, dict]) -> None:
        self.answers = answers
        self.queries: list[str] = []
        self.unavailable = 0
        self._server = JsonServer(self._route)
        self.url = self._server.url

    def _route(self, method: str, path: str, query: dict, body: dict | None, headers: object) -> tuple[int, dict]:
        text = query.get("query", [""])[0]
        self.queries.append(text)
        if self.unavailable:
            self.unavailable -= 1
            return 503, {"status": "error", "errorType": "unavailable", "error": "overloaded"}
        if path == "/api/v1/query" and text in self.answers:
            return 200, {"status": "success", "data": self.answers[text]}
        return 400, {"status": "error", "errorType": "bad_data", "error": f"unexpected {text}"}

    def close(self) -> None:
        self._server.close()


def vector(*samples: tuple[dict, str]) -> dict:
    return {"resultType": "vector", "result": [{"metric": m, "value": [1767225600.0, v]} for m, v in samples]}


# A step of 60 s at the default scrape interval of 30 s is queried over query_window_s(30, 60) = 90 s.
STEP_S = 60
WINDOW_S = prom.query_window_s(prom.DEFAULT_SCRAPE_INTERVAL_S, STEP_S)


def canned(revision: str, requests: str, errors: str | None, p50: str, p99: str, buckets: dict[str, str]) -> dict:
    variant = prom.Variant(NAMESPACE, NAME, revision)
    return {
        prom.scrape_health_query(variant, WINDOW_S): vector(({}, "1")),
        prom.request_count_query(variant, WINDOW_S): vector(({}, requests)),
        prom.error_count_query(variant, WINDOW_S): vector(({}, errors)) if errors else vector(),
        prom.latency_quantile_query(variant, WINDOW_S, 0.5): vector(({}, p50)),
        prom.latency_quantile_query(variant, WINDOW_S, 0.99): vector(({}, p99)),
        prom.score_buckets_query(variant, WINDOW_S): vector(*(({"le": le}, n) for le, n in buckets.items())),
    }


def test_promql_selects_the_revision_pods():
    variant = prom.Variant(NAMESPACE, NAME, REVISION_2)
    assert prom.request_count_query(variant, 60) == (
        'sum(increase(defectkit_requests_total{namespace="ml",serving_kserve_io_inferenceservice="defect",'
        'component="predictor",serving_knative_dev_revision="defect-predictor-00002"}[60s]))'
    )
    assert prom.latency_quantile_query(variant, 30.4, 0.99).startswith(
        "histogram_quantile(0.99, sum by (le) (rate(defectkit_request_latency_seconds_bucket{")
    assert 'status=~"5.."' in prom.error_count_query(variant, 60)
    assert prom.Variant("ml", 'a"b', "r").selector().count('\\"') == 1
    with pytest.raises(ValueError, match="window"):
        prom.request_count_query(variant, 0)


def test_metrics_per_variant_from_prometheus(kube, deployed):
    deployed.deploy_candidate(CANDIDATE_URI)
    deployed.set_traffic(10)
    answers = {
        **canned(REVISION_1, "900", "9", "0.012", "0.080", {"0.1": "500", "0.5": "800", "1.0": "900", "+Inf": "900"}),
        **canned(REVISION_2, "100", None, "NaN", "0.120", {"0.1": "10", "0.5": "40", "1.0": "100", "+Inf": "100"}),
    }
    prometheus = PrometheusStandIn(answers)
    try:
        prometheus.unavailable = 1
        backend = make_backend(kube, prom.PrometheusClient(
            prometheus.url, retry_policy=RetryPolicy(attempts=3, initial_delay_s=0.01)))
        metrics = backend.metrics(STEP_S)
    finally:
        prometheus.close()
    stable, canary = metrics["stable"], metrics["canary"]
    assert (stable.requests, stable.errors, stable.p50_latency_s, stable.p99_latency_s) == (900, 9, 0.012, 0.08)
    assert (canary.requests, canary.errors, canary.p50_latency_s, canary.p99_latency_s) == (100, 0, None, 0.12)
    assert sorted(stable.scores) == [0.05] * 500 + [0.3] * 300 + [0.75] * 100
    assert sorted(canary.scores) == [0.05] * 10 + [0.3] * 30 + [0.75] * 60
    assert set(prometheus.queries[1:]) == set(answers)  # the first one met the 503 and was retried


def test_a_failed_scrape_in_the_window_makes_the_figures_unavailable(kube, deployed):
    deployed.deploy_candidate(CANDIDATE_URI)
    deployed.set_traffic(10)
    canary = prom.Variant(NAMESPACE, NAME, REVISION_2)
    answers = {
        **canned(REVISION_1, "900", "9", "0.012", "0.080", {"+Inf": "900"}),
        **canned(REVISION_2, "100", None, "0.01", "0.120", {"+Inf": "100"}),
        prom.scrape_health_query(canary, WINDOW_S): vector(({}, "0")),  # one scrape of the canary failed
    }
    prometheus = PrometheusStandIn(answers)
    try:
        backend = make_backend(kube, prom.PrometheusClient(prometheus.url))
        with pytest.raises(prom.PrometheusUnavailable, match="a failed scrape of .*defect-predictor-00002"):
            backend.metrics(STEP_S)
        answers[prom.scrape_health_query(canary, WINDOW_S)] = vector()  # no sample of `up`: no figures either
        with pytest.raises(prom.PrometheusUnavailable, match="no scrape at all"):
            backend.metrics(STEP_S)
    finally:
        prometheus.close()


def test_prometheus_errors_are_clear():
    prometheus = PrometheusStandIn({})
    try:
        client = prom.PrometheusClient(prometheus.url)
        with pytest.raises(prom.PrometheusError, match="bad_data: unexpected up"):
            client.query("up")
    finally:
        prometheus.close()
    with pytest.raises(prom.PrometheusError, match="unreachable"):
        prom.PrometheusClient(f"http://127.0.0.1:{free_port()}",
                              retry_policy=RetryPolicy(attempts=2, initial_delay_s=0.01)).query("up")


def test_scores_from_buckets_scale_down_large_counts():
    sample = prom.scores_from_buckets([(0.5, 10_000.0), (1.0, 20_000.0), (float("inf"), 20_000.0)], max_points=100)
    assert sorted(sample) == [0.25] * 50 + [0.75] * 50
    assert prom.scores_from_buckets([]) == []


PROBE_SERVER = '''
import base64
import os
import sys

import uvicorn

_Config = uvicorn.Config


class LoopbackConfig(_Config):
    """KServe's ModelServer binds 0.0.0.0; tests listen on 127.0.0.1 only."""

    def __init__(self, *args, **kwargs):
        kwargs["host"] = "127.0.0.1"
        super().__init__(*args, **kwargs)


uvicorn.Config = LoopbackConfig

import numpy as np  # noqa: E402
from kserve import InferOutput, InferResponse, Model, ModelServer  # noqa: E402


class SizeScorer(Model):
    """Scores each image by its size in kB: a known answer per probe image."""

    def __init__(self):
        super().__init__("defectkit")
        self.ready = True

    async def predict(self, payload, headers=None, response_headers=None):
        sizes = [len(base64.b64decode(x)) for x in payload.inputs[0].as_numpy()]
        scores = np.array([n / 1000 for n in sizes], dtype=np.float32)
        output = InferOutput(name="score", shape=list(scores.shape), datatype="FP32")
        output.set_data_from_numpy(scores, binary_data=False)
        return InferResponse(model_name=self.name, infer_outputs=[output], response_id=payload.id or "probe")


if __name__ == "__main__":
    sys.argv = sys.argv[:1]
    ModelServer(http_port=int(os.environ["PROBE_PORT"]), enable_grpc=False).start([SizeScorer()])
'''


@pytest.fixture(scope="module")
def model_server(tmp_path_factory):
    """A real KServe model server on 127.0.0.1 standing in for the candidate revision."""
    work = tmp_path_factory.mktemp("probe")
    (work / "probe_server.py").write_text(PROBE_SERVER)
    port = free_port()
    server = start_server([sys.executable, str(work / "probe_server.py")], url=f"http://127.0.0.1:{port}",
                          health_path="/v2/models/defectkit/ready", log_path=work / "server.log",
                          env={"PROBE_PORT": str(port)})
    yield server
    server.stop()


def test_probe_scores_images_on_the_candidate(kube, deployed, model_server):
    deployed.deploy_candidate(CANDIDATE_URI)
    assert deployed.candidate_url() == f"http://latest-{NAME}-predictor.{NAMESPACE}.example.com"
    # Images are arbitrary bytes, not text: a PNG signature and high bytes must survive the trip.
    images = [b"\x89PNG\r\n\x1a\n" + b"\xff" * 1492, bytes(range(256)) * 8, b"\x00" * 250]
    backend = make_backend(kube, probe_url=model_server.url, probe_batch=2)
    answer = backend.probe(images)
    assert answer.scores == pytest.approx([1.5, 2.048, 0.25]) and answer.precision == "fp32"


def test_probe_url_needs_tag_routing(kube):
    backend = make_backend(kube)
    backend.ensure_exists(ServiceConfig(**{**CONFIG.__dict__, "tag_routing": False}))
    backend.deploy_candidate(CANDIDATE_URI)
    assert read_traffic(backend.get()).candidate_url is None
    with pytest.raises(ValueError, match="enable tag routing"):
        backend.candidate_url()
