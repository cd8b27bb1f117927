"""Compiled YAML is current, strictly valid, and carries the pipeline's operational settings."""

import copy
from pathlib import Path

import pytest
import yaml

import compile as compile_module
from defectkit_kfp.pipelines.run import TRAINING_YAML


def test_committed_yaml_is_current_and_valid():
    assert compile_module.main(["--check"]) == 0


def _tamper(tmp_path: Path, edit) -> Path:
    docs = list(yaml.safe_load_all(TRAINING_YAML.read_text()))
    docs = copy.deepcopy(docs)
    edit(docs)
    out = tmp_path / "tampered.yaml"
    out.write_text(yaml.safe_dump_all(docs))
    return out


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d[0].update(pipelineInfoo={}), "PipelineSpec"),
        (lambda d: d[0]["deploymentSpec"]["executors"]["exec-train-model"]["container"].update(imagee="x"),
         "executor exec-train-model"),
        (lambda d: d[0]["deploymentSpec"]["executors"].pop("exec-train-model"), "missing executor exec-train-model"),
        (lambda d: d[0]["root"]["dag"]["tasks"]["train-model"]["componentRef"].update(name="comp-nope"),
         "missing component comp-nope"),
        (lambda d: d[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-train-model"].update(
            tolerationz=[]), "kubernetes executor exec-train-model"),
    ],
)
def test_strict_validation_catches_typos_inside_free_form_structs(tmp_path, edit, message):
    with pytest.raises(compile_module.InvalidSpec, match=message):
        compile_module.validate_yaml(_tamper(tmp_path, edit))


def test_check_fails_on_stale_or_missing_yaml(tmp_path, monkeypatch):
    monkeypatch.setattr(compile_module, "ROOT", tmp_path)
    monkeypatch.setattr(compile_module, "TARGETS", (compile_module.Target("defectkit_kfp.pipelines.training", "training_pipeline"),))
    assert compile_module.main(["--check"]) == 1, "missing YAML must fail the check"
    stale = tmp_path / "pipelines" / "training.yaml"
    stale.parent.mkdir()
    stale.write_text(TRAINING_YAML.read_text().replace("defaultValue: 10.0", "defaultValue: 11.0", 1))
    assert stale.read_text() != TRAINING_YAML.read_text()
    assert compile_module.main(["--check"]) == 1
    stale.write_text(TRAINING_YAML.read_text())
    assert compile_module.main(["--check"]) == 0


def _tasks():
    spec = next(yaml.safe_load_all(TRAINING_YAML.read_text()))
    return spec, spec["root"]["dag"]["tasks"]


def test_side_effect_and_mutable_input_steps_are_not_cached():
    _, tasks = _tasks()
    # What is at the source URI now is fingerprinted on every run; validation caches on that fingerprint
    # (tests/pipelines/test_cache_keys.py follows the backend's cache keys through the chain).
    assert tasks["fingerprint-source"]["cachingOptions"].get("enableCache", False) is False
    assert tasks["validate-images"]["cachingOptions"]["enableCache"] is True
    assert tasks["evaluate-model"]["cachingOptions"].get("enableCache", False) is False
    assert tasks["preprocess-images"]["cachingOptions"]["enableCache"] is True
    assert tasks["train-model"]["cachingOptions"]["enableCache"] is True


def test_dataset_fingerprint_feeds_every_cached_step():
    _, tasks = _tasks()
    for name in ("preprocess-images", "train-model", "evaluate-model"):
        source = tasks[name]["inputs"]["parameters"]["dataset_fingerprint"]["taskOutputParameter"]
        assert source == {"outputParameterKey": "fingerprint", "producerTask": "validate-images"}


def test_cluster_resources_and_retries():
    spec, tasks = _tasks()
    executors = spec["deploymentSpec"]["executors"]
    train = executors["exec-train-model"]["container"]
    assert train["resources"]["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert train["image"].startswith("ghcr.io/defectkit/train:")
    for name in ("preprocess-images", "train-model", "evaluate-model"):
        assert tasks[name]["retryPolicy"]["maxRetryCount"] >= 1
    for executor in executors.values():
        assert "pip install" not in " ".join(executor["container"]["command"]), "no runtime pip installs"


def test_every_input_has_a_description():
    spec, _ = _tasks()
    for name, component in spec["components"].items():
        if "executorLabel" not in component:
            continue  # a dsl.If/ExitHandler sub-DAG: its inputs are generated channels
        for kind in ("parameters", "artifacts"):
            for inp, definition in component.get("inputDefinitions", {}).get(kind, {}).items():
                assert definition.get("description"), f"{name} input {inp} has no description"
    for inp, definition in spec["root"]["inputDefinitions"]["parameters"].items():
        assert definition.get("description"), f"pipeline input {inp} has no description"
