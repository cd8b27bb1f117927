"""A bad candidate rolled back on the kserve path with real metrics: the controller drives the Kubernetes API
stand-in (tests/kube_api.py, Knative mode) while a real Prometheus scrapes two real ``defectkit serve``
processes labelled as the service's two revisions, and a router thread sends each request to the revision the
stand-in's status gives it (what Knative's routing does). Skipped where no ``prometheus`` binary is on PATH;
every process is stopped by PID.
"""

from __future__ import annotations

import concurrent.futures
import json
import sys
import time
from pathlib import Path

import pytest
import torch

from defectkit.data import Manifest
from defectkit.delivery.analysis import CanaryPolicy
from defectkit.delivery.backend import infer_request
from defectkit.delivery.controller import Controller
from defectkit.delivery.kserve.api import KubeApi
from defectkit.delivery.kserve.backend import KServeBackend
from defectkit.delivery.kserve.manifest import ServiceConfig
from defectkit.delivery.kserve.prometheus import PrometheusClient
from defectkit.delivery.kserve.state import ConfigMapStore
from defectkit.delivery.state import ROLLED_BACK
from defectkit.models import ModelMetadata, build_model, save_model
from defectkit.preprocess import PreprocessSpec
from defectkit.retry import RetryPolicy
from tests.conftest import TINY_IMAGE_SIZE
from tests.kube_api import KubeApiStandIn
from tests.stand_ins import KnativeRouter
from tests.servers import PodTarget, free_port, start_server

ROOT = Path(__file__).resolve().parents[2]
NAMESPACE, NAME = "ml", "defect"
STABLE_URI, CANDIDATE_URI = "gs://defectkit-models/defect/1", "gs://defectkit-models/defect/2"
REVISIONS = {"stable": f"{NAME}-predictor-00001", "candidate": f"{NAME}-predictor-00002"}
SCRAPE_INTERVAL_S = 1.0
RATE = 10.0  # requests a second, both revisions together
POLICY = CanaryPolicy(steps=(50, 100), interval_s=4.0, failure_threshold=1, min_requests=5, max_error_rate=0.01,
                      max_p99_latency_s=1.0)
BAD_ARGS = ("--fault-error-rate", "0.5", "--breaker-failures", "100000")


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    root = tmp_path_factory.mktemp("kserve-prometheus")
    torch.manual_seed(0)
    module = build_model("resnet18")
    metadata = ModelMetadata(architecture="resnet18", classes=("good", "crack"),
                             preprocess=PreprocessSpec(image_size=TINY_IMAGE_SIZE), threshold=0.5)
    model = save_model(module, metadata, root / "model")

    def start(name: str, *args: str):
        port = free_port()
        return start_server(
            [sys.executable, "-m", "defectkit", "serve", "--model", str(model), "--port", str(port), "--threads", "1",
             *args],
            url=f"http://127.0.0.1:{port}", health_path="/v2/health/ready", log_path=root / f"{name}.log",
            env={"PYTHONPATH": str(ROOT)}, timeout=120,
        )

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = {"stable": pool.submit(start, "stable"), "candidate": pool.submit(start, "candidate", *BAD_ARGS)}
    started = {name: f.result() for name, f in futures.items() if f.exception() is None}
    try:
        for future in futures.values():
            if future.exception() is not None:
                raise future.exception()
        yield started
    finally:
        for server in started.values():
            server.stop()


def test_a_bad_candidate_is_rolled_back_on_real_metrics(servers, prometheus, dataset_dir, capsys):
    targets = [PodTarget(address=server.url.removeprefix("http://"), namespace=NAMESPACE,
                         pod=f"{REVISIONS[name]}-deployment-0",
                         labels={"serving.kserve.io/inferenceservice": NAME, "component": "predictor",
                                 "serving.knative.dev/revision": REVISIONS[name]})
               for name, server in servers.items()]
    prometheus_server = prometheus(targets, SCRAPE_INTERVAL_S)
    images = [(dataset_dir / e.path).read_bytes() for e in Manifest.read(dataset_dir).entries[:20]]
    bodies = [json.dumps(infer_request([image])).encode() for image in images]
    urls = {REVISIONS[name]: server.url + "/v2/models/defectkit/infer" for name, server in servers.items()}
    with KubeApiStandIn(status_delay_s=0.05) as kube:
        api = KubeApi(kube.url, retry_policy=RetryPolicy(attempts=3, initial_delay_s=0.01, max_delay_s=0.05))
        client = PrometheusClient(prometheus_server.url, scrape_interval_s=SCRAPE_INTERVAL_S)
        backend = KServeBackend(api, NAMESPACE, NAME, client, poll_interval_s=0.2, traffic_timeout_s=30.0,
                                ready_timeout_s=30.0, candidate_uri=CANDIDATE_URI)
        backend.ensure_exists(ServiceConfig(name=NAME, namespace=NAMESPACE, image="ghcr.io/defectkit/serve:0.1.0",
                                            storage_uri=STABLE_URI))
        with KnativeRouter(kube, NAMESPACE, NAME, urls, bodies, RATE) as router:
            state = Controller(backend, POLICY, ConfigMapStore(api, NAMESPACE, NAME), candidate=CANDIDATE_URI,
                               backend_name="kserve").run()
            restored_at = time.time()
            time.sleep(1.0)
        assert kube.internal_errors == []
    assert state.phase == ROLLED_BACK, state.reason
    assert "error rate" in state.reason or "error_rate" in state.reason, state.reason
    got_traffic = next(e["t"] for e in state.timeline if e["event"] == "candidate traffic set")
    decided = next(e["t"] for e in state.timeline if e["event"] == "rolling back")
    back = next(e["t"] for e in state.timeline if e["event"] == "traffic back on the stable version")
    candidate_answers = [a for a in router.answers if a[1] == REVISIONS["candidate"]]
    assert candidate_answers and all(sent < back for sent, _, _ in candidate_answers)
    assert not [a for a in router.answers if a[0] > restored_at and a[1] != REVISIONS["stable"]]
    with capsys.disabled():
        print(f"\n[delivery] kserve Knative with a real Prometheus (scrape {SCRAPE_INTERVAL_S:g} s, interval "
              f"{POLICY.interval_s:g} s, API stand-in, real model servers): rollback took {back - got_traffic:.2f} s "
              f"from the candidate getting {POLICY.steps[0]}% to stable holding all traffic (decided after "
              f"{decided - got_traffic:.2f} s, traffic moved back in {back - decided:.3f} s); the candidate "
              f"answered {len(candidate_answers)} requests, "
              f"{sum(1 for a in candidate_answers if a[2] >= 500)} with 5xx", flush=True)
