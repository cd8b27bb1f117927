"""Training a defect classifier on preprocessed shards, in the style of torchvision's classification reference.

GPU-safe (torch, torchvision, numpy). The whole split is held in memory as
uint8; each batch travels to the device as uint8 (4x less than float) and is
augmented and normalised there. On CUDA: bf16 autocast, channels_last, TF32,
optional torch.compile, and an out-of-memory guard that halves the batch size.
On CPU: fp32, every core, and bit-for-bit reproducible weights for a given config.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from defectkit import models, preprocess, storage
from defectkit.data import GOOD
from defectkit.evaluation import roc_auc

log = logging.getLogger(__name__)

T = TypeVar("T")

WARMUP_FRACTION = 0.1  # of all epochs, a linear ramp before the cosine decay
BRIGHTNESS_JITTER = 0.1  # multiplicative, +-
CONTRAST_JITTER = 0.1  # multiplicative around each image's mean, +-


@dataclass(frozen=True)
class TrainConfig:
    architecture: str = "resnet18"
    epochs: int = 10
    batch_size: int = 32
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    patience: int = 3  # epochs without a better validation AUROC before stopping
    seed: int = 0
    device: str = "auto"
    compile: bool = False  # torch.compile the model (CUDA only)
    pretrained_weights: str = ""  # .safetensors/.pth state dict, a local path or gs:// URI; "" trains from scratch
    augment: bool = True
    min_batch_size: int = 4  # out-of-memory halving stops here

    def __post_init__(self) -> None:
        if self.architecture not in models.supported_architectures():
            raise ValueError(f"architecture {self.architecture!r} is not a torchvision classification model; "
                             f"choose one of {', '.join(models.supported_architectures())}")
        for name in ("epochs", "batch_size", "patience", "min_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.min_batch_size > self.batch_size:
            raise ValueError(f"min_batch_size={self.min_batch_size} must not exceed batch_size={self.batch_size}")
        if not (isinstance(self.learning_rate, (int, float)) and 0 < self.learning_rate < 1):
            raise ValueError(f"learning_rate={self.learning_rate!r} must be in (0, 1)")
        if not (isinstance(self.weight_decay, (int, float)) and 0 <= self.weight_decay < 1):
            raise ValueError(f"weight_decay={self.weight_decay!r} must be in [0, 1)")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed={self.seed!r} must be a non-negative integer")
        device = self.device
        if not (device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())):
            raise ValueError(f"device={device!r} must be 'auto', 'cpu', 'cuda' or 'cuda:N'")

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TrainResult:
    model_dir: Path
    best_epoch: int  # 1-based
    best_val_auroc: float
    history: tuple[dict, ...]  # one record per epoch run
    images_per_s: float  # training throughput over all epochs
    device: str


@dataclass(frozen=True)
class TensorData:
    images: torch.Tensor  # (N, S, S, 3) uint8 on the host, pinned when training on CUDA
    labels: torch.Tensor  # (N,) float32 on the training device

    def __len__(self) -> int:
        return self.images.shape[0]


# --------------------------------------------------------------------------- setup


def _cpu_threads() -> int:
    # The cores this process may run on, which can be fewer than the machine has.
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@contextmanager
def runtime(device: torch.device, seed: int) -> Iterator[None]:
    """Seeded global RNG and backend settings for one run; the caller's settings come back afterwards."""
    saved = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(), torch.backends.cuda.matmul.allow_tf32,
             torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    # Layer initialisation and dropout draw from the global generator; forking keeps the caller's stream intact.
    cuda_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(seed)
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True  # fixed batch shapes: autotuned kernels pay off
        else:
            torch.set_num_threads(_cpu_threads())
            torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            yield
        finally:
            torch.set_num_threads(saved[0])
            torch.use_deterministic_algorithms(saved[1], warn_only=saved[2])
            (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.backends.cudnn.benchmark) = saved[3:]


