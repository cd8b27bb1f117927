"""Benchmark: how close the model server comes to the hardware's limit for its model.

The value is the server's requests/s under 8 concurrent single-image clients
(as ``serve`` drives it: JPEGs over keep-alive connections), serving the
model's ONNX export (runtime auto). The baseline is the best in-process
batched forward pass of the same model on the same cores, with no HTTP, no
decoding and no resizing: PyTorch and ONNX Runtime, each at batch 1, 8, 16
and 32 with one thread per core, the fastest counting. The ratio is how much
of that ceiling the server delivers. The server with ``--runtime torch`` is
measured beside it for comparison. Run from the project root::

    PYTHONPATH=. .venv/bin/python -m tests.bench.run serve_ceiling
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from tests.bench.bench_serve import (
    ARCH,
    IMAGE_SIZE,
    IMAGES,
    INFER_PATH,
    SERVER_ARGS,
    best,
    drive,
    make_jpegs,
    make_judged_model,
    oip_request,
    port_of,
    start_model_server,
)

TARGET_RATIO = 0.85
BATCHES = (1, 8, 16, 32)
FORWARD_S = 2.0  # per runtime and batch size
REPEATS = 2


def _rate(forward, images: np.ndarray, seconds: float) -> float:
    """Images/s of ``forward`` on ``images`` (one batch), after two warm-up calls."""
    forward(images)
    forward(images)
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        forward(images)
        done += len(images)
    return done / (time.perf_counter() - started)


def ceilings(model_dir: Path, pixels: np.ndarray, seconds: float = FORWARD_S) -> dict[str, float]:
    """Images/s of the bare forward pass, by runtime and batch size, one thread per core."""
    import torch

    from defectkit.exported import ExportedModel
    from defectkit.models import load_model

    cores = len(os.sched_getaffinity(0))
    previous = torch.get_num_threads()
    torch.set_num_threads(cores)
    try:
        model = load_model(model_dir, "cpu")
        exported = ExportedModel(model_dir, threads=cores)
        rates = {}
        for batch in BATCHES:
            images = pixels[:batch]
            rates[f"torch_batch_{batch}"] = _rate(model.scores, images, seconds)
            rates[f"onnxruntime_batch_{batch}"] = _rate(exported.scores, images, seconds)
        return rates
    finally:
        torch.set_num_threads(previous)


def run() -> dict:
    from defectkit.artifact import ONNX_RECORD
    from defectkit.preprocess import PreprocessSpec, to_model_input

    rates: dict[str, float] = {}
    served: dict[str, list[dict]] = {"onnxruntime": [], "torch": []}
    with tempfile.TemporaryDirectory(prefix="bench-ceiling-") as tmp:
        model_dir = make_judged_model(Path(tmp) / "model")
        record = json.loads((model_dir / ONNX_RECORD).read_text())
        jpegs = make_jpegs(IMAGES)
        spec = PreprocessSpec(image_size=IMAGE_SIZE)
        pixels = np.stack([to_model_input(j, spec) for j in jpegs[:max(BATCHES)]])
        bodies = [oip_request(j) for j in jpegs]
        servers = {"onnxruntime": start_model_server(model_dir, Path(tmp) / "onnx.log", *SERVER_ARGS),
                   "torch": start_model_server(model_dir, Path(tmp) / "torch.log", *SERVER_ARGS,
                                               "--runtime", "torch")}
        try:
            for _ in range(REPEATS):  # alternating, so that both see the same machine
                for key, value in ceilings(model_dir, pixels).items():
                    rates[key] = max(rates.get(key, 0.0), value)
                for runtime, server in servers.items():
                    served[runtime].append(drive(port_of(server), INFER_PATH, bodies))
        finally:
            for server in servers.values():
                server.stop()
    ours, torch_served = best(served["onnxruntime"]), best(served["torch"])
    ceiling_name = max(rates, key=rates.get)
    ceiling = rates[ceiling_name]
    return {
        "name": "serve_ceiling",
        "value": round(ours["requests_per_s"], 1),
        "baseline": round(ceiling, 1),
        "ratio": round(ours["requests_per_s"] / ceiling, 2),
        "target": TARGET_RATIO,
        "unit": "requests/s (server, 8 clients) vs images/s (best in-process batched forward)",
        "ceiling": ceiling_name,
        "forward_images_per_s": {k: round(v, 1) for k, v in rates.items()},
        "server_torch_requests_per_s": round(torch_served["requests_per_s"], 1),
        "server_torch_ratio": round(torch_served["requests_per_s"] / ceiling, 2),
        "p50_ms": round(ours["p50_ms"], 1),
        "p99_ms": round(ours["p99_ms"], 1),
        "export_parity_max_abs_diff": record["parity"]["max_abs_diff"],
        "model": f"{ARCH} at {IMAGE_SIZE} px",
        "server": " ".join(SERVER_ARGS),
        "cores": len(os.sched_getaffinity(0)),
    }


if __name__ == "__main__":
    print(json.dumps(run()))
