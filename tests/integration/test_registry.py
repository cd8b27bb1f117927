"""The registry against a real MLflow tracking server on 127.0.0.1 and against the embedded sqlite default."""

import dataclasses
import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from kfp import dsl, local
from kfp.dsl import Model
from mlflow import MlflowClient

import defectkit
from defectkit_kfp.components.register_model import register_model
from defectkit import registry, storage
from defectkit.models import ModelMetadata, build_model, load_model, save_model
from defectkit.preprocess import PreprocessSpec
from tests.conftest import S3_BUCKET
from tests.servers import start_mlflow_server

# A small torchvision architecture: a few MB of weights keep uploads and hashing quick.
ARCH = "squeezenet1_0"
FINGERPRINT = "f" * 64


@dataclasses.dataclass(frozen=True)
class Backend:
    config: registry.RegistryConfig
    artifacts: Path  # where the registry stores artifact files, for tampering with them


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    server = start_mlflow_server(root)
    try:
        yield Backend(registry.RegistryConfig(tracking_uri=server.url), root / "artifacts")
    finally:
        server.stop()


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    work = tmp_path_factory.mktemp("mlflow-embedded")
    return Backend(registry.RegistryConfig.embedded(work), work / "mlartifacts")


@pytest.fixture(scope="module", params=["server", "embedded"])
def backend(request) -> Backend:
    return request.getfixturevalue("mlflow_server" if request.param == "server" else "embedded")


@pytest.fixture
def config(backend) -> registry.RegistryConfig:
    """A registered model of its own for each test, so aliases never leak between tests."""
    return dataclasses.replace(backend.config, model_name=f"defectkit-{uuid.uuid4().hex[:8]}")


