"""The ONNX export of a judged model: self-describing, scored by ONNX Runtime as PyTorch scores it, refused when
it was changed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from defectkit import models, preprocess
from defectkit.artifact import ONNX_FILE, ONNX_RECORD, ModelIntegrityError
from defectkit.evaluation import Gates, judge
from defectkit.exported import PARITY_TOLERANCE, ExportedModel
from defectkit.golden import read_golden
from tests.unit.test_evaluation import _model_for


@pytest.fixture(scope="module")
def judged(preprocessed_dir, dataset_dir, tmp_path_factory) -> tuple[Path, Path]:
    """(judged model dir, golden dir) of a real evaluation: the export is part of it."""
    root = tmp_path_factory.mktemp("judged")
    candidate = _model_for(preprocessed_dir, root / "candidate", seed=3)
    (root / "no-champion").mkdir()
    judge(candidate, preprocessed_dir, dataset_dir, root / "no-champion", judged_model_dir=root / "model",
          golden_dir=root / "golden", metrics_path=root / "metrics.json", report_path=root / "report.md",
          gates=Gates(min_auroc=0.0), device="cpu")
    return root / "model", root / "golden"


def _golden_pixels(model_dir: Path, golden_dir: Path) -> np.ndarray:
    spec = models.read_metadata(model_dir).preprocess
    golden = read_golden(golden_dir)
    return np.stack([preprocess.to_model_input(data, spec) for data in golden.images])


def test_the_export_carries_threshold_and_preprocessing_and_scores_the_golden_set_as_pytorch(judged):
    model_dir, golden_dir = judged
    metadata = models.read_metadata(model_dir)
    props = {p.key: p.value for p in onnx.load(str(model_dir / ONNX_FILE)).metadata_props}
    assert json.loads(props["defectkit.threshold"]) == metadata.threshold
    assert int(props["defectkit.image_size"]) == metadata.preprocess.image_size
    assert json.loads(props["defectkit.mean"]) == list(metadata.preprocess.mean)
    assert props["defectkit.weights_sha256"] == metadata.weights_sha256
    record = json.loads((model_dir / ONNX_RECORD).read_text())
    assert record["parity"]["images"] == 8 and record["parity"]["max_abs_diff"] <= PARITY_TOLERANCE
    # Loaded anew, with no torch involved in its scores: the golden set's offline scores come back.
    exported = ExportedModel(model_dir)
    golden = read_golden(golden_dir)
    scores = exported.scores(_golden_pixels(model_dir, golden_dir))
    assert np.max(np.abs(scores - np.asarray(golden.scores))) <= PARITY_TOLERANCE
    assert exported.metadata.threshold == metadata.threshold
    with pytest.raises(ValueError, match=r"uint8 \[N, 32, 32, 3\]"):
        exported.scores(np.zeros((1, 16, 16, 3), np.uint8))


def test_a_changed_file_or_reference_is_refused_at_load(judged, tmp_path):
    model_dir, _ = judged
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in (ONNX_FILE, ONNX_RECORD):
        (copy / name).write_bytes((model_dir / name).read_bytes())
    record = json.loads((copy / ONNX_RECORD).read_text())
    record["reference"]["scores"] = [s + 1e-3 for s in record["reference"]["scores"]]
    (copy / ONNX_RECORD).write_text(json.dumps(record))
    with pytest.raises(ModelIntegrityError, match="away from PyTorch"):
        ExportedModel(copy)
    (copy / ONNX_FILE).write_bytes((model_dir / ONNX_FILE).read_bytes() + b"\0")
    with pytest.raises(ModelIntegrityError, match="modified or corrupted"):
        ExportedModel(copy)
