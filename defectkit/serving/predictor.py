"""The KServe predictor: a defect model behind the Open Inference Protocol v2.

Inputs (exactly one per request):

- ``image``: BYTES, shape ``[N]``: encoded image files (PNG, JPEG, BMP, TIFF,
  WEBP). With the binary data extension (tritonclient's default) they are
  sent as they are; in plain JSON, where BYTES elements are strings, each
  element is the file base64-encoded. Each is decoded and resized by
  ``defectkit.preprocess.to_model_input`` with the model's own spec from
  model.json: the same function evaluation uses, so scores cannot drift.
- ``pixels``: UINT8 or FP32, shape ``[N, S, S, 3]``: RGB pixels already at the
  model's input size ``S`` (what to_model_input returns), FP32 on the same
  0-255 scale.

Outputs: ``score`` FP32 ``[N]`` (defect probability) and ``label`` BYTES
``[N]`` (``good`` or ``defect``, by the threshold in model.json); the
response's ``model_version`` says which model answered (the weights'
sha256 prefix, or the registry version).

Requests are micro-batched (:mod:`defectkit.serving.batching`); decoding
runs in a thread pool, never on the event loop. A circuit breaker guards
the primary model: after repeated failures or timeouts the fallback model
(the previous champion) answers until a probe call succeeds again; without
a fallback the answer is a 503. Bad input is always an ``InvalidInput``
(HTTP 400) naming what is wrong.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import importlib.util
import logging
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from defectkit import image, models, preprocess
from defectkit.artifact import ONNX_FILE, ModelIntegrityError
from defectkit.artifact import verify as verify_weights
from defectkit.exported import ExportedModel
from defectkit.sampling import LABELS, Sampler, SamplingConfig
from defectkit.serving import metrics
from defectkit.serving.batching import BatchConfig, MicroBatcher
from defectkit.serving.breaker import BreakerConfig, CircuitBreaker
from defectkit.serving.contract import (
    IMAGE_INPUT,
    LABEL_OUTPUT,
    PIXELS_INPUT,
    PRECISION_PARAMETER,
    RUNTIMES,
    SCORE_OUTPUT,
    VERSION_PREFIX_LENGTH,
)
from defectkit.serving.faults import FaultConfig, FaultInjector, InjectedFault
from defectkit.serving.kserve_runtime import import_kserve

import_kserve()

from kserve import InferOutput, InferRequest, InferResponse, Model  # noqa: E402
from kserve.errors import InvalidInput  # noqa: E402

log = logging.getLogger(__name__)

GOOD_LABEL, DEFECT_LABEL = LABELS
# The OIP metadata's platform, by what scores: Triton's names for the frameworks.
PLATFORMS = {"torch": "pytorch_torchvision", "onnxruntime": "onnxruntime_onnx"}


class ModelUnavailable(RuntimeError):
    """No model can answer now: the primary's circuit is open and no fallback can take the request (HTTP 503)."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ModelFailed(RuntimeError):
    """The model raised while scoring (HTTP 500)."""


class ModelTimedOut(ModelFailed):
    """The model did not answer within the per-request timeout (HTTP 504)."""


@dataclass(frozen=True)
class ServingConfig:
    """How the predictor answers: batching, protection of the primary model, input limits."""

    batch: BatchConfig = field(default_factory=BatchConfig)
    breaker: BreakerConfig = field(default_factory=BreakerConfig)
    faults: FaultConfig = field(default_factory=FaultConfig)  # for canary tests only
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    timeout_s: float = 10.0  # per request, batching wait and forward included
    max_images: int = 64  # per request
    max_pixels: int = image.DEFAULT_MAX_PIXELS  # per image, checked from its header before decoding
    decode_threads: int = 2
    device: str = "auto"
    precision: str = models.AUTO  # auto: bf16 on CUDA, fp32 elsewhere
    runtime: str = "auto"  # auto: ONNX Runtime where the model carries an export and the device is the CPU

    def __post_init__(self) -> None:
        if self.runtime not in RUNTIMES:
            raise ValueError(f"runtime {self.runtime!r} is not one of {', '.join(RUNTIMES)}")
        if not (isinstance(self.timeout_s, (int, float)) and math.isfinite(self.timeout_s) and self.timeout_s > 0):
            raise ValueError(f"timeout_s={self.timeout_s!r} must be a positive number of seconds")
        for name in ("max_images", "max_pixels", "decode_threads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")


