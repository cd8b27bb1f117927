"""Model input preparation: one decode-and-resize rule, and the dataset shards built with it.

:func:`to_model_input` is the only place that turns image bytes into model
pixels. Preprocessing, evaluation of raw files and the model server all call
it, so what the model sees in training is what it sees in production.

:func:`preprocess_dataset` runs it over a dataset artifact on every core and
writes::

    out_dir/preprocess.json              spec, fingerprint, classes, counts, shard names
    out_dir/shards/{split}-{k:05d}.npz   images (N,S,S,3) uint8, labels, class_index, paths
    out_dir/features.csv                 per-image brightness, sharpness, colour statistics

GPU-safe: Pillow and numpy only.
"""

from __future__ import annotations

import csv
import json
import logging
import time
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from defectkit import image
from defectkit.cores import usable_cores
from defectkit.data import GOOD, SPLITS, Manifest, ManifestEntry
from defectkit.files import replacing

log = logging.getLogger(__name__)

FORMAT = "defectkit.preprocessed/v1"
INFO_FILE = "preprocess.json"
FEATURES_FILE = "features.csv"
SHARD_DIR = "shards"
FEATURE_NAMES: tuple[str, ...] = (
    "brightness",
    "contrast",
    "sharpness",
    "r_mean",
    "g_mean",
    "b_mean",
    "r_std",
    "g_std",
    "b_std",
    "saturation",
)
# Pillow first shrinks by an integer factor (box filter) while the image is at least
# this many times the target, then resamples; at 3 the result is indistinguishable
# from a plain bilinear resize and much faster for large PNG/BMP/TIFF sources.
REDUCING_GAP = 3.0


