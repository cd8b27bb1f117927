"""Benchmark: the test AUROC of a model trained with the defaults on real photographs, and its training time.

The dataset is ``tests.photos`` (crops of three texture photographs with drawn
scratches, holes, stains and cracks: 440 train and 210 test images at 256 px).
Everything runs as the training pipeline runs it, with the core's defaults:
validate_dataset, preprocess_dataset at the default ``PreprocessSpec``,
``train`` with the default ``TrainConfig``, ``evaluate`` with the default
threshold policy. The baseline is the goal: AUROC 0.95 within 20 minutes of
training on CPU, 0.98 on a GPU; ``met`` needs both the AUROC and the time.
Run from the project root::

    PYTHONPATH=. .venv/bin/python -m tests.bench.run quality

``QUALITY_SEED`` picks another dataset and training seed, and
``QUALITY_OVERRIDES`` (JSON) changes training options, e.g. to measure the
defaults with one option switched off: ``QUALITY_OVERRIDES='{"synthetic_anomalies": 0}'``;
``QUALITY_GOOD_ONLY=1`` drops the defect images from train (good-images-only mode).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path

import torch

from defectkit.evaluation import evaluate
from defectkit.preprocess import PreprocessSpec, preprocess_dataset
from defectkit.train import TrainConfig, train
from tests import photos
from tests.unit.layouts import thin_train_defects

log = logging.getLogger(__name__)

NAME = "quality"
TRAIN_IMAGES = 440
TEST_IMAGES = 210
GOAL = {"cpu": 0.95, "cuda": 0.98}
BUDGET_S = 20 * 60


def _dataset_artifact(source: Path, out: Path) -> Path:
    """validate_dataset where its data-checking dependencies are installed; else the manifest built directly."""
    try:
        from defectkit.validation.dataset import ValidationConfig, validate_dataset
    except ModuleNotFoundError:  # a bare GPU machine carries only the training stack
        from tests.bench.bench_train_gpu import _dataset_artifact as manifest_only

        return manifest_only(source, out)
    validate_dataset(str(source), out, ValidationConfig())
    return out


def measure(root: Path, *, seed: int = 0, overrides: dict | None = None, good_only: bool = False,
            spec: PreprocessSpec = PreprocessSpec()) -> dict:
    """Build, validate, preprocess, train and evaluate under ``root``; the figures of one run."""
    photos.build(root / "photos", train=TRAIN_IMAGES, test=TEST_IMAGES, seed=seed)
    if good_only:
        thin_train_defects(root / "photos")
    dataset = _dataset_artifact(root / "photos", root / "dataset")
    preprocess_dataset(dataset, root / "preprocessed", spec)
    config = TrainConfig(seed=seed, **(overrides or {}))
    started = time.perf_counter()
    result = train(root / "preprocessed", root / "model", config)
    train_s = time.perf_counter() - started
    evaluation = evaluate(root / "model", root / "preprocessed", root / "evaluation", dataset_dir=dataset,
                          device=config.device)
    metrics = evaluation.metrics
    return {
        "image_auroc": round(metrics["image_auroc"], 4),
        "train_s": round(train_s, 1),
        "best_step": result.best_step,
        "steps_run": result.history[-1]["step"],
        "stopped_early": result.stopped_early,
        "f1": round(metrics["f1"], 4),
        "threshold_policy": metrics["threshold_policy"],
        "recall_by_defect_type": {k: round(v, 4) for k, v in metrics["recall_by_defect_type"].items()},
        "auroc_by_defect_type": {k: round(v, 4) for k, v in metrics.get("auroc_by_defect_type", {}).items()},
        "images_per_s": round(result.images_per_s, 1),
        "image_size": spec.image_size,
        "seed": seed,
        "overrides": overrides or {},
        "good_only": good_only,
    }


def run() -> dict:
    seed = int(os.environ.get("QUALITY_SEED", "0"))
    overrides = json.loads(os.environ.get("QUALITY_OVERRIDES", "{}"))
    good_only = os.environ.get("QUALITY_GOOD_ONLY", "") == "1"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory(prefix="bench-quality-") as tmp:
        figures = measure(Path(tmp), seed=seed, overrides=overrides, good_only=good_only)
    goal = GOAL[device]
    return {
        "name": NAME,
        "value": figures["image_auroc"],
        "baseline": goal,
        "ratio": round(figures["image_auroc"] / goal, 4),
        "target": 1.0,
        "unit": "test image AUROC",
        "met": figures["image_auroc"] >= goal and figures["train_s"] <= BUDGET_S,
        "budget_s": BUDGET_S,
        "device": device,
        **figures,
    }
