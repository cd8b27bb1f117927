"""Production sampling: a share of served images, with their answers, kept for drift checks and retraining.

The model server offers every answered request to a :class:`Sampler`; a
seeded draw keeps each image with probability ``rate``. Kept images wait on a
bounded queue and a writer process of its own writes them, so a request never
waits for storage: when the queue is full the image is dropped and counted.

Samples are written in shards, one tar file per hour partition per batch
(the WebDataset layout: the files of one sample share a key), because a file
or GCS object per image would cost a create or an upload per request. Under
the root (a local directory, ``file://`` or ``gs://`` URI)::

    date=YYYY-MM-DD/HH/<first-ms>-<id>.tar
        <key>.<ext>     the image file as it was sent (pixels inputs as PNG)
        <key>.json      {"image": "<key>.<ext>", "score", "label", "model_version", "time"}

Date and hour are UTC; a shard appears whole or not at all. :func:`read_window`
lists the samples of a time window; :func:`window_to_dataset` turns them into
the ``current`` directory :func:`defectkit.drift.detect_artifact_drift` reads.

GPU-safe: numpy, Pillow and defectkit's storage only.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import multiprocessing
import queue
import random
import signal
import tarfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from defectkit import image, preprocess, storage

if TYPE_CHECKING:  # the caller loads the model: sampling itself never imports torch
    from defectkit.models import DefectModel

log = logging.getLogger(__name__)

LABELS = ("good", "defect")  # the model server's answers, as samples record them
SIDECAR_SUFFIX = ".json"
SHARD_SUFFIX = ".tar"
SAMPLES_FILE = "samples.jsonl"
IMAGES_DIR = "images"
QUARANTINE_DIR = "quarantine"
QUARANTINE_FILE = "quarantine.json"
EMBEDDINGS_FILE = "embeddings.npy"
# Leading bytes of the formats the server accepts, so a sample keeps its real extension without decoding it.
_MAGIC = ((b"\x89PNG", "png"), (b"\xff\xd8", "jpg"), (b"BM", "bmp"), (b"II*\x00", "tif"), (b"MM\x00*", "tif"))
_BATCH_WAIT_S = 0.2
_DROP_LOG_EVERY = 1000
# While storage keeps failing (disk full, bucket unreachable), a shard fails every batch: one log line a
# minute says so, not a traceback every batch.
_FAILURE_LOG_EVERY_S = 60.0


@dataclass(frozen=True)
class SamplingConfig:
    """Which share of served images is kept (``rate``, drawn with ``seed``), where, and how much may wait."""

    rate: float = 0.0
    uri: str = ""
    seed: int = 0
    queue_size: int = 256

    def __post_init__(self) -> None:
        if not (isinstance(self.rate, (int, float)) and 0.0 <= self.rate <= 1.0):
            raise ValueError(f"sample rate {self.rate!r} must be a share between 0 and 1")
        if self.rate > 0 and not self.uri:
            raise ValueError(f"sample rate {self.rate} needs a storage URI to write the samples to (--sample-uri)")
        if not isinstance(self.queue_size, int) or self.queue_size < 1:
            raise ValueError(f"queue_size={self.queue_size!r} must be a positive integer")

    @property
    def enabled(self) -> bool:
        return self.rate > 0


@dataclass(frozen=True)
class Sample:
    """One sampled image: ``image`` is its file name in ``shard`` (relative to the sampling root),
    or, with no shard, its path relative to a window dataset."""

    image: str
    score: float
    label: str
    model_version: str
    time: float
    shard: str = ""

    def to_json(self) -> dict:
        record = {"image": self.image, "score": self.score, "label": self.label,
                  "model_version": self.model_version, "time": self.time}
        return {**record, "shard": self.shard} if self.shard else record

    @classmethod
    def from_json(cls, record: dict) -> Sample:
        return cls(str(record["image"]), float(record["score"]), str(record["label"]),
                   str(record["model_version"]), float(record["time"]), str(record.get("shard", "")))


def partition(at: float) -> str:
    """The ``date=YYYY-MM-DD/HH`` folder of a UNIX time (UTC)."""
    moment = datetime.fromtimestamp(at, timezone.utc)
    return f"date={moment:%Y-%m-%d}/{moment:%H}"


def extension(data: bytes) -> str:
    for magic, ext in _MAGIC:
        if data.startswith(magic):
            return ext
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return "bin"


class Sampler:
    """Keeps a seeded share of offered images and has them written in shards; :meth:`offer` never blocks."""

    def __init__(self, config: SamplingConfig) -> None:
        if not config.enabled:
            raise ValueError("sampling is off (rate 0); create a Sampler only for a positive rate")
        self.config = config
        # Files are written by a process of its own: in this one, every write would hold the GIL
        # that request handling needs (measured in `make bench`: sampling).
        storage.Store(config.uri)  # a bad URI fails here, in the caller, not in the writer
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._writer = context.Process(target=_writer_process, args=(child, config.uri), name="sample-writer",
                                       daemon=True)
        self._writer.start()
        child.close()
        self._draw = random.Random(config.seed)
        self._queue: queue.Queue = queue.Queue(config.queue_size)
        self._lock = threading.Lock()
        self.offered = self.sampled = self.dropped = self.written = self.failed = 0
        self._thread = threading.Thread(target=self._write_loop, name="sampler", daemon=True)
        self._thread.start()

    def offer(self, images: Sequence[bytes] | np.ndarray, scores: Sequence[float], labels: Sequence[str],
              model_version: str, at: float | None = None) -> None:
        """Consider one request's images (encoded files, or (N, S, S, 3) pixels) with their answers."""
        at = time.time() if at is None else at
        with self._lock:
            for i in range(len(scores)):
                self.offered += 1
                if self._draw.random() >= self.config.rate:
                    continue
                self.sampled += 1
                item = (images[i], float(scores[i]), str(labels[i]), model_version, at)
                try:
                    self._queue.put_nowait(item)
                except queue.Full:
                    self.dropped += 1
                    if self.dropped % _DROP_LOG_EVERY == 1:
                        log.warning("sampling queue full (%d): %d samples dropped so far; storage at %s is slower "
                                    "than the sample rate %g needs", self.config.queue_size, self.dropped,
                                    self.config.uri, self.config.rate)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"offered": self.offered, "sampled": self.sampled, "dropped": self.dropped,
                    "written": self.written, "failed": self.failed}

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until every queued sample is written; False if that took longer than ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while self._queue.unfinished_tasks:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def close(self, timeout_s: float = 10.0) -> None:
        """Write what is queued (up to ``timeout_s``), then stop the writer."""
        self.flush(timeout_s)
        self._queue.put(None)
        self._thread.join(timeout_s)

    def _write_loop(self) -> None:
        while True:
            items = [self._queue.get()]
            # One hand-over per batch, not per sample: each wake-up of this thread makes the
            # request threads wait for the GIL.
            time.sleep(_BATCH_WAIT_S)
            with contextlib.suppress(queue.Empty):
                while True:
                    items.append(self._queue.get_nowait())
            batch = [item for item in items if item is not None]
            written = failed = 0
            try:
                if batch:
                    self._conn.send(batch)
                    written, failed = self._conn.recv()
            except (OSError, EOFError):
                failed = len(batch)
                log.exception("the sample writer process is gone; %d samples lost", failed)
            with self._lock:
                self.written += written
                self.failed += failed
            for _ in items:
                self._queue.task_done()
            if len(batch) < len(items):  # close() asked to stop
                with contextlib.suppress(OSError):
                    self._conn.send(None)
                self._writer.join(10)
                return


