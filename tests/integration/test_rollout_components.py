"""deploy_canary and restore_traffic through kfp.local with an embedded MLflow registry: on the local stack, and
on the kserve backend against the Kubernetes API stand-in (tests/kube_api.py).

No ``from __future__ import annotations`` here: kfp reads the pipeline's annotations as types.
"""

import base64
import hashlib
import inspect
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from kfp import dsl, local
from kfp.dsl import Artifact, Model

from defectkit_kfp.components import images
from defectkit_kfp.components.deploy_canary import deploy_canary
from defectkit_kfp.components.restore_traffic import restore_traffic
from defectkit import registry
from defectkit.delivery import record
from defectkit.evaluation import build_golden
from defectkit.delivery.local import LocalBackend, read_stack, stop_stack
from defectkit.delivery.kserve.canary import storage_uri_of
from defectkit.delivery.state import PROMOTED, ROLLED_BACK, StateStore
from defectkit.golden import read_golden, write_golden
from defectkit.models import ModelMetadata, build_model, save_model
from defectkit.preprocess import PreprocessSpec
from tests.conftest import TINY_IMAGE_SIZE
from tests.kube_api import KubeApiStandIn
from tests.stand_ins import JsonServer


@pytest.fixture(autouse=True)
def kfp_local(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"))


def two_models(out: Path) -> tuple[Path, Path]:
    torch.manual_seed(1)
    module = build_model("resnet18")
    metadata = ModelMetadata(architecture="resnet18", classes=("good", "crack"),
                             preprocess=PreprocessSpec(image_size=TINY_IMAGE_SIZE), threshold=0.5)
    first = save_model(module, metadata, out / "first")
    with torch.no_grad():
        module.fc.bias.add_(1e-4)
    return first, save_model(module, metadata, out / "second")


@dsl.pipeline
def ship(model_uri: str, golden_uri: str, tracking_uri: str, version: str, work_dir: str):
    restore = restore_traffic(tracking_uri=tracking_uri, backend="local", work_dir=work_dir).set_caching_options(False)
    with dsl.ExitHandler(restore):
        model = dsl.importer(artifact_uri=model_uri, artifact_class=Model, reimport=False)
        golden = dsl.importer(artifact_uri=golden_uri, artifact_class=Artifact, reimport=False)
        deploy_canary(model=model.output, golden=golden.output, tracking_uri=tracking_uri, model_version=version,
                      backend="local", steps="100", interval_s=1.0, work_dir=work_dir).set_caching_options(False)


def outputs(root: Path, task: str, name: str) -> list[Path]:
    return sorted(root.rglob(f"{task}/{name}"), key=lambda p: p.stat().st_mtime)


def test_first_deployment_then_a_canary_through_the_components(dataset_dir, tmp_path):
    first, second = two_models(tmp_path / "models")
    config = registry.RegistryConfig.embedded(tmp_path / "mlflow")
    v1, v2 = registry.register(config, first), registry.register(config, second)
    work = tmp_path / "work"
    golden = {model: build_golden(dataset_dir, model, tmp_path / f"golden-{model.name}", count=4)
              for model in (first, second)}
    root = tmp_path / "root"
    try:
        # Nothing serves yet: the first version becomes the stable model of a new stack.
        ship(model_uri=str(first), golden_uri=str(golden[first]), tracking_uri=config.tracking_uri,
             version=v1.version, work_dir=str(work))
        assert registry.champion(config).version == v1.version
        assert "first deployment" in outputs(root, "deploy-canary", "decision_record")[-1].read_text()

        # The second goes through deploy, golden probe and promotion (steps "100": no analysed step).
        ship(model_uri=str(second), golden_uri=str(golden[second]), tracking_uri=config.tracking_uri,
             version=v2.version, work_dir=str(work))
        assert registry.champion(config).version == v2.version
        assert registry.version_for_alias(config, registry.PREVIOUS_CHAMPION).version == v1.version
        decision = json.loads(outputs(root, "deploy-canary", "decision_record_json")[-1].read_text())
        assert decision["verdict"] == PROMOTED and decision["probe"]["max_abs_diff"] <= 1e-4
        assert "Golden probe" in outputs(root, "deploy-canary", "decision_record")[-1].read_text()
        assert StateStore(work / "delivery" / "state.json").load().phase == PROMOTED
        backend = LocalBackend(work)
        try:
            assert backend.traffic() == 100
        finally:
            backend.close()
        assert read_stack(work).stable.model == v2.uri
        assert record.read_record(work / "delivery")["verdict"] == PROMOTED
        # The exit handler ran after each delivery and found nothing to restore.
        restored = [json.loads(p.read_text())["parameterValues"]["Output"]
                    for p in outputs(root, "restore-traffic", "executor_output.json")]
        assert restored == [False, False]
    finally:
        stop_stack(work)


# --------------------------------------------------------------------------- kserve backend

NAMESPACE, SERVICE = "ml", "defect"
# Never queried below: a first deployment, steps "100" and a failed probe analyse nothing, and the killed
# delivery is killed before its first analysis.
UNUSED_PROMETHEUS = "http://127.0.0.1:9"


def test_the_serve_image_default_is_the_projects():
    assert inspect.signature(deploy_canary.python_func).parameters["serve_image"].default == images.SERVE_IMAGE


@dsl.pipeline
def ship_kserve(model_uri: str, golden_uri: str, tracking_uri: str, version: str, storage_uri: str,
                kube_api_url: str, probe_url: str, steps: str, interval_s: float, work_dir: str):
    restore = restore_traffic(tracking_uri=tracking_uri, backend="kserve", work_dir=work_dir, namespace=NAMESPACE,
                              service_name=SERVICE, prometheus_url=UNUSED_PROMETHEUS,
                              kube_api_url=kube_api_url).set_caching_options(False)
    with dsl.ExitHandler(restore):
        model = dsl.importer(artifact_uri=model_uri, artifact_class=Model, reimport=False)
        golden = dsl.importer(artifact_uri=golden_uri, artifact_class=Artifact, reimport=False)
        deploy_canary(model=model.output, golden=golden.output, tracking_uri=tracking_uri, model_version=version,
                      backend="kserve", steps=steps, interval_s=interval_s, work_dir=work_dir, namespace=NAMESPACE,
                      service_name=SERVICE, prometheus_url=UNUSED_PROMETHEUS, prometheus_scrape_interval_s=0.5,
                      storage_uri=storage_uri, kube_api_url=kube_api_url,
                      probe_url=probe_url).set_caching_options(False)


@dsl.pipeline
def restore_kserve(tracking_uri: str, kube_api_url: str, work_dir: str):
    restore_traffic(tracking_uri=tracking_uri, backend="kserve", work_dir=work_dir, namespace=NAMESPACE,
                    service_name=SERVICE, prometheus_url=UNUSED_PROMETHEUS,
                    kube_api_url=kube_api_url).set_caching_options(False)


class ModelServerStandIn:
    """A candidate's model server on 127.0.0.1: answers each golden image with its golden score plus ``shift``."""

    def __init__(self, golden_dir: Path, shift: float) -> None:
        golden = read_golden(golden_dir)
        self.scores = {hashlib.sha256(image).hexdigest(): score for image, score in zip(golden.images, golden.scores)}
        self.shift = shift
        self._server = JsonServer(self._route)
        self.url = self._server.url

    def _route(self, method: str, path: str, query: dict, body: dict | None, headers: object) -> tuple[int, dict]:
        if method != "POST" or path != "/v2/models/defectkit/infer":
            return 404, {"error": f"no route {method} {path}"}
        images = [base64.b64decode(x) for x in body["inputs"][0]["data"]]
        scores = [self.scores[hashlib.sha256(image).hexdigest()] + self.shift for image in images]
        return 200, {"model_name": "defectkit", "outputs": [{"name": "score", "shape": [len(scores)],
                                                             "datatype": "FP32", "data": scores}]}

    def close(self) -> None:
        self._server.close()


def kserve_golden(out: Path) -> Path:
    chosen = [(f"test/good/{i}.png", "good", bytes([i]) * (100 + i), round(0.1 + 0.2 * i, 4)) for i in range(4)]
    return write_golden(out, chosen, weights_sha256="", precision="fp32")


def candidate_split(kube: KubeApiStandIn) -> dict[str, int]:
    predictor = kube.stored(NAMESPACE, SERVICE)["status"]["components"]["predictor"]
    candidate = predictor["latestCreatedRevision"]
    return {"candidate": sum(e["percent"] for e in predictor["traffic"] if e["revisionName"] == candidate),
            "total": sum(e["percent"] for e in predictor["traffic"])}


def test_kserve_first_deployment_promotion_rollback_and_restore_through_the_components(tmp_path):
    first, second = two_models(tmp_path / "models")
    config = registry.RegistryConfig.embedded(tmp_path / "mlflow")
    v1, v2, v3, v4 = (registry.register(config, model) for model in (first, second, second, second))
    golden = kserve_golden(tmp_path / "golden")
    good, bad = ModelServerStandIn(golden, 0.0), ModelServerStandIn(golden, 0.5)
    root = tmp_path / "root"
    uris = {v.version: f"gs://defectkit-models/defect/{v.version}" for v in (v1, v2, v3, v4)}
    with KubeApiStandIn(status_delay_s=0.01) as kube:
        def ship(version, model: Path, probe_url: str, steps: str = "100", interval_s: float = 1.0) -> dict:
            return dict(model_uri=str(model), golden_uri=str(golden), tracking_uri=config.tracking_uri,
                        version=version.version, storage_uri=uris[version.version], kube_api_url=kube.url,
                        probe_url=probe_url, steps=steps, interval_s=interval_s,
                        work_dir=str(tmp_path / f"work-{version.version}"))

        try:
            # An empty namespace: the first model creates the InferenceService and becomes stable.
            ship_kserve(**ship(v1, first, good.url))
            assert registry.champion(config).version == v1.version
            assert "first deployment" in outputs(root, "deploy-canary", "decision_record")[-1].read_text()
            assert storage_uri_of(kube.stored(NAMESPACE, SERVICE)) == uris[v1.version]

            # A good candidate: golden probe passes, promoted.
            ship_kserve(**ship(v2, second, good.url))
            assert registry.champion(config).version == v2.version
            assert candidate_split(kube) == {"candidate": 100, "total": 100}

            # A bad candidate: its server answers other scores than the golden set: rolled back, champion kept.
            ship_kserve(**ship(v3, second, bad.url))
            decision = json.loads(outputs(root, "deploy-canary", "decision_record_json")[-1].read_text())
            assert decision["verdict"] == ROLLED_BACK and "probe" in decision["reason"]
            assert registry.champion(config).version == v2.version
            assert candidate_split(kube) == {"candidate": 0, "total": 100}

            # A run killed while the candidate holds 10%: its exit handler never ran.
            killed = subprocess.Popen(
                [sys.executable, "-c", KILLED_RUN, str(root), json.dumps(ship(v4, second, good.url, "10,100", 3600.0))],
                env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True)
            try:
                deadline = time.monotonic() + 180
                while time.monotonic() < deadline and killed.poll() is None:
                    if storage_uri_of(kube.stored(NAMESPACE, SERVICE)) == uris[v4.version] \
                            and candidate_split(kube)["candidate"] == 10:
                        break
                    time.sleep(0.1)
                assert candidate_split(kube)["candidate"] == 10, "the killed run never gave its candidate 10%"
            finally:
                if killed.poll() is None:
                    os.killpg(killed.pid, signal.SIGKILL)  # the run and its component's process
                killed.wait(30)
            # The exit handler in a fresh process, with a work directory that never held anything.
            fresh = tmp_path / "fresh"
            restore_kserve(tracking_uri=config.tracking_uri, kube_api_url=kube.url, work_dir=str(fresh))
            restored = json.loads(outputs(root, "restore-traffic", "executor_output.json")[-1].read_text())
            assert restored["parameterValues"]["Output"] is True
            assert candidate_split(kube) == {"candidate": 0, "total": 100}
            assert registry.champion(config).version == v2.version
            assert not (fresh / "delivery" / "state.json").exists()
        finally:
            good.close()
            bad.close()
        assert kube.internal_errors == []


REPO = Path(__file__).resolve().parents[2]
KILLED_RUN = """
import json, sys
from kfp import local
local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=sys.argv[1])
from tests.integration.test_rollout_components import ship_kserve
ship_kserve(**json.loads(sys.argv[2]))
"""
