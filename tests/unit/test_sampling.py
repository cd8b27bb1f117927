"""The production sampler on real temp directories and the GCS emulator: shards, partitions, seeded rate,
never blocking, window reading."""

from __future__ import annotations

import io
import json
import logging
import tarfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from defectkit import storage
from defectkit.preprocess import FEATURE_NAMES, PreprocessSpec, image_features, to_model_input
from defectkit.sampling import (
    Sampler,
    SamplingConfig,
    extension,
    partition,
    read_window,
    window_to_dataset,
    write_shards,
)

AT = datetime(2024, 5, 6, 7, 30, tzinfo=timezone.utc).timestamp()


def _jpeg(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (value, value, 255 - value)).save(buffer, "JPEG")
    return buffer.getvalue()


def _members(shard: Path) -> dict[str, bytes]:
    with tarfile.open(shard) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_samples_are_written_as_one_shard_per_hour_partition(tmp_path):
    sampler = Sampler(SamplingConfig(rate=1.0, uri=str(tmp_path)))
    first, second = _jpeg(10), _jpeg(20)
    sampler.offer([first, second], [0.1, 0.9], ["good", "defect"], "abc123", at=AT)
    sampler.offer(np.full((1, 8, 8, 3), 7, np.uint8), [0.2], ["good"], "abc123", at=AT + 3600)
    sampler.close()
    assert sampler.stats() == {"offered": 3, "sampled": 3, "dropped": 0, "written": 3, "failed": 0}
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert [f.rsplit("/", 1)[0] for f in files] == ["date=2024-05-06/07", "date=2024-05-06/08"]
    assert all(f.endswith(".tar") for f in files)

    morning = _members(tmp_path / files[0])
    assert sorted(name.rsplit(".", 1)[1] for name in morning) == ["jpg", "jpg", "json", "json"]
    sidecars = [json.loads(data) for name, data in morning.items() if name.endswith(".json")]
    # Each image is kept byte for byte beside its answer, under one key.
    assert {morning[s["image"]]: (s["score"], s["label"]) for s in sidecars} == {first: (0.1, "good"),
                                                                                  second: (0.9, "defect")}
    assert all(s["image"].split(".")[0] + ".json" in morning for s in sidecars)

    (sidecar,) = [json.loads(data) for name, data in _members(tmp_path / files[1]).items() if name.endswith(".json")]
    assert sidecar["label"] == "good" and sidecar["model_version"] == "abc123" and sidecar["time"] == AT + 3600
    assert _members(tmp_path / files[1])[sidecar["image"]][:4] == b"\x89PNG"


def test_a_batch_is_one_write_not_one_per_image(tmp_path):
    images = [_jpeg(i) for i in range(50)]
    assert write_shards(storage.Store(str(tmp_path)),
                        [(data, 0.5, "good", "v", AT + i) for i, data in enumerate(images)]) == (50, 0)
    (shard,) = tmp_path.rglob("*.tar")
    assert len(_members(shard)) == 100
    assert sorted(s.time for s in read_window(tmp_path, AT, AT + 60)) == [AT + i for i in range(50)]


def test_samples_go_to_gcs(gcs_emulator):
    uri = "gs://defectkit-test/production-samples"
    sampler = Sampler(SamplingConfig(rate=1.0, uri=uri))
    sampler.offer([_jpeg(1), _jpeg(2)], [0.3, 0.7], ["good", "defect"], "v9", at=AT)
    sampler.close()
    assert sampler.stats()["written"] == 2
    (name,) = storage.Store(uri).list()
    assert name.startswith("date=2024-05-06/07/") and name.endswith(".tar")
    window = read_window(uri, AT, AT + 1)
    assert sorted((s.label, s.model_version, s.shard) for s in window) == [("defect", "v9", name), ("good", "v9", name)]


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
    assert len(read_window(tmp_path, AT, AT + 1)) == stats["written"]
    assert offered_in < 1.0  # never waited on a write


def test_storage_failures_are_counted_not_raised(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    sampler = Sampler(SamplingConfig(rate=1.0, uri=str(tmp_path / "file")))
    sampler.offer([_jpeg(1)], [0.5], ["good"], "v", at=AT)
    sampler.close()
    assert sampler.stats()["failed"] == 1


def test_a_pixels_sample_that_cannot_be_encoded_fails_alone(tmp_path):
    batch = [(np.zeros((2, 2, 7), np.uint8), 0.5, "good", "v", AT), (_jpeg(1), 0.5, "good", "v", AT)]
    assert write_shards(storage.Store(str(tmp_path)), batch) == (1, 1)
    assert len(read_window(tmp_path, AT, AT + 1)) == 1
    assert write_shards(storage.Store(str(tmp_path / "none")), batch[:1]) == (0, 1)
    assert not (tmp_path / "none").exists(), "no empty shard"


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
    assert (result.images, result.quarantined, result.embeddings) == (2, 1, False)
    (kept,) = json.loads((tmp_path / "current" / "quarantine" / "quarantine.json").read_text())
    assert kept["reason"] == "unsupported_format" and kept["sample"]["time"] == AT + 86400 + 1
    assert (tmp_path / "current" / "quarantine" / kept["path"]).read_bytes() == b"\xff\xd8 broken"
    rows = (tmp_path / "current" / "features.csv").read_text().splitlines()
    assert rows[0] == ",".join(["path", *FEATURE_NAMES]) and len(rows) == 3
    first = rows[1].split(",")
    expected = image_features(to_model_input((tmp_path / "current" / first[0]).read_bytes(), spec))
    assert float(first[1]) == pytest.approx(expected["brightness"], rel=1e-6)
    with pytest.raises(ValueError, match="give model"):
        window_to_dataset(tmp_path / "samples", AT, AT + 1, tmp_path / "none")
    with pytest.raises(ValueError, match="after its start"):
        read_window(tmp_path / "samples", AT, AT)


def test_a_window_reads_only_its_hours_and_skips_unreadable_shards(tmp_path, caplog):
    root = tmp_path / "samples"
    write_shards(storage.Store(str(root)), [(_jpeg(1), 0.5, "good", "v", AT)])  # 07:30
    (root / "date=2024-05-06" / "05").mkdir()
    (root / "date=2024-05-06" / "05" / "0-broken.tar").write_bytes(b"not a tar file" * 100)
    with caplog.at_level(logging.WARNING, logger="defectkit.sampling"):
        assert len(read_window(root, AT - 1800, AT + 1)) == 1  # 07:00 .. 07:30: the broken 05 shard is not read
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="defectkit.sampling"):
        assert len(read_window(root, AT - 3 * 3600, AT + 1)) == 1
    assert "0-broken.tar is unreadable" in caplog.text


def test_a_shard_naming_a_path_outside_the_window_dataset_is_refused(tmp_path, caplog):
    shard = tmp_path / "samples" / "date=2024-05-06" / "07" / "0-hostile.tar"
    shard.parent.mkdir(parents=True)
    sidecar = json.dumps({"image": "../../escape.jpg", "score": 0.5, "label": "good", "model_version": "v",
                          "time": AT}).encode()
    with tarfile.open(shard, "w") as tar:
        for name, data in (("k.json", sidecar), ("../../escape.jpg", _jpeg(1))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    result = window_to_dataset(tmp_path / "samples", AT, AT + 1, tmp_path / "current", spec=PreprocessSpec(16))
    assert result.images == 0 and not (tmp_path / "escape.jpg").exists()
    assert "names no image file of the shard" in caplog.text

