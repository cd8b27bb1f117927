"""The production sampler on real temp directories: partitions, seeded rate, never blocking, window reading."""

from __future__ import annotations

import io
import json
import time
from datetime import datetime, timezone

import numpy as np
import pytest
from PIL import Image

from defectkit.preprocess import FEATURE_NAMES, PreprocessSpec, image_features, to_model_input
from defectkit.sampling import Sampler, SamplingConfig, extension, partition, read_window, window_to_dataset

AT = datetime(2024, 5, 6, 7, 30, tzinfo=timezone.utc).timestamp()


def _jpeg(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (value, value, 255 - value)).save(buffer, "JPEG")
    return buffer.getvalue()


def test_samples_are_written_in_date_and_hour_partitions(tmp_path):
    sampler = Sampler(SamplingConfig(rate=1.0, uri=str(tmp_path)))
    sampler.offer([_jpeg(10), _jpeg(20)], [0.1, 0.9], ["good", "defect"], "abc123", at=AT)
    sampler.offer(np.full((1, 8, 8, 3), 7, np.uint8), [0.2], ["good"], "abc123", at=AT + 3600)
    sampler.close()
    assert sampler.stats() == {"offered": 3, "sampled": 3, "dropped": 0, "written": 3, "failed": 0}
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert [f.rsplit("/", 1)[0] for f in files] == ["date=2024-05-06/07"] * 4 + ["date=2024-05-06/08"] * 2
    assert sorted(f.rsplit(".", 1)[1] for f in files) == ["jpg", "jpg", "json", "json", "json", "png"]
    sidecar = json.loads(next(tmp_path.glob("date=2024-05-06/08/*.json")).read_text())
    assert sidecar["label"] == "good" and sidecar["model_version"] == "abc123" and sidecar["time"] == AT + 3600
    assert (tmp_path / sidecar["image"]).read_bytes()[:4] == b"\x89PNG"


def test_rate_is_a_seeded_share(tmp_path):
    counts = []
    for run in range(2):
        sampler = Sampler(SamplingConfig(rate=0.25, uri=str(tmp_path / str(run)), seed=3))
        sampler.offer([b"x"] * 400, [0.5] * 400, ["good"] * 400, "v", at=AT)
        sampler.close()
        counts.append(sampler.stats()["sampled"])
    assert counts[0] == counts[1] and 70 <= counts[0] <= 130


def test_a_full_queue_drops_and_counts_without_blocking(tmp_path):
    sampler = Sampler(SamplingConfig(rate=1.0, uri=str(tmp_path), queue_size=1))
    started = time.perf_counter()
    sampler.offer([_jpeg(1)] * 2000, [0.5] * 2000, ["good"] * 2000, "v", at=AT)
    offered_in = time.perf_counter() - started
    sampler.close()
    stats = sampler.stats()
    assert stats["dropped"] > 0 and stats["written"] + stats["dropped"] == 2000 and stats["failed"] == 0
    assert offered_in < 1.0  # never waited on a write


def test_storage_failures_are_counted_not_raised(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    sampler = Sampler(SamplingConfig(rate=1.0, uri=str(tmp_path / "file")))
    sampler.offer([_jpeg(1)], [0.5], ["good"], "v", at=AT)
    sampler.close()
    assert sampler.stats()["failed"] == 1


def test_config_validation():
    with pytest.raises(ValueError, match="between 0 and 1"):
        SamplingConfig(rate=1.5, uri="x")
    with pytest.raises(ValueError, match="--sample-uri"):
        SamplingConfig(rate=0.1)
    with pytest.raises(ValueError, match="sampling is off"):
        Sampler(SamplingConfig())


def test_extension_and_partition():
    assert extension(_jpeg(1)) == "jpg" and extension(b"RIFF\0\0\0\0WEBPVP8 ") == "webp" and extension(b"?") == "bin"
    assert partition(AT) == "date=2024-05-06/07"


def test_read_window_and_window_to_dataset(tmp_path):
    sampler = Sampler(SamplingConfig(rate=1.0, uri=str(tmp_path / "samples")))
    for day in range(3):  # one sample a day, plus one that no longer decodes on the middle day
        sampler.offer([_jpeg(50 * day)], [0.1], ["good"], "v", at=AT + day * 86400)
    sampler.offer([b"\xff\xd8 broken"], [0.1], ["good"], "v", at=AT + 86400 + 1)
    sampler.close()
    window = read_window(tmp_path / "samples", AT + 1, AT + 2 * 86400 + 1)
    assert [s.time for s in window] == [AT + 86400, AT + 86400 + 1, AT + 2 * 86400]
    assert read_window(tmp_path / "samples", AT - 9 * 86400, AT - 8 * 86400) == []

    spec = PreprocessSpec(image_size=16)
    result = window_to_dataset(tmp_path / "samples", AT + 1, AT + 2 * 86400 + 1, tmp_path / "current", spec=spec)
    assert (result.images, result.rejected, result.embeddings) == (2, 1, False)
    rows = (tmp_path / "current" / "features.csv").read_text().splitlines()
    assert rows[0] == ",".join(["path", *FEATURE_NAMES]) and len(rows) == 3
    first = rows[1].split(",")
    expected = image_features(to_model_input((tmp_path / "current" / first[0]).read_bytes(), spec))
    assert float(first[1]) == pytest.approx(expected["brightness"], rel=1e-6)
    with pytest.raises(ValueError, match="model_dir"):
        window_to_dataset(tmp_path / "samples", AT, AT + 1, tmp_path / "none")
