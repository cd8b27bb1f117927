"""The model server: KServe's REST application for one DefectPredictor, under our own uvicorn server.

    defectkit serve --model DIR|models:/<name>@<alias> --port P [--host 127.0.0.1] [--fallback DIR] ...

(the command line lives in :mod:`defectkit.cli.serve`).

It is KServe's ModelServer application (its v1/v2 endpoints, ``/metrics``,
exception handlers and middleware) with four changes:

- it binds the requested host, 127.0.0.1 by default (``ModelServer.start``
  always binds 0.0.0.0: kserve/kserve#4558);
- request bodies are limited (``--max-body-mb``, 413 beyond it);
- ``POST /v2/models/<name>/infer`` is ours: it decodes requests with
  :mod:`defectkit.serving.protocol`, so that images sent as binary BYTES
  work and malformed requests get a 400 rather than KServe's 500, and
  counts every request in the ``defectkit_*`` Prometheus metrics;
- ``/v2/health/ready`` reports whether the model is loaded (KServe's
  always says ready) and model metadata carries the model version.
"""

from __future__ import annotations

import asyncio
import logging
import math
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from defectkit.serving.predictor import DefectPredictor, ServingConfig

log = logging.getLogger(__name__)

MIB = 1 << 20
DEFAULT_MAX_BODY_MB = 16
DEFAULT_PORT = 8080
# Bodies up to this size are parsed on the event loop; bigger JSON would hold it up for milliseconds.
PARSE_INLINE_BYTES = 64 * 1024
# An over-limit body announced by Content-Length is read and discarded up to this many times the limit
# before the 413 goes out, so that clients still sending it read the answer instead of a reset connection.
DRAIN_FACTOR = 4
INFER_PATHS = ("/v2/models/{model_name}/infer", "/v2/models/{model_name}/versions/{model_version}/infer")


class BodyTooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"request body is larger than the limit of {limit:,} bytes ({limit / MIB:g} MiB); "
                         f"send fewer or smaller images per request, or start the server with a higher "
                         f"--max-body-mb")


class BodyLimit:
    """ASGI middleware: refuse request bodies over ``max_bytes`` with 413, declared or streamed.

    Starlette's RequestBodyLimitMiddleware would answer in plain text; this one answers with the OIP error
    object, says which limit and how to change it, and counts the rejection in the metrics.
    """

    def __init__(self, app, max_bytes: int, on_reject: Callable[[dict, float], None]) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self._on_reject = on_reject

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            started = time.perf_counter()
            if declared <= DRAIN_FACTOR * self.max_bytes:
                await _drain(receive)
            await _send_json(send, 413, BodyTooLarge(self.max_bytes))
            self._on_reject(scope, time.perf_counter() - started)
            return
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, limited_receive, send)


def _content_length(scope) -> int | None:
    for key, value in scope["headers"]:
        if key == b"content-length":
            return int(value) if value.isdigit() else None
    return None


async def _drain(receive) -> None:
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return


async def _send_json(send, status: int, error: Exception) -> None:
    from defectkit.serving.protocol import error_body

    body = error_body(str(error))
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def resolve_model(spec: str, work_dir: Path, *, tracking_uri: str | None) -> tuple[Path, str | None]:
    """A local model dir for ``spec`` (a directory, or ``models:/<name>@<alias>`` / ``models:/<name>/<version>``)
    and its registry version (None for a directory)."""
    from defectkit import registry

    uri = registry.ModelUri.parse(spec)
    if uri is None:
        path = Path(spec)
        if not (path / "model.json").is_file():
            raise FileNotFoundError(f"{path} is not a model artifact directory (no model.json); give the judged "
                                    f"model's directory or a models:/<name>@<alias> registry URI")
        return path, None
    if not tracking_uri:
        raise ValueError(f"{spec} is a registry URI: give the MLflow registry with --tracking-uri")
    ref = registry.pin(uri, tracking_uri)
    dest = registry.resolve(ref.uri, work_dir / f"{ref.name}-{ref.version}", tracking_uri=tracking_uri)
    return Path(dest), ref.version


