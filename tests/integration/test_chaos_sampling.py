"""Sampling counts on /metrics: a real Sampler's counts in the Prometheus exposition, and a served model whose
sample storage refuses every write still answering 2xx while it counts the dropped samples."""

from __future__ import annotations

import io
import time
import urllib.request

import pytest
from PIL import Image
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from defectkit.sampling import Sampler, SamplingConfig, read_window
from defectkit.serving import metrics
from tests.chaos import stack
from tests.chaos.scenario_sampling import oip_body, sampling_counts, start_sampling_server


def _jpeg(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (24, 24), (value, 255 - value, 90)).save(buffer, "JPEG")
    return buffer.getvalue()


def _series(text: str, version: str) -> dict[tuple[str, str], float]:
    """(series name, reason or "") -> value for ``version``."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("model_version") == version:
                found[(sample.name, sample.labels.get("reason", ""))] = sample.value
    return found


def _exported(sampler: Sampler, version: str) -> dict[tuple[str, str], float]:
    metrics.watch_sampling(version, sampler.stats)
    try:
        return _series(generate_latest(REGISTRY).decode(), version)
    finally:
        metrics.forget_sampling(version)


def test_written_samples_are_counted_and_stored(tmp_path):
    sampler = Sampler(SamplingConfig(rate=1.0, uri=str(tmp_path)))
    sampler.offer([_jpeg(i) for i in range(6)], [0.2] * 6, ["good"] * 6, "v-ok")
    sampler.close()
    exported = _exported(sampler, "v-ok")
    assert exported == {("defectkit_samples_drawn_total", ""): 6, ("defectkit_samples_written_total", ""): 6,
                        ("defectkit_samples_dropped_total", "queue_full"): 0,
                        ("defectkit_samples_dropped_total", "write_failed"): 0,
                        ("defectkit_samples_pending", ""): 0}
    assert len(read_window(tmp_path, time.time() - 60, time.time() + 60)) == 6


def test_dropped_samples_are_counted_by_reason(tmp_path):
    (tmp_path / "file").write_text("a file where the sample directory should be: every write fails")
    sampler = Sampler(SamplingConfig(rate=1.0, uri=str(tmp_path / "file"), queue_size=2))
    sampler.offer([_jpeg(1)] * 200, [0.5] * 200, ["good"] * 200, "v-down")
    sampler.close()
    stats = sampler.stats()
    exported = _exported(sampler, "v-down")
    assert exported[("defectkit_samples_drawn_total", "")] == 200
    assert exported[("defectkit_samples_written_total", "")] == 0
    assert exported[("defectkit_samples_dropped_total", "queue_full")] == stats["dropped"] > 0
    assert exported[("defectkit_samples_dropped_total", "write_failed")] == stats["failed"] > 0
    assert stats["dropped"] + stats["failed"] == 200
    assert exported[("defectkit_samples_pending", "")] == 0


def test_a_forgotten_sampler_is_not_exported(tmp_path):
    sampler = Sampler(SamplingConfig(rate=1.0, uri=str(tmp_path)))
    sampler.close()
    _exported(sampler, "v-gone")
    assert _series(generate_latest(REGISTRY).decode(), "v-gone") == {}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    (model,) = stack.models(tmp_path_factory.mktemp("chaos-sampling-model"), count=1)
    return model


def test_served_requests_succeed_while_sample_storage_refuses_writes(model_dir, tmp_path):
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("every sample write under here fails")
    server = start_sampling_server(tmp_path, model_dir, "served", str(blocked))
    try:
        body, headers = oip_body(_jpeg(40))
        for _ in range(5):
            request = urllib.request.Request(server.url + stack.INFER_PATH, body, headers, method="POST")
            with urllib.request.urlopen(request, timeout=30) as response:
                assert response.status == 200
        deadline = time.monotonic() + 20
        counts = sampling_counts(server.url)
        while counts.pending and time.monotonic() < deadline:
            time.sleep(0.1)
            counts = sampling_counts(server.url)
        assert (counts.drawn, counts.written, counts.write_failed, counts.pending) == (5, 0, 5, 0)
        with urllib.request.urlopen(server.url + "/v2/health/ready", timeout=10) as response:
            assert response.status == 200
        assert server.process.poll() is None
    finally:
        server.stop()


def test_storage_failures_are_logged_once_then_counted_then_recovery(tmp_path, monkeypatch, caplog):
    from defectkit import sampling, storage

    failures = sampling._WriteFailures(every_s=3600)
    monkeypatch.setattr(sampling, "_write_failures", failures)
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the sample directory should be")
    batch = [(_jpeg(7), 0.5, "good", "v", time.time())]
    with caplog.at_level("WARNING", logger="defectkit.sampling"):
        for _ in range(5):
            assert sampling.write_shards(storage.Store(str(blocked)), batch) == (0, 1)
        failing = [r for r in caplog.records if r.levelname == "ERROR"]
        # The first failure of the run, with its traceback; the next four within the minute are only counted.
        assert len(failing) == 1 and failing[0].exc_info is not None and failures.lost == 5
        blocked.unlink()
        assert sampling.write_shards(storage.Store(str(blocked)), batch) == (1, 0)
    (recovered,) = [r for r in caplog.records if r.levelname == "WARNING"]
    assert "succeed again" in recovered.getMessage() and "5 samples were dropped" in recovered.getMessage()
    assert failures.lost == 0