def _writer_process(conn, uri: str) -> None:
    """The sample writer: receives batches of samples, writes them as shards, answers (written, failed).

    It ignores SIGTERM and SIGINT, which the server's process group receives on shutdown, so that
    the server can hand over what is still queued; it ends when the server closes the pipe.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    store = storage.Store(uri)
    while True:
        try:
            batch = conn.recv()
        except EOFError:
            return
        if batch is None:
            return
        conn.send(write_shards(store, batch))


class _WriteFailures:
    """Logs storage failures of the sample writer: the first of a run of failures with its traceback, then
    a count at most every ``every_s``, and a line when writes succeed again."""

    def __init__(self, every_s: float = _FAILURE_LOG_EVERY_S) -> None:
        self.every_s = every_s
        self.lost = 0  # samples not written since the last shard that was
        self._logged_at: float | None = None

    def failed(self, count: int, where: str) -> None:
        """Call from the ``except`` block of the failed write."""
        self.lost += count
        now = time.monotonic()
        if self._logged_at is None:
            log.exception("could not write %d samples to %s; samples are dropped (and counted) until storage "
                          "takes writes again", count, where)
        elif now - self._logged_at >= self.every_s:
            log.error("sample storage still failing: %d samples dropped since the first failure; last: %s",
                      self.lost, where)
        else:
            return
        self._logged_at = now

    def succeeded(self, where: str) -> None:
        if self.lost:
            log.warning("sample writes succeed again (%s); %d samples were dropped while they failed", where,
                        self.lost)
        self.lost = 0
        self._logged_at = None


_write_failures = _WriteFailures()


def write_shards(store: storage.Store, batch: Sequence[tuple]) -> tuple[int, int]:
    """Write (image, score, label, model_version, time) samples, one shard per hour partition; (written, failed).

    A sample that cannot be encoded, or a shard that cannot be stored, is logged and counted, never raised.
    """
    partitions: dict[str, list[tuple]] = {}
    for item in batch:
        partitions.setdefault(partition(item[4]), []).append(item)
    written = failed = 0
    for folder, items in partitions.items():
        buffer = io.BytesIO()
        count = 0
        with tarfile.open(fileobj=buffer, mode="w") as shard:
            for data, score, label, model_version, at in items:
                try:
                    data = _encoded(data)
                except Exception:  # noqa: BLE001 - one bad sample, never the batch
                    failed += 1
                    log.exception("could not encode a sample of model %s", model_version)
                    continue
                key = uuid.uuid4().hex
                name = f"{key}.{extension(data)}"
                _add(shard, name, data, at)
                _add(shard, key + SIDECAR_SUFFIX, json.dumps(Sample(name, score, label, model_version, at).to_json())
                     .encode(), at)
                count += 1
        if not count:
            continue
        rel = f"{folder}/{int(items[0][4] * 1000)}-{uuid.uuid4().hex[:12]}{SHARD_SUFFIX}"
        try:
            store.write(rel, buffer.getvalue())
        except Exception:  # noqa: BLE001 - a storage failure loses this shard, never the writer
            failed += count
            _write_failures.failed(count, f"{store.root}/{rel}")
            continue
        written += count
        _write_failures.succeeded(f"{store.root}/{rel}")
    return written, failed


def _encoded(data: bytes | np.ndarray) -> bytes:
    if isinstance(data, np.ndarray):
        buffer = io.BytesIO()
        Image.fromarray(np.clip(data, 0, 255).astype(np.uint8)).save(buffer, "PNG")
        return buffer.getvalue()
    return bytes(data)


def _add(shard: tarfile.TarFile, name: str, data: bytes, at: float) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), int(at)
    shard.addfile(info, io.BytesIO(data))


# --------------------------------------------------------------------------- reading


def _days(since: float, until: float) -> list[str]:
    day = datetime.fromtimestamp(since, timezone.utc).date()
    last = datetime.fromtimestamp(until, timezone.utc).date()
    days = []
    while day <= last:
        days.append(f"date={day:%Y-%m-%d}")
        day += timedelta(days=1)
    return days


def _hour_in_window(day: str, hour: str, since: float, until: float) -> bool:
    try:
        start = datetime.strptime(f"{day[len('date='):]} {hour}", "%Y-%m-%d %H").replace(tzinfo=timezone.utc)
    except ValueError:
        return False  # not a partition this module wrote
    return start.timestamp() < until and start.timestamp() + 3600 > since


def _window(root: str, since: float, until: float) -> Iterator[tuple[Sample, bytes]]:
    """Each sample taken at ``since <= time < until`` with its image file; only the window's hours are read."""
    if until <= since:
        raise ValueError(f"window end {until} must be after its start {since}")
    for day in _days(since, until):
        store = storage.Store(f"{root}/{day}")
        try:
            names = store.list()
        except FileNotFoundError:
            continue  # no request was sampled that day
        for name in names:
            hour = name.split("/", 1)[0]
            if not name.endswith(SHARD_SUFFIX) or not _hour_in_window(day, hour, since, until):
                continue
            try:
                with tarfile.open(fileobj=io.BytesIO(store.read(name))) as shard:
                    files = {member.name: member for member in shard.getmembers() if member.isfile()}
                    for key, member in files.items():
                        if not key.endswith(SIDECAR_SUFFIX):
                            continue
                        sample = Sample.from_json(json.loads(shard.extractfile(member).read()))
                        if not since <= sample.time < until:
                            continue
                        if Path(sample.image).name != sample.image or sample.image not in files:
                            # Becomes a file name in the window dataset: never a path that leaves it.
                            log.warning("sample %s in shard %s/%s names no image file of the shard (%r); skipped",
                                        key, day, name, sample.image)
                            continue
                        yield replace(sample, shard=f"{day}/{name}"), shard.extractfile(files[sample.image]).read()
            except (tarfile.TarError, KeyError, ValueError) as exc:
                log.warning("shard %s/%s/%s is unreadable and skipped: %s", root, day, name, exc)


