"""Training throughput: images/s fed from the real shards against a synthetic batch already on the device.

Both runs use the training code's own model, optimizer, precision, batch size
and ``train_step``; their ratio is the cost of the input pipeline. Used by the
``train_gpu`` benchmark and the GPU tests; importable with torch alone, so it
runs on a bare GPU machine with ``PYTHONPATH=.``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from defectkit import models
from defectkit.train import (
    Sampler,
    TrainConfig,
    fetch_batch,
    load_data,
    make_generators,
    make_model,
    make_optimizer,
    runtime,
    synchronize,
    train_step,
)

log = logging.getLogger(__name__)


def _images_per_s(step: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor],
                  batches: Iterator[tuple[torch.Tensor, torch.Tensor, int]], steps: int, warmup: int,
                  device: torch.device) -> float:
    for _ in range(warmup):
        step(*next(batches))
    synchronize(device)
    seen = 0
    started = time.perf_counter()
    for _ in range(steps):
        images, labels, synthetic = next(batches)
        step(images, labels, synthetic)
        seen += labels.numel()
    synchronize(device)
    return seen / (time.perf_counter() - started)


def measure_throughput(preprocessed_dir: Path, config: TrainConfig, *, steps: int = 30, warmup: int = 10) -> dict:
    """Steady-state training images/s fed from the real shards vs a synthetic batch already on the device.

    Both runs use the same model, optimizer, precision, batch size and
    ``train_step``; their ratio is the cost of the input pipeline: sampling,
    the copy to the device, and the synthetic anomalies drawn on the real side.
    """
    if steps < 1 or warmup < 0:
        raise ValueError(f"steps={steps} must be at least 1 and warmup={warmup} non-negative")
    device = models.resolve_device(config.device)
    with runtime(device, config.seed):
        data, spec, _ = load_data(Path(preprocessed_dir), device, splits=("train",))
        train_data = data["train"]
        if len(train_data) < config.batch_size:
            raise ValueError(f"the train split has {len(train_data)} images, fewer than batch_size="
                             f"{config.batch_size}; use a larger sample or a smaller batch")
        module, model, _ = make_model(config, device)
        optimizer = make_optimizer(module, config)
        order_generator, augment_generator = make_generators(config.seed, device)
        sampler = Sampler(train_data, config, order_generator)
        model.train()

        def step(images: torch.Tensor, labels: torch.Tensor, synthetic: int) -> torch.Tensor:
            return train_step(model, optimizer, images, labels, spec, augment_generator, config, synthetic, device)

        def real_batches() -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
            while True:
                plan = sampler.plan(config.batch_size)
                yield *fetch_batch(train_data, plan.index, device), plan.synthetic

        real = _images_per_s(step, real_batches(), steps, warmup, device)
        synthetic_batch = (
            torch.randint(0, 256, (config.batch_size, *train_data.images.shape[1:]), dtype=torch.uint8,
                          device=device, generator=augment_generator),
            (torch.arange(config.batch_size, device=device) % 2).float(),
            0,
        )
        synthetic = _images_per_s(step, iter(lambda: synthetic_batch, None), steps, warmup, device)
    result = {
        "real_images_per_s": real,
        "synthetic_images_per_s": synthetic,
        "ratio": real / synthetic,
        "architecture": config.architecture,
        "batch_size": config.batch_size,
        "image_size": spec.image_size,
        "precision": models.training_precision(device),
        "channels_last": True,
        "compile": config.compile and device.type == "cuda",
        "steps": steps,
        "warmup": warmup,
        "device": str(device),
    }
    log.info("training throughput on %s: %.1f images/s from shards, %.1f images/s synthetic (ratio %.3f)",
             device, real, synthetic, result["ratio"])
    return result