def load_data(preprocessed_dir: Path, device: torch.device,
              splits: tuple[str, ...] = ("train", "val")) -> tuple[dict[str, TensorData], preprocess.PreprocessSpec,
                                                                   dict]:
    """The splits as uint8 tensors in memory, with the spec and preprocess.json they were made with."""
    info = preprocess.read_info(preprocessed_dir)
    spec = preprocess.read_spec(preprocessed_dir)
    data = {}
    for split in splits:
        loaded = preprocess.load_split(preprocessed_dir, split)
        defects = int(loaded.labels.sum())
        if defects == 0 or defects == loaded.labels.size:
            raise ValueError(f"the {split} split of {preprocessed_dir} has {loaded.labels.size} images of which "
                             f"{defects} are defects; training needs both good and defect images in train and val")
        images = torch.from_numpy(loaded.images)
        if device.type == "cuda":
            images = images.pin_memory()  # lets batch copies to the GPU run asynchronously
        labels = torch.from_numpy(loaded.labels.astype(np.float32)).to(device)
        data[split] = TensorData(images, labels)
        log.info("loaded %s: %d images (%d defects) at %d px", split, len(images), defects, spec.image_size)
    return data, spec, info


def make_model(config: TrainConfig, device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(module, the callable to train): the same module, or its torch.compile wrapper."""
    with tempfile.TemporaryDirectory() as scratch:
        weights = storage.fetch_file(config.pretrained_weights, Path(scratch)) if config.pretrained_weights else None
        module = models.build_model(config.architecture, pretrained_weights=weights)
    module = module.to(device, memory_format=torch.channels_last)
    if config.compile and device.type != "cuda":
        log.warning("compile=True is only used on CUDA; training on %s without torch.compile", device)
    if config.compile and device.type == "cuda":
        return module, torch.compile(module)
    return module, module


def make_optimizer(module: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; biases and normalisation parameters are not weight-decayed, as in torchvision's reference."""
    decay = [p for p in module.parameters() if p.ndim > 1]
    no_decay = [p for p in module.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel is several times faster than the per-tensor loop on CPU as well as on CUDA.
    return torch.optim.AdamW(groups, lr=config.learning_rate, fused=True)


def make_loss(labels: torch.Tensor) -> torch.nn.Module:
    """BCE on the logit, with defects weighted by good/defect so that both classes count equally."""
    defects = labels.sum()
    return torch.nn.BCEWithLogitsLoss(pos_weight=(labels.numel() - defects) / defects)


def learning_rate(progress: float, config: TrainConfig) -> float:
    """Linear warmup, then cosine decay to zero; ``progress`` is in epochs, so it survives batch size changes."""
    warmup = WARMUP_FRACTION * config.epochs
    if progress < warmup:
        return config.learning_rate * progress / warmup
    remaining = max(config.epochs - warmup, 1e-9)
    return config.learning_rate * 0.5 * (1.0 + math.cos(math.pi * min(1.0, (progress - warmup) / remaining)))


def make_generators(seed: int, device: torch.device) -> tuple[torch.Generator, torch.Generator]:
    """(host generator for batch order, device generator for augmentation)."""
    order = torch.Generator().manual_seed(seed)
    augment = torch.Generator(device=device).manual_seed(seed + 1)
    return order, augment


# --------------------------------------------------------------------------- batches


def iterate_batches(data: TensorData, order: torch.Tensor, batch_size: int,
                    device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(uint8 images, float labels) on ``device`` in ``order``; full batches only, unless all fit in one.

    On CUDA each batch is gathered into one of two pinned staging buffers and
    copied asynchronously, so gathering the next batch overlaps the GPU's work.
    """
    count = max(1, len(order) // batch_size)
    if device.type != "cuda":
        for k in range(count):
            index = order[k * batch_size:(k + 1) * batch_size]
            yield data.images[index], data.labels[index]
        return
    size = min(batch_size, len(order))
    order = order.pin_memory()
    staging = [torch.empty((size, *data.images.shape[1:]), dtype=torch.uint8, pin_memory=True) for _ in range(2)]
    copied: list[torch.cuda.Event | None] = [None, None]
    for k in range(count):
        slot = k % 2
        if copied[slot] is not None:
            copied[slot].synchronize()  # the copy out of this buffer two batches ago must be done
        index = order[k * size:(k + 1) * size]
        torch.index_select(data.images, 0, index, out=staging[slot])
        images = staging[slot].to(device, non_blocking=True)
        labels = data.labels[index.to(device, non_blocking=True)]
        event = torch.cuda.Event()
        event.record()
        copied[slot] = event
        yield images, labels


def random_orientation(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each uint8 NHWC square image flipped and rotated by a multiple of 90°, uniformly over all eight ways.

    A horizontal flip, a vertical flip and a transpose, each with p=0.5, compose
    to every element of the square's symmetry group with equal probability. A
    defect has no preferred orientation.
    """
    n = images.shape[0]
    chosen = torch.rand((n, 3), generator=generator, device=images.device) < 0.5

    def where(column: int, changed: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
        return torch.where(chosen[:, column].view(n, 1, 1, 1), changed, original)

    images = where(0, images.flip(2), images)
    images = where(1, images.flip(1), images)
    return where(2, images.transpose(1, 2), images)


def jitter(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random brightness and contrast per image of a float NCHW batch in [0, 1]; stays in [0, 1]."""
    n = x.shape[0]
    spread = torch.tensor([BRIGHTNESS_JITTER, CONTRAST_JITTER], device=x.device).view(1, 2, 1, 1, 1)
    factors = 1.0 + (torch.rand((n, 2, 1, 1, 1), generator=generator, device=x.device) * 2 - 1) * spread
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (((x - mean) * factors[:, 1] + mean) * factors[:, 0]).clamp_(0.0, 1.0)


def prepare_batch(images: torch.Tensor, spec: preprocess.PreprocessSpec,
                  generator: torch.Generator | None) -> torch.Tensor:
    """uint8 NHWC on the device -> normalised float NCHW channels_last, augmented when a generator is given."""
    if generator is None:
        return models.normalize(images, spec)
    x = models.to_unit_float(random_orientation(images, generator))
    return models.standardize(jitter(x, generator), spec)


# --------------------------------------------------------------------------- steps and epochs


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss_fn: torch.nn.Module,
               images: torch.Tensor, labels: torch.Tensor, spec: preprocess.PreprocessSpec,
               generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """One optimisation step on a uint8 batch already on the device; returns the loss without syncing."""
    x = prepare_batch(images, spec, generator)
    with models.autocast(device):
        logits = model(x).reshape(-1)
    loss = loss_fn(logits.float(), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_one_epoch(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss_fn: torch.nn.Module,
                    data: TensorData, spec: preprocess.PreprocessSpec, config: TrainConfig, epoch: int,
                    batch_size: int, device: torch.device,
                    generators: tuple[torch.Generator, torch.Generator]) -> dict:
    """One pass over the training data in a seeded order; ``epoch`` is 0-based."""
    order_generator, augment_generator = generators
    model.train()
    optimizer.zero_grad(set_to_none=True)  # frees gradients left by a step that ran out of memory
    order = torch.randperm(len(data), generator=order_generator)
    count = max(1, len(order) // batch_size)
    total_loss = torch.zeros((), device=device)
    seen = 0
    started = time.perf_counter()
    for k, (images, labels) in enumerate(iterate_batches(data, order, batch_size, device)):
        lr = learning_rate(epoch + (k + 1) / count, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = train_step(model, optimizer, loss_fn, images, labels, spec,
                          augment_generator if config.augment else None, device)
        total_loss += loss * labels.numel()
        seen += labels.numel()
    synchronize(device)
    seconds = time.perf_counter() - started
    return {"loss": float(total_loss) / seen, "images": seen, "seconds": seconds,
            "images_per_s": seen / seconds if seconds > 0 else 0.0, "lr": lr}


def evaluate_epoch(model: torch.nn.Module, data: TensorData, spec: preprocess.PreprocessSpec,
                   batch_size: int, device: torch.device) -> dict:
    """Validation AUROC and (unweighted) BCE of the current weights."""
    model.eval()
    scores = models.score_images(model, data.images, spec, device, batch_size).astype(np.float64)
    if not np.all(np.isfinite(scores)):
        raise FloatingPointError("the model gives non-finite validation scores: training diverged; "
                                 "use a lower learning_rate")
    labels = data.labels.cpu().numpy()
    p = np.clip(scores, 1e-7, 1 - 1e-7)
    loss = float(-np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p)))
    return {"val_auroc": roc_auc(labels, scores), "val_loss": loss}


def _release_memory() -> None:
    # Only CUDA raises OutOfMemoryError; a full collection elsewhere would just cost time.
    if torch.cuda.is_initialized():
        gc.collect()
        torch.cuda.empty_cache()


def run_with_oom_backoff(fn: Callable[[int], T], batch_size: int, min_batch_size: int) -> tuple[T, int]:
    """``fn(batch_size)``, halving the batch size after each CUDA out-of-memory error; (result, batch size used)."""
    while True:
        try:
            return fn(batch_size), batch_size
        except torch.OutOfMemoryError:
            pass  # recover outside the handler, once the traceback no longer pins the failed step's tensors
        _release_memory()
        if batch_size // 2 < min_batch_size:
            raise RuntimeError(f"CUDA out of memory at batch size {batch_size}, and halving it would go below "
                               f"min_batch_size={min_batch_size}; use a smaller image_size or architecture, "
                               f"or a GPU with more memory")
        log.warning("CUDA out of memory at batch size %d: emptied the cache, retrying the epoch at batch size %d",
                    batch_size, batch_size // 2)
        batch_size //= 2


@dataclass
class EarlyStopping:
    """Tracks the best epoch by validation AUROC and says when ``patience`` epochs brought nothing better.

    Validation loss only breaks ties at a perfect AUROC: small validation sets
    reach 1.0 early, and from there on AUROC cannot tell epochs apart.
    """

    patience: int
    best_auroc: float = -math.inf
    best_loss: float = math.inf
    best_epoch: int = 0

    def improved(self, epoch: int, val_auroc: float, val_loss: float) -> bool:
        better = val_auroc > self.best_auroc or (val_auroc == self.best_auroc == 1.0 and val_loss < self.best_loss)
        if better:
            self.best_auroc, self.best_loss, self.best_epoch = val_auroc, val_loss, epoch
        return better

    def should_stop(self, epoch: int) -> bool:
        return epoch - self.best_epoch >= self.patience


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


# --------------------------------------------------------------------------- entry points


def train(preprocessed_dir: Path, out_dir: Path, config: TrainConfig) -> TrainResult:
    """Train on the train split, stop early on validation AUROC, and write the best model to ``out_dir``."""
    preprocessed_dir, out_dir = Path(preprocessed_dir), Path(out_dir)
    device = models.resolve_device(config.device)
    log.info("training %s on %s for up to %d epochs: %s", config.architecture, device, config.epochs, config)
    with runtime(device, config.seed):
        data, spec, info = load_data(preprocessed_dir, device)
        module, model = make_model(config, device)
        optimizer = make_optimizer(module, config)
        loss_fn = make_loss(data["train"].labels)
        generators = make_generators(config.seed, device)
        batch_size = config.batch_size
        history: list[dict] = []
        stopping = EarlyStopping(config.patience)
        best_state: dict[str, torch.Tensor] = {}
        for epoch in range(config.epochs):
            def run_epoch(size: int, epoch: int = epoch) -> dict:
                stats = train_one_epoch(model, optimizer, loss_fn, data["train"], spec, config, epoch, size, device,
                                        generators)
                # The plain module for validation: a compiled one would recompile for eval mode and odd batches.
                return {**stats, **evaluate_epoch(module, data["val"], spec, size, device)}

            stats, batch_size = run_with_oom_backoff(run_epoch, batch_size, config.min_batch_size)
            record = {"epoch": epoch + 1, "batch_size": batch_size, **stats}
            history.append(record)
            log.info("epoch %d/%d  loss %.4f  val AUROC %.4f  val loss %.4f  %.1f images/s  batch %d  lr %.2e",
                     epoch + 1, config.epochs, record["loss"], record["val_auroc"], record["val_loss"],
                     record["images_per_s"], batch_size, record["lr"])
            if stopping.improved(epoch + 1, record["val_auroc"], record["val_loss"]):
                best_state = _snapshot(module)
            elif stopping.should_stop(epoch + 1):
                log.info("early stopping after epoch %d: no better validation AUROC for %d epochs (best %.4f at "
                         "epoch %d)", epoch + 1, config.patience, stopping.best_auroc, stopping.best_epoch)
                break
        module.load_state_dict(best_state)
        seconds = sum(r["seconds"] for r in history)
        images_per_s = sum(r["images"] for r in history) / seconds if seconds > 0 else 0.0
        metadata = models.ModelMetadata(
            architecture=config.architecture,
            classes=(GOOD, *info["defect_types"]),
            preprocess=spec,
            metrics={"val_auroc": stopping.best_auroc, "best_epoch": stopping.best_epoch},
            dataset_fingerprint=info["dataset_fingerprint"],
            training={"config": config.to_json(), "history": history, "device": str(device),
                      "images_per_s": images_per_s},
        )
        models.save_model(module, metadata, out_dir)
    log.info("best epoch %d (val AUROC %.4f); model written to %s", stopping.best_epoch, stopping.best_auroc, out_dir)
    return TrainResult(out_dir, stopping.best_epoch, stopping.best_auroc, tuple(history), images_per_s, str(device))
