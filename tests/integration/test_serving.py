"""The model server as a real process on 127.0.0.1, spoken to with tritonclient and plain HTTP.

Three servers start together: the judged model with a fallback (conformance,
parity with evaluation, bad input, limits, metrics); a primary from the
registry that fails on purpose for its first requests (circuit breaker,
fallback, recovery); and a model slower than its timeout with no fallback
(504s, then 503s).
"""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import os
import struct
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import requests
import torch
import tritonclient.http as triton
import yaml
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from defectkit import registry, storage
from defectkit.delivery.analysis import BF16_PROBE_TOLERANCE
from defectkit.evaluation import evaluate
from defectkit.export import export_onnx
from defectkit.exported import PARITY_TOLERANCE
from defectkit.models import ModelMetadata, build_model, save_model
from defectkit.preprocess import PreprocessSpec, load_split
from tests.conftest import S3_BUCKET, TINY_IMAGE_SIZE
from tests.servers import ServerProcess, free_port, start_server

REPO = Path(__file__).resolve().parents[2]
_SPEC = Path("shared", "schemas", "kserve", "rest_predict_v2.yaml")
OIP_SPEC = next((root / _SPEC for root in (REPO, REPO.parent) if (root / _SPEC).is_file()), REPO.parent / _SPEC)
NAME = "defectkit"
MAX_BODY_MB = 1


def oip_errors(body: object, schema_name: str) -> list[str]:
    """Violations of the Open Inference Protocol REST spec's ``schema_name`` object."""
    components = yaml.safe_load(OIP_SPEC.read_text())["components"]
    schema = {**components["schemas"][schema_name], "components": components}
    return sorted(e.message for e in jsonschema.Draft7Validator(schema).iter_errors(body))


@dataclass
class Served:
    server: ServerProcess
    version: str  # the primary's model version
    fallback_version: str

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def infer_url(self) -> str:
        return f"{self.url}/v2/models/{NAME}/infer"

    def client(self) -> triton.InferenceServerClient:
        return triton.InferenceServerClient(self.url.removeprefix("http://"))