def model_version(metadata: models.ModelMetadata) -> str:
    """The version a model artifact is served under when no registry version is known."""
    return metadata.weights_sha256[:VERSION_PREFIX_LENGTH]


@dataclass
class _Inputs:
    """One request's images: the encoded files (when sent as BYTES) and pixels decoded per preprocessing spec."""

    encoded: list[bytes] | None
    pixels: dict[preprocess.PreprocessSpec, np.ndarray]


class _Scorer:
    """One model with its own micro-batcher: its ONNX export (``exported``) scores where the runtime chose it, else
    the torch module.

    Scoring the export, the torch module is built only when FP32 pixels ask for it (the export takes uint8, and
    FP32 pixels go through torch unrounded): a server that never gets any starts without importing torchvision,
    seconds sooner.
    """

    def __init__(self, model_dir: Path, metadata: models.ModelMetadata, version: str, role: str, batch: BatchConfig,
                 device: torch.device, precision: str, exported: ExportedModel | None = None) -> None:
        self.model_dir = model_dir
        self.metadata = metadata
        self.exported = exported
        self.version = version
        self.role = role
        self.spec = metadata.preprocess
        self.threshold = float(metadata.threshold)
        self.runtime = "onnxruntime" if exported is not None else "torch"
        self._device, self._precision = device, precision
        self._model_lock = threading.Lock()
        self._model = None if exported is not None else self._load_torch()
        # What computed the scores, for every answer: ONNX Runtime's CPU provider computes in fp32.
        self.precision = models.FP32 if exported is not None else self._model.precision
        self._batch_size = batch.max_batch
        self.batcher = MicroBatcher(self._forward, batch, name=role,
                                    on_batch=lambda size: metrics.batch(version, size))

    def _load_torch(self) -> models.DefectModel:
        model = models.load_model(self.model_dir, self._device, self._precision)
        if model.metadata.weights_sha256 != self.metadata.weights_sha256:
            raise ModelIntegrityError(f"{self.model_dir} now holds other weights ({model.metadata.weights_sha256[:12]})"
                                      f" than it did when the server loaded it ({self.metadata.weights_sha256[:12]})")
        return model

    def _torch_model(self) -> models.DefectModel:
        with self._model_lock:
            if self._model is None:
                log.info("%s model %s: building the torch module for FP32 pixels", self.role, self.version)
                self._model = self._load_torch()
            return self._model

    def _forward(self, images: np.ndarray) -> np.ndarray:
        if self.exported is not None and images.dtype == np.uint8:
            # The export's graph holds the same normalisation; its parity with PyTorch was checked at load.
            return self.exported.scores(images)
        model = self._torch_model()
        # The very function DefectModel.scores (and so evaluation) uses; FP32 pixels go through it unrounded.
        return models.score_images(model.module, images, self.spec, model.device, self._batch_size, model.precision)

    def warm_up(self) -> None:
        """First forwards of a batch shape are slow (kernel selection); do them before the first request."""
        size = self.spec.image_size
        for n in sorted({1, self._batch_size}):
            self._forward(np.zeros((n, size, size, 3), np.uint8))

    async def score(self, images: np.ndarray) -> np.ndarray:
        return await self.batcher.submit(images)