def build_app(predictor: DefectPredictor, *, max_body_bytes: int, port: int = DEFAULT_PORT):
    """KServe's REST application serving ``predictor`` (loaded), with our routes and the body limit.

    KServe keeps its FastAPI application in a module global, so this is called once per process.
    """
    from defectkit.serving.kserve_runtime import import_kserve

    import_kserve()
    import kserve.model_server
    import orjson
    from kserve import ModelServer
    from kserve.constants.constants import FASTAPI_APP_IMPORT_STRING
    from kserve.errors import InvalidInput, ModelNotFound, ModelNotReady
    from kserve.protocol.rest.server import RESTServer
    from starlette.requests import Request
    from starlette.responses import Response

    from defectkit.serving import metrics, protocol
    from defectkit.serving.predictor import ModelFailed, ModelTimedOut, ModelUnavailable

    model_server = ModelServer(http_port=port, enable_grpc=False, enable_docs_url=False,
                               enable_latency_logging=False)
    model_server.register_model(predictor)
    dataplane = model_server.dataplane
    app = kserve.model_server.app

    def json_response(status: int, message: str, headers: dict | None = None) -> Response:
        return Response(protocol.error_body(message), status_code=status, media_type=protocol.JSON_CONTENT_TYPE,
                        headers=headers)

    async def infer(request: Request) -> Response:
        started = time.perf_counter()
        name = request.path_params["model_name"]
        version = predictor.version
        headers: dict[str, str] = {}
        try:
            if not await dataplane.model_ready(name, True):
                raise ModelNotReady(name)
            body = await request.body()
            request_headers = dict(request.headers)
            if len(body) <= PARSE_INLINE_BYTES:
                infer_request = protocol.parse_request(body, request_headers, name)
            else:
                infer_request = await asyncio.get_running_loop().run_in_executor(
                    None, protocol.parse_request, body, request_headers, name)
            response, _ = await dataplane.infer(name, infer_request, request_headers)
            version = response.model_version or version
            content, headers = protocol.encode_response(response)
            status = 200
        except InvalidInput as exc:
            status, content = 400, protocol.error_body(str(exc))
        except BodyTooLarge as exc:
            status, content = 413, protocol.error_body(str(exc))
        except ModelNotFound:
            status, content = 404, protocol.error_body(f"model {name!r} not found; this server serves model "
                                                       f"{predictor.name!r}")
        except ModelNotReady as exc:
            status, content = 503, protocol.error_body(str(exc))
        except ModelUnavailable as exc:
            status, content = 503, protocol.error_body(str(exc))
            headers = {"retry-after": str(max(1, math.ceil(exc.retry_after_s)))}
        except ModelTimedOut as exc:
            status, content = 504, protocol.error_body(str(exc))
        except ModelFailed as exc:
            status, content = 500, protocol.error_body(str(exc))
        except Exception as exc:  # noqa: BLE001 - the server must answer and stay up whatever happened
            log.exception("inference request to %s failed", name)
            status, content = 500, protocol.error_body(f"internal error: {type(exc).__name__}: {exc}")
        metrics.request_done(version, status, time.perf_counter() - started)
        if status != 200:
            headers = {**headers, "content-type": protocol.JSON_CONTENT_TYPE}
        return Response(content, status_code=status, headers=headers)

    async def server_ready(request: Request) -> Response:
        models = dataplane.model_registry.get_models()
        waiting = [name for name, model in models.items() if not model.ready]
        if not models or waiting:
            return json_response(503, f"not ready: model(s) {', '.join(waiting) or '(none)'} not loaded")
        return Response(b'{"ready":true}', media_type=protocol.JSON_CONTENT_TYPE)

    async def model_metadata(request: Request) -> Response:
        name = request.path_params["model_name"]
        if name != predictor.name:
            return json_response(404, f"model {name!r} not found; this server serves model {predictor.name!r}")
        return Response(orjson.dumps(predictor.metadata()), media_type=protocol.JSON_CONTENT_TYPE)

    # Added before KServe's routes, so they take precedence over KServe's handlers for the same paths.
    for path in INFER_PATHS:
        app.add_route(path, infer, methods=["POST"])
    app.add_route("/v2/health/ready", server_ready, methods=["GET"])
    app.add_route("/v2/models/{model_name}", model_metadata, methods=["GET"])
    RESTServer(FASTAPI_APP_IMPORT_STRING, dataplane, model_server.model_repository_extension, port).create_application()

    async def body_too_large(request: Request, exc: BodyTooLarge) -> Response:
        return json_response(413, str(exc))

    app.add_exception_handler(BodyTooLarge, body_too_large)

    def rejected(scope: dict, seconds: float) -> None:
        if scope["path"].endswith("/infer"):
            metrics.request_done(predictor.version, 413, seconds)

    return BodyLimit(app, max_body_bytes, rejected)


