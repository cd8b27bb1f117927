"""Each component on its own, through kfp.local, fed real artifacts with dsl.importer."""


import json
from pathlib import Path

import pytest
from kfp import dsl, local
from kfp.dsl import Dataset, Model

from defectkit_kfp.components.evaluate_model import evaluate_model
from defectkit_kfp.components.fingerprint_source import fingerprint_source
from defectkit_kfp.components.preprocess_images import preprocess_images
from defectkit_kfp.components.resolve_champion import resolve_champion
from defectkit_kfp.components.train_model import train_model
from defectkit_kfp.components.validate_images import validate_images
from defectkit.data import Manifest
from defectkit.models import load_model
from defectkit.preprocess import load_split, read_info
from tests.conftest import TINY_IMAGE_SIZE


@pytest.fixture(autouse=True)
def kfp_local(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"))


def test_validate_images_rejects_classes_outside_the_allow_list(sample_dir):
    @dsl.pipeline
    def only_validate(source_uri: str):
        fingerprint = fingerprint_source(source_uri=source_uri)
        validate_images(source_uri=source_uri, source_fingerprint=fingerprint.output, min_images_per_class=2,
                        allowed_classes="good,scratch,hole")

    with pytest.raises(RuntimeError, match="validate-images"):
        only_validate(source_uri=str(sample_dir))


def test_validate_images_outputs(sample_dir, tmp_path):
    @dsl.pipeline
    def only_validate(source_uri: str) -> Dataset:
        fingerprint = fingerprint_source(source_uri=source_uri)
        return validate_images(source_uri=source_uri, source_fingerprint=fingerprint.output,
                               min_images_per_class=2).outputs["dataset"]

    task = only_validate(source_uri=str(sample_dir))
    dataset = Path(task.output.path)
    manifest = Manifest.read(dataset)
    html = next((tmp_path / "root").rglob("validate-images/expectations")).read_text()
    assert html.startswith("<!DOCTYPE html>")
    assert "Dataset validation: <span class=\"pass\">PASSED</span>" in html
    assert manifest.fingerprint in html
    assert {e.split for e in manifest.entries} == {"train", "val", "test"}
    assert all((dataset / e.path).is_file() for e in manifest.entries)


def test_preprocess_then_train_then_evaluate(dataset_dir, tmp_path):
    fingerprint = Manifest.read(dataset_dir).fingerprint

    @dsl.pipeline
    def chain(dataset_uri: str, fingerprint: str) -> Model:
        dataset = dsl.importer(artifact_uri=dataset_uri, artifact_class=Dataset, reimport=False)
        pre = preprocess_images(dataset=dataset.output, dataset_fingerprint=fingerprint, image_size=TINY_IMAGE_SIZE)
        trained = train_model(preprocessed=pre.outputs["preprocessed"], dataset_fingerprint=fingerprint, steps=10,
                              batch_size=16, device="cpu")
        no_champion = resolve_champion()
        judged = evaluate_model(model=trained.outputs["model"], preprocessed=pre.outputs["preprocessed"],
                                dataset=dataset.output, dataset_fingerprint=fingerprint,
                                champion=no_champion.outputs["champion"], min_auroc=0.0, device="cpu")
        return judged.outputs["judged_model"]

    task = chain(dataset_uri=str(dataset_dir), fingerprint=fingerprint)
    model = load_model(Path(task.output.path))
    assert model.metadata.threshold is not None
    assert model.metadata.dataset_fingerprint == fingerprint
    preprocessed = next((tmp_path / "root").rglob("preprocess-images/preprocessed"))
    assert read_info(preprocessed)["dataset_fingerprint"] == fingerprint
    assert load_split(preprocessed, "test").images.shape[1:] == (TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, 3)
    report = next((tmp_path / "root").rglob("evaluate-model/report")).read_text()
    assert "AUROC" in report
    verdict = json.loads(next((tmp_path / "root").rglob("evaluate-model/verdict")).read_text())
    assert verdict["approved"] is True, verdict["reasons"]


def test_preprocess_refuses_a_mismatched_fingerprint(dataset_dir):
    @dsl.pipeline
    def wrong(dataset_uri: str):
        dataset = dsl.importer(artifact_uri=dataset_uri, artifact_class=Dataset, reimport=False)
        preprocess_images(dataset=dataset.output, dataset_fingerprint="0" * 64, image_size=TINY_IMAGE_SIZE)

    with pytest.raises(RuntimeError, match="preprocess-images"):
        wrong(dataset_uri=str(dataset_dir))