class DefectPredictor(Model):
    """A defect model artifact served over the Open Inference Protocol, with an optional fallback model.

    ``version``/``fallback_version`` default to the weights' sha256 prefix;
    pass the registry version when the model came from the registry.
    """

    def __init__(self, name: str, model_dir: Path, *, fallback_dir: Path | None = None,
                 config: ServingConfig = ServingConfig(), version: str | None = None,
                 fallback_version: str | None = None) -> None:
        super().__init__(name)
        self.model_dir = Path(model_dir)
        self.fallback_dir = None if fallback_dir is None else Path(fallback_dir)
        self.config = config
        # Known before loading, so that even requests refused early are labelled with the version.
        self.version = version or model_version(models.read_metadata(self.model_dir))
        self._fallback_version = fallback_version
        self._breaker = CircuitBreaker(config.breaker)
        self._faults = FaultInjector(config.faults)
        self._primary: _Scorer | None = None
        self._fallback: _Scorer | None = None
        self._decoder: ThreadPoolExecutor | None = None
        self.sampler: Sampler | None = None

    # ------------------------------------------------------------------ lifecycle

    def load(self) -> bool:
        """Load and verify (sha256) the model and the fallback; ready only once both are usable."""
        self._primary = self._load(self.model_dir, self.version, "primary")
        if self.fallback_dir is not None:
            version = self._fallback_version or model_version(models.read_metadata(self.fallback_dir))
            if version == self.version:
                log.warning("fallback %s is the same model version %s as the primary", self.fallback_dir, version)
            self._fallback = self._load(self.fallback_dir, version, "fallback")
        self._decoder = ThreadPoolExecutor(self.config.decode_threads, thread_name_prefix="decode")
        if self.config.sampling.enabled:
            self.sampler = Sampler(self.config.sampling)
            log.info("sampling %g of requests to %s", self.config.sampling.rate, self.config.sampling.uri)
        metrics.breaker_state(self.version, self._breaker.state)
        if self.config.faults.enabled:
            log.warning("FAULT INJECTION is on for %s (%s): for canary tests only", self.version,
                        self.config.faults.describe())
        self.ready = True
        return self.ready

    def _load(self, model_dir: Path, version: str, role: str) -> _Scorer:
        metadata = models.read_metadata(model_dir)
        if metadata.threshold is None:
            raise ValueError(f"{model_dir} has no decision threshold in model.json; serve the judged model "
                             f"that evaluation writes (its out_dir/model), not the raw training output")
        device = models.resolve_device(self.config.device)
        exported = self._exported(model_dir, metadata, device)
        if exported is not None:
            verify_weights(model_dir)  # tampered weights stop the server, though the torch module is built later
        scorer = _Scorer(model_dir, metadata, version, role, self.config.batch, device, self.config.precision,
                         exported)
        scorer.warm_up()
        spec = metadata.preprocess
        metrics.model_loaded(version, role, metadata.architecture, spec.image_size, metadata.weights_sha256)
        log.info("loaded %s model %s (version %s, %s, %d px, threshold %.4f, %s, %s, %s)", role, model_dir, version,
                 metadata.architecture, spec.image_size, scorer.threshold, device, scorer.precision, scorer.runtime)
        return scorer

    def _exported(self, model_dir: Path, metadata: models.ModelMetadata, device: torch.device) -> ExportedModel | None:
        """The model's ONNX export, where the runtime asks for it (or, on auto, where it exists and the device is
        the CPU); it must be of the same weights and threshold and score as PyTorch does."""
        runtime, has_export = self.config.runtime, (model_dir / ONNX_FILE).is_file()
        if runtime == "torch" or (runtime == "auto" and (not has_export or device.type != "cpu")):
            return None
        if not has_export:
            raise FileNotFoundError(f"{model_dir} carries no ONNX export ({ONNX_FILE}), which runtime=onnxruntime "
                                    f"needs: serve the judged model that evaluation writes, or runtime torch")
        if importlib.util.find_spec("onnxruntime") is None:
            if runtime == "auto":
                log.warning("%s carries an ONNX export, but onnxruntime is not installed: scoring with torch",
                            model_dir)
                return None
            raise ValueError("runtime onnxruntime needs the onnxruntime package (defectkit[serve])")
        exported = ExportedModel(model_dir, threads=torch.get_num_threads())
        for what, ours, theirs in (("weights", metadata.weights_sha256, exported.metadata.weights_sha256),
                                   ("threshold", metadata.threshold, exported.metadata.threshold)):
            if ours != theirs:
                raise ModelIntegrityError(f"{model_dir / ONNX_FILE} was exported from other {what} ({theirs}) than "
                                          f"model.json's ({ours}); export the judged model again")
        return exported

    def stop(self) -> None:
        for scorer in (self._primary, self._fallback):
            if scorer is not None:
                scorer.batcher.close()
        if self._decoder is not None:
            self._decoder.shutdown(wait=False, cancel_futures=True)
        if self.sampler is not None:
            self.sampler.close()
        self.ready = False

    # ------------------------------------------------------------------ metadata

    @property
    def image_size(self) -> int:
        if self._primary is not None:
            return self._primary.spec.image_size
        return models.read_metadata(self.model_dir).preprocess.image_size

    def get_input_types(self) -> list[dict]:
        size = self.image_size
        return [{"name": IMAGE_INPUT, "datatype": "BYTES", "shape": [-1]},
                {"name": PIXELS_INPUT, "datatype": "UINT8", "shape": [-1, size, size, 3]}]

    def get_output_types(self) -> list[dict]:
        return [{"name": SCORE_OUTPUT, "datatype": "FP32", "shape": [-1]},
                {"name": LABEL_OUTPUT, "datatype": "BYTES", "shape": [-1]}]

    def metadata(self) -> dict:
        """The OIP model metadata object."""
        runtime = self._primary.runtime if self._primary is not None else "torch"
        return {"name": self.name, "versions": [self.version], "platform": PLATFORMS[runtime],
                "inputs": self.get_input_types(), "outputs": self.get_output_types()}

    @property
    def breaker_state(self) -> str:
        return self._breaker.state

    # ------------------------------------------------------------------ inference

    async def predict(self, payload: InferRequest, headers: dict[str, str] | None = None,
                      response_headers: dict[str, str] | None = None) -> InferResponse:
        if not isinstance(payload, InferRequest):
            raise InvalidInput(f"model {self.name} speaks the Open Inference Protocol v2: POST an inference "
                               f"request to /v2/models/{self.name}/infer")
        if self._primary is None:
            raise RuntimeError(f"model {self.name} is not loaded; call load() first")
        _check_requested_outputs(payload)
        loop = asyncio.get_running_loop()
        inputs = await loop.run_in_executor(self._decoder, self._read_inputs, payload)
        scores, scorer = await self._score(inputs)
        defect = scores >= scorer.threshold
        metrics.predictions(scorer.version, scores, defect)
        labels = np.array([DEFECT_LABEL.encode() if d else GOOD_LABEL.encode() for d in defect.tolist()], object)
        if self.sampler is not None:
            self.sampler.offer(inputs.encoded if inputs.encoded is not None else inputs.pixels[self._primary.spec],
                               scores.tolist(), [DEFECT_LABEL if d else GOOD_LABEL for d in defect.tolist()],
                               scorer.version)
        outputs = [InferOutput(SCORE_OUTPUT, [len(scores)], "FP32", data=scores),
                   InferOutput(LABEL_OUTPUT, [len(scores)], "BYTES", data=labels)]
        # The precision that computed the scores: a golden probe compares them with offline fp32 scores.
        return InferResponse(payload.id or "", self.name, outputs, model_version=scorer.version,
                             parameters={PRECISION_PARAMETER: scorer.precision},
                             use_binary_outputs=payload.use_binary_outputs,
                             requested_outputs=payload.request_outputs)

    async def _score(self, inputs: _Inputs) -> tuple[np.ndarray, _Scorer]:
        primary, fallback, breaker = self._primary, self._fallback, self._breaker
        allowed = breaker.allow()
        metrics.breaker_state(self.version, breaker.state)
        if allowed:
            try:
                scores = await asyncio.wait_for(self._call_primary(inputs.pixels[primary.spec]),
                                                self.config.timeout_s)
            except asyncio.CancelledError:
                breaker.abandon()
                raise
            except Exception as exc:  # noqa: BLE001 - any failure of the model counts against it
                failure = self._failure(primary, exc)
                breaker.failure()
                metrics.breaker_state(self.version, breaker.state)
                if fallback is None:
                    log.error("%s", failure)
                    raise failure from exc
                log.warning("%s; answering from the fallback model (version %s)", failure, fallback.version)
            else:
                breaker.success()
                metrics.breaker_state(self.version, breaker.state)
                return scores, primary
        elif fallback is None:
            retry, limits = breaker.retry_after_s(), self.config.breaker
            raise ModelUnavailable(f"model version {self.version} is unavailable: it failed {limits.failures} times "
                                   f"within {limits.window_s:g} s, so its circuit breaker is open and no fallback "
                                   f"model is configured; retry in {retry:.0f} s", retry)
        pixels = await self._pixels_for(fallback, inputs)
        try:
            return await asyncio.wait_for(fallback.score(pixels), self.config.timeout_s), fallback
        except Exception as exc:  # noqa: BLE001 - reported as a failure of the fallback
            failure = self._failure(fallback, exc)
            log.error("%s", failure)
            raise failure from exc

    async def _call_primary(self, pixels: np.ndarray) -> np.ndarray:
        if self._faults.latency_s:
            await asyncio.sleep(self._faults.latency_s)
        self._faults.maybe_fail()
        return self._faults.shift(await self._primary.score(pixels))

    def _failure(self, scorer: _Scorer, exc: Exception) -> ModelFailed:
        """The failure as reported to the client, counted in the metrics."""
        if isinstance(exc, TimeoutError):
            metrics.model_failure(scorer.version, "timeout")
            return ModelTimedOut(f"{scorer.role} model (version {scorer.version}) did not answer within "
                                 f"{self.config.timeout_s:g} s")
        metrics.model_failure(scorer.version, "error")
        if not isinstance(exc, InjectedFault):
            log.error("%s model (version %s) raised", scorer.role, scorer.version, exc_info=exc)
        return ModelFailed(f"{scorer.role} model (version {scorer.version}) failed: {type(exc).__name__}: {exc}")

    async def _pixels_for(self, scorer: _Scorer, inputs: _Inputs) -> np.ndarray:
        if scorer.spec in inputs.pixels:
            return inputs.pixels[scorer.spec]
        if inputs.encoded is None:
            raise ModelUnavailable(f"the primary model is failing and the fallback model {scorer.version} needs "
                                   f"{scorer.spec.image_size} px images, not these pixels; send encoded images "
                                   f"(input {IMAGE_INPUT!r})", self._breaker.retry_after_s())
        loop = asyncio.get_running_loop()
        pixels = await loop.run_in_executor(self._decoder, self._decode, inputs.encoded, scorer.spec)
        inputs.pixels[scorer.spec] = pixels
        return pixels

    # ------------------------------------------------------------------ inputs (run in the decode threads)

    def _read_inputs(self, request: InferRequest) -> _Inputs:
        if len(request.inputs) != 1:
            names = ", ".join(repr(i.name) for i in request.inputs)
            raise InvalidInput(f"send exactly one input, {IMAGE_INPUT!r} or {PIXELS_INPUT!r}; got {names}")
        infer_input = request.inputs[0]
        spec = self._primary.spec
        if infer_input.name == IMAGE_INPUT:
            encoded = _encoded_images(infer_input)
            self._check_count(len(encoded))
            return _Inputs(encoded, {spec: self._decode(encoded, spec)})
        if infer_input.name == PIXELS_INPUT:
            pixels = _pixels(infer_input, spec)
            self._check_count(len(pixels))
            return _Inputs(None, {spec: pixels})
        raise InvalidInput(f"unknown input {infer_input.name!r}; this model takes {IMAGE_INPUT!r} (BYTES [N], "
                           f"encoded image files) or {PIXELS_INPUT!r} (UINT8 or FP32 [N, {spec.image_size}, "
                           f"{spec.image_size}, 3], RGB 0-255)")

    def _check_count(self, count: int) -> None:
        if count < 1:
            raise InvalidInput("the request holds no images; send at least one")
        if count > self.config.max_images:
            raise InvalidInput(f"the request holds {count} images, more than the limit of {self.config.max_images} "
                               f"per request; split it")

    def _decode(self, encoded: list[bytes], spec: preprocess.PreprocessSpec) -> np.ndarray:
        out = np.empty((len(encoded), spec.image_size, spec.image_size, 3), np.uint8)
        for i, data in enumerate(encoded):
            try:
                out[i] = preprocess.to_model_input(data, spec, max_pixels=self.config.max_pixels)
            except image.ImageRejected as exc:
                where = f"image {i}" if len(encoded) > 1 else "the image"
                raise InvalidInput(f"{where} was rejected ({exc.reason}): {exc.detail}") from None
        return out


