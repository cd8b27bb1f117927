"""Benchmark: request latency with production sampling of every image (rate 1.0) against sampling off.

Two in-process DefectPredictors on the same model (resnet18, 128 px, random
weights) answer the same single-image JPEG requests from 8 concurrent
clients, through the same micro-batching path the server uses; one samples
every image to a temporary directory, the other samples nothing. Rounds
alternate in ABBA order (off, on, on, off, ...) so that both see the same
machine state, and the sampler's last batch is written before an "off" round
starts, so that "off" never pays for it. The target is met when the p50
latency with sampling is within 5% of the p50 without:
``ratio = p50_off / p50_on >= 0.95``. Run from the project root::

    PYTHONPATH=. .venv/bin/python -m tests.bench.run sampling
"""

from __future__ import annotations

import asyncio
import io
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SIZE = 128  # the input size `make run` serves, as in the serve benchmark
CLIENTS = 8
REQUESTS_PER_ROUND = 600  # about 3 s: the writer's last batch (0.2 s) is a small part of a round
ROUNDS = 4
TARGET = 0.95


def _images(count: int = 32) -> list[bytes]:
    rng = np.random.default_rng(0)
    files = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)).save(buffer, "JPEG")
        files.append(buffer.getvalue())
    return files


def _latencies(predictor, files: list[bytes]) -> list[float]:
    from kserve import InferInput, InferRequest

    def request(data: bytes) -> InferRequest:
        infer_input = InferInput("image", [1], "BYTES")
        infer_input.set_data_from_numpy(np.array([data], dtype=object), binary_data=True)
        return InferRequest("defectkit", [infer_input])

    async def client(k: int, out: list[float]) -> None:
        for i in range(k, REQUESTS_PER_ROUND, CLIENTS):
            started = time.perf_counter()
            await predictor.predict(request(files[i % len(files)]))
            out.append(time.perf_counter() - started)

    async def scenario() -> list[float]:
        out: list[float] = []
        await asyncio.gather(*(client(k, out) for k in range(CLIENTS)))
        return out

    return asyncio.run(scenario())


def _writer_ms_per_sample(files: list[bytes], root: Path, batches: int = 25, batch: int = 40) -> float:
    """CPU the sample writer spends per sample (shards of ``batch``, as the server hands them over)."""
    from defectkit.sampling import write_shards
    from defectkit.storage import Store

    store, at = Store(str(root)), time.time()
    started = time.process_time()
    for k in range(batches):
        write_shards(store, [(files[i % len(files)], 0.5, "good", "v", at + k) for i in range(batch)])
    return (time.process_time() - started) * 1000 / (batches * batch)


def run() -> dict:
    import torch

    from defectkit.models import ModelMetadata, build_model, save_model
    from defectkit.preprocess import PreprocessSpec
    from defectkit.sampling import SamplingConfig
    from defectkit.serving.kserve_runtime import import_kserve

    import_kserve()
    from defectkit.serving.predictor import DefectPredictor, ServingConfig

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model_dir = save_model(build_model("resnet18"), ModelMetadata(
            architecture="resnet18", classes=("good", "scratch"), preprocess=PreprocessSpec(image_size=IMAGE_SIZE),
            threshold=0.5), Path(tmp) / "model")
        files = _images()
        predictors = {
            "off": DefectPredictor("defectkit", model_dir, config=ServingConfig(device="cpu")),
            "on": DefectPredictor("defectkit", model_dir, config=ServingConfig(
                device="cpu", sampling=SamplingConfig(rate=1.0, uri=str(Path(tmp) / "samples"), queue_size=4096))),
        }
        for predictor in predictors.values():
            predictor.load()
            _latencies(predictor, files[:CLIENTS])  # warm-up
        sampler = predictors["on"].sampler
        sampler.flush()
        measured: dict[str, list[float]] = {"off": [], "on": []}
        for round_ in range(ROUNDS):
            for name in ("off", "on") if round_ % 2 == 0 else ("on", "off"):
                measured[name] += _latencies(predictors[name], files)
                sampler.flush()
        stats = sampler.stats()
        writer_ms = _writer_ms_per_sample(files, Path(tmp) / "writer")
        for predictor in predictors.values():
            predictor.stop()
    p50_off = float(np.median(measured["off"]) * 1000)
    p50_on = float(np.median(measured["on"]) * 1000)
    return {"name": "sampling", "value": p50_on, "baseline": p50_off, "ratio": p50_off / p50_on, "target": TARGET,
            "unit": "ms p50", "p50_on_ms": p50_on, "p50_off_ms": p50_off,
            "p99_on_ms": float(np.percentile(measured["on"], 99) * 1000),
            "p99_off_ms": float(np.percentile(measured["off"], 99) * 1000),
            "samples_written": stats["written"], "samples_dropped": stats["dropped"],
            "writer_cpu_ms_per_sample": writer_ms,
            "clients": CLIENTS, "rounds": ROUNDS, "requests_each": REQUESTS_PER_ROUND * ROUNDS}