def read_window(root: str | Path, since: float, until: float) -> list[Sample]:
    """Samples taken at ``since <= time < until`` (UNIX seconds), oldest first."""
    return [sample for sample, _ in read_window_images(root, since, until)]


def read_window_images(root: str | Path, since: float, until: float) -> list[tuple[Sample, bytes]]:
    """:func:`read_window` with each sample's image file."""
    return sorted(_window(str(root).rstrip("/"), since, until), key=lambda pair: (pair[0].time, pair[0].image))


@dataclass(frozen=True)
class WindowDataset:
    """What :func:`window_to_dataset` wrote: ``images`` usable samples, ``quarantined`` that do not decode."""

    path: Path
    images: int
    quarantined: int
    embeddings: bool


def window_to_dataset(root: str | Path, since: float, until: float, out_dir: Path, *,
                      model: DefectModel | None = None,
                      spec: preprocess.PreprocessSpec | None = None) -> WindowDataset:
    """Write a window's samples as the ``current`` side of a drift check.

    ``out_dir/images/<file>`` (the sampled files), ``samples.jsonl`` (one
    :class:`Sample` per line, ``image`` now relative to out_dir),
    ``features.csv`` (path, then preprocess.FEATURE_NAMES, computed on
    ``preprocess.to_model_input`` at the model's input size, as for the
    reference) and, with ``model`` (the served model, loaded), ``embeddings.npy``
    (its penultimate-layer embeddings, float32). Give ``model`` or ``spec``.
    Samples that do not decode are kept under ``quarantine/``: the file in
    ``files/`` and ``quarantine.json`` listing each with its reason.
    """
    if model is None and spec is None:
        raise ValueError("give model (the served model) or spec (its preprocessing): features are computed "
                         "at the model's input size")
    if model is not None:
        spec = model.metadata.preprocess
    out_dir = Path(out_dir)
    (out_dir / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    (out_dir / QUARANTINE_DIR / "files").mkdir(parents=True, exist_ok=True)
    root = str(root).rstrip("/")
    pixels, rows, quarantined = [], [], []
    with (out_dir / SAMPLES_FILE).open("w") as lines:
        for sample, data in _window(root, since, until):
            name = sample.image
            try:
                array = preprocess.to_model_input(data, spec, name=name)
            except image.ImageRejected as exc:
                (out_dir / QUARANTINE_DIR / "files" / name).write_bytes(data)
                quarantined.append({"path": f"files/{name}", "reason": exc.reason, "detail": exc.detail,
                                    "sample": sample.to_json()})
                log.warning("sample %s of %s quarantined (%s): %s", name, sample.shard, exc.reason, exc.detail)
                continue
            rel = f"{IMAGES_DIR}/{name}"
            (out_dir / rel).write_bytes(data)
            lines.write(json.dumps(replace(sample, image=rel, shard="").to_json()) + "\n")
            pixels.append(array)
            rows.append({"path": rel, **preprocess.image_features(array)})
    (out_dir / QUARANTINE_DIR / QUARANTINE_FILE).write_text(json.dumps(quarantined, indent=1))
    with (out_dir / preprocess.FEATURES_FILE).open("w", newline="") as table:
        writer = csv.DictWriter(table, ["path", *preprocess.FEATURE_NAMES])
        writer.writeheader()
        writer.writerows(rows)
    if model is not None:
        stacked = np.stack(pixels) if pixels else np.zeros((0, spec.image_size, spec.image_size, 3), np.uint8)
        np.save(out_dir / EMBEDDINGS_FILE, model.embeddings(stacked).astype(np.float32))
    log.info("window %s .. %s of %s: %d images (%d quarantined) in %s",
             datetime.fromtimestamp(since, timezone.utc).isoformat(),
             datetime.fromtimestamp(until, timezone.utc).isoformat(), root, len(rows), len(quarantined), out_dir)
    return WindowDataset(out_dir, len(rows), len(quarantined), model is not None)
