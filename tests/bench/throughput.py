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
    TensorData,
    TrainConfig,
    iterate_batches,
    load_data,
    make_generators,
    make_loss,
    make_model,
    make_optimizer,
    runtime,
    synchronize,
    train_step,
)

log = logging.getLogger(__name__)


def _endless_batches(data: TensorData, batch_size: int, device: torch.device,
                     generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    while True:
        yield from iterate_batches(data, torch.randperm(len(data), generator=generator), batch_size, device)


def _images_per_s(step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                  batches: Iterator[tuple[torch.Tensor, torch.Tensor]], steps: int, warmup: int,
                  device: torch.device) -> float:
    for _ in range(warmup):
        step(*next(batches))
    synchronize(device)
    seen = 0
    started = time.perf_counter()
    for _ in range(steps):
        images, labels = next(batches)
        step(images, labels)
        seen += labels.numel()
    synchronize(device)
    return seen / (time.perf_counter() - started)


def measure_throughput(preprocessed_dir: Path, config: TrainConfig, *, steps: int = 30, warmup: int = 10) -> dict:
    """Steady-state training images/s fed from the real shards vs a synthetic batch already on the device.

    Both runs use the same model, optimizer, precision, batch size and
    ``train_step``; their ratio is the cost of the input pipeline.
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
        module, model = make_model(config, device)
        optimizer = make_optimizer(module, config)
        loss_fn = make_loss(train_data.labels)
        order_generator, augment_generator = make_generators(config.seed, device)
        model.train()

        def step(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return train_step(model, optimizer, loss_fn, images, labels, spec,
                              augment_generator if config.augment else None, device)

        real = _images_per_s(step, _endless_batches(train_data, config.batch_size, device, order_generator),
                             steps, warmup, device)
        synthetic_batch = (
            torch.randint(0, 256, (config.batch_size, *train_data.images.shape[1:]), dtype=torch.uint8,
                          device=device, generator=augment_generator),
            (torch.arange(config.batch_size, device=device) % 2).float(),
        )
        synthetic = _images_per_s(step, iter(lambda: synthetic_batch, None), steps, warmup, device)
    result = {
        "real_images_per_s": real,
        "synthetic_images_per_s": synthetic,
        "ratio": real / synthetic,
        "architecture": config.architecture,
        "batch_size": config.batch_size,
        "image_size": spec.image_size,
        "precision": "bf16" if device.type == "cuda" else "fp32",
        "channels_last": True,
        "compile": config.compile and device.type == "cuda",
        "steps": steps,
        "warmup": warmup,
        "device": str(device),
    }
    log.info("training throughput on %s: %.1f images/s from shards, %.1f images/s synthetic (ratio %.3f)",
             device, real, synthetic, result["ratio"])
    return result