def _judged_model(out: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    metadata = ModelMetadata(
        architecture=ARCH,
        classes=("good", "hole", "scratch"),
        preprocess=PreprocessSpec(image_size=32),
        threshold=0.5,
        threshold_policy={"kind": "max_f1"},
        metrics={"val_auroc": 0.9 + seed / 100, "best_epoch": 2,
                 "test": {"image_auroc": 0.95, "f1": 0.9, "recall_by_defect_type": {"hole": 1.0, "scratch": 0.8}}},
        dataset_fingerprint=FINGERPRINT,
        training={"config": {"epochs": 3, "learning_rate": 0.001}, "history": []},
    )
    return save_model(build_model(ARCH), metadata, out)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("models")
    return [_judged_model(root / f"model-{seed}", seed) for seed in range(3)]


def _stored(backend: Backend, ref: registry.ModelVersionRef, name: str) -> Path:
    (path,) = backend.artifacts.rglob(f"{ref.run_id}/artifacts/model/{name}")
    return path


def test_register_sets_challenger_and_logs_lineage(config, models):
    ref = registry.register(config, models[0], params={"pipeline": "training"}, tags={registry.KFP_RUN_ID: "run-123"})

    assert (ref.version, ref.aliases, ref.uri) == ("1", ("challenger",), f"models:/{config.model_name}/1")
    sha = json.loads((models[0] / "model.json").read_text())["weights_sha256"]
    expected_tags = {"dataset_fingerprint": FINGERPRINT, "kfp_run_id": "run-123", "code_version": defectkit.__version__,
                     "weights_sha256": sha, "architecture": ARCH}
    assert expected_tags.items() <= ref.tags.items()
    client = MlflowClient(config.tracking_uri)
    run = client.get_run(ref.run_id)
    assert expected_tags.items() <= run.data.tags.items()
    assert run.info.status == "FINISHED"
    assert {"architecture": ARCH, "image_size": "32", "threshold": "0.5", "train.epochs": "3",
            "pipeline": "training"}.items() <= run.data.params.items()
    assert run.data.metrics["test.image_auroc"] == pytest.approx(0.95)
    assert run.data.metrics["test.recall_by_defect_type.scratch"] == pytest.approx(0.8)
    assert sorted(f.path for f in client.list_artifacts(ref.run_id, "model")) == ["model/model.json",
                                                                                  "model/model.safetensors"]
    assert ref.source.endswith(f"{ref.run_id}/artifacts/model")
    assert registry.version_for_alias(config, "challenger") == ref
    assert registry.champion(config) is None, "registering never makes a champion"


def test_promote_twice_keeps_the_previous_champion(config, models):
    first, second, third = (registry.register(config, m, tags={}) for m in models)

    registry.promote(config, first.version)
    assert registry.champion(config).version == "1"
    assert registry.version_for_alias(config, "previous-champion") is None

    registry.promote(config, second.version)
    registry.promote(config, 2)  # promoting the champion again changes nothing
    assert registry.champion(config).version == "2"
    assert registry.version_for_alias(config, "previous-champion").version == "1"
    assert registry.version_for_alias(config, "challenger").version == third.version == "3"

    with pytest.raises(LookupError, match="no version '9'"):
        registry.promote(config, "9")
    assert registry.champion(config).version == "2", "a failed promotion leaves the champion alone"

    registry.mark(config, third.version, "canary", "rolled_back")
    assert registry.version_for_alias(config, "challenger").tags["canary"] == "rolled_back"
    assert registry.champion(config).version == "2"


def test_resolve_gives_the_identical_verified_model(config, models, tmp_path):
    registry.register(config, models[0], tags={})
    registry.register(config, models[1], tags={})
    registry.promote(config, "2")

    by_alias = registry.resolve(f"models:/{config.model_name}@champion", tmp_path / "champion",
                                tracking_uri=config.tracking_uri)
    by_version = registry.resolve(f"models:/{config.model_name}/1", tmp_path / "v1", tracking_uri=config.tracking_uri)

    assert by_alias == tmp_path / "champion"
    for name in ("model.safetensors", "model.json"):
        assert (by_alias / name).read_bytes() == (models[1] / name).read_bytes()
        assert (by_version / name).read_bytes() == (models[0] / name).read_bytes()
    assert load_model(by_alias).metadata.weights_sha256 == registry.champion(config).tags["weights_sha256"]


def test_resolve_rejects_tampered_artifacts(backend, config, models, tmp_path):
    ref = registry.register(config, models[0], tags={})
    weights = _stored(backend, ref, "model.safetensors")
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    uri = f"models:/{config.model_name}@challenger"

    with pytest.raises(registry.ModelIntegrityError, match="does not match weights_sha256"):
        registry.resolve(uri, tmp_path / "tampered", tracking_uri=config.tracking_uri)
    assert not (tmp_path / "tampered").exists(), "nothing unverified is left where the caller looks"

    # A consistent swap (other weights with their own model.json) is caught by the version's registered sha256.
    for name in ("model.safetensors", "model.json"):
        _stored(backend, ref, name).write_bytes((models[1] / name).read_bytes())
    with pytest.raises(registry.ModelIntegrityError, match="was registered with weights"):
        registry.resolve(uri, tmp_path / "swapped", tracking_uri=config.tracking_uri)
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "staging dirs are cleaned up"


def test_unknown_models_aliases_and_versions_are_clear_errors(config, models, tmp_path):
    def resolve(uri: str) -> Path:
        return registry.resolve(uri, tmp_path / "out", tracking_uri=config.tracking_uri)

    with pytest.raises(LookupError, match=f"no registered model '{config.model_name}'"):
        resolve(f"models:/{config.model_name}@champion")
    assert registry.champion(config) is None
    registry.register(config, models[0], tags={})
    with pytest.raises(LookupError, match=r"no alias 'champion' \(its aliases: challenger -> 1\)"):
        resolve(f"models:/{config.model_name}@champion")
    with pytest.raises(LookupError, match="no version '4'"):
        resolve(f"models:/{config.model_name}/4")
    with pytest.raises(ValueError, match="'runs:/abc/model' is not of the form"):
        resolve("runs:/abc/model")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not an empty directory"):
        resolve(f"models:/{config.model_name}/1")


def test_decision_record_is_logged_with_the_run(config, models, tmp_path):
    ref = registry.register(config, models[0], tags={})
    record = {"verdict": "promoted", "canary": [{"percent": 10, "ok": True}]}

    registry.log_decision_record(config, ref.run_id, record, "# Decision\n\npromoted\n")

    client = MlflowClient(config.tracking_uri)
    local_dir = Path(client.download_artifacts(ref.run_id, "", str(tmp_path)))
    assert json.loads((local_dir / "decision_record.json").read_text()) == record
    assert (local_dir / "decision_record.md").read_text() == "# Decision\n\npromoted\n"
    with pytest.raises(LookupError, match="run 'nope' not found"):
        registry.log_decision_record(config, "nope", record, "")


def test_register_refuses_models_it_cannot_vouch_for(embedded, models, tmp_path):
    config = dataclasses.replace(embedded.config, model_name="refused")
    corrupted = tmp_path / "corrupted"
    corrupted.mkdir()
    (corrupted / "model.json").write_bytes((models[0] / "model.json").read_bytes())
    (corrupted / "model.safetensors").write_bytes((models[1] / "model.safetensors").read_bytes())
    with pytest.raises(registry.ModelIntegrityError, match="does not match"):
        registry.register(config, corrupted, tags={})

    with pytest.raises(ValueError, match="contradicts"):
        registry.register(config, models[0], tags={registry.DATASET_FINGERPRINT: "other"})

    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "model.safetensors").write_bytes((models[0] / "model.safetensors").read_bytes())
    record = json.loads((models[0] / "model.json").read_text())
    (raw / "model.json").write_text(json.dumps({**record, "threshold": None}))
    with pytest.raises(ValueError, match="no decision threshold"):
        registry.register(config, raw, tags={})

    assert registry.version_for_alias(config, "challenger") is None, "nothing was registered"


