"""The committed training pipeline YAML, run end to end through kfp.local."""


import json
import shutil
from pathlib import Path

import pytest

from defectkit.data import Manifest
from defectkit.storage import Store
from defectkit_kfp.pipelines.run import TRAINING_YAML, run_local
from tests.conftest import TINY_IMAGE_SIZE

TINY = {"image_size": TINY_IMAGE_SIZE, "steps": 10, "batch_size": 16, "min_images_per_class": 2, "min_auroc": 0.0}


@pytest.fixture(scope="module")
def gs_run(sample_dir, gcs_emulator, tmp_path_factory):
    """One pipeline run over a gs:// copy of the sample, served by the storage emulator."""
    store = Store("gs://defectkit-test/surfaces")
    for path in sorted(p for p in sample_dir.rglob("*") if p.is_file()):
        store.write(path.relative_to(sample_dir).as_posix(), path.read_bytes())
    run = run_local(TRAINING_YAML, {"source_uri": "gs://defectkit-test/surfaces", **TINY}, tmp_path_factory.mktemp("run"))
    return run


def test_gs_dataset_runs_end_to_end(gs_run, sample_dir):
    verdict = json.loads(gs_run.path("verdict").read_text())
    for key in ("image_auroc", "precision", "recall", "f1", "threshold", "approved", "reasons"):
        assert key in verdict
    assert verdict["approved"] is gs_run.outputs["approved"]
    assert gs_run.outputs["quarantined"] == 0
    files = [p for p in sample_dir.rglob("*.jpg")]
    assert gs_run.outputs["images"] == len(files)

    model_json = json.loads((gs_run.path("model") / "model.json").read_text())
    assert model_json["threshold"] == pytest.approx(verdict["threshold"])
    assert model_json["preprocess"]["image_size"] == TINY_IMAGE_SIZE
    dataset = next(gs_run.pipeline_root.rglob("validate-images/dataset"))
    assert model_json["dataset_fingerprint"] == Manifest.read(dataset).fingerprint
    assert Manifest.read(dataset).source == "gs://defectkit-test/surfaces"


def test_champion_is_judged_on_the_same_test_set(gs_run, sample_dir, tmp_path):
    champion = tmp_path / "champion"
    shutil.copytree(gs_run.path("model"), champion)
    run = run_local(
        TRAINING_YAML,
        {"source_uri": str(sample_dir), "champion_uri": str(champion), **TINY, "seed": 1},
        tmp_path / "run",
    )
    verdict = json.loads(run.path("verdict").read_text())
    assert verdict["champion"]["image_auroc"] == pytest.approx(
        json.loads(gs_run.path("verdict").read_text())["image_auroc"], abs=1e-6
    ), "the champion scores what it scored before on the same frozen test set"
    assert any("champion" in reason for reason in verdict["reasons"])


def test_bad_dataset_fails_validation_with_the_quarantine_kept(sample_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(sample_dir, data)
    victims = sorted((data / "train" / "good").glob("*.jpg"))[:12]
    for victim in victims:
        victim.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(RuntimeError, match="validate-images"):
        run_local(TRAINING_YAML, {"source_uri": str(data), **TINY}, tmp_path / "run")
    quarantine = next((tmp_path / "run").rglob("validate-images/quarantine"))
    listed = json.loads((quarantine / "quarantine.json").read_text())
    assert {Path(q["path"]).name for q in listed} == {v.name for v in victims}
    assert all((quarantine / "files" / q["path"]).is_file() for q in listed), "quarantined files are kept"
