"""Deliveries on the KServe backend, in both deployment modes: the Kubernetes API stand-in (tests/kube_api.py)
and a Prometheus stand-in on 127.0.0.1.

The delivery state lives in a ConfigMap beside the InferenceService, so everything here runs
with no state file: a restore or a second delivery is a fresh backend with nothing local.
"""

from __future__ import annotations

import re

import pytest

from defectkit.cli import main
from defectkit.delivery import rollout
from defectkit.delivery.analysis import CanaryPolicy
from defectkit.delivery.controller import Controller, RolloutInProgress
from defectkit.delivery.kserve.api import KubeApi
from defectkit.delivery.kserve.backend import KServeBackend
from defectkit.delivery.kserve.prometheus import PrometheusClient
from defectkit.delivery.kserve.state import ConfigMapStore
from defectkit.delivery.state import PROMOTED, ROLLED_BACK, RolloutState, StateConflict
from defectkit.retry import RetryPolicy
from tests.kube_api import CONFIG_MAP_PREFIX, KubeApiStandIn
from tests.stand_ins import JsonServer, ManualClock

NAMESPACE, NAME = "ml", "defect"
STABLE_URI, CANDIDATE_URI = "gs://defectkit-models/defect/1", "gs://defectkit-models/defect/2"
IMAGE = "ghcr.io/defectkit/serve:0.1.0"
POLICY = CanaryPolicy(steps=(10, 50, 100), interval_s=30.0, failure_threshold=2, min_requests=50)
# Knative pods carry their revision; Standard-mode pods their Deployment's app label.
_VARIANT = re.compile(r'(?:serving_knative_dev_revision|app)="([^"]+)"')
MODES = ("Knative", "Standard")


class Prometheus:
    """Answers the controller's queries from per-variant figures (a revision or a Deployment)."""

    def __init__(self) -> None:
        self.figures: dict[str, dict] = {}
        self._server = JsonServer(
            lambda method, path, query, body, headers: (200, {"status": "success", "data": self.answer(query["query"][0])}))
        self.url = self._server.url

    def answer(self, query: str) -> dict:
        variant = _VARIANT.search(query).group(1)
        f = self.figures.get(variant, {"requests": 0, "errors": 0, "p99": None, "scores": {}})
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


def variants(mode: str, candidate_uri: str = CANDIDATE_URI) -> tuple[str, str]:
    """The names Prometheus tells stable and candidate pods apart by, in ``mode``."""
    if mode == "Knative":
        return f"{NAME}-predictor-00001", f"{NAME}-predictor-00002"
    from defectkit.delivery.kserve.canary import canary_name

    return f"{NAME}-predictor", f"{NAME}-{canary_name(candidate_uri)}-predictor"


def config(kube: KubeApiStandIn, prometheus: Prometheus, model: str, tmp_path, **settings) -> rollout.DeliveryConfig:
    return rollout.DeliveryConfig(**{"model": model, "backend": "kserve", "namespace": NAMESPACE,
                                     "service_name": NAME, "api_url": kube.url, "prometheus_url": prometheus.url,
                                     "serve_image": IMAGE, "work_dir": str(tmp_path / "work"),
                                     # The stand-in answers at once; steps of a second need a scrape of 0.5 s.
                                     "prometheus_scrape_interval_s": 0.5, **settings})


@pytest.fixture(params=MODES)
def platform(request):
    prometheus = Prometheus()
    with KubeApiStandIn(status_delay_s=0.01, default_mode=request.param) as kube:
        yield kube, prometheus, request.param
        assert kube.internal_errors == []
    prometheus.close()


def backend_for(kube: KubeApiStandIn, prometheus: Prometheus, candidate: str | None = CANDIDATE_URI) -> KServeBackend:
    api = KubeApi(kube.url, retry_policy=RetryPolicy(attempts=3, initial_delay_s=0.01, max_delay_s=0.05))
    # POLICY holds steps of 30 s: a scrape of 10 s queries them over 40 s.
    client = PrometheusClient(prometheus.url, scrape_interval_s=10.0)
    return KServeBackend(api, NAMESPACE, NAME, client, poll_interval_s=0.01, traffic_timeout_s=5.0,
                         ready_timeout_s=5.0, candidate_uri=candidate)


def run(backend: KServeBackend, clock: ManualClock | None = None) -> RolloutState:
    clock = clock or ManualClock()
    return Controller(backend, POLICY, ConfigMapStore(backend.api, NAMESPACE, NAME), candidate=CANDIDATE_URI,
                      backend_name="kserve", clock=clock, sleep=clock.sleep).run()


