"""Benchmark: GPU training images/s fed from the real shards against a batch already on the GPU.

Both sides run the same ``train_step`` (resnet18, batch 256, bf16 autocast,
channels_last, augmentation and normalisation on the device) in the same
process, one after the other. The synthetic side never touches the host, so
the ratio is the share of the GPU's training speed that the real input path
(in-memory shards, pinned staging, asynchronous copies) keeps. Run from the
project root::

    PYTHONPATH=. .venv/bin/python -c "import tests.bench.bench_train_gpu as b; print(b.run())"
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import torch

from defectkit import image
from defectkit.data import Manifest, ManifestEntry, assign_validation, parse_layout, sha256_bytes
from defectkit.preprocess import PreprocessSpec, preprocess_dataset
from defectkit.synthetic import generate_sample
from defectkit.train import TrainConfig
from tests.bench.throughput import measure_throughput

log = logging.getLogger(__name__)

NAME = "train_gpu"
COUNT = 1200  # 840 train images, of which about 670 stay in train: more than two batches
SOURCE_SIZE = 256
IMAGE_SIZE = 224
BATCH = 256
STEPS = 30
WARMUP = 10
TARGET_RATIO = 0.9


def _dataset_artifact(sample: Path, out: Path) -> Path:
    """validate_dataset where its data-checking dependencies are installed; else the same manifest built directly.

    GPU machines carry only the training stack; the sample is valid by construction.
    """
    try:
        from defectkit.validation.dataset import ValidationConfig, validate_dataset

        validate_dataset(str(sample), out, ValidationConfig(min_images_per_class=2, min_side=16))
        return out
    except ModuleNotFoundError as missing:
        log.info("validation unavailable here (%s): writing the manifest directly", missing)
    layout = parse_layout([p.relative_to(sample).as_posix() for p in sample.rglob("*") if p.is_file()])
    entries = []
    for item in assign_validation(list(layout.images), 0.2, seed=0):
        data = (sample / item.path).read_bytes()
        _, info = image.decode(data, name=item.path)
        entries.append(ManifestEntry(item.path, item.split, item.class_name, sha256_bytes(data), len(data),
                                     info.width, info.height, info.mode, item.mask))
    Manifest(tuple(entries), source=str(sample)).write(sample)
    return sample


def preprocessed_sample(root: Path, *, count: int, size: int, image_size: int) -> tuple[Path, Path]:
    """sample -> dataset artifact -> preprocessed shards under ``root``; returns (dataset dir, preprocessed dir)."""
    generate_sample(root / "sample", count=count, size=size, seed=0)
    dataset = _dataset_artifact(root / "sample", root / "dataset")
    preprocess_dataset(dataset, root / "preprocessed", PreprocessSpec(image_size=image_size))
    return dataset, root / "preprocessed"


def run() -> dict:
    if not torch.cuda.is_available():
        return {"name": NAME, "skipped": "no CUDA device", "value": None, "baseline": None, "ratio": None,
                "target": TARGET_RATIO}
    with tempfile.TemporaryDirectory(prefix="bench-train-gpu-") as tmp:
        _, preprocessed = preprocessed_sample(Path(tmp), count=COUNT, size=SOURCE_SIZE, image_size=IMAGE_SIZE)
        config = TrainConfig(architecture="resnet18", batch_size=BATCH, device="cuda")
        result = measure_throughput(preprocessed, config, steps=STEPS, warmup=WARMUP)
    return {
        "name": NAME,
        "value": round(result["real_images_per_s"], 1),
        "baseline": round(result["synthetic_images_per_s"], 1),
        "ratio": round(result["ratio"], 3),
        "target": TARGET_RATIO,
        "unit": "images/s",
        "batch": BATCH,
        "image_size": IMAGE_SIZE,
        "precision": result["precision"],
        "device": torch.cuda.get_device_name(),
    }
