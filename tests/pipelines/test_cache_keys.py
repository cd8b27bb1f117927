"""Caching of the compiled training pipeline, with cache keys computed the way the Kubeflow Pipelines backend does.

kfp.local ignores caching, so this reads the compiled IR. The backend
(kubeflow/pipelines ``backend/src/v2/cacheutils/cache.go``: ``GenerateCacheKey`` and
``GenerateFingerPrint``) keys a task on its input artifacts by MLMD name (their
identity, never their content), its input parameter values, its output artifacts'
types and metadata, its output parameters' types, and the container's image,
command and arguments (as written in the spec, placeholders unresolved), PVCs and
environment; the sha256 of that key's JSON is looked up per pipeline and namespace.
A task whose ``cachingOptions`` lack ``enableCache`` always runs.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
TRAINING = ROOT / "pipelines" / "training.yaml"
# The data path from a dataset URI to a trained model, in the order the DAG runs it.
CHAIN = ("fingerprint-source", "validate-images", "preprocess-images", "train-model")


@dataclass
class Backend:
    """The cache of one pipeline in one namespace: fingerprint -> the outputs of the execution that made it."""

    spec: dict[str, Any]
    cache: dict[str, dict[str, Any]] = field(default_factory=dict)
    _ids: Any = field(default_factory=lambda: itertools.count(1))

    def task(self, name: str) -> dict[str, Any]:
        return self.spec["root"]["dag"]["tasks"][name]

    def cache_key(self, name: str, parameters: dict[str, Any], artifacts: dict[str, str]) -> str:
        task = self.task(name)
        component = self.spec["components"][task["componentRef"]["name"]]
        container = self.spec["deploymentSpec"]["executors"][component["executorLabel"]]["container"]
        outputs = component.get("outputDefinitions", {})
        key = {
            "inputArtifactNames": {k: {"artifactNames": [v]} for k, v in artifacts.items()},
            "inputParameterValues": parameters,
            "outputArtifactsSpec": {k: {"type": v["artifactType"]} for k, v in outputs.get("artifacts", {}).items()},
            "outputParametersSpec": {k: v["parameterType"] for k, v in outputs.get("parameters", {}).items()},
            "containerSpec": {"image": container["image"],
                              "cmdArgs": container.get("command", []) + container.get("args", [])},
        }
        return hashlib.sha256(json.dumps(key, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def run(self, arguments: dict[str, Any], produced: dict[str, dict[str, Any]]) -> dict[str, bool]:
        """One run of CHAIN; ``produced`` gives what each task would output when it really runs.

        Returns, per task, whether it was served from the cache.
        """
        defaults = {k: v.get("defaultValue") for k, v in self.spec["root"]["inputDefinitions"]["parameters"].items()}
        values = {**defaults, **arguments}
        outputs: dict[str, dict[str, Any]] = {}
        hits = {}
        for name in CHAIN:
            task = self.task(name)
            parameters, artifacts = {}, {}
            for key, source in task.get("inputs", {}).get("parameters", {}).items():
                if "componentInputParameter" in source:
                    parameters[key] = values[source["componentInputParameter"]]
                elif "taskOutputParameter" in source:
                    upstream = source["taskOutputParameter"]
                    parameters[key] = outputs[upstream["producerTask"]][upstream["outputParameterKey"]]
                else:
                    parameters[key] = source["runtimeValue"]["constant"]
            for key, source in task.get("inputs", {}).get("artifacts", {}).items():
                upstream = source["taskOutputArtifact"]
                artifacts[key] = outputs[upstream["producerTask"]][upstream["outputArtifactKey"]]
            fingerprint = self.cache_key(name, parameters, artifacts)
            cached = task.get("cachingOptions", {}).get("enableCache", False)
            hits[name] = cached and fingerprint in self.cache
            if hits[name]:
                outputs[name] = self.cache[fingerprint]
                continue
            component = self.spec["components"][task["componentRef"]["name"]]
            made = {k: f"artifact-{next(self._ids)}"
                    for k in component.get("outputDefinitions", {}).get("artifacts", {})}
            made.update(produced.get(name, {}))
            outputs[name] = made
            if cached:
                self.cache[fingerprint] = made
        return hits


def _produced(source_fingerprint: str) -> dict[str, dict[str, Any]]:
    # The manifest's fingerprint follows the data as the source fingerprint does.
    return {"fingerprint-source": {"Output": source_fingerprint},
            "validate-images": {"fingerprint": f"manifest-of-{source_fingerprint}", "images": 400, "quarantined": 0},
            "train-model": {"val_auroc": 0.99, "best_step": 300}}


@pytest.fixture
def backend() -> Backend:
    return Backend(next(yaml.safe_load_all(TRAINING.read_text())))


def test_the_source_is_fingerprinted_on_every_run(backend):
    assert not backend.task("fingerprint-source").get("cachingOptions", {}).get("enableCache", False)
    validate = backend.task("validate-images")
    assert validate["cachingOptions"]["enableCache"]
    assert validate["inputs"]["parameters"]["source_fingerprint"]["taskOutputParameter"]["producerTask"] \
        == "fingerprint-source"


def test_unchanged_data_reuses_validation_preprocessing_and_training(backend):
    arguments = {"source_uri": "gs://bucket/surfaces"}
    first = backend.run(arguments, _produced("a" * 64))
    second = backend.run(arguments, _produced("a" * 64))
    assert not any(first.values())
    assert second == {"fingerprint-source": False, "validate-images": True, "preprocess-images": True,
                      "train-model": True}


def test_changed_data_at_the_same_uri_recomputes_everything(backend):
    arguments = {"source_uri": "gs://bucket/surfaces"}
    backend.run(arguments, _produced("a" * 64))
    changed = backend.run(arguments, _produced("b" * 64))
    assert not any(changed.values())
    # And the old data back again finds its own results, never the changed data's.
    assert backend.run(arguments, _produced("a" * 64))["train-model"]
