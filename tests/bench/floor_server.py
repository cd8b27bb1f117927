"""The least any model server must do per request, for ``serve_ceiling``'s attainable bound.

A bare ASGI application under uvicorn (the same loop and HTTP parser as
``defectkit serve``: uvloop and httptools): it reads the body, splits the
Open Inference Protocol binary request, decodes and sizes the JPEG with
``defectkit.preprocess.to_model_input`` (as the model server does), and
answers a fixed one-score response. No framework, no model: what it costs
per request is a floor under any server of this model on these cores.

    python -m uvicorn tests.bench.floor_server:app --port P
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

import numpy as np

from defectkit.preprocess import PreprocessSpec, to_model_input
from tests.bench.bench_serve import IMAGE_SIZE

SPEC = PreprocessSpec(image_size=IMAGE_SIZE)
ANSWER = json.dumps({"model_name": "defectkit", "outputs": [
    {"name": "score", "shape": [1], "datatype": "FP32", "data": [0.5]}]}).encode()


async def read_body(receive) -> bytes:
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body", False):
            return body


def oip_jpeg(scope, body: bytes) -> bytes:
    """The one image of an OIP binary request (JSON header, then the BYTES element with its 4-byte length)."""
    length = int(dict(scope["headers"])[b"inference-header-content-length"])
    size = json.loads(body[:length])["inputs"][0]["parameters"]["binary_data_size"]
    return body[length + 4:length + size]


async def respond(send, answer: bytes) -> None:
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(answer)).encode())]})
    await send({"type": "http.response.body", "body": answer})


def oip_app(answer_for: Callable[[np.ndarray], Awaitable[bytes]]):
    """An ASGI app that answers each OIP request with ``answer_for`` its decoded image, and GETs with ready."""

    async def app(scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        body = await read_body(receive)
        answer = b'{"ready":true}'
        if scope["method"] == "POST":
            answer = await answer_for(to_model_input(oip_jpeg(scope, body), SPEC))
        await respond(send, answer)

    return app


async def _fixed_answer(pixels: np.ndarray) -> bytes:
    return ANSWER


app = oip_app(_fixed_answer)
