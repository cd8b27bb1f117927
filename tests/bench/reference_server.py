"""A frameworkless server of the model, for ``serve_ceiling``: what a server can reach here with nothing in its way.

One uvicorn worker process per core (``--workers``), each a single thread
that does everything on its event loop: it reads the Open Inference
Protocol binary request, decodes the JPEG with
``defectkit.preprocess.to_model_input``, and scores the images the loop has
gathered with a single-threaded ONNX Runtime session of the model's export,
synchronously. While a forward runs, the next requests wait in the sockets,
so batches fill by themselves; there are no threads to hand work between,
no GIL to share and no framework (the HTTP side is the floor server's). It
skips everything a real server must do (validation, errors, metrics,
probes, timeouts, fallback), so it is a bound to read the model server
against, not a server.

    MODEL_DIR=<judged model> python -m uvicorn tests.bench.reference_server:app --workers <cores> --port P
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import numpy as np

from defectkit.exported import ExportedModel
from tests.bench.bench_serve import CLIENTS
from tests.bench.floor_server import oip_app

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


async def _answer(pixels: np.ndarray) -> bytes:
    score = asyncio.get_running_loop().create_future()
    _gathered.append((pixels, score))
    _schedule_flush()
    return json.dumps({"model_name": "defectkit", "outputs": [
        {"name": "score", "shape": [1], "datatype": "FP32", "data": [await score]}]}).encode()


app = oip_app(_answer)
