"""Training on CUDA: bf16 autocast, channels_last, the out-of-memory guard and torch.compile.

Skipped where torch.cuda.is_available() is False.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from defectkit import models
from defectkit.data import GOOD
from defectkit.evaluation import evaluate
from defectkit.preprocess import load_split, read_info
from defectkit.train import TrainConfig, run_with_oom_backoff, train
from tests.bench.throughput import measure_throughput
from tests.bench.bench_train_gpu import preprocessed_sample

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """(dataset dir, preprocessed dir): the same sample as the CPU end-to-end check, 400 images at 128 px."""
    return preprocessed_sample(tmp_path_factory.mktemp("gpu-sample"), count=400, size=256, image_size=128)


def test_trains_on_cuda_with_bf16_to_a_good_auroc(sample, tmp_path):
    dataset, preprocessed = sample
    config = TrainConfig(steps=300, eval_every=25, batch_size=32, device="cuda", pretrained_weights="")
    result = train(preprocessed, tmp_path / "model", config)
    assert result.device.startswith("cuda")
    assert result.history[0]["step"] == 25 and all(h["batch_size"] == 32 for h in result.history)
    assert result.best_val_auroc >= 0.95, result.history
    judged = evaluate(tmp_path / "model", preprocessed, tmp_path / "eval", device="cuda")
    assert judged.metrics["image_auroc"] >= 0.95, judged.metrics
    # The artifact is device-independent: fp32 on the CPU agrees with bf16 on the GPU.
    test = load_split(preprocessed, "test")
    on_cpu = models.load_model(tmp_path / "model", "cpu").scores(test.images)
    assert np.max(np.abs(on_cpu - judged.test_scores)) < 0.05


def test_out_of_memory_halves_the_batch_size(sample):
    baseline = torch.cuda.memory_allocated()

    def step(batch_size: int) -> int:
        if batch_size > 16:
            torch.empty(batch_size << 40, dtype=torch.uint8, device="cuda")  # terabytes: a real CUDA OOM
        return int(torch.ones(batch_size, device="cuda").sum())

    assert run_with_oom_backoff(step, 64, 4) == (16, 16)
    with pytest.raises(RuntimeError, match="min_batch_size=4"):
        run_with_oom_backoff(lambda size: torch.empty(size << 40, dtype=torch.uint8, device="cuda"), 8, 4)
    assert torch.cuda.memory_allocated() == baseline


def test_compiled_training_saves_a_loadable_model_and_feeds_the_gpu(sample, tmp_path):
    _, preprocessed = sample
    config = TrainConfig(steps=20, eval_every=10, batch_size=64, device="cuda", compile=True, pretrained_weights="")
    result = train(preprocessed, tmp_path / "model", config)
    assert [h["step"] for h in result.history] == [10, 20]
    model = models.load_model(result.model_dir, "cuda")  # keys carry no torch.compile prefix
    assert model.scores(load_split(preprocessed, "val").images).shape[0] > 0
    throughput = measure_throughput(preprocessed, TrainConfig(batch_size=64, device="cuda", pretrained_weights=""),
                                    steps=10, warmup=5)
    assert throughput["precision"] == "bf16"
    assert throughput["real_images_per_s"] > 0 and throughput["ratio"] > 0.3, throughput


def test_good_images_only_train_and_validate_with_synthetic_anomalies_on_cuda(sample, tmp_path):
    """No defect image in train or val: the anomalies are drawn on the GPU, the validation split's with a CUDA
    generator."""
    _, preprocessed = sample
    only_good = tmp_path / "only-good"
    shutil.copytree(preprocessed, only_good)
    info = read_info(only_good)
    for split in ("train", "val"):
        for shard in info["shards"][split]:
            path = only_good / "shards" / shard
            with np.load(path) as arrays:
                content = dict(arrays)
            content["labels"][:] = 0
            content["class_index"][:] = info["classes"].index(GOOD)
            np.savez(path, **content)
    config = TrainConfig(steps=20, eval_every=10, batch_size=32, device="cuda", pretrained_weights="")
    result = train(only_good, tmp_path / "model", config)
    assert [h["step"] for h in result.history] == [10, 20]
    assert all(np.isfinite(h["val_auroc"]) and np.isfinite(h["val_loss"]) for h in result.history)
    assert models.load_model(result.model_dir, "cuda").scores(load_split(only_good, "test").images).shape[0] > 0
