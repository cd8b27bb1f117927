"""The real-photograph benchmark at a small scale: few defect examples and good images only, validated, trained
with the defaults' options, evaluated with the report the Kubeflow UI shows."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from defectkit.data import GOOD
from defectkit.evaluation import evaluate
from defectkit.preprocess import PreprocessSpec, preprocess_dataset
from defectkit.synthetic import DEFECT_TYPES
from defectkit.train import TrainConfig, train
from defectkit.validation.dataset import ValidationConfig, validate_dataset
from tests import photos
from tests.unit.layouts import thin_train_defects

SMALL = dict(steps=60, eval_every=20, batch_size=16, device="cpu", pretrained_weights="")


def _prepared(root: Path, keep_defects: int) -> Path:
    """A small photograph dataset with ``keep_defects`` training images of each defect type, validated and
    preprocessed at 48 px."""
    photos.build(root / "photos", train=60, test=40, size=96, seed=5)
    thin_train_defects(root / "photos", {defect: keep_defects for defect in DEFECT_TYPES})
    validate_dataset(str(root / "photos"), root / "dataset", ValidationConfig(min_images_per_class=2))
    preprocess_dataset(root / "dataset", root / "preprocessed", PreprocessSpec(image_size=48), workers=1)
    return root / "preprocessed"


@pytest.mark.parametrize("keep_defects", [0, 2], ids=["good-only", "two-per-type"])
def test_few_or_no_defect_examples_train_and_are_judged(tmp_path, keep_defects):
    preprocessed = _prepared(tmp_path, keep_defects)
    result = train(preprocessed, tmp_path / "model", TrainConfig(**SMALL))
    assert [record["step"] for record in result.history] == [20, 40, 60]
    assert all(0.0 <= record["val_auroc"] <= 1.0 for record in result.history)

    evaluation = evaluate(tmp_path / "model", preprocessed, tmp_path / "evaluation", device="cpu")
    metrics = evaluation.metrics
    assert set(metrics["recall_by_defect_type"]) == set(DEFECT_TYPES)
    assert set(metrics["auroc_by_defect_type"]) == set(DEFECT_TYPES)
    # Sixty steps at 48 px test the mechanics only; what the defaults learn is the `quality` benchmark's to say.
    assert 0.0 <= metrics["image_auroc"] <= 1.0
    report = (tmp_path / "evaluation" / "report.md").read_text()
    for defect in DEFECT_TYPES:
        assert f"| {defect} |" in report
    policy = json.loads((tmp_path / "evaluation" / "metrics.json").read_text())["threshold_policy"]
    if keep_defects == 0:
        # No defect images in validation: the threshold flags at most target_fpr of the good parts instead.
        assert policy["kind"] == "target_fpr" and policy["requested"] == "max_f1"
        assert "target_fpr fallback" in report
    else:
        assert policy["kind"] == "max_f1" and "requested" not in policy


def test_without_defects_and_without_synthetic_anomalies_training_says_what_to_change(tmp_path):
    preprocessed = _prepared(tmp_path, 0)
    with pytest.raises(ValueError, match="synthetic_anomalies"):
        train(preprocessed, tmp_path / "model", TrainConfig(**{**SMALL, "synthetic_anomalies": 0.0}))
    assert not (tmp_path / "model").exists()


def test_a_dataset_without_good_training_images_is_refused_before_training(tmp_path):
    photos.build(tmp_path / "photos", train=30, test=20, size=64, seed=1)
    shutil.rmtree(tmp_path / "photos" / "train" / GOOD)
    with pytest.raises(Exception, match="good"):
        validate_dataset(str(tmp_path / "photos"), tmp_path / "dataset", ValidationConfig(min_images_per_class=2))
