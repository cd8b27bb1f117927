"""deploy_canary and restore_traffic through kfp.local, on the local stack and an embedded MLflow registry.

No ``from __future__ import annotations`` here: kfp reads the pipeline's annotations as types.
"""

import json
from pathlib import Path

import pytest
import torch
from kfp import dsl, local
from kfp.dsl import Artifact, Model

from defectkit_kfp.components.deploy_canary import deploy_canary
from defectkit_kfp.components.restore_traffic import restore_traffic
from defectkit import registry
from defectkit.delivery import record
from defectkit.evaluation import build_golden
from defectkit.delivery.local import LocalBackend, read_stack, stop_stack
from defectkit.delivery.state import PROMOTED, StateStore
from defectkit.models import ModelMetadata, build_model, save_model
from defectkit.preprocess import PreprocessSpec
from tests.conftest import TINY_IMAGE_SIZE


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
    restore = restore_traffic(tracking_uri=tracking_uri, work_dir=work_dir).set_caching_options(False)
    with dsl.ExitHandler(restore):
        model = dsl.importer(artifact_uri=model_uri, artifact_class=Model, reimport=False)
        golden = dsl.importer(artifact_uri=golden_uri, artifact_class=Artifact, reimport=False)
        deploy_canary(model=model.output, golden=golden.output, tracking_uri=tracking_uri, model_version=version,
                      steps="100", interval_s=1.0, work_dir=work_dir).set_caching_options(False)


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
