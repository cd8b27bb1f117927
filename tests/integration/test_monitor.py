"""Production sampling to retraining data on real files: a served model samples, drift is checked, the monitor decides."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from defectkit import drift, monitor, sampling, storage
from defectkit.data import Manifest
from defectkit.decision_record import iso
from defectkit.evaluation import Gates, evaluate
from defectkit.models import load_model
from defectkit.synthetic import generate_sample
from defectkit.serving.predictor import DefectPredictor, ServingConfig
from defectkit.serving.kserve_runtime import import_kserve
from defectkit.train import TrainConfig, train
from defectkit.validation.dataset import ValidationConfig, validate_dataset
from tests import shifts

import_kserve()  # kserve parses sys.argv when first imported, where pytest's own options could abort it

from kserve import InferInput, InferRequest  # noqa: E402

POLICY = monitor.MonitorPolicy(min_new_images=50, cooldown_s=3600, window_s=3600)
FALSE_ALARM_TRIALS = 40
WINDOW_IMAGES = 60


@pytest.fixture(scope="module")
def judged_model(preprocessed_dir, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("monitor-model")
    train(preprocessed_dir, work / "trained", TrainConfig(steps=10, batch_size=16, device="cpu"))
    return evaluate(work / "trained", preprocessed_dir, work / "eval", device="cpu",
                    gates=Gates(min_auroc=0.0)).model_dir


@pytest.fixture(scope="module")
def production_files(tmp_path_factory) -> list[bytes]:
    """Images from the same generator as the training sample, another seed: in-distribution production data."""
    out = tmp_path_factory.mktemp("production")
    generate_sample(out, count=120, size=64, seed=1)
    return [p.read_bytes() for p in sorted(out.glob("*/*/*.jpg"))]


def _brighter(data: bytes, offset: int = 70) -> bytes:
    pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), np.int16)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels + offset, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def _serve(model_dir: Path, files: list[bytes], root: Path) -> dict[str, int]:
    """Answer the files 8 per request with sampling of every image on; the samples' counters."""
    predictor = DefectPredictor("defectkit", model_dir, config=ServingConfig(
        device="cpu", sampling=sampling.SamplingConfig(rate=1.0, uri=str(root), queue_size=1024)))
    predictor.load()

    async def requests():
        for start in range(0, len(files), 8):
            chunk = files[start:start + 8]
            infer_input = InferInput("image", [len(chunk)], "BYTES")
            infer_input.set_data_from_numpy(np.array(chunk, dtype=object), binary_data=True)
            await predictor.predict(InferRequest("defectkit", [infer_input]))

    try:
        asyncio.run(requests())
    finally:
        predictor.stop()  # writes what is still queued
    return predictor.sampler.stats()


def _check(judged_model: Path, files: list[bytes], tmp_path: Path):
    since = time.time() - 1
    stats = _serve(judged_model, files, tmp_path / "samples")
    assert stats["written"] == len(files) and stats["dropped"] == 0
    window = sampling.window_to_dataset(tmp_path / "samples", since, time.time() + 1, tmp_path / "window",
                                        model=load_model(judged_model))
    assert window.images == len(files) and window.embeddings
    result = drift.detect_artifact_drift(judged_model / "reference", tmp_path / "window", drift.DriftThresholds(),
                                         tmp_path / "drift.html")
    decision = monitor.decide(result.drifted, window.images, None, time.time(), POLICY)
    return result, decision, window