@dataclass(frozen=True)
class PreprocessSpec:
    """How images become model input: squashed to ``image_size`` square, bilinear; mean/std for normalisation."""

    image_size: int = 160
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def __post_init__(self) -> None:
        if not isinstance(self.image_size, int) or self.image_size < 8:
            raise ValueError(f"image_size must be an integer of at least 8, got {self.image_size!r}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"mean and std need one value per RGB channel, got mean={self.mean!r} std={self.std!r}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std values must be positive, got {self.std!r}")

    def to_json(self) -> dict:
        return {"image_size": self.image_size, "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_json(cls, record: dict) -> PreprocessSpec:
        unknown = set(record) - {"image_size", "mean", "std"}
        if unknown:
            raise ValueError(f"unknown preprocess spec keys {sorted(unknown)}; written by a newer defectkit?")
        return cls(
            image_size=int(record["image_size"]),
            mean=tuple(float(v) for v in record["mean"]),
            std=tuple(float(v) for v in record["std"]),
        )


@dataclass(frozen=True)
class PreprocessResult:
    out_dir: Path
    counts: dict[str, int]  # images per split
    shards: dict[str, tuple[str, ...]]  # shard file names per split, under out_dir/shards
    seconds: float
    images_per_s: float


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # (N, S, S, 3) uint8
    labels: np.ndarray  # (N,) uint8, 1 = defect
    class_names: tuple[str, ...]  # per image
    paths: tuple[str, ...]  # per image, relative to the dataset artifact


def to_model_input(
    data: bytes, spec: PreprocessSpec, *, name: str = "", max_pixels: int = image.DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Decode image bytes and squash them to a contiguous (S, S, 3) uint8 array; raises image.ImageRejected."""
    size = (spec.image_size, spec.image_size)
    # draft lets JPEG decode at 1/2-1/8 scale while still at least `size`: most of the speed for large photos.
    picture, _ = image.decode(data, name=name, max_pixels=max_pixels, draft=size)
    if picture.size != size:
        picture = picture.resize(size, Image.Resampling.BILINEAR, reducing_gap=REDUCING_GAP)
    return np.array(picture, dtype=np.uint8, order="C")


def image_features(pixels: np.ndarray) -> dict[str, float]:
    """Summary statistics of one uint8 HWC RGB image, for drift monitoring and data checks.

    Values are in 8-bit units (0-255) except ``saturation`` (mean HSV saturation, 0-1).
    ``contrast`` is the standard deviation of the grey image; ``sharpness`` the variance
    of its 3x3 Laplacian (0 for images under 3x3).
    """
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
        raise ValueError(f"expected a uint8 (H, W, 3) image, got {pixels.dtype} {pixels.shape}")
    # Planar copies keep every operation contiguous; float32 throughout: about 0.3 ms for 224x224.
    channels = np.ascontiguousarray(pixels.transpose(2, 0, 1))
    planes = channels.astype(np.float32)
    flat = planes.reshape(3, -1)
    means = flat.mean(axis=1)
    stds = flat.std(axis=1)
    grey = 0.299 * planes[0] + 0.587 * planes[1] + 0.114 * planes[2]
    if grey.shape[0] >= 3 and grey.shape[1] >= 3:
        laplacian = grey[:-2, 1:-1] + grey[2:, 1:-1] + grey[1:-1, :-2] + grey[1:-1, 2:] - 4.0 * grey[1:-1, 1:-1]
        sharpness = float(laplacian.var())
    else:
        sharpness = 0.0
    high = np.maximum(np.maximum(channels[0], channels[1]), channels[2])
    low = np.minimum(np.minimum(channels[0], channels[1]), channels[2])
    high_f = high.astype(np.float32)
    saturation = np.divide(high_f - low, high_f, out=np.zeros_like(high_f), where=high > 0)
    return {
        "brightness": float(grey.mean()),
        "contrast": float(grey.std()),
        "sharpness": sharpness,
        "r_mean": float(means[0]),
        "g_mean": float(means[1]),
        "b_mean": float(means[2]),
        "r_std": float(stds[0]),
        "g_std": float(stds[1]),
        "b_std": float(stds[2]),
        "saturation": float(saturation.mean()),
    }


def preprocess_dataset(
    dataset_dir: Path,
    out_dir: Path,
    spec: PreprocessSpec,
    *,
    workers: int | None = None,
    shard_size: int = 1024,
    expected_fingerprint: str | None = None,
) -> PreprocessResult:
    """Decode and resize every image of a dataset artifact on all cores; write shards, features and preprocess.json.

    Output order is manifest order within each split, whatever ``workers`` is. Resized
    images stream from the workers straight into the shard files: memory never holds more
    than one shard's results, whatever the dataset size. With ``expected_fingerprint``,
    a dataset with another fingerprint is refused before anything is written, so that
    changed data never passes for the data a cache key or lineage names.
    """
    dataset_dir, out_dir = Path(dataset_dir), Path(out_dir)
    if shard_size < 1:
        raise ValueError(f"shard_size must be at least 1, got {shard_size}")
    manifest = Manifest.read(dataset_dir)
    if expected_fingerprint is not None and manifest.fingerprint != expected_fingerprint:
        raise ValueError(f"dataset fingerprint {manifest.fingerprint} of {dataset_dir} does not match the expected "
                         f"{expected_fingerprint}; give the dataset artifact that the fingerprint was taken of")
    classes = manifest.classes
    class_index = {name: i for i, name in enumerate(classes)}
    by_split = {split: manifest.split(split) for split in SPLITS}
    total = sum(len(entries) for entries in by_split.values())
    workers = max(1, min(workers or usable_cores(), total or 1))
    # A stale preprocess.json would mark a half-written output complete; stale shards would linger.
    (out_dir / INFO_FILE).unlink(missing_ok=True)
    (out_dir / SHARD_DIR).mkdir(parents=True, exist_ok=True)
    for stale in [*(out_dir / SHARD_DIR).glob("*.npz"), *(out_dir / SHARD_DIR).glob(".*.tmp")]:
        stale.unlink()
    log.info("preprocessing %d images from %s at %dpx on %d workers", total, dataset_dir, spec.image_size, workers)

    started = time.perf_counter()
    progress = _Progress(total, started)
    shards: dict[str, list[str]] = {split: [] for split in SPLITS}
    with (
        _ordered_map(workers, dataset_dir, spec) as run,
        (out_dir / FEATURES_FILE).open("w", newline="") as features_file,
    ):
        features = csv.writer(features_file)
        features.writerow(["path", "split", "class", *FEATURE_NAMES])
        for split, entries in by_split.items():
            for k, start in enumerate(range(0, len(entries), shard_size)):
                batch = entries[start : start + shard_size]
                shard_name = f"{split}-{k:05d}.npz"
                with _shard_writer(out_dir / SHARD_DIR / shard_name, batch, class_index, spec.image_size) as add:
                    for entry, (pixels, values) in zip(batch, run([e.path for e in batch]), strict=True):
                        add(pixels)
                        features.writerow([entry.path, split, entry.class_name, *values])
                        progress.step()
                shards[split].append(shard_name)

    seconds = time.perf_counter() - started
    counts = {split: len(entries) for split, entries in by_split.items()}
    info = {
        "format": FORMAT,
        "spec": spec.to_json(),
        "dataset_fingerprint": manifest.fingerprint,
        "classes": classes,
        "defect_types": manifest.defect_types,
        "counts": counts,
        "shards": shards,
    }
    # Written last: its presence marks a complete output directory.
    (out_dir / INFO_FILE).write_text(json.dumps(info, indent=1))
    rate = total / seconds if seconds > 0 else 0.0
    log.info("preprocessed %d images in %.1f s (%.0f images/s) into %s", total, seconds, rate, out_dir)
    return PreprocessResult(out_dir, counts, {s: tuple(n) for s, n in shards.items()}, seconds, rate)


def read_info(out_dir: Path) -> dict:
    """The preprocess.json of a preprocessed artifact."""
    path = Path(out_dir) / INFO_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {out_dir} is not a complete preprocessed artifact")
    info = json.loads(path.read_text())
    if info.get("format") != FORMAT:
        raise ValueError(f"{path}: format is {info.get('format')!r}, expected {FORMAT!r}")
    return info


def read_spec(out_dir: Path) -> PreprocessSpec:
    return PreprocessSpec.from_json(read_info(out_dir)["spec"])


def load_split(out_dir: Path, split: str) -> Split:
    """All images of one split, in manifest order, from the shards."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    info = read_info(out_dir)
    size = info["spec"]["image_size"]
    classes = info["classes"]
    images, labels, indices, paths = [], [], [], []
    for shard_name in info["shards"][split]:
        with np.load(Path(out_dir) / SHARD_DIR / shard_name, allow_pickle=False) as shard:
            images.append(shard["images"])
            labels.append(shard["labels"])
            indices.append(shard["class_index"])
            paths.extend(str(p) for p in shard["paths"])
    if not images:
        return Split(np.empty((0, size, size, 3), np.uint8), np.empty((0,), np.uint8), (), ())
    return Split(
        np.concatenate(images),
        np.concatenate(labels),
        tuple(classes[i] for i in np.concatenate(indices)),
        tuple(paths),
    )


@contextmanager
def _shard_writer(
    path: Path, batch: list[ManifestEntry], class_index: dict[str, int], image_size: int
) -> Iterator[Callable[[np.ndarray], None]]:
    """Yields a function that streams each image, in order, straight into the shard's ``images`` array.

    An .npz is a zip of .npy files; writing ``images.npy`` as results arrive keeps no
    shard in memory and overlaps the writing with decoding. Uncompressed, because resized
    pixels barely compress and zlib would cost more than the decoding did.
    """
    arrays = {
        "labels": np.array([e.class_name != GOOD for e in batch], np.uint8),
        "class_index": np.array([class_index[e.class_name] for e in batch], np.int16),
        "paths": np.array([e.path for e in batch], dtype=str),
    }
    header = {"descr": np.dtype(np.uint8).str, "fortran_order": False, "shape": (len(batch), image_size, image_size, 3)}

    def add(pixels: np.ndarray) -> None:
        images.write(np.ascontiguousarray(pixels, np.uint8).data)

    with replacing(path) as partial, zipfile.ZipFile(partial, "w", zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, array, allow_pickle=False)
        with archive.open("images.npy", "w", force_zip64=True) as images:
            np.lib.format.write_array_header_1_0(images, header)
            yield add  # the caller adds exactly len(batch) images (zip(..., strict=True))


class _Progress:
    """Logs at about every 10% of images, with the rate so far."""

    def __init__(self, total: int, started: float) -> None:
        self.total, self.started = total, started
        self.done = self.reported_decile = 0

    def step(self) -> None:
        self.done += 1
        decile = self.done * 10 // self.total
        if decile > self.reported_decile:
            self.reported_decile = decile
            elapsed = time.perf_counter() - self.started
            log.info(
                "preprocessed %d/%d images (%.0f%%, %.0f images/s)",
                self.done,
                self.total,
                100 * self.done / self.total,
                self.done / elapsed if elapsed > 0 else 0.0,
            )


# Set once per worker process so that each task only carries a relative path.
_worker_job: tuple[Path, PreprocessSpec] | None = None


def _init_worker(root: Path, spec: PreprocessSpec) -> None:
    global _worker_job
    _worker_job = (root, spec)


def _process(rel_path: str) -> tuple[np.ndarray, tuple[float, ...]]:
    if _worker_job is None:
        raise RuntimeError("preprocess worker used before _init_worker")
    root, spec = _worker_job
    path = root / rel_path
    try:
        pixels = to_model_input(path.read_bytes(), spec, name=rel_path)
    except (image.ImageRejected, OSError) as exc:
        # A RuntimeError, not ImageRejected: this is a broken artifact, not a validation verdict.
        raise RuntimeError(
            f"cannot preprocess {path}: {exc}. A dataset artifact should only hold images that passed "
            f"validation; re-run validation on the source data"
        ) from None
    values = image_features(pixels)
    return pixels, tuple(values[name] for name in FEATURE_NAMES)


@contextmanager
def _ordered_map(workers: int, root: Path, spec: PreprocessSpec) -> Iterator[Callable[[list[str]], Iterator]]:
    """Yields a function mapping ``_process`` over paths in order, on ``workers`` threads.

    Threads, not processes: Pillow releases the GIL while it decodes and resizes, and
    numpy while it computes the features, so threads use every core without pickling
    each image back to a parent process (measured in `make bench`: preprocess).
    """
    _init_worker(root, spec)
    if workers == 1:
        yield lambda paths: map(_process, paths)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="preprocess") as pool:
        yield lambda paths: pool.map(_process, paths)
