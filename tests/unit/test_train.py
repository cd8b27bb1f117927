"""Training on a tiny real preprocessed sample: reproducibility, early stopping, the artifact, the helpers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from defectkit import models
from defectkit.preprocess import read_info
from defectkit.train import (
    EarlyStopping,
    TrainConfig,
    jitter,
    learning_rate,
    random_orientation,
    run_with_oom_backoff,
    train,
)
from tests.bench.throughput import measure_throughput

TINY = TrainConfig(epochs=2, batch_size=16, device="cpu")


@pytest.fixture(scope="module")
def trained(preprocessed_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    return train(preprocessed_dir, out, TINY)


def test_training_is_reproducible_on_cpu(trained, preprocessed_dir, tmp_path):
    again = train(preprocessed_dir, tmp_path / "again", TINY)
    first = models.read_metadata(trained.model_dir).weights_sha256
    assert models.read_metadata(again.model_dir).weights_sha256 == first
    assert [h["loss"] for h in again.history] == [h["loss"] for h in trained.history]
    other_seed = train(preprocessed_dir, tmp_path / "seed1", TrainConfig(epochs=1, batch_size=16, seed=1,
                                                                         device="cpu"))
    assert models.read_metadata(other_seed.model_dir).weights_sha256 != first


def test_training_writes_the_model_artifact(trained, preprocessed_dir):
    info = read_info(preprocessed_dir)
    record = json.loads((trained.model_dir / "model.json").read_text())
    assert record["architecture"] == "resnet18"
    assert record["classes"] == ["good", "crack", "hole", "scratch", "stain"]
    assert record["preprocess"] == info["spec"]
    assert record["dataset_fingerprint"] == info["dataset_fingerprint"]
    assert record["threshold"] is None and record["threshold_policy"] is None
    assert record["metrics"] == {"val_auroc": trained.best_val_auroc, "best_epoch": trained.best_epoch}
    assert record["training"]["config"] == TINY.to_json()
    assert len(record["training"]["history"]) == len(trained.history) == 2
    epoch = trained.history[0]
    for key in ("epoch", "loss", "val_auroc", "images_per_s", "batch_size", "lr"):
        assert key in epoch
    assert trained.device == "cpu" and trained.images_per_s > 0
    model = models.load_model(trained.model_dir)
    assert model.metadata.preprocess.image_size == 32


def test_the_best_epoch_is_what_gets_saved(trained, preprocessed_dir):
    from defectkit.evaluation import roc_auc
    from defectkit.preprocess import load_split

    val = load_split(preprocessed_dir, "val")
    scores = models.load_model(trained.model_dir).scores(val.images)
    assert roc_auc(val.labels, scores) == pytest.approx(trained.best_val_auroc)


def test_early_stopping_stops_when_validation_cannot_improve(preprocessed_dir, tmp_path):
    # Identical validation images get identical scores: AUROC is 0.5 after every epoch.
    flat = tmp_path / "flat"
    shutil.copytree(preprocessed_dir, flat)
    for shard in read_info(flat)["shards"]["val"]:
        path = flat / "shards" / shard
        with np.load(path) as arrays:
            content = dict(arrays)
        content["images"][:] = 128
        np.savez(path, **content)
    result = train(flat, tmp_path / "model", TrainConfig(epochs=6, batch_size=16, patience=2, device="cpu"))
    assert [h["val_auroc"] for h in result.history] == [0.5, 0.5, 0.5]
    assert result.best_epoch == 1


def test_early_stopping_rules():
    stopping = EarlyStopping(patience=2)
    assert stopping.improved(1, 0.8, 0.5)
    assert not stopping.improved(2, 0.7, 0.1)
    assert not stopping.should_stop(2)
    assert not stopping.improved(3, 0.8, 0.1)  # below a perfect AUROC, only AUROC counts
    assert stopping.should_stop(3)
    assert stopping.improved(4, 1.0, 0.3) and stopping.improved(5, 1.0, 0.2)  # at 1.0 a lower loss wins
    assert not stopping.improved(6, 1.0, 0.25)
    assert stopping.best_epoch == 5


@pytest.mark.parametrize("changes, match", [
    ({"epochs": 0}, "epochs=0"),
    ({"batch_size": -1}, "batch_size=-1"),
    ({"learning_rate": 0.0}, "learning_rate=0.0"),
    ({"weight_decay": -1e-4}, "weight_decay=-0.0001"),
    ({"architecture": "resnet19"}, "'resnet19'"),
    ({"device": "gpu"}, "'gpu'"),
    ({"min_batch_size": 64}, "min_batch_size=64"),
    ({"seed": -3}, "seed=-3"),
])
def test_train_config_validation_names_the_bad_value(changes, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**changes)


def test_missing_defects_in_train_is_a_clear_error(tmp_path, preprocessed_dir):
    only_good = tmp_path / "only-good"
    shutil.copytree(preprocessed_dir, only_good)
    for shard in read_info(only_good)["shards"]["train"]:
        path = only_good / "shards" / shard
        with np.load(path) as arrays:
            content = dict(arrays)
        content["labels"][:] = 0
        np.savez(path, **content)
    with pytest.raises(ValueError, match="train split.*both good and defect"):
        train(only_good, tmp_path / "model", TINY)


def test_oom_backoff_halves_the_batch_size_down_to_the_minimum():
    tried = []

    def step(batch_size: int) -> str:
        tried.append(batch_size)
        if batch_size > 8:
            raise torch.OutOfMemoryError(f"simulated: no room for a batch of {batch_size}")
        return "done"

    assert run_with_oom_backoff(step, 64, 4) == ("done", 8)
    assert tried == [64, 32, 16, 8]
    with pytest.raises(RuntimeError, match="batch size 16.*min_batch_size=16"):
        run_with_oom_backoff(step, 32, 16)


def test_learning_rate_warms_up_then_decays_to_zero():
    config = TrainConfig(epochs=10, learning_rate=1e-3)
    rates = [learning_rate(p, config) for p in np.linspace(0, 10, 101)]
    assert rates[0] == 0.0 and max(rates) == pytest.approx(1e-3) and rates[-1] == pytest.approx(0.0, abs=1e-12)
    assert int(np.argmax(rates)) == 10  # the peak at the end of the warmup (10% of the epochs)


def test_random_orientation_draws_all_eight_flips_and_rotations():
    image = torch.arange(3 * 3 * 3, dtype=torch.uint8).view(1, 3, 3, 3)  # no symmetry: all 8 variants differ
    variants = {tuple(torch.rot90(v, k, dims=(0, 1)).flatten().tolist())
                for v in (image[0], image[0].flip(1)) for k in range(4)}
    assert len(variants) == 8
    out = random_orientation(image.repeat(200, 1, 1, 1), torch.Generator().manual_seed(0))
    seen = {tuple(o.flatten().tolist()) for o in out}
    assert seen == variants


def test_jitter_keeps_range_and_is_seeded():
    x = torch.rand((4, 3, 8, 8), generator=torch.Generator().manual_seed(0))
    a = jitter(x, torch.Generator().manual_seed(5))
    b = jitter(x, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.shape == x.shape and 0.0 <= a.min() and a.max() <= 1.0
    assert not torch.equal(a, x)


def test_measure_throughput_runs_the_same_step_on_both_feeds(preprocessed_dir):
    result = measure_throughput(preprocessed_dir, TrainConfig(batch_size=8, device="cpu"), steps=2, warmup=1)
    assert result["real_images_per_s"] > 0 and result["synthetic_images_per_s"] > 0
    assert result["ratio"] == pytest.approx(result["real_images_per_s"] / result["synthetic_images_per_s"])
    assert result["batch_size"] == 8 and result["device"] == "cpu" and result["precision"] == "fp32"
    with pytest.raises(ValueError, match="batch_size=512"):
        measure_throughput(preprocessed_dir, TrainConfig(batch_size=512, device="cpu"), steps=1, warmup=0)


def test_fine_tuning_from_a_trained_model(trained, preprocessed_dir, tmp_path):
    weights = Path(trained.model_dir) / "model.safetensors"
    result = train(preprocessed_dir, tmp_path / "tuned",
                   TrainConfig(epochs=1, batch_size=16, device="cpu", pretrained_weights=str(weights)))
    assert result.best_epoch == 1