def test_brighter_production_images_trigger_retraining_on_the_new_data(judged_model, production_files, sample_dir,
                                                                       dataset_dir, tmp_path):
    result, decision, window = _check(judged_model, [_brighter(f) for f in production_files], tmp_path)
    assert result.drifted and "brightness" in result.drifted_features
    assert decision.retrain, decision.reasons

    # A defect class is named, so every sampled image is added whichever label the model gave it.
    merged = monitor.merge_for_retraining(sample_dir, tmp_path / "window", tmp_path / "merged", defect_class="stain")
    labels = [sampling.Sample.from_json(json.loads(line)).label
              for line in (tmp_path / "window" / sampling.SAMPLES_FILE).read_text().splitlines()]
    expected = {name: n for name, n in (("good", labels.count("good")), ("stain", labels.count("defect"))) if n}
    assert merged.added == expected and merged.skipped == 0
    validate_dataset(str(tmp_path / "merged"), tmp_path / "dataset",
                     ValidationConfig(min_images_per_class=2, min_side=16))
    retraining, base = Manifest.read(tmp_path / "dataset"), Manifest.read(dataset_dir)
    assert retraining.fingerprint != base.fingerprint
    production = [e for e in retraining.entries if Path(e.path).name.startswith("prod-")]
    assert len(production) == window.images and all(e.path.startswith("train/") for e in production)
    assert retraining.split("test") == base.split("test")  # the champion is judged on the same test set

    now = time.time()
    record = monitor.decision_record(window=(now - POLICY.window_s, now), drift=result.to_json(),
                                     new_images=window.images, last_retrain=None, now=now, policy=POLICY,
                                     decision=decision, run="local-run")
    json_path, md_path = monitor.write_record(record, tmp_path / "record")
    assert md_path.read_text().startswith("# Drift monitor: RETRAIN") and "brightness" in md_path.read_text()
    monitor.write_last_retrain(tmp_path / "state", now, "local-run")
    marker = monitor.read_last_retrain(tmp_path / "state")
    again = monitor.decide(True, window.images, marker["at"], now + 60, POLICY)
    assert not again.retrain and "within the cooldown" in again.reasons[3]


def _altered(data: bytes, alter) -> bytes:
    buffer = io.BytesIO()
    alter(Image.open(io.BytesIO(data)).convert("RGB")).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


# Stronger than in the feature-level tests: the model sees these 64 px images at 32 px.
@pytest.mark.parametrize("alter, feature", [(partial(shifts.blurred, radius=1.5), "sharpness"),
                                            (partial(shifts.new_texture, cell=4), "contrast")])
def test_blurred_or_retextured_production_images_trigger_retraining(judged_model, production_files, tmp_path, alter,
                                                                    feature):
    result, decision, _ = _check(judged_model, [_altered(f, alter) for f in production_files], tmp_path)
    assert result.drifted and feature in result.drifted_features, result.to_markdown()
    assert decision.retrain, decision.reasons


def test_re_encoding_alone_is_no_drift(judged_model, production_files, tmp_path):
    """The control of the test above: its images are decoded and saved again, which by itself shifts nothing."""
    result, decision, _ = _check(judged_model, [_altered(f, lambda p: p) for f in production_files], tmp_path)
    assert not result.drifted and not decision.retrain, result.to_markdown()


def test_in_distribution_production_images_trigger_nothing(judged_model, production_files, tmp_path):
    result, decision, _ = _check(judged_model, production_files, tmp_path)
    assert not result.drifted, result.to_markdown()
    assert not decision.retrain and decision.reasons[1] == "no drift from the training reference"


def test_in_distribution_windows_rarely_raise_a_false_alarm(judged_model, tmp_path):
    """The whole check the monitor runs (feature table and embeddings) on windows drawn from the training
    distribution: disjoint draws of the same generator, sampled as the server writes them."""
    model = load_model(judged_model)
    at = time.time()
    alarms = []
    for seed in range(2, 2 + FALSE_ALARM_TRIALS):
        draw = tmp_path / f"draw-{seed}"
        generate_sample(draw / "images", count=WINDOW_IMAGES, size=64, seed=seed)
        files = [p.read_bytes() for p in sorted((draw / "images").glob("*/*/*.jpg"))]
        sampling.write_shards(storage.Store(str(draw / "samples")),
                              [(data, 0.5, "good", "v1", at + i / 1000) for i, data in enumerate(files)])
        sampling.window_to_dataset(draw / "samples", at, at + 60, draw / "window", model=model)
        if drift.detect_artifact_drift(judged_model / "reference", draw / "window", drift.DriftThresholds(),
                                       draw / "drift.html").drifted:
            alarms.append(seed)
    rate = len(alarms) / FALSE_ALARM_TRIALS
    logging.getLogger(__name__).info("false alarm rate of the monitor's check %.3f over %d windows of %d images "
                                     "(alarms at seeds %s)", rate, FALSE_ALARM_TRIALS, WINDOW_IMAGES, alarms)
    assert rate <= 0.05, alarms


def test_registered_model_carries_its_drift_reference(judged_model, tmp_path):
    from defectkit import registry

    config = registry.RegistryConfig.embedded(tmp_path / "mlflow")
    version = registry.register(config, judged_model)
    resolved = registry.resolve(version.uri, tmp_path / "resolved", tracking_uri=config.tracking_uri)
    for name in ("features.csv", "embeddings.npz"):
        assert (resolved / "reference" / name).read_bytes() == (judged_model / "reference" / name).read_bytes()