def serve(model: str, *, port: int, host: str = "127.0.0.1", fallback: str | None = None, name: str = "defectkit",
          tracking_uri: str | None = None, config: ServingConfig | None = None,
          max_body_bytes: int = DEFAULT_MAX_BODY_MB * MIB, torch_threads: int = 0, access_log: bool = False) -> None:
    """Load ``model`` (and ``fallback``), then serve it over OIP v2 REST on host:port until SIGTERM/SIGINT.

    ``config`` is a :class:`~defectkit.serving.predictor.ServingConfig` (batching, circuit breaker, timeouts,
    input limits, fault injection). Registry URIs need ``tracking_uri``. Blocks.
    """
    if max_body_bytes < 1:
        raise ValueError(f"max_body_bytes={max_body_bytes} must be positive")
    import torch
    import uvicorn

    from defectkit.serving.predictor import DefectPredictor, ServingConfig

    config = config or ServingConfig()
    torch.set_num_threads(torch_threads or default_torch_threads(config))
    # KServe's timing middleware logs two trace lines per request; at hundreds of requests/s that is real CPU.
    logging.getLogger("kserve.trace").setLevel(logging.WARNING)
    # KServe 0.21 builds its app with FastAPI's ORJSONResponse, which FastAPI now flags on the first response.
    warnings.filterwarnings("ignore", message="ORJSONResponse is deprecated")
    work_dir = Path(tempfile.mkdtemp(prefix="defectkit-serve-"))
    predictor = None
    try:
        model_dir, version = resolve_model(model, work_dir / "model", tracking_uri=tracking_uri)
        fallback_dir = fallback_version = None
        if fallback is not None:
            fallback_dir, fallback_version = resolve_model(fallback, work_dir / "fallback", tracking_uri=tracking_uri)
        predictor = DefectPredictor(name, model_dir, fallback_dir=fallback_dir, config=config, version=version,
                                    fallback_version=fallback_version)
        predictor.load()
        app = build_app(predictor, max_body_bytes=max_body_bytes, port=port)
        server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_config=None, access_log=access_log,
                                               timeout_graceful_shutdown=10))
        log.info("serving model %r version %s (torch threads %d) at http://%s:%d/v2/models/%s/infer", name,
                 predictor.version, torch.get_num_threads(), host, port, name)
        server.run()
        if not server.started:
            raise OSError(f"could not listen on {host}:{port}; is the port in use?")
    finally:
        if predictor is not None:
            predictor.stop()
        shutil.rmtree(work_dir, ignore_errors=True)


def default_batch_workers(device: str) -> int:
    """Forwards at a time: one on a GPU; on a CPU two, each on its own cores.

    Two single-threaded forwards on 2 cores beat one forward on two threads: no
    thread barriers inside the forward, so a core taken by another process only
    slows its own forward instead of stalling both at every layer.
    """
    import os

    from defectkit.models import resolve_device

    return 1 if resolve_device(device).type == "cuda" else min(2, os.cpu_count() or 1)


def default_torch_threads(config: ServingConfig) -> int:
    import os

    return max(1, (os.cpu_count() or 1) // config.batch.workers)