def test_module_imports_without_mlflow_or_torch():
    blocked = "import sys; sys.modules.update(mlflow=None, torch=None); import defectkit.registry"
    subprocess.run([sys.executable, "-c", blocked], check=True, cwd=Path(__file__).parents[2])


def test_register_model_component_in_a_local_pipeline(mlflow_server, models, tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"))
    name = f"component-{uuid.uuid4().hex[:8]}"

    # kfp reads the return annotation as a type, which is why this module has no `from __future__ import annotations`.
    @dsl.pipeline
    def register_only(model_uri: str, tracking_uri: str, registered_model: str) -> str:
        model = dsl.importer(artifact_uri=model_uri, artifact_class=Model, reimport=False)
        task = register_model(model=model.output, tracking_uri=tracking_uri, registered_model=registered_model,
                              dataset_fingerprint=FINGERPRINT, kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER)
        task.set_caching_options(False)
        return task.outputs["model_uri"]

    task = register_only(model_uri=str(models[2]), tracking_uri=mlflow_server.config.tracking_uri, registered_model=name)

    assert task.output == f"models:/{name}/1"
    config = dataclasses.replace(mlflow_server.config, model_name=name)
    ref = registry.version_for_alias(config, "challenger")
    assert ref.version == "1"
    assert ref.tags["kfp_run_id"] and ref.tags["kfp_run_id"] != dsl.PIPELINE_JOB_ID_PLACEHOLDER
    assert ref.tags["kfp_model_uri"] == str(models[2])
    assert ref.tags["dataset_fingerprint"] == FINGERPRINT
    registered = json.loads(next((tmp_path / "root").rglob("register-model/registered")).read_text())
    assert registered == {"name": name, "version": "1", "model_uri": ref.uri, "run_id": ref.run_id,
                          "source": ref.source}


@pytest.fixture(scope="module")
def mlflow_s3_server(s3_server, tmp_path_factory) -> str:
    """A tracking server whose artifact store is a bucket, as KServe needs; yields its URL."""
    root = tmp_path_factory.mktemp("mlflow-s3")
    server = start_mlflow_server(root, default_artifact_root=f"s3://{S3_BUCKET}/mlflow")
    try:
        yield server.url
    finally:
        server.stop()


def test_storage_uri_is_the_registered_copy_in_the_bucket(mlflow_s3_server, models):
    config = registry.RegistryConfig(tracking_uri=mlflow_s3_server, model_name=f"s3-{uuid.uuid4().hex[:8]}")
    registry.register(config, models[0], tags={})
    ref = registry.register(config, models[1], tags={})

    uri = registry.storage_uri(mlflow_s3_server, config.model_name, int(ref.version))

    assert uri.startswith(f"s3://{S3_BUCKET}/mlflow/") and uri.endswith(f"/{ref.run_id}/artifacts/model")
    stored = storage.Store(uri)
    assert stored.list() == ["model.json", "model.safetensors"]
    for name in stored.list():
        assert stored.read(name) == (models[1] / name).read_bytes()
    assert registry.storage_uri(mlflow_s3_server, config.model_name, "1") != uri
    with pytest.raises(LookupError, match="no version '7'"):
        registry.storage_uri(mlflow_s3_server, config.model_name, "7")


def test_storage_uri_refuses_stores_kserve_cannot_read(backend, config, models):
    ref = registry.register(config, models[0], tags={})
    proxied = config.tracking_uri.startswith("http")
    why = r"mlflow-artifacts:.*artifact proxy" if proxied else r"file://.*a path on the registry's disk"

    with pytest.raises(ValueError, match=why) as refused:
        registry.storage_uri(config.tracking_uri, config.model_name, ref.version)
    assert f"version 1 of {config.model_name!r}" in str(refused.value)
    assert "--default-artifact-root s3://<bucket>/<prefix> or gs://<bucket>/<prefix>" in str(refused.value)
