"""Validation of production windows: undecodable samples, answers and features checked before drift trusts them."""

from __future__ import annotations

import io
import json
from datetime import datetime, timezone
from pathlib import Path

import pytest
from PIL import Image

from defectkit import storage
from defectkit.preprocess import PreprocessSpec
from defectkit.sampling import window_to_dataset, write_shards
from defectkit.validation.window import WindowValidationConfig, validate_window

AT = datetime(2024, 5, 6, 7, 30, tzinfo=timezone.utc).timestamp()


def _jpeg(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (value, value, 255 - value)).save(buffer, "JPEG")
    return buffer.getvalue()


def _window(tmp_path: Path, files: list[bytes]) -> Path:
    write_shards(storage.Store(str(tmp_path / "samples")),
                 [(data, 0.05 + 0.09 * i, "good" if i % 2 else "defect", "v1", AT + i) for i, data in enumerate(files)])
    window_to_dataset(tmp_path / "samples", AT, AT + 60, tmp_path / "window", spec=PreprocessSpec(image_size=16))
    return tmp_path / "window"


def test_a_clean_window_passes_validation(tmp_path):
    report = validate_window(_window(tmp_path, [_jpeg(v) for v in range(0, 250, 25)]), AT, AT + 60)
    assert report.window == "2024-05-06T07:30:00+00:00 to 2024-05-06T07:31:00+00:00"
    assert report.passed and report.images == 10 and not report.quarantined and report.failure_message() == ""
    assert {c.name for c in report.checks} >= {"score_between", "label_in_set", "brightness_in_range"}
    assert "PASSED" in report.to_html() and report.to_json()["passed"]


def test_answers_out_of_range_fail_validation_by_name(tmp_path):
    window = _window(tmp_path, [_jpeg(v) for v in range(0, 250, 25)])
    lines = [json.loads(line) for line in (window / "samples.jsonl").read_text().splitlines()]
    lines[3]["score"], lines[5]["label"], lines[7]["score"] = 1.7, "maybe", "high"
    (window / "samples.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    report = validate_window(window, AT, AT + 60)
    failed = {c.name: c.detail for c in report.checks if not c.success}
    assert set(failed) == {"score_between", "label_in_set", "score_not_null"}
    assert lines[7]["image"] in failed["score_not_null"]
    assert f"{lines[3]['image']} (score=1.7)" in failed["score_between"]
    assert f"{lines[5]['image']} (label='maybe')" in failed["label_in_set"]
    assert "expectation score_between failed" in report.failure_message() and "FAILED" in report.to_html()


def test_too_many_undecodable_samples_fail_validation(tmp_path):
    window = _window(tmp_path, [_jpeg(1), b"\xff\xd8 broken", b"not an image"])
    assert not validate_window(window, AT, AT + 60).passed
    report = validate_window(window, AT, AT + 60, WindowValidationConfig(max_quarantine_fraction=0.7))
    assert report.passed and report.quarantine_fraction == pytest.approx(2 / 3)
    assert report.reason_counts() == {"unsupported_format": 2}


def test_an_empty_window_is_valid(tmp_path):
    (tmp_path / "samples").mkdir()
    window_to_dataset(tmp_path / "samples", AT, AT + 60, tmp_path / "window", spec=PreprocessSpec(image_size=16))
    report = validate_window(tmp_path / "window", AT, AT + 60)
    assert report.passed and report.images == 0
