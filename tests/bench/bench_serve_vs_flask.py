"""Benchmark: our model server against the Flask pattern of the MLOps literature, under the same load.

The Flask app is the usual tutorial server: ``app.run()`` (Werkzeug,
threaded), a ``/predict`` route that parses a JSON body holding the
preprocessed image as a float tensor ``[1, 3, H, W]``, builds a torch tensor
from it and calls the same model (resnet18 at 128 px, the same weights). It
gets the same one-thread-per-forward torch setting as our server, so that
its figure is not an artefact of thread oversubscription (on 2 cores,
torch's default threads measured about the same for it). Its clients send
pre-serialised JSON (their own preprocessing is not counted); ours send the
128 px JPEG in an Open Inference Protocol request. Both answer 8 concurrent
clients, one request at a time each, on the same cores, in the same run, in
alternating rounds (the best of each counts). ratio = our requests/s /
Flask's. Run from the project root::

    PYTHONPATH=. .venv/bin/python -m tests.bench.run serve_vs_flask
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from defectkit.cores import usable_cores
from tests.bench.bench_serve import (
    BENCH_ENV,
    CLIENTS,
    IMAGE_SIZE,
    INFER_PATH,
    REPEATS,
    SERVER_ARGS,
    best,
    drive,
    make_jpegs,
    make_judged_model,
    oip_request,
    port_of,
    start_model_server,
)
from tests.servers import free_port, start_server

IMAGES = 32
TARGET_RATIO = 4.0


def flask_request(jpeg: bytes, model_dir: Path) -> tuple[bytes, dict[str, str]]:
    """The JSON body a tutorial client posts: the normalised NCHW tensor as nested lists of floats."""
    import torch

    from defectkit.models import normalize, read_metadata
    from defectkit.preprocess import to_model_input

    spec = read_metadata(model_dir).preprocess
    tensor = normalize(torch.from_numpy(to_model_input(jpeg, spec)[None]), spec).contiguous()
    return json.dumps({"instances": tensor.tolist()}).encode(), {"Content-Type": "application/json"}


def flask_app(model_dir: str, port: int) -> None:
    """The Flask server (run in its own process by ``python -m tests.bench.bench_serve_vs_flask DIR PORT``)."""
    import torch
    from flask import Flask, jsonify, request

    from defectkit.models import load_model

    torch.set_num_threads(1)
    model = load_model(Path(model_dir), "cpu")
    app = Flask(__name__)

    @app.get("/health")
    def health():
        return jsonify(status="ok")

    @app.post("/predict")
    def predict():
        data = request.get_json()
        x = torch.tensor(data["instances"], dtype=torch.float32)
        with torch.no_grad():
            score = torch.sigmoid(model.module(x)).item()
        label = "defect" if score >= model.metadata.threshold else "good"
        return jsonify(score=score, label=label)

    app.run(host="127.0.0.1", port=port)


def run() -> dict:
    """REPEATS alternating rounds against each server (both stay up, the other idle); the best round counts."""
    flask_rounds: list[dict] = []
    our_rounds: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-flask-") as tmp:
        model_dir = make_judged_model(Path(tmp) / "model")  # ours serves the ONNX export, as it would
        jpegs = make_jpegs(IMAGES)
        flask_bodies = [flask_request(j, model_dir) for j in jpegs]
        our_bodies = [oip_request(j) for j in jpegs]
        port = free_port()
        flask = start_server(
            [sys.executable, "-m", "tests.bench.bench_serve_vs_flask", str(model_dir), str(port)],
            url=f"http://127.0.0.1:{port}", health_path="/health", log_path=Path(tmp) / "flask.log",
            env=BENCH_ENV,
        )
        try:
            server = start_model_server(model_dir, Path(tmp) / "server.log", *SERVER_ARGS)
            try:
                for _ in range(REPEATS):
                    flask_rounds.append(drive(port, "/predict", flask_bodies))
                    our_rounds.append(drive(port_of(server), INFER_PATH, our_bodies))
            finally:
                server.stop()
        finally:
            flask.stop()
    theirs, ours = best(flask_rounds), best(our_rounds)
    return {
        "name": "serve_vs_flask",
        "value": round(ours["requests_per_s"], 1),
        "baseline": round(theirs["requests_per_s"], 1),
        "ratio": round(ours["requests_per_s"] / theirs["requests_per_s"], 2),
        "target": TARGET_RATIO,
        "unit": "requests/s",
        "p50_ms": round(ours["p50_ms"], 1),
        "p99_ms": round(ours["p99_ms"], 1),
        "flask_p50_ms": round(theirs["p50_ms"], 1),
        "flask_p99_ms": round(theirs["p99_ms"], 1),
        "flask_request_kb": round(float(np.mean([len(b) for b, _ in flask_bodies])) / 1024, 1),
        "rounds_requests_per_s": [round(r["requests_per_s"], 1) for r in our_rounds],
        "flask_rounds_requests_per_s": [round(r["requests_per_s"], 1) for r in flask_rounds],
        "clients": CLIENTS,
        "model": f"resnet18 at {IMAGE_SIZE} px",
        "cores": usable_cores(),
    }


if __name__ == "__main__":
    if len(sys.argv) == 3:
        flask_app(sys.argv[1], int(sys.argv[2]))
    else:
        print(json.dumps(run()))
