"""Training on a tiny real preprocessed sample: reproducibility, early stopping, the artifact, sampling, the helpers."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import shutil
import socket
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from defectkit import models, weights
from defectkit.data import GOOD
from defectkit.evaluation import roc_auc
from defectkit.preprocess import load_split, read_info, read_spec
from defectkit.train import (
    SATURATION_JITTER,
    SMOOTHING_WINDOW,
    EarlyStopping,
    Sampler,
    TensorData,
    TrainConfig,
    ema_of,
    fetch_batch,
    jitter,
    learning_rate,
    prepare_batch,
    random_crop,
    random_orientation,
    run_with_oom_backoff,
    synthetic_validation,
    train,
)
from tests.bench.throughput import measure_throughput

# 10 steps validated every 4: three validations, the last after a short round of 2 steps.
TINY = TrainConfig(steps=10, eval_every=4, batch_size=16, device="cpu", pretrained_weights="")
HISTORY_KEYS = {"step", "batch_size", "loss", "images", "seconds", "images_per_s", "lr", "val_auroc", "val_loss"}


@pytest.fixture(scope="module")
def trained(preprocessed_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    return train(preprocessed_dir, out, TINY)


def _rewrite_shards(root: Path, split: str, change) -> None:
    """Apply ``change(arrays, classes)`` to every shard of ``split`` under the copied preprocessed dir ``root``."""
    info = read_info(root)
    for shard in info["shards"][split]:
        path = root / "shards" / shard
        with np.load(path) as arrays:
            content = dict(arrays)
        change(content, info["classes"])
        np.savez(path, **content)


def _all_good(content: dict, classes: list[str]) -> None:
    content["labels"][:] = 0
    content["class_index"][:] = classes.index(GOOD)


def _bce(labels: np.ndarray, scores: np.ndarray) -> float:
    p = np.clip(scores.astype(np.float64), 1e-7, 1 - 1e-7)
    return float(-np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p)))


# --------------------------------------------------------------------------- whole runs


def test_training_is_reproducible_on_cpu(trained, preprocessed_dir, tmp_path):
    again = train(preprocessed_dir, tmp_path / "again", TINY)
    first = models.read_metadata(trained.model_dir).weights_sha256
    assert models.read_metadata(again.model_dir).weights_sha256 == first
    assert [h["loss"] for h in again.history] == [h["loss"] for h in trained.history]
    assert [h["val_auroc"] for h in again.history] == [h["val_auroc"] for h in trained.history]
    other_seed = train(preprocessed_dir, tmp_path / "seed1",
                       TrainConfig(steps=4, eval_every=4, batch_size=16, seed=1, device="cpu", pretrained_weights=""))
    assert models.read_metadata(other_seed.model_dir).weights_sha256 != first


def test_training_writes_the_model_artifact(trained, preprocessed_dir):
    info = read_info(preprocessed_dir)
    record = json.loads((trained.model_dir / "model.json").read_text())
    assert record["architecture"] == "resnet18"
    assert record["classes"] == ["good", "crack", "hole", "scratch", "stain"]
    assert record["preprocess"] == info["spec"]
    assert record["dataset_fingerprint"] == info["dataset_fingerprint"]
    assert record["threshold"] is None and record["threshold_policy"] is None
    assert record["metrics"] == {"val_auroc": trained.best_val_auroc, "best_step": trained.best_step}
    training = record["training"]
    assert training["config"] == TINY.to_json()
    assert training["device"] == "cpu" and training["images_per_s"] > 0 and training["seconds"] > 0
    assert training["pretrained"] == "" and training["pretrained_sha256"] == ""
    assert "scratch" in training["note"]
    # A validation every eval_every steps, and one after the last, shorter round.
    assert [h["step"] for h in trained.history] == [4, 8, 10]
    assert training["history"] == [dict(h) for h in trained.history]
    for h in trained.history:
        assert set(h) == HISTORY_KEYS
        assert h["batch_size"] == 16 and h["images_per_s"] > 0 and 0.0 <= h["val_auroc"] <= 1.0
        assert h["lr"] == pytest.approx(learning_rate(h["step"] - 1, TINY))  # the rate of the round's last step
    assert [h["images"] for h in trained.history] == [64, 64, 32]
    assert trained.device == "cpu" and trained.images_per_s > 0 and not trained.stopped_early
    model = models.load_model(trained.model_dir)
    assert model.metadata.preprocess.image_size == 32


def test_the_best_validation_is_what_gets_saved(trained, preprocessed_dir):
    # The rule: the highest AUROC, the first one reached; at a perfect AUROC the lowest validation loss.
    best = trained.history[0]
    for h in trained.history[1:]:
        if h["val_auroc"] > best["val_auroc"] or (h["val_auroc"] == best["val_auroc"] == 1.0
                                                  and h["val_loss"] < best["val_loss"]):
            best = h
    assert (trained.best_step, trained.best_val_auroc) == (best["step"], best["val_auroc"])
    val = load_split(preprocessed_dir, "val")
    scores = models.load_model(trained.model_dir).scores(val.images)
    assert roc_auc(val.labels, scores) == pytest.approx(trained.best_val_auroc)
    # The loss pins the weights down further than the AUROC does: these are the weights of that validation.
    assert _bce(val.labels, scores) == pytest.approx(best["val_loss"], rel=1e-4)


def test_without_an_average_the_raw_weights_are_validated_and_saved(trained, preprocessed_dir, tmp_path):
    raw = train(preprocessed_dir, tmp_path / "raw", dataclasses.replace(TINY, ema_decay=0.0))
    assert models.read_metadata(raw.model_dir).weights_sha256 != models.read_metadata(trained.model_dir).weights_sha256
    # The loss of each round is the same: the average only changes what is validated and kept.
    assert [h["loss"] for h in raw.history] == [h["loss"] for h in trained.history]
    val = load_split(preprocessed_dir, "val")
    assert roc_auc(val.labels, models.load_model(raw.model_dir).scores(val.images)) == pytest.approx(
        raw.best_val_auroc)


def test_the_weight_average_ramps_its_decay_up_and_copies_step_counters():
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    assert ema_of(module, 0.0) is None
    ema = ema_of(module, 0.99)
    start = module[0].weight.detach().clone()
    ema.update_parameters(module)  # the first update copies
    with torch.no_grad():
        module[0].weight.add_(1.0)
        module[1].num_batches_tracked.fill_(7)
    ema.update_parameters(module)  # after one update the decay is (1 + 1) / (10 + 1), not 0.99
    decay = 2 / 11
    expected = start * decay + (start + 1.0) * (1 - decay)
    assert torch.allclose(ema.module[0].weight, expected, atol=1e-6)
    assert int(ema.module[1].num_batches_tracked) == 7
    for _ in range(2000):
        ema.update_parameters(module)
    assert torch.allclose(ema.module[0].weight, module[0].weight, atol=1e-5)  # converges on steady weights


def test_early_stopping_stops_when_validation_cannot_improve(preprocessed_dir, tmp_path):
    # Identical validation images get identical scores: AUROC is 0.5 at every validation.
    flat = tmp_path / "flat"
    shutil.copytree(preprocessed_dir, flat)

    def grey(content: dict, classes: list[str]) -> None:
        content["images"][:] = 128

    _rewrite_shards(flat, "val", grey)
    config = TrainConfig(steps=20, eval_every=2, batch_size=8, patience=2, device="cpu", pretrained_weights="")
    result = train(flat, tmp_path / "model", config)
    # The third validation fills the smoothing window and sets the bar; two more without a better mean use up
    # the patience.
    assert [h["val_auroc"] for h in result.history] == [0.5] * 5
    assert [h["step"] for h in result.history] == [2, 4, 6, 8, 10]
    assert result.best_step == 2 and result.stopped_early
    assert json.loads((result.model_dir / "model.json").read_text())["metrics"]["best_step"] == 2


def test_training_on_good_images_only_draws_its_defects(preprocessed_dir, tmp_path):
    # MVTec AD's layout: no defect image in train, and here none in val either.
    only_good = tmp_path / "only-good"
    shutil.copytree(preprocessed_dir, only_good)
    for split in ("train", "val"):
        _rewrite_shards(only_good, split, _all_good)
    assert not load_split(only_good, "train").labels.any() and not load_split(only_good, "val").labels.any()
    config = TrainConfig(steps=4, eval_every=2, batch_size=8, device="cpu", pretrained_weights="")
    result = train(only_good, tmp_path / "model", config)
    # Validation on good images alone would have no AUROC: the synthetic validation split gives it one.
    assert [h["step"] for h in result.history] == [2, 4]
    assert all(math.isfinite(h["val_auroc"]) and 0.0 <= h["val_auroc"] <= 1.0 for h in result.history)
    assert all(math.isfinite(h["val_loss"]) for h in result.history)
    assert (result.model_dir / "model.safetensors").is_file()

    with pytest.raises(ValueError, match="synthetic_anomalies"):
        train(only_good, tmp_path / "refused", TrainConfig(steps=4, eval_every=2, batch_size=8, device="cpu",
                                                           pretrained_weights="", synthetic_anomalies=0.0))
    assert not (tmp_path / "refused" / "model.safetensors").exists()


def test_fine_tuning_starts_from_a_trained_model(trained, preprocessed_dir, tmp_path):
    path = Path(trained.model_dir) / "model.safetensors"
    # A learning rate so small that the weights cannot move: what comes out is what went in.
    config = TrainConfig(steps=2, eval_every=2, batch_size=8, device="cpu", pretrained_weights=str(path),
                         learning_rate=1e-9, warmup_fraction=0.0)
    result = train(preprocessed_dir, tmp_path / "tuned", config)
    assert result.best_step == 2
    training = json.loads((result.model_dir / "model.json").read_text())["training"]
    assert training["pretrained"] == str(path)
    assert training["pretrained_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    start, tuned = load_file(path), load_file(result.model_dir / "model.safetensors")
    learned = [k for k in start if "running_" not in k and "num_batches" not in k]  # BN statistics do move
    assert len(learned) > 20
    for key in learned:
        torch.testing.assert_close(tuned[key], start[key], rtol=0, atol=1e-5)
    # From scratch the same weights are far off: the start really came from the file.
    scratch = models.build_model("resnet18").state_dict()
    assert max(float((scratch[k] - start[k]).abs().max()) for k in learned) > 0.01


def _can_reach(host: str) -> bool:
    try:
        socket.create_connection((host, 443), timeout=3).close()
        return True
    except OSError:
        return False


def test_imagenet_weights_offline_train_from_scratch_with_one_warning(preprocessed_dir, tmp_path, caplog):
    published = weights.published_weights("resnet18")
    if _can_reach(published.url.split("/")[2]):
        pytest.skip("this machine reaches download.pytorch.org: the offline fallback cannot be observed here")
    config = TrainConfig(steps=2, eval_every=2, batch_size=8, device="cpu")
    assert config.pretrained_weights == "imagenet"  # the default
    with caplog.at_level(logging.INFO):
        result = train(preprocessed_dir, tmp_path / "model", config)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    message = warnings[0].getMessage()
    assert published.url in message and "from scratch" in message
    training = json.loads((result.model_dir / "model.json").read_text())["training"]
    assert training["pretrained"] == "" and training["pretrained_sha256"] == ""
    assert "from scratch" in training["note"] and training["config"]["pretrained_weights"] == "imagenet"


def test_measure_throughput_runs_the_same_step_on_both_feeds(preprocessed_dir):
    config = TrainConfig(batch_size=8, device="cpu", pretrained_weights="")
    result = measure_throughput(preprocessed_dir, config, steps=2, warmup=1)
    assert result["real_images_per_s"] > 0 and result["synthetic_images_per_s"] > 0
    assert result["ratio"] == pytest.approx(result["real_images_per_s"] / result["synthetic_images_per_s"])
    # bf16 where the CPU has native bf16 arithmetic (AVX512-BF16 or AMX), fp32 elsewhere
    precision = models.training_precision(torch.device("cpu"))
    assert result["batch_size"] == 8 and result["device"] == "cpu" and result["precision"] == precision
    assert result["image_size"] == 32
    with pytest.raises(ValueError, match="batch_size=512"):
        measure_throughput(preprocessed_dir, TrainConfig(batch_size=512, device="cpu", pretrained_weights=""),
                           steps=1, warmup=0)


# --------------------------------------------------------------------------- early stopping


def test_early_stopping_stops_after_patience_validations_without_a_better_mean():
    stopping = EarlyStopping(patience=2)
    assert stopping.improved(10, 0.8, 0.5)
    assert not stopping.improved(20, 0.7, 0.1)
    assert not stopping.improved(30, 0.8, 0.1)  # below a perfect AUROC, only AUROC counts: a lower loss is no better
    assert not stopping.should_stop()  # the window has just filled: its mean, 0.767, is the bar
    assert not stopping.improved(40, 0.7, 0.1)
    assert not stopping.should_stop()
    assert not stopping.improved(50, 0.75, 0.1)
    assert stopping.should_stop()  # means 0.733 and 0.75: two validations without a better one
    assert stopping.best_step == 10 and stopping.best_auroc == 0.8


def test_one_lucky_validation_does_not_reset_patience_as_a_sustained_improvement_does():
    def run(tail: list[float]) -> tuple[EarlyStopping, list[bool]]:
        stopping = EarlyStopping(patience=4)
        stops = []
        for i, auroc in enumerate([0.9, 0.9, 0.9, 0.7, *tail]):
            stopping.improved(i + 1, auroc, 0.5)
            stops.append(stopping.should_stop())
        return stopping, stops

    # The window fills at the third validation (mean 0.9). A spike to 1.0 between validations at 0.7: the means
    # (0.833, 0.867, 0.8, 0.8) stay below 0.9.
    lucky, stops = run([1.0, 0.7, 0.7])
    assert stops == [False] * 6 + [True] and lucky.since_smoothed_best == 4
    # ... but the weights kept are the spike's: the best single validation.
    assert lucky.best_step == 5 and lucky.best_auroc == 1.0
    # Validations that stay higher lift the mean above 0.9 (0.85, 0.867, 0.95): patience starts over.
    sustained, stops = run([0.95, 0.95, 0.95])
    assert not any(stops) and sustained.since_smoothed_best == 0 and sustained.best_smoothed == pytest.approx(0.95)
    assert sustained.best_step == 5 and sustained.best_auroc == 0.95
    assert SMOOTHING_WINDOW == 3  # the arithmetic above assumes it


def test_a_lucky_first_validation_does_not_end_training():
    stopping = EarlyStopping(patience=3)
    for step, auroc in enumerate([1.0, 0.7, 0.8, 0.9, 0.95], start=1):
        stopping.improved(step, auroc, 0.5)
    # Steady improvement after one lucky validation: the docstring's "one lucky validation must not end training".
    assert not stopping.should_stop()


def test_ties_at_a_perfect_auroc_are_broken_by_the_loss():
    stopping = EarlyStopping(patience=2)
    assert stopping.improved(1, 1.0, 0.3)
    assert stopping.improved(2, 1.0, 0.2)  # at 1.0 a lower loss wins
    assert not stopping.improved(3, 1.0, 0.25)
    assert not stopping.improved(4, 0.99, 0.01)
    assert (stopping.best_step, stopping.best_auroc, stopping.best_loss) == (2, 1.0, 0.2)


def test_patience_zero_never_stops():
    stopping = EarlyStopping(patience=0)
    stopping.improved(1, 0.9, 0.1)
    for step in range(2, 40):
        stopping.improved(step, 0.5, 1.0)
        assert not stopping.should_stop()
    assert stopping.since_smoothed_best == 36 and stopping.best_step == 1  # counted from the full window on


# --------------------------------------------------------------------------- configuration


@pytest.mark.parametrize("changes, match", [
    ({"steps": 0}, "steps=0"),
    ({"steps": 2.5}, "steps=2.5"),
    ({"batch_size": -1}, "batch_size=-1"),
    ({"batch_size": 1, "min_batch_size": 1}, "batch_size=1 must be at least 2 with balanced_sampling"),
    ({"eval_every": 0}, "eval_every=0"),
    ({"patience": -1}, "patience=-1"),
    ({"patience": True}, "patience=True"),
    ({"learning_rate": 0.0}, "learning_rate=0.0"),
    ({"weight_decay": -1e-4}, "weight_decay=-0.0001"),
    ({"weight_decay": 1.0}, "weight_decay=1.0"),
    ({"warmup_fraction": 1.0}, "warmup_fraction=1.0"),
    ({"warmup_fraction": -0.1}, "warmup_fraction=-0.1"),
    ({"crop_fraction": 0.4}, "crop_fraction=0.4"),
    ({"crop_fraction": 1.1}, "crop_fraction=1.1"),
    ({"synthetic_anomalies": 1.5}, "synthetic_anomalies=1.5"),
    ({"synthetic_anomalies": -0.1}, "synthetic_anomalies=-0.1"),
    ({"architecture": "resnet19"}, "'resnet19'"),
    ({"device": "gpu"}, "'gpu'"),
    ({"min_batch_size": 64}, "min_batch_size=64"),
    ({"seed": -3}, "seed=-3"),
    ({"ema_decay": 1.0}, "ema_decay=1.0"),
    ({"ema_decay": -0.5}, "ema_decay=-0.5"),
])
def test_train_config_validation_names_the_bad_value(changes, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**changes)


def test_train_config_accepts_the_edges():
    TrainConfig(batch_size=1, min_batch_size=1, balanced_sampling=False)  # uniform batches may hold one image
    TrainConfig(patience=0, weight_decay=0.0, warmup_fraction=0.0, crop_fraction=0.5, synthetic_anomalies=1.0)
    TrainConfig(crop_fraction=1.0, synthetic_anomalies=0.0, steps=1, eval_every=1)


# --------------------------------------------------------------------------- learning rate


def test_learning_rate_warms_up_to_the_peak_then_decays_over_the_steps():
    config = TrainConfig(steps=1000, learning_rate=1e-3, warmup_fraction=0.1)
    rates = [learning_rate(step, config) for step in range(config.steps)]
    assert rates[0] == pytest.approx(1e-5) and rates[0] > 0  # no step is wasted at a rate of zero
    assert rates[99] == pytest.approx(1e-3) and max(rates) == pytest.approx(1e-3)
    assert all(b > a for a, b in zip(rates[:100], rates[1:100]))  # a linear ramp over the first 10%
    assert np.allclose(np.diff(rates[:100]), 1e-5)
    assert all(b <= a for a, b in zip(rates[100:], rates[101:]))  # then decaying
    assert rates[550] == pytest.approx(5e-4, rel=0.01)  # halfway through the decay: half the peak (cosine)
    assert rates[-1] < 1e-3 * 1e-4  # at the last step next to nothing is left
    # A pure function of the step: a step repeated after an out-of-memory error gets the same rate.
    assert learning_rate(500, config) == learning_rate(500, config) == rates[500]
    assert learning_rate(0, TrainConfig(steps=10, warmup_fraction=0.0, learning_rate=1e-3)) == pytest.approx(1e-3)


def test_learning_rate_is_zero_at_the_last_step():
    config = TrainConfig(steps=10, learning_rate=1e-3, warmup_fraction=0.2)
    assert learning_rate(config.steps - 1, config) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("steps, warmup_fraction", [(4, 0.1), (10, 0.25), (15, 0.1)])
def test_learning_rate_never_exceeds_the_peak(steps, warmup_fraction):
    config = TrainConfig(steps=steps, learning_rate=1e-3, warmup_fraction=warmup_fraction)
    assert max(learning_rate(step, config) for step in range(steps)) <= 1e-3 * (1 + 1e-9)


# --------------------------------------------------------------------------- sampling


def _skewed(good: int = 20, counts: dict[str, int] | None = None) -> TensorData:
    """Tiny images tagged with their index; defect types in very unequal numbers."""
    counts = {"crack": 30, "hole": 2, "stain": 6} if counts is None else counts
    names = [GOOD] * good + [name for name, n in counts.items() for _ in range(n)]
    images = torch.zeros((len(names), 4, 4, 3), dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(len(names), dtype=torch.uint8)
    labels = torch.tensor([0.0 if n == GOOD else 1.0 for n in names])
    return TensorData(images, labels, tuple(names))


def test_balanced_batches_are_half_good_with_every_defect_type_equally_often():
    data = _skewed()
    config = TrainConfig(batch_size=16, synthetic_anomalies=0.25, device="cpu")
    sampler = Sampler(data, config, torch.Generator().manual_seed(0))
    types: Counter[str] = Counter()
    good_seen: Counter[int] = Counter()
    for _ in range(400):
        plan = sampler.plan(16)
        assert plan.index.shape == (16,) and plan.synthetic == round(8 * 0.25) == 2
        names = [data.class_names[i] for i in plan.index.tolist()]
        assert names[:plan.synthetic] == [GOOD] * plan.synthetic  # the images that get an anomaly drawn on
        rest = names[plan.synthetic:]
        assert rest.count(GOOD) == 8  # the good half
        assert len(rest) - rest.count(GOOD) == 8 - plan.synthetic  # the real defects of the defect half
        types.update(n for n in rest if n != GOOD)
        good_seen.update(i for i, n in zip(plan.index.tolist(), names) if n == GOOD)
    # 2 holes against 30 cracks, yet each type makes up a third of the real defects drawn.
    total = sum(types.values())
    assert total == 400 * 6 and set(types) == {"crack", "hole", "stain"}
    for name in types:
        assert types[name] / total == pytest.approx(1 / 3, abs=0.04), types
    assert set(good_seen) == set(range(20))  # every good image is drawn


@pytest.mark.parametrize("batch_size, share", [(16, 0.0), (16, 0.5), (16, 0.3), (16, 0.8), (16, 1.0), (7, 0.5),
                                               (2, 0.5)])
def test_the_synthetic_count_is_the_share_of_the_defect_half(batch_size, share):
    data = _skewed()
    sampler = Sampler(data, TrainConfig(batch_size=max(batch_size, 4), synthetic_anomalies=share, device="cpu",
                                        min_batch_size=2), torch.Generator().manual_seed(1))
    half = batch_size // 2
    plan = sampler.plan(batch_size)
    assert plan.synthetic == round(half * share)
    labels = data.labels[plan.index]
    assert plan.index.shape == (batch_size,)
    assert not labels[:plan.synthetic].any()
    assert int(labels.sum()) == half - plan.synthetic  # real defects
    assert int((labels[plan.synthetic:] == 0).sum()) == batch_size - half


def test_sampling_is_seeded():
    data = _skewed()
    config = TrainConfig(batch_size=16, device="cpu")
    a = Sampler(data, config, torch.Generator().manual_seed(3))
    b = Sampler(data, config, torch.Generator().manual_seed(3))
    c = Sampler(data, config, torch.Generator().manual_seed(4))
    plans_a = [a.plan(16).index for _ in range(5)]
    assert all(torch.equal(x, b.plan(16).index) for x in plans_a)
    assert not all(torch.equal(x, c.plan(16).index) for x in plans_a)


def test_a_training_split_of_good_images_only_makes_every_defect_synthetic():
    data = _skewed(good=12, counts={})
    sampler = Sampler(data, TrainConfig(batch_size=16, synthetic_anomalies=0.25, device="cpu"),
                      torch.Generator().manual_seed(0))
    plan = sampler.plan(16)
    assert plan.synthetic == 8 and not data.labels[plan.index].any()
    with pytest.raises(ValueError, match="synthetic_anomalies=0"):
        Sampler(data, TrainConfig(batch_size=16, synthetic_anomalies=0.0, device="cpu"), torch.Generator())


def test_uniform_sampling_follows_the_split_and_puts_good_images_first():
    data = _skewed()  # 20 good of 58
    config = TrainConfig(batch_size=16, balanced_sampling=False, synthetic_anomalies=0.5, device="cpu")
    sampler = Sampler(data, config, torch.Generator().manual_seed(0))
    good = 0
    for _ in range(300):
        plan = sampler.plan(16)
        labels = data.labels[plan.index]
        n_good = int((labels == 0).sum())
        good += n_good
        assert not labels[:n_good].any() and labels[n_good:].all()  # good images first
        assert plan.synthetic == min(n_good, 4)  # half the batch's half, as far as it has good images
    assert good / (300 * 16) == pytest.approx(20 / 58, abs=0.03)


def test_fetch_batch_gathers_images_and_labels():
    data = _skewed()
    index = torch.tensor([0, 25, 3, 55])
    images, labels = fetch_batch(data, index, torch.device("cpu"))
    assert images[:, 0, 0, 0].tolist() == [0, 25, 3, 55]
    assert labels.tolist() == [0.0, 1.0, 0.0, 1.0]


def test_synthetic_validation_pairs_each_good_image_with_a_defaced_copy(preprocessed_dir):
    val = load_split(preprocessed_dir, "val")
    good = val.images[val.labels == 0]
    data = TensorData(torch.from_numpy(good), torch.zeros(len(good)), (GOOD,) * len(good))
    config = TrainConfig(device="cpu")
    made = synthetic_validation(data, read_spec(preprocessed_dir), config, torch.device("cpu"))
    n = len(good)
    assert len(made) == 2 * n and made.images.dtype == torch.uint8 and made.images.shape[1:] == good.shape[1:]
    assert made.labels.tolist() == [0.0] * n + [1.0] * n
    assert made.class_names[:n] == (GOOD,) * n and GOOD not in made.class_names[n:]
    assert torch.equal(made.images[:n], data.images)
    assert all(not torch.equal(made.images[n + i], data.images[i]) for i in range(n))
    again = synthetic_validation(data, read_spec(preprocessed_dir), config, torch.device("cpu"))
    assert torch.equal(again.images, made.images)  # the same split at every validation and every run


# --------------------------------------------------------------------------- augmentation


def test_random_orientation_draws_all_eight_flips_and_rotations():
    image = torch.arange(3 * 3 * 3, dtype=torch.uint8).view(1, 3, 3, 3)  # no symmetry: all 8 variants differ
    variants = {tuple(torch.rot90(v, k, dims=(0, 1)).flatten().tolist())
                for v in (image[0], image[0].flip(1)) for k in range(4)}
    assert len(variants) == 8
    out = random_orientation(image.repeat(200, 1, 1, 1), torch.Generator().manual_seed(0))
    seen = Counter(tuple(o.flatten().tolist()) for o in out)
    assert set(seen) == variants
    assert min(seen.values()) >= 10  # uniform: 25 each expected


def test_random_crop_keeps_the_scale_and_moves_the_framing():
    images = torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    offsets = set()
    for seed in range(60):
        crop = random_crop(images, 0.875, torch.Generator().manual_seed(seed))
        assert crop.shape == (3, 28, 28, 3)
        # An exact sub-array of each image, at the same place in all of them: no resampling.
        found = [(y, x) for y in range(5) for x in range(5) if torch.equal(crop, images[:, y:y + 28, x:x + 28])]
        assert len(found) == 1
        offsets.add(found[0])
    assert len(offsets) > 10  # the position is random
    same = random_crop(images, 0.875, torch.Generator().manual_seed(7))
    assert torch.equal(same, random_crop(images, 0.875, torch.Generator().manual_seed(7)))
    assert torch.equal(random_crop(images, 1.0, torch.Generator().manual_seed(0)), images)


def test_jitter_keeps_range_and_is_seeded():
    x = torch.rand((4, 3, 8, 8), generator=torch.Generator().manual_seed(0))
    a = jitter(x, torch.Generator().manual_seed(5))
    b = jitter(x, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.shape == x.shape and 0.0 <= a.min() and a.max() <= 1.0
    assert not torch.equal(a, x)
    assert not torch.equal(a, jitter(x, torch.Generator().manual_seed(6)))
    bright = jitter(torch.full((2, 3, 4, 4), 0.99), torch.Generator().manual_seed(0))
    assert bright.max() <= 1.0 and bright.min() >= 0.0


def test_jitter_changes_saturation_within_its_bounds():
    generator = torch.Generator().manual_seed(0)
    x = 0.3 + 0.4 * torch.rand((64, 3, 8, 8), generator=generator)  # away from 0 and 1: nothing is clamped
    y = jitter(x, torch.Generator().manual_seed(1))
    # Brightness b and contrast c scale every difference; saturation s scales only the differences between
    # channels: (r - g) becomes b*c*s*(r - g) while the grey image's spatial differences become b*c*(...).
    channel = (y[:, 0] - y[:, 1]).flatten(1).norm(dim=1) / (x[:, 0] - x[:, 1]).flatten(1).norm(dim=1)
    gx, gy = x.mean(1), y.mean(1)
    spatial = (gy - gy.mean((1, 2), keepdim=True)).flatten(1).norm(dim=1) / \
        (gx - gx.mean((1, 2), keepdim=True)).flatten(1).norm(dim=1)
    saturation = channel / spatial
    assert saturation.min() >= 1 - SATURATION_JITTER - 1e-4 and saturation.max() <= 1 + SATURATION_JITTER + 1e-4
    assert saturation.max() - saturation.min() > SATURATION_JITTER  # it varies from image to image
    grey = jitter(x.mean(1, keepdim=True).expand(-1, 3, -1, -1).contiguous(), torch.Generator().manual_seed(1))
    assert torch.allclose(grey[:, 0], grey[:, 1]) and torch.allclose(grey[:, 1], grey[:, 2])  # grey stays grey


def test_prepare_batch_draws_anomalies_on_the_first_images_only(preprocessed_dir):
    spec = read_spec(preprocessed_dir)
    images = torch.from_numpy(load_split(preprocessed_dir, "train").images[:6])
    plain = TrainConfig(augment=False, crop_fraction=1.0, device="cpu")
    expected = models.normalize(images, spec)
    assert torch.equal(prepare_batch(images, spec, None, plain), expected)  # validation: only normalised
    x = prepare_batch(images, spec, torch.Generator().manual_seed(0), plain, synthetic=2)
    assert x.shape == (6, 3, 32, 32) and x.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(x[2:], expected[2:])
    assert all(not torch.allclose(x[i], expected[i]) for i in range(2))
    augmented = prepare_batch(images, spec, torch.Generator().manual_seed(0),
                              TrainConfig(device="cpu", crop_fraction=0.8), synthetic=3)
    assert augmented.shape == (6, 3, 26, 26) and torch.isfinite(augmented).all()  # a crop of 0.8 of 32


# --------------------------------------------------------------------------- out of memory


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
