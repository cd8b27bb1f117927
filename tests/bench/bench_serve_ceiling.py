"""Benchmark: how close the model server comes to the hardware's limit for its model.

The value is the server's requests/s under 8 concurrent single-image clients
(as ``serve`` drives it: JPEGs over keep-alive connections), serving the
model's ONNX export (runtime auto). The baseline is the best in-process
batched forward pass of the same model on the same cores, with no HTTP, no
decoding and no resizing: PyTorch and ONNX Runtime, each at batch 1,
8 / cores, 8, 16 and 32 with one thread per core, and ONNX Runtime also as
one single-threaded session per core running side by side (as the server's
workers do, which is often the faster), the fastest counting. The ratio is
how much of that ceiling the server delivers. The server with ``--runtime torch`` is
measured beside it for comparison.

Beside the ratio it estimates what a server could attain here at best, so
that the target can be read against the machine: the 8 clients never have
more than 8 images in flight, so the forward is at best as fast as the
fastest of those forwards that hold at most 8 images at a time (such as one
batch of 8 on every core, or a batch of 8 / cores in each single-threaded
session side by side: ``forward_8_in_flight``); and every
request costs at least what a bare ASGI app costs that only parses the
request and decodes the JPEG (``tests/bench/floor_server.py``), with the
clients' own CPU, which shares the cores (``floor_cpu_ms_per_request``).
``attainable_ratio`` is 1 / (1 / forward_8_in_flight + floor / cores)
against the ceiling, the best rounds counting; beside it is the server's
CPU per request, clients included (``server_cpu_ms_per_request``), to
compare with 1000 * cores / forward_8_in_flight + floor. That estimate
assumes every forward full and no core ever idle; a real server is measured
beside it: a frameworkless server of the same export, one single-threaded
process per core that parses, decodes and runs the forward on its event loop
(``tests/bench/reference_server.py``), driven in the same rounds
(``reference_requests_per_s``, and the model server's share of it,
``server_vs_reference``). Run from the project root::

    PYTHONPATH=. .venv/bin/python -m tests.bench.run serve_ceiling
"""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from defectkit.cores import usable_cores
from tests.bench.bench_serve import (
    ARCH,
    BENCH_ENV,
    CLIENTS,
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
from tests.servers import ServerProcess, free_port, start_server

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


def _rate_side_by_side(sessions: list, images: np.ndarray, seconds: float) -> float:
    """Images/s of single-threaded sessions (one per core) each scoring ``images`` at the same time."""
    rates = [0.0] * len(sessions)

    def measure(k: int) -> None:
        rates[k] = _rate(sessions[k].scores, images, seconds)

    threads = [threading.Thread(target=measure, args=(k,)) for k in range(len(sessions))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(rates)


def forward_rates(model_dir: Path, pixels: np.ndarray, seconds: float = FORWARD_S) -> dict[str, tuple[int, float]]:
    """Images/s of the bare forward pass, with the images it holds at a time, by runtime and batch size: one
    forward on every core, and for ONNX Runtime also one single-threaded session per core side by side (no
    thread barriers inside a forward). The batch sizes include CLIENTS / cores, what each of the side-by-side
    sessions gets when the clients' images are split over them."""
    import torch

    from defectkit.exported import ExportedModel
    from defectkit.models import load_model

    cores = usable_cores()
    previous = torch.get_num_threads()
    torch.set_num_threads(cores)
    try:
        model = load_model(model_dir, "cpu")
        exported = ExportedModel(model_dir, threads=cores)
        per_core = [ExportedModel(model_dir, threads=1) for _ in range(cores)]
        rates = {}
        for batch in sorted({*BATCHES, max(1, CLIENTS // cores)}):
            images = pixels[:batch]
            rates[f"torch_batch_{batch}"] = (batch, _rate(model.scores, images, seconds))
            rates[f"onnxruntime_batch_{batch}"] = (batch, _rate(exported.scores, images, seconds))
            rates[f"onnxruntime_{cores}x_batch_{batch}"] = (cores * batch,
                                                            _rate_side_by_side(per_core, images, seconds))
        return rates
    finally:
        torch.set_num_threads(previous)


def _cpu_seconds(pid: int) -> float:
    """CPU seconds of the process and its live children (the reference server's workers are children)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    children = [int(c) for task in Path(f"/proc/{pid}/task").iterdir()
                for c in (task / "children").read_text().split()]
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK") + sum(map(_cpu_seconds, children))


def drive_counting_cpu(server: ServerProcess, bodies: list) -> dict:
    """``drive`` the server, adding the CPU milliseconds per request of the server and of the clients."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    started = _cpu_seconds(server.pid)
    result = drive(port_of(server), INFER_PATH, bodies)
    spent = _cpu_seconds(server.pid) - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    clients = after.ru_utime + after.ru_stime - own.ru_utime - own.ru_stime
    return {**result, "cpu_ms_per_request": 1000 * (spent + clients) / result["answered"]}


def start_asgi_server(app: str, log_path: Path, *args: str, env: dict[str, str] | None = None) -> ServerProcess:
    """``app`` (module:attribute) under uvicorn, as the model server runs: its loop and HTTP parser, no access log."""
    port = free_port()
    return start_server([sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port),
                         "--log-level", "warning", "--no-access-log", *args],
                        url=f"http://127.0.0.1:{port}", health_path="/", log_path=log_path,
                        env={**BENCH_ENV, **(env or {})})


def run() -> dict:
    from defectkit.artifact import ONNX_RECORD
    from defectkit.preprocess import PreprocessSpec, to_model_input

    rates: dict[str, float] = {}
    images_held: dict[str, int] = {}
    served: dict[str, list[dict]] = {"onnxruntime": [], "torch": [], "reference": [], "floor": []}
    with tempfile.TemporaryDirectory(prefix="bench-ceiling-") as tmp:
        model_dir = make_judged_model(Path(tmp) / "model")
        record = json.loads((model_dir / ONNX_RECORD).read_text())
        jpegs = make_jpegs(IMAGES)
        spec = PreprocessSpec(image_size=IMAGE_SIZE)
        pixels = np.stack([to_model_input(j, spec) for j in jpegs[:max(BATCHES)]])
        bodies = [oip_request(j) for j in jpegs]
        servers = {"onnxruntime": start_model_server(model_dir, Path(tmp) / "onnx.log", *SERVER_ARGS),
                   "torch": start_model_server(model_dir, Path(tmp) / "torch.log", *SERVER_ARGS,
                                               "--runtime", "torch"),
                   "reference": start_asgi_server("tests.bench.reference_server:app", Path(tmp) / "reference.log",
                                                  "--workers", str(usable_cores()),
                                                  env={"MODEL_DIR": str(model_dir)}),
                   "floor": start_asgi_server("tests.bench.floor_server:app", Path(tmp) / "floor.log")}
        try:
            for _ in range(REPEATS):  # alternating, so that all see the same machine
                for key, (held, value) in forward_rates(model_dir, pixels).items():
                    rates[key] = max(rates.get(key, 0.0), value)
                    images_held[key] = held
                for name, server in servers.items():
                    served[name].append(drive_counting_cpu(server, bodies))
        finally:
            for server in servers.values():
                server.stop()
    ours, torch_served, reference = best(served["onnxruntime"]), best(served["torch"]), best(served["reference"])
    ceiling_name = max(rates, key=rates.get)
    ceiling = rates[ceiling_name]
    cores = usable_cores()
    in_flight = {key: rate for key, rate in rates.items() if images_held[key] <= CLIENTS}
    forward_8 = max(in_flight.values())
    floor_ms = min(r["cpu_ms_per_request"] for r in served["floor"])
    attainable = 1 / (1 / forward_8 + floor_ms / 1000 / cores)
    return {
        "name": "serve_ceiling",
        "value": round(ours["requests_per_s"], 1),
        "baseline": round(ceiling, 1),
        "ratio": round(ours["requests_per_s"] / ceiling, 2),
        "target": TARGET_RATIO,
        "unit": "requests/s (server, 8 clients) vs images/s (best in-process batched forward)",
        "ceiling": ceiling_name,
        "forward_images_per_s": {k: round(v, 1) for k, v in rates.items()},
        "forward_8_in_flight": {k: round(v, 1) for k, v in in_flight.items()},
        "floor_cpu_ms_per_request": round(floor_ms, 2),
        "attainable_requests_per_s": round(attainable, 1),
        "attainable_ratio": round(attainable / ceiling, 2),
        "server_cpu_ms_per_request": round(ours["cpu_ms_per_request"], 2),
        "reference_requests_per_s": round(reference["requests_per_s"], 1),
        "reference_ratio": round(reference["requests_per_s"] / ceiling, 2),
        "server_vs_reference": round(ours["requests_per_s"] / reference["requests_per_s"], 2),
        "reference_cpu_ms_per_request": round(reference["cpu_ms_per_request"], 2),
        "server_torch_requests_per_s": round(torch_served["requests_per_s"], 1),
        "server_torch_ratio": round(torch_served["requests_per_s"] / ceiling, 2),
        "p50_ms": round(ours["p50_ms"], 1),
        "p99_ms": round(ours["p99_ms"], 1),
        "export_parity_max_abs_diff": record["parity"]["max_abs_diff"],
        "model": f"{ARCH} at {IMAGE_SIZE} px",
        "server": " ".join(SERVER_ARGS),
        "cores": cores,
    }


if __name__ == "__main__":
    print(json.dumps(run()))
