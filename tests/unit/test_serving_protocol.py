"""OIP v2 REST bodies: robust decoding of JSON and binary-extension requests, schema-conformant responses."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import yaml

from defectkit.serving.protocol import INFERENCE_HEADER, encode_response, error_body, parse_request
from defectkit.serving.kserve_runtime import import_kserve

import_kserve()  # kserve parses sys.argv when first imported, where pytest's own options could abort it

from kserve import InferOutput, InferResponse  # noqa: E402
from kserve.errors import InvalidInput  # noqa: E402

_SPEC = Path("shared", "schemas", "kserve", "rest_predict_v2.yaml")
_REPO = Path(__file__).resolve().parents[2]
OIP_SPEC = next((root / _SPEC for root in (_REPO, _REPO.parent) if (root / _SPEC).is_file()), _REPO.parent / _SPEC)


def oip_errors(body: dict, schema_name: str) -> list[str]:
    """Violations of the Open Inference Protocol REST spec's ``schema_name`` object."""
    components = yaml.safe_load(OIP_SPEC.read_text())["components"]
    schema = {**components["schemas"][schema_name], "components": components}
    return sorted(e.message for e in jsonschema.Draft7Validator(schema).iter_errors(body))


def _binary(header: dict, *blobs: bytes) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(header).encode()
    return head + b"".join(blobs), {INFERENCE_HEADER: str(len(head))}


def _bytes_tensor(*elements: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def test_json_request():
    body = json.dumps({"id": "r1", "parameters": {"p": 1},
                       "inputs": [{"name": "pixels", "datatype": "uint8", "shape": [1, 2, 2, 3],
                                   "data": list(range(12))}],
                       "outputs": [{"name": "score", "parameters": {"binary_data": True}}]}).encode()
    request = parse_request(body, {}, "m")
    assert request.model_name == "m" and request.id == "r1" and request.parameters == {"p": 1}
    (pixels,) = request.inputs
    assert (pixels.name, pixels.datatype, pixels.shape) == ("pixels", "UINT8", [1, 2, 2, 3])
    np.testing.assert_array_equal(pixels.as_numpy(), np.arange(12, dtype=np.uint8).reshape(1, 2, 2, 3))
    assert [o.name for o in request.request_outputs] == ["score"] and request.request_outputs[0].binary_data


def test_binary_request_with_image_bytes_that_are_not_utf8():
    jpeg_like = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\xff\xd9"
    header = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2],
                          "parameters": {"binary_data_size": 8 + 2 * len(jpeg_like)}},
                         {"name": "extra", "datatype": "FP32", "shape": [2], "data": [1.5, 2.5]}]}
    body, headers = _binary(header, _bytes_tensor(jpeg_like, jpeg_like[::-1]))
    request = parse_request(body, headers, "m")
    images, extra = request.inputs
    assert images.as_numpy().tolist() == [jpeg_like, jpeg_like[::-1]]
    assert extra.as_numpy().tolist() == [1.5, 2.5]


MALFORMED = [
    (b"", {}, "body is empty"),
    (b"not json", {}, "request body is not valid JSON"),
    (b"[1, 2]", {}, "must be a JSON object"),
    (b"{}", {}, "non-empty \"inputs\" list"),
    (b'{"inputs": {"name": "x"}}', {}, "non-empty \"inputs\" list"),
    (b'{"inputs": [5]}', {}, "inputs[0] must be an object"),
    (b'{"inputs": [{"datatype": "FP32", "shape": [1], "data": [1]}]}', {}, "non-empty string \"name\""),
    (b'{"inputs": [{"name": "x", "datatype": "FLOAT", "shape": [1], "data": [1]}]}', {}, "datatype 'FLOAT'"),
    (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1], "data": [1]}]}', {}, "non-negative integers"),
    (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [true], "data": [1]}]}', {}, "non-negative integers"),
    (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1]}]}', {}, "needs \"data\""),
    (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": 1}]}', {}, "needs \"data\""),
    (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1], "parameters": 3}]}', {},
     "\"parameters\" of input 'x'"),
    (b'{"id": 7, "inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}]}', {}, "\"id\""),
    (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}], "outputs": "score"}', {},
     "\"outputs\" must be a list"),
    (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}], "outputs": [{}]}', {},
     "string \"name\""),
    (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}]}', {INFERENCE_HEADER: "x"},
     "must be a non-negative integer"),
    (b'{"inputs": []}', {INFERENCE_HEADER: "999"}, "but the body has only"),
    (b'garbage!', {INFERENCE_HEADER: "4"}, "JSON header"),
]


@pytest.mark.parametrize(("body", "headers", "message"), MALFORMED)
def test_malformed_requests_are_invalid_input_naming_the_problem(body, headers, message):
    with pytest.raises(InvalidInput) as caught:
        parse_request(body, headers, "m")
    assert message in str(caught.value)


def test_binary_sizes_must_add_up_to_the_body():
    declared = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                            "parameters": {"binary_data_size": 100}}]}
    with pytest.raises(InvalidInput, match="only 10 bytes of binary data follow"):
        parse_request(*_binary(declared, b"0123456789"), "m")
    declared["inputs"][0]["parameters"]["binary_data_size"] = 4
    with pytest.raises(InvalidInput, match="10 bytes follow the JSON header but"):
        parse_request(*_binary(declared, b"0123456789"), "m")
    declared["inputs"][0]["parameters"]["binary_data_size"] = -1
    with pytest.raises(InvalidInput, match="binary_data_size must be a non-negative integer"):
        parse_request(*_binary(declared), "m")
    both = {"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "data": ["a"],
                        "parameters": {"binary_data_size": 1}}]}
    with pytest.raises(InvalidInput, match="both \"data\" and binary_data_size"):
        parse_request(*_binary(both, b"a"), "m")


def _response(**kwargs) -> InferResponse:
    outputs = [InferOutput("score", [2], "FP32", data=np.array([0.25, 0.75], np.float32)),
               InferOutput("label", [2], "BYTES", data=np.array([b"good", b"defect"], object))]
    return InferResponse(kwargs.pop("response_id", ""), "m", outputs, model_version="abc123", **kwargs)


def test_json_response_conforms_to_the_oip_schema():
    body, headers = encode_response(_response())
    assert headers["content-type"] == "application/json"
    record = json.loads(body)
    assert oip_errors(record, "inference_response") == []
    assert "parameters" not in record and len(record["id"]) == 32  # no nulls; a fresh id when none was given
    assert record["model_version"] == "abc123"
    assert record["outputs"] == [{"name": "score", "shape": [2], "datatype": "FP32", "data": [0.25, 0.75]},
                                 {"name": "label", "shape": [2], "datatype": "BYTES", "data": ["good", "defect"]}]


def test_binary_outputs_when_the_request_asks():
    request = parse_request(b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}], '
                            b'"outputs": [{"name": "score", "parameters": {"binary_data": true}}]}', {}, "m")
    body, headers = encode_response(_response(response_id="r9", requested_outputs=request.request_outputs))
    length = int(headers[INFERENCE_HEADER])
    header = json.loads(body[:length])
    assert header["id"] == "r9"
    assert [o["name"] for o in header["outputs"]] == ["score"]
    np.testing.assert_array_equal(np.frombuffer(body[length:], np.float32), [0.25, 0.75])


def test_error_body_conforms():
    assert oip_errors(json.loads(error_body("bad \"thing\"")), "inference_error_response") == []
    assert json.loads(error_body("bad")) == {"error": "bad"}