def first_deployment(kube, prometheus, tmp_path) -> RolloutState:
    return rollout.deliver(config(kube, prometheus, STABLE_URI, tmp_path,
                                  policy=CanaryPolicy(steps=(100,), interval_s=1.0)))


def report(capsys, text: str) -> None:
    with capsys.disabled():
        print(f"\n[delivery] {text}", flush=True)


def event_time(state: RolloutState, name: str, after: float = 0.0) -> float:
    return next(e["t"] for e in state.timeline if e["event"] == name and e["t"] >= after)


def test_the_first_model_creates_the_service_and_the_next_is_canaried(platform, tmp_path):
    kube, prometheus, mode = platform
    state = first_deployment(kube, prometheus, tmp_path)
    assert state.phase == PROMOTED and state.reason.startswith("first deployment: InferenceService ml/defect did "
                                                               "not exist")
    stored = kube.stored(NAMESPACE, NAME)
    assert stored["status"]["deploymentMode"] == mode
    assert [c for c in kube.calls("POST") if c.path.endswith("/inferenceservices")][0].query == \
        {"fieldValidation": "Strict"}
    # The state is on the cluster, owned by the service; nothing under the work directory.
    config_map = kube.config_maps[(NAMESPACE, f"{NAME}-rollout")]
    assert config_map["metadata"]["ownerReferences"][0]["uid"] == stored["metadata"]["uid"]
    assert not (tmp_path / "work" / "delivery" / "state.json").exists()

    stable, candidate = variants(mode)
    prometheus.figures = {stable: figures(900), candidate: figures(400)}
    second = rollout.deliver(config(kube, prometheus, CANDIDATE_URI, tmp_path,
                                    policy=CanaryPolicy(steps=(10, 100), interval_s=1.0, min_requests=50)))
    assert second.phase == PROMOTED, second.reason
    assert [a["weight"] for a in second.analyses] == [10]
    assert backend_for(kube, prometheus).traffic() == 100
    # State writes are ConfigMap writes: in Knative mode the service has exactly one revision per model.
    if mode == "Knative":
        assert kube.stored(NAMESPACE, NAME)["status"]["components"]["predictor"]["latestCreatedRevision"] == candidate


def test_a_first_deployment_needs_the_serve_image(platform, tmp_path):
    kube, prometheus, _ = platform
    with pytest.raises(ValueError, match="does not exist, and creating it needs the serve image"):
        rollout.deliver(config(kube, prometheus, STABLE_URI, tmp_path, serve_image=""))
    assert kube.objects == {}


def test_a_failing_candidate_is_rolled_back_and_the_time_is_measured(platform, tmp_path, capsys):
    kube, prometheus, mode = platform
    first_deployment(kube, prometheus, tmp_path)
    stable, candidate = variants(mode)
    prometheus.figures = {stable: figures(900), candidate: figures(400, errors=40)}
    state = run(backend_for(kube, prometheus))
    assert state.phase == ROLLED_BACK and state.failed_checks == 2
    assert all(a["weight"] == 10 for a in state.analyses)
    assert backend_for(kube, prometheus).traffic() == 0
    got_traffic = event_time(state, "candidate traffic set")
    decided = event_time(state, "rolling back")
    restored = event_time(state, "traffic back on the stable version")
    report(capsys, f"kserve {mode} (API stand-in, Prometheus stand-in, analysis clock simulated): rollback took "
                   f"{restored - decided:.3f} s from the decision to stable holding all traffic; "
                   f"{restored - got_traffic:.3f} s of wall time from the candidate getting traffic")


