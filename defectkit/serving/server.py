"""The model server: KServe's REST application for one DefectPredictor, under our own uvicorn server.

    defectkit serve --model DIR|URI --port P [--host 127.0.0.1] [--fallback DIR|URI] ...

(the command line lives in :mod:`defectkit.cli.serve`; :class:`ServingOptions` is what
it configures beyond the model, the address and the served name, so that the same options
reach a KServe InferenceService's container arguments).

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

import argparse
import asyncio
import dataclasses
import logging
import math
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from defectkit.serving.contract import RUNTIMES

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
# defectkit.models.PRECISIONS, repeated here so that the options can be checked where torch is not installed.
PRECISIONS = ("auto", "fp32", "bf16")
_DEVICE = re.compile(r"^(auto|cpu|cuda(:[0-9]+)?)$")


@dataclass(frozen=True)
class ServingOptions:
    """How ``defectkit serve`` serves, as opposed to what (model, fallback) and where (host, port, name).

    Each field is the option ``--<field name with '-' for '_'>`` of ``defectkit serve``; :meth:`args`
    writes them back as that command's arguments, for a KServe InferenceService's container.
    Importing and checking them needs neither torch nor kserve.
    """

    device: str = "auto"
    precision: str = "auto"
    runtime: str = "auto"  # auto: ONNX Runtime where the model carries an export and the device is the CPU
    threads: int = 0  # 0: the cores divided by the batch workers
    max_batch: int = 8
    max_wait_ms: float = 5.0
    batch_workers: int = 0  # 0: 1 on a GPU, 2 on a CPU
    timeout_s: float = 10.0
    max_body_mb: float = DEFAULT_MAX_BODY_MB
    max_images: int = 64
    max_pixels: int | None = None  # None: defectkit.image's limit
    access_log: bool = False
    sample_rate: float = 0.0
    sample_uri: str = ""
    sample_seed: int = 0
    breaker_failures: int = 5
    breaker_window_s: float = 30.0
    breaker_cooldown_s: float = 10.0
    fault_error_rate: float = 0.0
    fault_latency_ms: float = 0.0
    fault_score_shift: float = 0.0
    fault_duration_s: float = 0.0
    fault_seed: int = 0

    def __post_init__(self) -> None:
        if not _DEVICE.match(self.device):
            raise ValueError(f"device {self.device!r} is not one of 'auto', 'cpu', 'cuda', 'cuda:N'")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.runtime not in RUNTIMES:
            raise ValueError(f"runtime {self.runtime!r} is not one of {', '.join(RUNTIMES)}")
        for name in ("threads", "batch_workers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}={value!r} must be a whole number, 0 or more (0 chooses for the machine)")
        for name in ("timeout_s", "max_body_mb"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name}={value!r} must be a positive number")
        for name in ("max_images", "max_pixels"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}={value!r} must be a positive whole number")
        self._parts()  # the serving parts check their own fields

    def _parts(self):
        from defectkit.sampling import SamplingConfig
        from defectkit.serving.batching import BatchConfig
        from defectkit.serving.breaker import BreakerConfig
        from defectkit.serving.faults import FaultConfig

        return (
            BatchConfig(max_batch=self.max_batch, max_wait_ms=self.max_wait_ms, workers=self.batch_workers or 1),
            BreakerConfig(failures=self.breaker_failures, window_s=self.breaker_window_s,
                          cooldown_s=self.breaker_cooldown_s),
            FaultConfig(error_rate=self.fault_error_rate, latency_ms=self.fault_latency_ms,
                        score_shift=self.fault_score_shift, duration_s=self.fault_duration_s, seed=self.fault_seed),
            SamplingConfig(rate=self.sample_rate, uri=self.sample_uri, seed=self.sample_seed),
        )

    @classmethod
    def from_namespace(cls, args: argparse.Namespace) -> ServingOptions:
        """The options parsed by ``defectkit serve``'s parser."""
        return cls(**{field.name: getattr(args, field.name) for field in dataclasses.fields(cls)})

    def args(self) -> list[str]:
        """``defectkit serve`` arguments for every option that differs from its default."""
        words: list[str] = []
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value == field.default:
                continue
            flag = "--" + field.name.replace("_", "-")
            # A switch is its flag alone (store_true); its default, off, is never written.
            words += [flag] if isinstance(value, bool) else [flag, str(value)]
        return words

    def serving_config(self) -> ServingConfig:
        """The :class:`~defectkit.serving.predictor.ServingConfig` these options describe (imports torch)."""
        from defectkit import image
        from defectkit.serving.predictor import ServingConfig

        batch, breaker, faults, sampling = self._parts()
        return ServingConfig(
            batch=dataclasses.replace(batch, workers=self.batch_workers or default_batch_workers(self.device)),
            breaker=breaker, faults=faults, sampling=sampling, timeout_s=self.timeout_s,
            max_images=self.max_images, max_pixels=self.max_pixels or image.DEFAULT_MAX_PIXELS,
            device=self.device, precision=self.precision, runtime=self.runtime,
        )


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
    """A local model dir for ``spec`` and its registry version (None outside the registry).

    ``spec`` is a directory, a ``gs://`` or ``s3://`` directory (downloaded into ``work_dir``: in a
    KServe pod the storage initializer fetches only the primary model, so a fallback such as the
    previous champion's artifact comes this way), or ``models:/<name>@<alias>`` /
    ``models:/<name>/<version>`` in the registry at ``tracking_uri``.
    """
    from defectkit import registry, storage

    uri = registry.ModelUri.parse(spec)
    if uri is None and storage.is_remote(spec):
        return fetch_remote_model(spec, work_dir), None
    if uri is None:
        path = Path(spec)
        if not (path / "model.json").is_file():
            raise FileNotFoundError(f"{path} is not a model artifact directory (no model.json); give the judged "
                                    f"model's directory, its gs:// or s3:// copy, or a models:/<name>@<alias> "
                                    f"registry URI")
        return path, None
    if not tracking_uri:
        raise ValueError(f"{spec} is a registry URI: give the MLflow registry with --tracking-uri")
    ref = registry.pin(uri, tracking_uri)
    dest = registry.resolve(ref.uri, work_dir / f"{ref.name}-{ref.version}", tracking_uri=tracking_uri)
    return Path(dest), ref.version