def test_monitor_pipeline_retrains_in_its_own_run_only_on_a_window_that_passes_validation(
        judged_model, production_files, sample_dir, tmp_path, monkeypatch):
    """The compiled monitor pipeline through kfp.local: collect -> validate -> drift -> decide -> training
    sub-pipeline on the merged data."""
    from defectkit_kfp.pipelines.run import MONITOR_YAML, run_local
    from tests.conftest import TINY_IMAGE_SIZE

    monkeypatch.setenv("TMPDIR", str(tmp_path))  # run_local points TMPDIR into its work dir; restored afterwards
    stats = _serve(judged_model, [_brighter(f) for f in production_files], tmp_path / "samples")
    arguments = {"sample_uri": str(tmp_path / "samples"), "model_uri": str(judged_model),
                 "state_uri": str(tmp_path / "state"), "base_dataset_uri": str(sample_dir),
                 "retraining_data_uri": str(tmp_path / "retraining"), "window_s": 600.0, "min_new_images": 50,
                 "cooldown_s": 0.0, "defect_class": "stain", "image_size": TINY_IMAGE_SIZE, "steps": 10,
                 "batch_size": 16, "device": "cpu", "min_images_per_class": 2, "min_auroc": 0.0}

    def monitor_run(name: str) -> tuple[dict, str, Path]:
        root = run_local(MONITOR_YAML, arguments, tmp_path / name).pipeline_root
        record = json.loads(next(root.rglob("decide-retraining/record")).read_text())
        return record, next(root.rglob("validate-window/expectations")).read_text(), root

    record, report, root = monitor_run("clean")
    assert record["validation"] == {"passed": True, "problems": ""} and "PASSED" in report
    assert record["drift"]["drifted"] and "brightness" in record["drift"]["drifted_features"]
    assert record["new_images"] == stats["written"] and record["retrain"], record["reasons"]
    assert record["run"] and "{{" not in record["run"], "the run id kfp.local substituted"
    assert monitor.read_last_retrain(tmp_path / "state")["run"] == record["run"]
    # The training sub-pipeline ran in the same run, on the merged data.
    dataset = Manifest.read(next(root.rglob("validate-images/dataset")))
    assert dataset.source == record["retraining_data"]
    assert sum(1 for e in dataset.entries if Path(e.path).name.startswith("prod-")) == record["new_images"]
    assert "approved" in json.loads(next(root.rglob("evaluate-model/verdict")).read_text())

    # Then clients start sending broken files: a quarter of the window no longer decodes.
    sampling.write_shards(storage.Store(str(tmp_path / "samples")),
                          [(b"\xff\xd8 torn upload", 0.5, "good", "v", time.time()) for _ in range(40)])
    record, report, root = monitor_run("broken")
    assert not record["validation"]["passed"] and "FAILED" in report
    assert "40 of 160 sampled images do not decode" in record["validation"]["problems"]
    assert record["drift"]["drifted"] and not record["retrain"]
    assert record["reasons"][0].startswith("the production window failed validation")
    assert not any(root.rglob("validate-images")), "no retraining on a window that failed validation"


def test_monitor_pipeline_checks_the_window_ending_at_window_end(judged_model, production_files, tmp_path,
                                                                monkeypatch):
    """A past window, named by its end: the samples taken in it count, those taken after it do not."""
    from defectkit_kfp.pipelines.run import MONITOR_YAML, run_local

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    end = 1767963600.0  # 2026-01-09T13:00:00Z
    inside = [(data, 0.1, "good", "v1", end - 300 + i) for i, data in enumerate(production_files[:40])]
    after = [(data, 0.1, "good", "v1", end + 1 + i) for i, data in enumerate(production_files[40:50])]
    sampling.write_shards(storage.Store(str(tmp_path / "samples")), inside + after)
    arguments = {"sample_uri": str(tmp_path / "samples"), "model_uri": str(judged_model),
                 "state_uri": str(tmp_path / "state"), "base_dataset_uri": str(tmp_path / "unused"),
                 "retraining_data_uri": str(tmp_path / "retraining"), "window_s": 600.0,
                 "window_end": "2026-01-09T13:00:00Z", "min_new_images": 1000}
    root = run_local(MONITOR_YAML, arguments, tmp_path / "run").pipeline_root
    record = json.loads(next(root.rglob("decide-retraining/record")).read_text())
    assert record["window"] == {"since": iso(end - 600.0), "until": iso(end)}
    assert record["new_images"] == len(inside) and not record["retrain"]
