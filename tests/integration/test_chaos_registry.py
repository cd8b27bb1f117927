"""The registry when the tracking server is gone, answers twice, or sees two promotions at once.

Against the embedded sqlite registry (real MLflow, no server) for the lock and
duplicate handling, and a port where nothing listens for the unreachable server.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from defectkit import registry
from defectkit.models import ModelMetadata, build_model, save_model
from defectkit.preprocess import PreprocessSpec
from tests.servers import free_port

ARCH = "squeezenet1_0"  # a few MB of weights: uploads and hashing stay quick


@pytest.fixture(scope="module")
def embedded(tmp_path_factory) -> registry.RegistryConfig:
    return registry.RegistryConfig.embedded(tmp_path_factory.mktemp("mlflow-embedded"))


@pytest.fixture
def config(embedded) -> registry.RegistryConfig:
    return dataclasses.replace(embedded, model_name=f"chaos-{uuid.uuid4().hex[:8]}")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("models")
    out = []
    for seed in range(3):
        torch.manual_seed(seed)
        metadata = ModelMetadata(architecture=ARCH, classes=("good", "crack"), preprocess=PreprocessSpec(image_size=32),
                                 threshold=0.5, threshold_policy={"kind": "max_f1"})
        out.append(save_model(build_model(ARCH), metadata, root / f"model-{seed}"))
    return out


def _client(config: registry.RegistryConfig) -> MlflowClient:
    return MlflowClient(tracking_uri=config.tracking_uri, registry_uri=config.tracking_uri)


def test_concurrent_promotions_happen_one_after_the_other(config, models):
    first, second, third = (registry.register(config, m).version for m in models)
    registry.promote(config, first)
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def promote(version: str) -> None:
        barrier.wait()
        try:
            registry.promote(config, version)
        except BaseException as exc:  # noqa: BLE001 - asserted below
            errors.append(exc)

    threads = [threading.Thread(target=promote, args=(v,)) for v in (second, third)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    assert errors == []
    champion = registry.champion(config).version
    previous = registry.version_for_alias(config, registry.PREVIOUS_CHAMPION).version
    assert {champion, previous} == {second, third}, "the second promotion replaced the first, not the old champion"
    assert _client(config).search_registered_models(
        f"name = '{registry.promotion_lock_name(config.model_name)}'") == [], "the lock is released"


def test_a_promotion_waits_for_another_versions_lock_then_refuses_clearly(config, models):
    first, second = (registry.register(config, m).version for m in models[:2])
    lock = registry.promotion_lock_name(config.model_name)
    _client(config).create_registered_model(lock, tags={registry.LOCK_VERSION_TAG: "99",
                                                        registry.LOCK_SINCE_TAG: str(time.time())})

    started = time.monotonic()
    with pytest.raises(registry.PromotionInProgress, match=rf"version 99 .*{lock}.*Re-run this step"):
        registry.promote(config, first, wait_s=0.5)
    assert time.monotonic() - started >= 0.5
    assert registry.champion(config) is None, "a refused promotion moves nothing"

    # A lock held for the same version is a promotion that died part-way: re-running finishes it.
    _client(config).delete_registered_model(lock)
    _client(config).create_registered_model(lock, tags={registry.LOCK_VERSION_TAG: second,
                                                        registry.LOCK_SINCE_TAG: str(time.time())})
    registry.promote(config, second, wait_s=0.5)
    assert registry.champion(config).version == second
    assert _client(config).search_registered_models(f"name = '{lock}'") == []


def test_a_stale_lock_is_broken(config, models):
    (version,) = (registry.register(config, m).version for m in models[:1])
    lock = registry.promotion_lock_name(config.model_name)
    long_ago = time.time() - registry.PROMOTION_LOCK_STALE_S - 1
    _client(config).create_registered_model(lock, tags={registry.LOCK_VERSION_TAG: "99",
                                                        registry.LOCK_SINCE_TAG: str(long_ago)})
    registry.promote(config, version, wait_s=0.5)
    assert registry.champion(config).version == version


def test_a_create_sent_twice_leaves_one_version(config, models):
    ref = registry.register(config, models[0])
    client = _client(config)
    # What a create resent after its lost answer leaves: a second version from the same run.
    client.create_model_version(config.model_name, source=ref.source, run_id=ref.run_id)

    assert registry._one_version_of_run(client, config.model_name, ref.run_id, "2") == ref.version
    versions = client.search_model_versions(f"name = '{config.model_name}'")
    assert [str(v.version) for v in versions] == [ref.version], "the repeated version is deleted"


def test_an_unreachable_server_is_a_clear_error(models, monkeypatch):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens here
    monkeypatch.setitem(os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    config = registry.RegistryConfig(tracking_uri=url, model_name="chaos")

    with pytest.raises(registry.RegistryUnavailable, match=rf"{url} did not answer while registering .*re-run the step"):
        registry.register(config, models[0])
    with pytest.raises(registry.RegistryUnavailable, match=rf"{url} did not answer while promoting chaos version 3"):
        registry.promote(config, "3")
    with pytest.raises(registry.RegistryUnavailable, match="re-running sets it"):
        registry.mark(config, "3", "canary", "promoted")


def test_a_truncated_upload_is_never_registered(config, models, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient as Client

    real = Client.log_artifact

    def truncating(self, run_id, local_path, artifact_path=None):
        # The store receives a short weights file, as when an upload is cut off and not resent whole.
        if local_path.endswith("model.safetensors"):
            short = tmp_path / "model.safetensors"
            short.write_bytes(Path(local_path).read_bytes()[:1000])
            local_path = str(short)
        return real(self, run_id, local_path, artifact_path)

    monkeypatch.setattr(Client, "log_artifact", truncating)
    with pytest.raises(registry.ModelIntegrityError, match="stored with 1000 bytes.*nothing was registered"):
        registry.register(config, models[0])
    client = _client(config)
    assert client.search_model_versions(f"name = '{config.model_name}'") == []
    (run,) = client.search_runs([client.get_experiment_by_name(config.experiment).experiment_id],
                                order_by=["attributes.start_time DESC"], max_results=1)
    assert run.info.status == "FAILED"