def test_restore_from_a_fresh_process_with_no_local_files(platform, tmp_path, capsys):
    kube, prometheus, mode = platform
    first_deployment(kube, prometheus, tmp_path)
    stable, candidate = variants(mode)
    prometheus.figures = {stable: figures(900), candidate: figures(400)}
    backend = backend_for(kube, prometheus)
    clock = ManualClock()

    def stop_mid_analysis(seconds: float) -> None:
        raise KeyboardInterrupt  # the run is killed while the candidate holds 10%

    with pytest.raises(KeyboardInterrupt):
        Controller(backend, POLICY, ConfigMapStore(backend.api, NAMESPACE, NAME), candidate=CANDIDATE_URI,
                   backend_name="kserve", clock=clock, sleep=stop_mid_analysis).run()
    assert backend.traffic() == 10

    # A second delivery to the same service is refused, naming the running one and the way out.
    other = config(kube, prometheus, "gs://defectkit-models/defect/3", tmp_path / "elsewhere")
    with pytest.raises(RolloutInProgress, match=f"ConfigMap ml/defect-rollout .* holds an unfinished delivery of "
                                                f"{CANDIDATE_URI} \\(phase analysing, 10% traffic\\).*defectkit "
                                                "rollout restore --backend kserve --namespace ml --name defect"):
        rollout.deliver(other)

    target = ["--backend", "kserve", "--namespace", NAMESPACE, "--name", NAME, "--api-url", kube.url]
    assert main(["rollout", "status", *target]) == 0
    assert f'"candidate": "{CANDIDATE_URI}"' in capsys.readouterr().out

    restore_config = rollout.DeliveryConfig(backend="kserve", namespace=NAMESPACE, service_name=NAME,
                                            api_url=kube.url, prometheus_url=prometheus.url,
                                            work_dir=str(tmp_path / "fresh"))
    assert rollout.restore(restore_config) is True
    assert backend_for(kube, prometheus, None).traffic() == 0
    assert ConfigMapStore(backend.api, NAMESPACE, NAME).load().phase == ROLLED_BACK
    assert rollout.restore(restore_config) is False  # finished: nothing left to restore
    assert not (tmp_path / "fresh" / "delivery" / "state.json").exists()


def test_two_writers_cannot_both_win(platform, tmp_path):
    kube, prometheus, _ = platform
    first_deployment(kube, prometheus, tmp_path)
    api = backend_for(kube, prometheus).api
    mine, theirs = ConfigMapStore(api, NAMESPACE, NAME), ConfigMapStore(api, NAMESPACE, NAME)
    state, other = mine.load(), theirs.load()
    theirs.save(other)
    puts = len(kube.calls("PUT", CONFIG_MAP_PREFIX))
    with pytest.raises(StateConflict, match="changed by another process"):
        mine.save(state)
    assert len(kube.calls("PUT", CONFIG_MAP_PREFIX)) == puts + 1  # refused once, never retried
    assert kube.calls("PUT", CONFIG_MAP_PREFIX)[-1].body["metadata"]["resourceVersion"]


def test_the_state_goes_with_its_service(platform, tmp_path):
    kube, prometheus, _ = platform
    first_deployment(kube, prometheus, tmp_path)
    backend = backend_for(kube, prometheus)
    backend.api.request("DELETE", backend._path)
    assert (NAMESPACE, f"{NAME}-rollout") not in kube.config_maps
    assert ConfigMapStore(backend.api, NAMESPACE, NAME).load() is None


def test_a_delivery_whose_state_another_process_took_over_stops_without_touching_traffic(platform, tmp_path):
    kube, prometheus, mode = platform
    first_deployment(kube, prometheus, tmp_path)
    stable, candidate = variants(mode)
    prometheus.figures = {stable: figures(900), candidate: figures(400, errors=40)}
    backend = backend_for(kube, prometheus)
    clock = ManualClock()

    def another_process_resumes(seconds: float) -> None:
        # A retried step (another pod) resumes the delivery and records that it did.
        other = ConfigMapStore(backend_for(kube, prometheus).api, NAMESPACE, NAME)
        state = other.load()
        state.event("resumed after an interruption")
        other.save(state)
        clock.sleep(seconds)

    with pytest.raises(StateConflict):
        Controller(backend, POLICY, ConfigMapStore(backend.api, NAMESPACE, NAME), candidate=CANDIDATE_URI,
                   backend_name="kserve", clock=clock, sleep=another_process_resumes).run()
    # The failing analysis would have rolled back; the process that lost the state left traffic to the other.
    assert backend.traffic() == 10
    assert ConfigMapStore(backend.api, NAMESPACE, NAME).load().phase == "analysing"


def test_a_retried_step_resumes_from_the_cluster(platform, tmp_path):
    kube, prometheus, mode = platform
    first_deployment(kube, prometheus, tmp_path)
    stable, candidate = variants(mode)
    prometheus.figures = {stable: figures(900), candidate: figures(400)}
    backend = backend_for(kube, prometheus)

    def killed(seconds: float) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Controller(backend, POLICY, ConfigMapStore(backend.api, NAMESPACE, NAME), candidate=CANDIDATE_URI,
                   backend_name="kserve", clock=ManualClock(), sleep=killed).run()
    # The retry: another backend and store, nothing shared with the killed attempt but the cluster.
    state = run(backend_for(kube, prometheus))
    assert state.phase == PROMOTED, state.reason
    assert any(e["event"] == "resumed after an interruption" for e in state.timeline)
    assert [a["weight"] for a in state.analyses] == [10, 50]
    assert backend_for(kube, prometheus).traffic() == 100