def _save(out: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    metadata = ModelMetadata(architecture="resnet18", classes=("good", "scratch"),
                             preprocess=PreprocessSpec(image_size=TINY_IMAGE_SIZE), threshold=0.5)
    return save_model(build_model("resnet18"), metadata, out)


@pytest.fixture(scope="module")
def judged(preprocessed_dir, tmp_path_factory):
    """A model judged by evaluation (threshold from validation, scores of the test split kept)."""
    root = tmp_path_factory.mktemp("serving-judged")
    return evaluate(_save(root / "trained", seed=0), preprocessed_dir, root / "evaluation", device="cpu")


@pytest.fixture(scope="module")
def exported(judged, preprocessed_dir, tmp_path_factory) -> Path:
    """A copy of the judged model with its ONNX export, its parity checked on eight test images."""
    target = tmp_path_factory.mktemp("serving-exported") / "model"
    target.mkdir()
    for name in ("model.json", "model.safetensors"):
        (target / name).write_bytes((judged.model_dir / name).read_bytes())
    export_onnx(target, load_split(preprocessed_dir, "test").images[:8])
    return target


@pytest.fixture(scope="module")
def servers(judged, exported, tmp_path_factory):
    root = tmp_path_factory.mktemp("serving")
    fallback = _save(root / "fallback", seed=1)
    fallback_version = json.loads((fallback / "model.json").read_text())["weights_sha256"][:12]
    version = judged.metrics["weights_sha256"][:12]
    config = registry.RegistryConfig.embedded(root / "registry")
    registered = registry.register(config, judged.model_dir, params={}, tags={})

    def start(label: str, *args: str) -> ServerProcess:
        port = free_port()
        return start_server(
            [sys.executable, "-m", "defectkit", "serve", "--port", str(port), "--served-name", NAME, *args],
            url=f"http://127.0.0.1:{port}", health_path="/v2/health/ready", log_path=root / f"{label}.log",
            env={"PYTHONPATH": str(REPO)}, timeout=120,
        )

    plans = {
        "main": ("--model", str(judged.model_dir), "--fallback", str(fallback), "--max-body-mb", str(MAX_BODY_MB)),
        "failing": ("--model", f"models:/{config.model_name}@challenger", "--tracking-uri", config.tracking_uri,
                    "--fallback", str(fallback), "--fault-error-rate", "1", "--fault-duration-s", "1.5",
                    "--breaker-failures", "2", "--breaker-cooldown-s", "1"),
        "slow": ("--model", str(judged.model_dir), "--fault-latency-ms", "800", "--timeout-s", "0.2",
                 "--breaker-failures", "2", "--breaker-cooldown-s", "60"),
        # What a GPU serves in, here on the CPU.
        "bf16": ("--model", str(judged.model_dir), "--precision", "bf16"),
        # The ONNX export, which runtime auto picks on a CPU.
        "onnx": ("--model", str(exported)),
    }
    with concurrent.futures.ThreadPoolExecutor(len(plans)) as pool:
        futures = {label: pool.submit(start, label, *args) for label, args in plans.items()}
    started = {label: f.result() for label, f in futures.items() if f.exception() is None}
    try:
        for future in futures.values():
            if future.exception() is not None:
                raise future.exception()
        yield {
            "main": Served(started["main"], version, fallback_version),
            "failing": Served(started["failing"], registered.version, fallback_version),
            "slow": Served(started["slow"], version, ""),
            "bf16": Served(started["bf16"], version, ""),
            "onnx": Served(started["onnx"], version, ""),
        }
    finally:
        for server in started.values():
            server.stop()


def _test_split(preprocessed_dir, dataset_dir) -> list[bytes]:
    return [(dataset_dir / path).read_bytes() for path in load_split(preprocessed_dir, "test").paths]


def _bytes_input(files: list[bytes]) -> triton.InferInput:
    infer_input = triton.InferInput("image", [len(files)], "BYTES")
    infer_input.set_data_from_numpy(np.array(files, dtype=np.object_), binary_data=True)
    return infer_input


def _infer_files(served: Served, files: list[bytes]) -> tuple[np.ndarray, list[str], str]:
    result = served.client().infer(NAME, [_bytes_input(files)])
    labels = [v.decode() for v in result.as_numpy("label")]
    return result.as_numpy("score"), labels, result.get_response()["model_version"]


def _jpeg(size: int = 40, color=(120, 130, 140)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, "JPEG")
    return buffer.getvalue()


def _metrics(served: Served) -> dict[tuple[str, tuple], float]:
    text = requests.get(f"{served.url}/metrics", timeout=10).text
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def _sample(metrics: dict, name: str, **labels) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


# --------------------------------------------------------------------------- conformance


def test_health_metadata_and_errors_conform_to_the_oip_spec(servers):
    served = servers["main"]
    assert requests.get(f"{served.url}/v2/health/live", timeout=5).json() == {"live": True}
    assert requests.get(f"{served.url}/v2/health/ready", timeout=5).json() == {"ready": True}
    assert requests.get(f"{served.url}/v2/models/{NAME}/ready", timeout=5).status_code == 200

    server_metadata = requests.get(f"{served.url}/v2", timeout=5).json()
    assert oip_errors(server_metadata, "metadata_server_response") == []

    metadata = requests.get(f"{served.url}/v2/models/{NAME}", timeout=5).json()
    assert oip_errors(metadata, "metadata_model_response") == []
    assert metadata["versions"] == [served.version]
    assert {t["name"]: t["shape"] for t in metadata["inputs"]} == {
        "image": [-1], "pixels": [-1, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, 3]}

    missing = requests.get(f"{served.url}/v2/models/nope", timeout=5)
    assert missing.status_code == 404 and oip_errors(missing.json(), "metadata_model_error_response") == []
    missing = requests.post(f"{served.url}/v2/models/nope/infer", json={}, timeout=5)
    assert missing.status_code == 404 and "serves model 'defectkit'" in missing.json()["error"]

    client = served.client()
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(NAME)
    assert client.get_model_metadata(NAME)["versions"] == [served.version]


def test_listens_on_loopback_only(servers):
    port = int(servers["main"].url.rsplit(":", 1)[1])
    table = Path("/proc/net/tcp")
    if not table.is_file():
        pytest.skip("needs Linux /proc/net/tcp")
    listening = [line.split()[1] for line in table.read_text().splitlines()[1:]
                 if line.split()[3] == "0A" and int(line.split()[1].split(":")[1], 16) == port]
    assert listening == [f"0100007F:{port:04X}"]


def test_json_requests_and_responses_conform(servers, preprocessed_dir, dataset_dir):
    served = servers["main"]
    files = _test_split(preprocessed_dir, dataset_dir)[:2]
    body = {"id": "req-1", "inputs": [{"name": "image", "datatype": "BYTES", "shape": [2],
                                       "data": [base64.b64encode(f).decode() for f in files]}]}
    assert oip_errors(body, "inference_request") == []
    response = requests.post(served.infer_url, json=body, timeout=10)
    assert response.status_code == 200, response.text
    record = response.json()
    assert oip_errors(record, "inference_response") == []
    assert record["id"] == "req-1" and record["model_name"] == NAME and record["model_version"] == served.version
    outputs = {o["name"]: o for o in record["outputs"]}
    assert outputs["score"]["datatype"] == "FP32" and outputs["score"]["shape"] == [2]
    assert outputs["label"]["datatype"] == "BYTES" and set(outputs["label"]["data"]) <= {"good", "defect"}
    scores, _, _ = _infer_files(served, files)
    np.testing.assert_allclose(outputs["score"]["data"], scores, atol=1e-6)

    # Decoded pixels, in tritonclient's JSON mode (which needs the content type said out loud).
    pixels = np.random.default_rng(0).integers(0, 256, (2, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, 3), dtype=np.uint8)
    results = {}
    for datatype, array in (("UINT8", pixels), ("FP32", pixels.astype(np.float32))):
        infer_input = triton.InferInput("pixels", list(array.shape), datatype)
        infer_input.set_data_from_numpy(array, binary_data=False)
        result = served.client().infer(NAME, [infer_input], headers={"Content-Type": "application/json"},
                                       outputs=[triton.InferRequestedOutput("score", binary_data=False)])
        assert oip_errors(result.get_response(), "inference_response") == []
        results[datatype] = result.as_numpy("score")
    np.testing.assert_allclose(results["UINT8"], results["FP32"], atol=1e-6)


def test_scores_equal_evaluation_for_the_same_files(servers, judged, preprocessed_dir, dataset_dir):
    """The server decodes raw files with the model's own model.json spec: scores match evaluate() to 1e-5."""
    served = servers["main"]
    files = _test_split(preprocessed_dir, dataset_dir)
    scores, labels, version = _infer_files(served, files)
    np.testing.assert_allclose(scores, judged.test_scores, atol=1e-5, rtol=0)
    threshold = judged.metrics["threshold"]
    assert labels == ["defect" if s >= threshold else "good" for s in judged.test_scores]
    assert version == served.version

    # One image per request from 8 threads at once: micro-batched together, still each its own score.
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        singles = list(pool.map(lambda f: _infer_files(served, [f])[0][0], files))
    np.testing.assert_allclose(singles, judged.test_scores, atol=1e-5, rtol=0)


def test_every_answer_names_its_precision_and_bf16_stays_within_the_probe_tolerance(servers, judged,
                                                                                    preprocessed_dir, dataset_dir):
    files = _test_split(preprocessed_dir, dataset_dir)
    answers = {}
    for label in ("main", "bf16"):
        result = servers[label].client().infer(NAME, [_bytes_input(files)])
        answers[label] = result.get_response()["parameters"]["precision"], result.as_numpy("score")
    assert answers["main"][0] == "fp32" and answers["bf16"][0] == "bf16"
    drift = np.abs(answers["bf16"][1] - judged.test_scores)
    assert 0 < drift.max() <= BF16_PROBE_TOLERANCE, drift.max()  # it does round, and no further than allowed


def test_the_onnx_export_is_served_with_the_scores_of_evaluation(servers, judged, preprocessed_dir, dataset_dir):
    served = servers["onnx"]
    metadata = requests.get(f"{served.url}/v2/models/{NAME}", timeout=10).json()
    assert metadata["platform"] == "onnxruntime_onnx"
    assert requests.get(f"{servers['main'].url}/v2/models/{NAME}", timeout=10).json()["platform"] \
        == "pytorch_torchvision"
    files = _test_split(preprocessed_dir, dataset_dir)
    result = served.client().infer(NAME, [_bytes_input(files)])
    assert result.get_response()["parameters"]["precision"] == "fp32"
    np.testing.assert_allclose(result.as_numpy("score"), judged.test_scores, atol=PARITY_TOLERANCE, rtol=0)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:  # micro-batched through ONNX Runtime too
        singles = list(pool.map(lambda f: _infer_files(served, [f])[0][0], files))
    np.testing.assert_allclose(singles, judged.test_scores, atol=PARITY_TOLERANCE, rtol=0)


def _maps_torchvision(pid: int) -> bool:
    return "torchvision" in Path(f"/proc/{pid}/maps").read_text()


def test_a_server_scoring_the_export_builds_the_torch_module_only_when_fp32_pixels_come(servers):
    served = servers["onnx"]
    assert not _maps_torchvision(served.server.pid)  # started and answered above without torchvision
    pixels = np.random.default_rng(1).integers(0, 256, (2, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, 3), dtype=np.uint8)
    scores = {}
    for datatype, array in (("UINT8", pixels), ("FP32", pixels.astype(np.float32))):
        infer_input = triton.InferInput("pixels", list(array.shape), datatype)
        infer_input.set_data_from_numpy(array, binary_data=True)
        scores[datatype] = served.client().infer(NAME, [infer_input]).as_numpy("score")
        assert _maps_torchvision(served.server.pid) == (datatype == "FP32")
    # ONNX Runtime for the uint8 pixels, PyTorch for the same values in FP32: the export's parity.
    np.testing.assert_allclose(scores["UINT8"], scores["FP32"], atol=PARITY_TOLERANCE, rtol=0)
    assert served.server.log_path.read_text().count("building the torch module for FP32 pixels") == 1


def test_runtime_onnxruntime_without_an_export_stops_the_server_with_the_reason(judged):
    result = subprocess.run([sys.executable, "-m", "defectkit", "serve", "--model", str(judged.model_dir),
                             "--runtime", "onnxruntime", "--port", str(free_port())], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 2
    assert "carries no ONNX export (model.onnx)" in result.stderr


# --------------------------------------------------------------------------- bad input


def _png_bomb(side: int = 7200) -> bytes:
    """A valid grey PNG of side x side (more pixels than the decoder's limit) that compresses to about 50 KB."""
    compressor = zlib.compressobj(9)
    row = b"\x00" * (side + 1)
    data = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def _binary(header: dict, blob: bytes) -> dict:
    """requests.post keyword arguments for a body in the binary data extension."""
    head = json.dumps(header).encode()
    return {"data": head + blob, "headers": {"Inference-Header-Content-Length": str(len(head))}}


def test_bad_requests_get_a_clear_4xx_and_the_server_stays_up(servers):
    served = servers["main"]
    good = _jpeg()
    bomb = _png_bomb()
    declared_too_much = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                     "parameters": {"binary_data_size": 50}}]}
    truncated_tensor = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                    "parameters": {"binary_data_size": 10}}]}
    oversized = b"x" * (MAX_BODY_MB * (1 << 20) + 1)
    cases = [
        ("garbage bytes", dict(data=os.urandom(300), headers={"Content-Type": "application/octet-stream"}), 400,
         "not valid JSON"),
        ("garbage JSON header", _binary({"x": 1}, b"zz"), 400, "inputs"),
        ("wrong datatype", dict(json={"inputs": [{"name": "image", "datatype": "FP32", "shape": [1],
                                                  "data": [1.0]}]}), 400, "must be BYTES"),
        ("wrong shape", dict(json={"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 8, 8, 3],
                                               "data": [0] * 192}]}), 400, "[N, 32, 32, 3]"),
        ("data does not fit shape", dict(json={"inputs": [{"name": "pixels", "datatype": "UINT8",
                                                           "shape": [1, 32, 32, 3], "data": [1, 2]}]}), 400,
         "does not fit"),
        ("not an image", _binary({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                              "parameters": {"binary_data_size": 4 + 11}}]},
                                 struct.pack("<I", 11) + b"hello world"), 400, "unsupported_format"),
        ("binary size beyond the body", _binary(declared_too_much, b"abc"), 400, "binary_data_size 50"),
        ("truncated BYTES tensor", _binary(truncated_tensor, struct.pack("<I", 100) + b"abcdef"), 400,
         "4-byte little-endian length"),
        ("decompression bomb", dict(json={"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                                      "data": [base64.b64encode(bomb).decode()]}]}), 400,
         "too_large"),
        ("oversized body", dict(data=oversized, headers={"Content-Type": "application/json"}), 413,
         "--max-body-mb"),
        ("oversized chunked body", dict(data=iter([oversized[:700_000], oversized[700_000:]]),
                                        headers={"Content-Type": "application/json"}), 413, "larger than the limit"),
    ]
    assert len(bomb) < 100_000
    for label, kwargs, status, message in cases:
        response = requests.post(served.infer_url, timeout=30, **kwargs)
        assert response.status_code == status, f"{label}: {response.status_code} {response.text[:300]}"
        error = response.json()
        assert oip_errors(error, "inference_error_response") == [] and message in error["error"], label
        scores, _, _ = _infer_files(served, [good])  # and the next good request is served
        assert scores.shape == (1,), label
    # tritonclient sees the 400 as an exception carrying the server's message.
    with pytest.raises(triton.InferenceServerException, match="unsupported_format"):
        served.client().infer(NAME, [_bytes_input([b"%PDF-1.4 not an image"])])
    assert served.server.process.poll() is None
    metrics = _metrics(served)
    assert _sample(metrics, "defectkit_requests_total", model_version=served.version, status="400") >= 9
    assert _sample(metrics, "defectkit_requests_total", model_version=served.version, status="413") >= 2


def test_metrics_by_model_version(servers, preprocessed_dir, dataset_dir):
    served = servers["main"]
    before = _metrics(served)
    files = _test_split(preprocessed_dir, dataset_dir)
    _, labels, _ = _infer_files(served, files)
    after = _metrics(served)

    def delta(name: str, **labels) -> float:
        return _sample(after, name, model_version=served.version, **labels) - \
            _sample(before, name, model_version=served.version, **labels)

    assert delta("defectkit_requests_total", status="200") == 1
    assert delta("defectkit_request_latency_seconds_count") == 1
    assert delta("defectkit_score_count") == len(files)
    assert delta("defectkit_score_bucket", le="+Inf") == len(files)
    assert delta("defectkit_predictions_total", label="defect") == labels.count("defect")
    assert delta("defectkit_predictions_total", label="good") == labels.count("good")
    assert delta("defectkit_batch_size_sum") == len(files)
    assert _sample(after, "defectkit_breaker_state", model_version=served.version) == 0
    loaded = {dict(labels)["role"]: (dict(labels)["model_version"], value)
              for (name, labels), value in after.items() if name == "defectkit_model_info"}
    assert loaded == {"primary": (served.version, 1.0), "fallback": (served.fallback_version, 1.0)}


# --------------------------------------------------------------------------- failing models


def test_failing_primary_is_answered_by_the_fallback_until_it_recovers(servers):
    """The primary (registry version, made to fail for 1.5 s) trips the breaker; the fallback answers; after
    the faults end, a half-open probe succeeds and the primary answers again."""
    served = servers["failing"]
    assert requests.get(f"{served.url}/v2/models/{NAME}", timeout=5).json()["versions"] == [served.version]
    files = [_jpeg()]
    answered_by = []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        scores, _, version = _infer_files(served, files)  # every request succeeds, whoever answers
        answered_by.append(version)
        if version == served.version:
            break
        time.sleep(0.1)
    assert answered_by[0] == served.fallback_version
    assert answered_by[-1] == served.version, f"the primary never came back: {answered_by}"
    metrics = _metrics(served)
    # Two failures opened the circuit; at least one more probe failed while the faults lasted.
    assert _sample(metrics, "defectkit_model_failures_total", model_version=served.version, kind="error") >= 2
    assert _sample(metrics, "defectkit_model_failures_total", model_version=served.version, kind="error") < \
        len(answered_by)
    assert _sample(metrics, "defectkit_requests_total", model_version=served.fallback_version, status="200") == \
        len(answered_by) - 1
    assert _sample(metrics, "defectkit_breaker_state", model_version=served.version) == 0


def test_slow_model_without_fallback_times_out_then_its_circuit_opens(servers):
    served = servers["slow"]
    statuses, bodies, retry_after = [], [], None
    for _ in range(3):
        response = requests.post(served.infer_url, timeout=10, json={
            "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                        "data": [base64.b64encode(_jpeg()).decode()]}]})
        statuses.append(response.status_code)
        bodies.append(response.json()["error"])
        retry_after = response.headers.get("retry-after")
    assert statuses == [504, 504, 503]
    assert "did not answer within 0.2 s" in bodies[0]
    assert "circuit breaker is open" in bodies[2] and "no fallback" in bodies[2]
    assert retry_after is not None and 1 <= int(retry_after) <= 60
    assert requests.get(f"{served.url}/v2/health/live", timeout=5).status_code == 200
    metrics = _metrics(served)
    assert _sample(metrics, "defectkit_model_failures_total", model_version=served.version, kind="timeout") == 2
    assert _sample(metrics, "defectkit_breaker_state", model_version=served.version) == 1
    assert _sample(metrics, "defectkit_requests_total", model_version=served.version, status="503") == 1


def test_tampered_weights_stop_the_server_before_it_listens(judged, tmp_path):
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    (tampered / "model.json").write_bytes((judged.model_dir / "model.json").read_bytes())
    weights = bytearray((judged.model_dir / "model.safetensors").read_bytes())
    weights[-1] ^= 0xFF
    (tampered / "model.safetensors").write_bytes(bytes(weights))
    result = subprocess.run([sys.executable, "-m", "defectkit", "serve", "--model", str(tampered), "--port",
                             str(free_port())], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 2
    assert "sha256" in result.stderr and "does not match" in result.stderr


@pytest.fixture(params=["gs", "s3"])
def object_store(request) -> str:
    """A model-store root URI on a real object storage API on 127.0.0.1 (GCS emulator, or moto's S3)."""
    if request.param == "gs":
        request.getfixturevalue("gcs_emulator")
        return "gs://defectkit-test/models"
    request.getfixturevalue("s3_server")
    return f"s3://{S3_BUCKET}/models"


def test_fallback_in_object_storage_is_downloaded_at_start_and_answers(judged, object_store, tmp_path):
    """What a KServe pod does: the storage initializer brings only the primary; the server fetches the fallback."""
    previous = _save(tmp_path / "previous", seed=2)
    previous_version = json.loads((previous / "model.json").read_text())["weights_sha256"][:12]
    uri = f"{object_store}/previous-champion"
    store = storage.Store(uri)
    for path in previous.iterdir():
        store.write(path.name, path.read_bytes())
    port = free_port()
    server = start_server(
        [sys.executable, "-m", "defectkit", "serve", "--port", str(port), "--served-name", NAME,
         "--model", str(judged.model_dir), "--fallback", uri,
         "--fault-error-rate", "1", "--breaker-failures", "1", "--breaker-cooldown-s", "60"],
        url=f"http://127.0.0.1:{port}", health_path="/v2/health/ready", log_path=tmp_path / "serve.log",
        env={"PYTHONPATH": str(REPO)}, timeout=120,
    )
    try:
        served = Served(server, judged.metrics["weights_sha256"][:12], previous_version)
        # The primary fails every call: the downloaded fallback answers, with its own version.
        _, _, version = _infer_files(served, [_jpeg()])
        assert version == previous_version != served.version
    finally:
        server.stop()


def test_a_fallback_that_cannot_be_fetched_stops_the_server_with_the_reason(judged, object_store, tmp_path):
    missing = f"{object_store}/no-such-model"
    result = subprocess.run([sys.executable, "-m", "defectkit", "serve", "--model", str(judged.model_dir),
                             "--fallback", missing, "--port", str(free_port())],
                            capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 2
    assert f"{missing} holds no model artifact" in result.stderr
    assert "model.json and model.safetensors" in result.stderr
