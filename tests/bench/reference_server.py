"""A frameworkless server of the model, for ``serve_ceiling``: what a server can reach here with nothing in its way.

One uvicorn worker process per core (``--workers``), each a single thread
that does everything on its event loop: it reads the Open Inference
Protocol binary request, decodes the JPEG with
``defectkit.preprocess.to_model_input``, and scores the images the loop has
gathered with a single-threaded ONNX Runtime session of the model's export,
synchronously. While a forward runs, the next requests wait in the sockets,
so batches fill by themselves; there are no threads to hand work between,
no GIL to share and no framework. It skips everything a real server must
do (validation, errors, metrics, probes, timeouts, fallback), so it is a
bound to read the model server against, not a server.

    MODEL_DIR=<judged model> python -m uvicorn tests.bench.reference_server:app --workers <cores> --port P
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import numpy as np

from defectkit.exported import ExportedModel
from defectkit.preprocess import PreprocessSpec, to_model_input
from tests.bench.bench_serve import CLIENTS, IMAGE_SIZE

SPEC = PreprocessSpec(image_size=IMAGE_SIZE)
MODEL = ExportedModel(Path(os.environ["MODEL_DIR"]), threads=1, check=False)  # parity is checked at export
_gathered: list[tuple[np.ndarray, asyncio.Future]] = []
_flush_due = False


def _flush() -> None:
    global _flush_due
    _flush_due = False
    batch = _gathered[:CLIENTS]
    del _gathered[:CLIENTS]
    scores = MODEL.scores(np.stack([pixels for pixels, _ in batch]))
    for (_, answer), score in zip(batch, scores.tolist()):
        answer.set_result(score)
    if _gathered:
        _schedule_flush()


def _schedule_flush() -> None:
    global _flush_due
    if not _flush_due:
        _flush_due = True
        loop = asyncio.get_running_loop()
        # Two turns of the loop: the requests already readable are parsed and gathered before the forward.
        loop.call_soon(loop.call_soon, _flush)


async def _score(pixels: np.ndarray) -> float:
    answer = asyncio.get_running_loop().create_future()
    _gathered.append((pixels, answer))
    _schedule_flush()
    return await answer


async def app(scope, receive, send) -> None:
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body", False):
            break
    answer = b'{"ready":true}'
    if scope["method"] == "POST":
        length = int(dict(scope["headers"])[b"inference-header-content-length"])
        size = json.loads(body[:length])["inputs"][0]["parameters"]["binary_data_size"]
        score = await _score(to_model_input(body[length + 4:length + size], SPEC))
        answer = json.dumps({"model_name": "defectkit", "outputs": [
            {"name": "score", "shape": [1], "datatype": "FP32", "data": [score]}]}).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(answer)).encode())]})
    await send({"type": "http.response.body", "body": answer})
