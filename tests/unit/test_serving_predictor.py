"""DefectPredictor in-process on real model artifacts: parity with DefectModel, input checks, breaker, fallback."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from prometheus_client import REGISTRY

from defectkit.models import ModelIntegrityError, ModelMetadata, build_model, load_model, save_model
from defectkit.preprocess import PreprocessSpec, to_model_input
from defectkit.serving.batching import BatchConfig
from defectkit.serving.breaker import BreakerConfig
from defectkit.serving.faults import FaultConfig
from defectkit.serving.predictor import (
    DefectPredictor,
    ModelFailed,
    ModelTimedOut,
    ModelUnavailable,
    ServingConfig,
    model_version,
)
from defectkit.serving.kserve_runtime import import_kserve
from defectkit.cli import build_parser
from defectkit.cli.serve import config_from_args
from defectkit.serving.server import resolve_model

import_kserve()  # kserve parses sys.argv when first imported, where pytest's own options could abort it

from kserve import InferInput, InferRequest  # noqa: E402
from kserve.errors import InvalidInput  # noqa: E402
from kserve.protocol.infer_type import RequestedOutput  # noqa: E402

SIZE = 32


def _save(out: Path, *, seed: int, size: int = SIZE, threshold: float | None = 0.5) -> Path:
    torch.manual_seed(seed)
    metadata = ModelMetadata(architecture="resnet18", classes=("good", "scratch"),
                             preprocess=PreprocessSpec(image_size=size), threshold=threshold)
    return save_model(build_model("resnet18"), metadata, out)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("serving-models")
    _save(root / "primary", seed=0)
    _save(root / "fallback", seed=1)
    _save(root / "fallback48", seed=2, size=48)
    return root


@pytest.fixture(scope="module")
def files(sample_dir) -> list[bytes]:
    paths = sorted(sample_dir.glob("test/*/*.jpg"))[:6]
    return [p.read_bytes() for p in paths]


def _predictor(models_dir: Path, *, fallback: str | None = None, **config) -> DefectPredictor:
    predictor = DefectPredictor("defectkit", models_dir / "primary",
                                fallback_dir=None if fallback is None else models_dir / fallback,
                                config=ServingConfig(**config))
    predictor.load()
    return predictor


def _bytes_request(files: list[bytes], **kwargs) -> InferRequest:
    infer_input = InferInput("image", [len(files)], "BYTES")
    infer_input.set_data_from_numpy(np.array(files, dtype=object), binary_data=True)
    return InferRequest("defectkit", [infer_input], **kwargs)


def _tensor_request(name: str, datatype: str, values, shape=None) -> InferRequest:
    array = np.asarray(values)
    return InferRequest("defectkit", [InferInput(name, list(shape or array.shape), datatype,
                                                 data=array.reshape(-1).tolist())])


def _run(predictor: DefectPredictor, *requests: InferRequest, concurrent: bool = False) -> list:
    """Outcomes (responses or exceptions) of the requests, one after the other or all at once."""

    async def scenario():
        if concurrent:
            return await asyncio.gather(*(predictor.predict(r) for r in requests), return_exceptions=True)
        outcomes = []
        for request in requests:
            try:
                outcomes.append(await predictor.predict(request))
            except Exception as exc:  # noqa: BLE001 - collected for the assertions
                outcomes.append(exc)
        return outcomes

    return asyncio.run(scenario())


def _outputs(response) -> tuple[np.ndarray, list[str]]:
    score = response.get_output_by_name("score").data
    label = [v.decode() for v in response.get_output_by_name("label").data]
    return np.asarray(score), label


def _counter(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_scores_equal_defect_model_scores_for_files_and_pixels(models_dir, files):
    predictor = _predictor(models_dir)
    model = load_model(models_dir / "primary", "cpu")
    pixels = np.stack([to_model_input(f, model.metadata.preprocess) for f in files])
    expected = model.scores(pixels)
    version = model_version(model.metadata)
    before = _counter("defectkit_predictions_total", model_version=version, label="defect") + \
        _counter("defectkit_predictions_total", model_version=version, label="good")

    as_files, as_uint8, as_float = _run(
        predictor, _bytes_request(files, request_id="r1"), _tensor_request("pixels", "UINT8", pixels),
        _tensor_request("pixels", "FP32", pixels.astype(np.float32)))
    singles = _run(predictor, *(_bytes_request([f]) for f in files), concurrent=True)
    predictor.stop()

    for response in (as_files, as_uint8, as_float):
        scores, labels = _outputs(response)
        np.testing.assert_allclose(scores, expected, atol=1e-5, rtol=0)
        assert labels == ["defect" if s >= 0.5 else "good" for s in scores]
        assert response.model_version == version == predictor.version
    assert as_files.id == "r1"
    # Micro-batched together, each request still gets its own image's score.
    np.testing.assert_allclose(np.concatenate([_outputs(r)[0] for r in singles]), expected, atol=1e-5, rtol=0)
    after = _counter("defectkit_predictions_total", model_version=version, label="defect") + \
        _counter("defectkit_predictions_total", model_version=version, label="good")
    assert after - before == 4 * len(files)


def test_bad_inputs_are_invalid_input_with_a_clear_message(models_dir, files):
    predictor = _predictor(models_dir, max_images=3)
    two_inputs = _bytes_request(files[:1])
    two_inputs.inputs.append(two_inputs.inputs[0])
    zeros = np.zeros((1, SIZE, SIZE, 3), np.uint8)
    cases = [
        (_tensor_request("features", "FP32", [1.0]), "unknown input 'features'"),
        (two_inputs, "exactly one input"),
        (_tensor_request("image", "FP32", [1.0]), "must be BYTES"),
        (_tensor_request("pixels", "UINT8", np.zeros((1, 16, 16, 3), np.uint8)), f"[N, {SIZE}, {SIZE}, 3]"),
        (_tensor_request("pixels", "INT32", zeros), "UINT8 or FP32"),
        (_tensor_request("pixels", "UINT8", zeros.astype(int) + 300), "within 0-255"),
        (_tensor_request("pixels", "UINT8", zeros.astype(float) + 0.5), "expected integers"),
        (_tensor_request("pixels", "FP32", np.full(zeros.shape, np.nan)), "within 0-255"),
        (_tensor_request("pixels", "UINT8", [1, 2, 3], shape=[1, SIZE, SIZE, 3]), "does not fit"),
        (_bytes_request([b"GIF89a not really"]), "unsupported_format"),
        (_bytes_request([files[0][: len(files[0]) // 3]]), "the image was rejected"),
        (_bytes_request(files[:1] + [b""]), "image 1 was rejected (empty)"),
        (_bytes_request(files[:4]), "more than the limit of 3"),
        (InferRequest("defectkit", [InferInput("image", [0], "BYTES", data=[])]), "no images"),
        (InferRequest("defectkit", [InferInput("image", [1], "BYTES", data=["%%%"])]), "not base64"),
        (_bytes_request(files[:1], request_outputs=[RequestedOutput("heatmap")]), "unknown output 'heatmap'"),
    ]
    outcomes = _run(predictor, *(request for request, _ in cases))
    outcomes.append(_run_dict(predictor))
    predictor.stop()
    for (_, message), outcome in zip(cases, outcomes, strict=False):
        assert isinstance(outcome, InvalidInput), f"{message}: got {outcome!r}"
        assert message in str(outcome)
    assert isinstance(outcomes[-1], InvalidInput) and "Open Inference Protocol v2" in str(outcomes[-1])


def _run_dict(predictor: DefectPredictor):
    try:
        asyncio.run(predictor.predict({"instances": [[1, 2]]}))
    except InvalidInput as exc:
        return exc
    return None


def test_json_bytes_are_base64_files(models_dir, files):
    import base64

    predictor = _predictor(models_dir)
    request = InferRequest("defectkit", [InferInput("image", [1], "BYTES",
                                                    data=[base64.b64encode(files[0]).decode()])])
    (response,) = _run(predictor, request)
    (binary,) = _run(predictor, _bytes_request(files[:1]))
    predictor.stop()
    assert _outputs(response)[0][0] == pytest.approx(_outputs(binary)[0][0], abs=1e-6)


def test_failing_primary_opens_the_breaker_the_fallback_answers_and_a_probe_recovers(models_dir, files):
    predictor = _predictor(models_dir, fallback="fallback", faults=FaultConfig(error_rate=1.0, duration_s=0.4),
                           breaker=BreakerConfig(failures=2, window_s=10, cooldown_s=0.6))
    fallback_version = model_version(load_model(models_dir / "fallback", "cpu").metadata)
    errors = "defectkit_model_failures_total"
    before = _counter(errors, model_version=predictor.version, kind="error")
    first = _run(predictor, *(_bytes_request(files[:2]) for _ in range(4)))
    assert all(r.model_version == fallback_version for r in first)  # nobody saw the failures
    assert predictor.breaker_state == "open"
    assert _counter(errors, model_version=predictor.version, kind="error") - before == 2  # then it stopped trying
    time.sleep(0.7)  # the faults have ended and the cool-down passed: the next request probes the primary
    (probe, after) = _run(predictor, _bytes_request(files[:2]), _bytes_request(files[:2]))
    predictor.stop()
    assert probe.model_version == after.model_version == predictor.version
    assert predictor.breaker_state == "closed"
    expected = load_model(models_dir / "fallback", "cpu").scores(
        np.stack([to_model_input(f, PreprocessSpec(image_size=SIZE)) for f in files[:2]]))
    np.testing.assert_allclose(_outputs(first[0])[0], expected, atol=1e-5, rtol=0)


def test_without_a_fallback_failures_are_500s_then_the_open_circuit_is_a_503(models_dir, files):
    predictor = _predictor(models_dir, faults=FaultConfig(error_rate=1.0),
                           breaker=BreakerConfig(failures=2, window_s=10, cooldown_s=30))
    outcomes = _run(predictor, *(_bytes_request(files[:1]) for _ in range(3)))
    predictor.stop()
    assert [type(o) for o in outcomes] == [ModelFailed, ModelFailed, ModelUnavailable]
    assert "injected model failure" in str(outcomes[0])
    assert "circuit breaker is open" in str(outcomes[2]) and 29 < outcomes[2].retry_after_s <= 30


def test_slow_model_times_out_and_trips_the_breaker(models_dir, files):
    predictor = _predictor(models_dir, faults=FaultConfig(latency_ms=300), timeout_s=0.05,
                           breaker=BreakerConfig(failures=2, window_s=10, cooldown_s=30))
    before = _counter("defectkit_model_failures_total", model_version=predictor.version, kind="timeout")
    started = time.perf_counter()
    outcomes = _run(predictor, *(_bytes_request(files[:1]) for _ in range(3)))
    seconds = time.perf_counter() - started
    predictor.stop()
    assert [type(o) for o in outcomes] == [ModelTimedOut, ModelTimedOut, ModelUnavailable]
    assert "did not answer within 0.05 s" in str(outcomes[0])
    assert seconds < 0.25  # nobody waited for the slow model
    assert _counter("defectkit_model_failures_total", model_version=predictor.version, kind="timeout") - before == 2


def test_score_shift_moves_scores_and_labels(models_dir, files):
    plain = _predictor(models_dir)
    shifted = _predictor(models_dir, faults=FaultConfig(score_shift=0.3))
    (a,), (b,) = _run(plain, _bytes_request(files)), _run(shifted, _bytes_request(files))
    plain.stop()
    shifted.stop()
    scores, _ = _outputs(a)
    shifted_scores, labels = _outputs(b)
    np.testing.assert_allclose(shifted_scores, np.minimum(scores + 0.3, 1.0), atol=1e-6)
    assert labels == ["defect" if s >= 0.5 else "good" for s in shifted_scores]


def test_a_fallback_with_another_input_size_decodes_the_files_again(models_dir, files):
    predictor = _predictor(models_dir, fallback="fallback48", faults=FaultConfig(error_rate=1.0))
    (response, pixels_outcome) = _run(
        predictor, _bytes_request(files[:3]),
        _tensor_request("pixels", "UINT8", np.zeros((1, SIZE, SIZE, 3), np.uint8)))
    predictor.stop()
    fallback = load_model(models_dir / "fallback48", "cpu")
    expected = fallback.scores(np.stack([to_model_input(f, fallback.metadata.preprocess) for f in files[:3]]))
    np.testing.assert_allclose(_outputs(response)[0], expected, atol=1e-5, rtol=0)
    assert isinstance(pixels_outcome, ModelUnavailable) and "48 px" in str(pixels_outcome)


def test_loading_verifies_weights_and_needs_a_threshold(models_dir, tmp_path):
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    for name in ("model.json", "model.safetensors"):
        (tampered / name).write_bytes((models_dir / "primary" / name).read_bytes())
    data = bytearray((tampered / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (tampered / "model.safetensors").write_bytes(bytes(data))
    predictor = DefectPredictor("defectkit", tampered)
    with pytest.raises(ModelIntegrityError, match="sha256"):
        predictor.load()
    assert not predictor.ready
    unjudged = _save(tmp_path / "unjudged", seed=0, threshold=None)
    with pytest.raises(ValueError, match="no decision threshold"):
        DefectPredictor("defectkit", unjudged).load()


def test_metadata_names_inputs_outputs_and_version(models_dir):
    predictor = DefectPredictor("defectkit", models_dir / "primary", version="7")
    assert not predictor.ready  # nothing loaded yet
    assert predictor.metadata() == {
        "name": "defectkit", "versions": ["7"], "platform": "pytorch_torchvision",
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [-1]},
                   {"name": "pixels", "datatype": "UINT8", "shape": [-1, SIZE, SIZE, 3]}],
        "outputs": [{"name": "score", "datatype": "FP32", "shape": [-1]},
                    {"name": "label", "datatype": "BYTES", "shape": [-1]}]}


def test_resolve_model_for_directories(models_dir, tmp_path):
    assert resolve_model(str(models_dir / "primary"), tmp_path, tracking_uri=None) == (models_dir / "primary", None)
    with pytest.raises(FileNotFoundError, match="not a model artifact directory"):
        resolve_model(str(tmp_path), tmp_path, tracking_uri=None)
    with pytest.raises(ValueError, match="--tracking-uri"):
        resolve_model("models:/defectkit@champion", tmp_path, tracking_uri=None)


def test_serve_command_options():
    parser = build_parser()
    args = parser.parse_args(["serve", "--model", "m", "--port", "9000", "--max-batch", "4", "--max-wait-ms", "2",
                              "--fault-error-rate", "0.2", "--fault-latency-ms", "50", "--fault-score-shift", "0.1",
                              "--breaker-failures", "3", "--max-body-mb", "2"])
    assert args.func.__name__ == "cmd_serve"
    assert (args.host, args.fallback, args.served_name, args.tracking_uri) == ("127.0.0.1", None, "defectkit", None)
    config = config_from_args(args)
    assert dataclasses.replace(config.batch, workers=1) == BatchConfig(max_batch=4, max_wait_ms=2, workers=1)
    assert config.faults == FaultConfig(error_rate=0.2, latency_ms=50, score_shift=0.1)
    assert config.breaker.failures == 3
    with pytest.raises(ValueError, match="error_rate"):
        config_from_args(parser.parse_args(["serve", "--model", "m", "--fault-error-rate", "2"]))
