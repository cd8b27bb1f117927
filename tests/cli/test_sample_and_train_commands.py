"""The defectkit command, as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import TINY_IMAGE_SIZE

BIN = Path(sys.executable).parent / "defectkit"


def test_sample_command_is_deterministic(tmp_path):
    for name in ("a", "b"):
        subprocess.run(
            [str(BIN), "sample", "--out", str(tmp_path / name), "--count", "30", "--size", "48", "--seed", "3"],
            check=True, capture_output=True,
        )
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert files_a == files_b and len(files_a) >= 30
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files_a)


def test_train_command_writes_metrics_and_model(sample_dir, tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "defectkit", "train", "--data", str(sample_dir), "--out", str(out),
         "--steps", "10", "--image-size", str(TINY_IMAGE_SIZE), "--device", "cpu", "--batch-size", "16"],
        capture_output=True, text=True,
    )
    # The tiny sample has few images per class; the default minimum of 5 rejects it with a clear message.
    assert result.returncode != 0
    assert "validate-images" in result.stderr + result.stdout


def test_train_command_on_a_valid_dataset(tmp_path):
    data = tmp_path / "data"
    subprocess.run([str(BIN), "sample", "--out", str(data), "--count", "160", "--size", "48"], check=True,
                   capture_output=True)
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "defectkit", "train", "--data", str(data), "--out", str(out), "--steps", "10",
         "--image-size", str(TINY_IMAGE_SIZE), "--device", "cpu", "--batch-size", "16"],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("image_auroc", "precision", "recall", "f1", "threshold", "approved", "reasons"):
        assert key in metrics, key
    assert (out / "model" / "model.safetensors").is_file() and (out / "model" / "model.json").is_file()
    assert "image AUROC" in result.stdout and "training.yaml" in result.stdout