def _check_requested_outputs(request: InferRequest) -> None:
    for output in request.request_outputs or ():
        if output.name not in (SCORE_OUTPUT, LABEL_OUTPUT):
            raise InvalidInput(f"unknown output {output.name!r}; this model returns {SCORE_OUTPUT!r} and "
                               f"{LABEL_OUTPUT!r}")


def _encoded_images(infer_input) -> list[bytes]:
    if infer_input.datatype != "BYTES":
        raise InvalidInput(f"input {IMAGE_INPUT!r} must be BYTES (encoded image files), got {infer_input.datatype}; "
                           f"send decoded pixels as input {PIXELS_INPUT!r}")
    if infer_input.data is None:  # the binary data extension: the files themselves
        try:
            elements = infer_input.as_numpy().reshape(-1).tolist()
        except Exception as exc:  # noqa: BLE001 - struct.error, ValueError: malformed length-prefixed data
            raise InvalidInput(f"input {IMAGE_INPUT!r}: the binary BYTES data does not match shape "
                               f"{infer_input.shape} (each element is a 4-byte little-endian length, then the "
                               f"bytes): {exc}") from None
        if len(elements) != math.prod(infer_input.shape):
            raise InvalidInput(f"input {IMAGE_INPUT!r} has {len(elements)} elements but shape {infer_input.shape}")
        return elements
    elements = _flatten(infer_input.data)
    if len(elements) != math.prod(infer_input.shape):
        raise InvalidInput(f"input {IMAGE_INPUT!r} has {len(elements)} elements but shape {infer_input.shape}")
    files = []
    for i, element in enumerate(elements):
        if not isinstance(element, str):
            raise InvalidInput(f"input {IMAGE_INPUT!r} element {i} is {type(element).__name__}; in JSON each "
                               f"element is an image file, base64-encoded")
        try:
            files.append(base64.b64decode(element, validate=True))
        except (binascii.Error, ValueError):
            raise InvalidInput(f"input {IMAGE_INPUT!r} element {i} is not base64; in JSON each element is an image "
                               f"file, base64-encoded (or send the files as they are with the binary data "
                               f"extension, as tritonclient does)") from None
    return files