def fetch_remote_model(uri: str, dest: Path) -> Path:
    """Download the model directory at a ``gs://`` or ``s3://`` ``uri`` into ``dest`` and verify its weights.

    A failure to read the store (no such bucket, no credentials, no network) is an OSError naming the URI
    and what to check, whatever client library raised it.
    """
    from defectkit import registry
    from defectkit.artifact import ModelIntegrityError

    try:
        return registry.fetch_model(uri, dest)
    except ModelIntegrityError:
        raise
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{uri} holds no model artifact ({exc}); give the directory that holds "
                                f"model.json and model.safetensors, e.g. a registered version's storage URI") from exc
    except Exception as exc:  # noqa: BLE001 - google-cloud-storage and boto3 raise their own types
        raise OSError(f"cannot download the model at {uri}: {type(exc).__name__}: {exc}. Check that the URI "
                      f"exists and that this process may read it (gs://: Workload Identity or "
                      f"GOOGLE_APPLICATION_CREDENTIALS; s3://: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and, "
                      f"for MinIO, AWS_ENDPOINT_URL)") from exc


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
    if predictor.sampler is not None:
        metrics.watch_sampling(predictor.version, predictor.sampler.stats)
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
    from defectkit.cores import usable_cores
    from defectkit.models import resolve_device

    return 1 if resolve_device(device).type == "cuda" else min(2, usable_cores())


def default_torch_threads(config: ServingConfig) -> int:
    from defectkit.cores import usable_cores

    return max(1, usable_cores() // config.batch.workers)
