"""The Open Inference Protocol v2 over REST, on the wire: request bodies in, response bodies out.

Both encodings of the protocol are accepted: a plain JSON body, and the
binary data extension (``Inference-Header-Content-Length``: a JSON header
followed by raw tensor bytes), which is how tritonclient sends images.

KServe 0.21 decodes these itself, but not robustly enough for untrusted
input: a binary BYTES tensor that is not UTF-8 (any JPEG or PNG) fails with
a 500, and a body missing ``inputs`` or with a data/shape mismatch raises a
KeyError or ValueError (500 too). Here every malformed body is an
``InvalidInput`` (400) naming what is wrong, and the result is KServe's own
``InferRequest``, so models see exactly what KServe would hand them.
Responses are serialised without the ``null`` fields that KServe's pydantic
models emit and the OIP schema does not allow.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping

import orjson

from defectkit.serving.kserve_runtime import import_kserve

import_kserve()

from kserve import InferInput, InferRequest, InferResponse  # noqa: E402
from kserve.errors import InvalidInput  # noqa: E402
from kserve.protocol.infer_type import RequestedOutput  # noqa: E402

INFERENCE_HEADER = "inference-header-content-length"
JSON_CONTENT_TYPE = "application/json"
BINARY_CONTENT_TYPE = "application/octet-stream"
DATATYPES = ("BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32",
             "FP64", "BYTES")


def parse_request(body: bytes, headers: Mapping[str, str], model_name: str) -> InferRequest:
    """An inference request body (JSON, or JSON header + binary tensors) as KServe's InferRequest."""
    header_length = headers.get(INFERENCE_HEADER)
    if header_length is None:
        json_part, binary = body, b""
    else:
        length = _header_length(header_length, len(body))
        json_part, binary = body[:length], memoryview(body)[length:]
    if not json_part:
        raise InvalidInput("the request body is empty; send an Open Inference Protocol v2 inference request "
                           "(JSON with an \"inputs\" list)")
    try:
        record = orjson.loads(json_part)
    except orjson.JSONDecodeError as exc:
        what = "JSON header (the first Inference-Header-Content-Length bytes)" if header_length else "request body"
        raise InvalidInput(f"the {what} is not valid JSON ({exc}); send an Open Inference Protocol v2 "
                           f"inference request") from None
    if not isinstance(record, dict):
        raise InvalidInput(f"the inference request must be a JSON object, got {type(record).__name__}")

    raw_inputs = record.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidInput("the inference request needs a non-empty \"inputs\" list")
    inputs: list[InferInput] = []
    raw_data: list[bytes | None] = []
    offset = 0
    for index, item in enumerate(raw_inputs):
        infer_input, size = _input(item, index)
        if size is None:
            raw_data.append(None)
        else:
            if offset + size > len(binary):
                raise InvalidInput(f"input {infer_input.name!r} declares binary_data_size {size} but only "
                                   f"{len(binary) - offset} bytes of binary data follow the JSON header")
            raw_data.append(bytes(binary[offset:offset + size]))
            offset += size
        inputs.append(infer_input)
    if offset != len(binary):
        raise InvalidInput(f"{len(binary)} bytes follow the JSON header but the inputs' binary_data_size add up "
                           f"to {offset}")

    request_id = record.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidInput(f"\"id\" must be a string, got {request_id!r}")
    parameters = _parameters(record.get("parameters"), "the request")
    outputs = record.get("outputs")
    requested = None
    if outputs is not None:
        if not isinstance(outputs, list):
            raise InvalidInput(f"\"outputs\" must be a list of {{\"name\": ...}} objects, got {outputs!r}")
        requested = []
        for item in outputs:
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                raise InvalidInput(f"each requested output needs a string \"name\", got {item!r}")
            requested.append(RequestedOutput(item["name"], _parameters(item.get("parameters"), item["name"])))
    return InferRequest(model_name, inputs, request_id=request_id,
                        raw_inputs=raw_data if any(r is not None for r in raw_data) else None,
                        parameters=parameters, request_outputs=requested or None)


def encode_response(response: InferResponse) -> tuple[bytes, dict[str, str]]:
    """(body, headers) of an inference response: JSON, or JSON + binary outputs where the request asked."""
    if not response.id:
        response.id = uuid.uuid4().hex
    result, json_length = response.to_rest()
    if json_length is None:
        return orjson.dumps(_without_nulls(result)), {"content-type": JSON_CONTENT_TYPE}
    return result, {"content-type": BINARY_CONTENT_TYPE, INFERENCE_HEADER: str(json_length)}


def error_body(message: str) -> bytes:
    """The OIP error object."""
    return orjson.dumps({"error": message})


def _header_length(value: str, body_length: int) -> int:
    if not value.strip().isdigit():
        raise InvalidInput(f"Inference-Header-Content-Length must be a non-negative integer, got {value!r}")
    length = int(value)
    if length > body_length:
        raise InvalidInput(f"Inference-Header-Content-Length is {length} but the body has only {body_length} bytes")
    return length


def _parameters(value: object, where: str) -> dict | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidInput(f"\"parameters\" of {where} must be a JSON object, got {value!r}")
    return value


def _input(item: object, index: int) -> tuple[InferInput, int | None]:
    """One entry of "inputs" and the size of its binary data (None when its data is in the JSON)."""
    if not isinstance(item, dict):
        raise InvalidInput(f"inputs[{index}] must be an object with name, datatype, shape and data, got {item!r}")
    name = item.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidInput(f"inputs[{index}] needs a non-empty string \"name\"")
    datatype = item.get("datatype")
    if not isinstance(datatype, str) or datatype.upper() not in DATATYPES:
        raise InvalidInput(f"input {name!r}: datatype {datatype!r} is not one of {', '.join(DATATYPES)}")
    shape = item.get("shape")
    if (not isinstance(shape, list)
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise InvalidInput(f"input {name!r}: shape must be a list of non-negative integers, got {shape!r}")
    parameters = _parameters(item.get("parameters"), f"input {name!r}")
    data = item.get("data")
    size = None if parameters is None else parameters.get("binary_data_size")
    if size is not None:
        if data is not None:
            raise InvalidInput(f"input {name!r} has both \"data\" and binary_data_size; send one of them")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InvalidInput(f"input {name!r}: binary_data_size must be a non-negative integer, got {size!r}")
    elif not isinstance(data, list):
        raise InvalidInput(f"input {name!r} needs \"data\" (a list) or, with the binary data extension, "
                           f"parameters.binary_data_size")
    return InferInput(name, shape, datatype, data=data, parameters=parameters), size


def _without_nulls(value):
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value