def _pixels(infer_input, spec: preprocess.PreprocessSpec) -> np.ndarray:
    size = spec.image_size
    expected = [size, size, 3]
    shape = list(infer_input.shape)
    if len(shape) != 4 or shape[1:] != expected:
        raise InvalidInput(f"input {PIXELS_INPUT!r} must have shape [N, {size}, {size}, 3] (RGB at this model's "
                           f"input size), got {shape}; send encoded images as input {IMAGE_INPUT!r} to have them "
                           f"resized by the server")
    datatype = infer_input.datatype
    if datatype not in ("UINT8", "FP32"):
        raise InvalidInput(f"input {PIXELS_INPUT!r} must be UINT8 or FP32 (0-255), got {datatype}")
    try:
        if infer_input.data is None:
            values = infer_input.as_numpy()
        else:
            values = np.asarray(infer_input.data)
            if values.dtype.kind not in ("iu" if datatype == "UINT8" else "iuf"):
                raise ValueError(f"expected {'integers' if datatype == 'UINT8' else 'numbers'}, got values of "
                                 f"type {values.dtype}")
        values = values.reshape(shape)
    except (ValueError, TypeError, OverflowError) as exc:
        count = math.prod(shape)
        raise InvalidInput(f"input {PIXELS_INPUT!r}: data does not fit {datatype} shape {shape} ({count} values): "
                           f"{exc}") from None
    if values.size and (values.min() < 0 or values.max() > 255 or not np.all(np.isfinite(values))):
        raise InvalidInput(f"input {PIXELS_INPUT!r}: values must be within 0-255, found "
                           f"{values.min()}..{values.max()}")
    # A fresh, writable array of the model's dtype: the forward may normalise float input in place.
    return np.array(values, dtype=np.uint8 if datatype == "UINT8" else np.float32, copy=True)


def _flatten(data: list) -> list:
    flat: list = []
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        else:
            flat.append(item)
    return flat
