"""The model artifact on disk: its file names and its integrity check.

Torch-free, so the registry and deploy steps can verify a model without the
training stack. A model artifact is a directory holding ``model.safetensors``
and ``model.json``; the JSON records the sha256 of the weights file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

MODEL_FORMAT = "defectkit.model/v1"
WEIGHTS_FILE = "model.safetensors"
METADATA_FILE = "model.json"
# The ONNX export of a judged model (defectkit.export) and its record: the file's sha256, the parity measured.
ONNX_FILE = "model.onnx"
ONNX_RECORD = "model.onnx.json"


class ModelIntegrityError(ValueError):
    """The weights file does not match the sha256 recorded in model.json."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_model_json(model_dir: Path, *, where: str = "") -> dict:
    """model.json of an artifact, checked to be one of ours."""
    path = Path(model_dir) / METADATA_FILE
    where = where or str(model_dir)
    if not path.is_file():
        raise FileNotFoundError(f"{where}: no {METADATA_FILE}; not a defectkit model artifact "
                                f"({WEIGHTS_FILE} + {METADATA_FILE})")
    try:
        record = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelIntegrityError(f"{where}: {METADATA_FILE} is not valid JSON ({exc})") from exc
    if not isinstance(record, dict) or record.get("format") != MODEL_FORMAT:
        found = record.get("format") if isinstance(record, dict) else type(record).__name__
        raise ValueError(f"{where}: {METADATA_FILE} format {found!r} is not {MODEL_FORMAT!r}")
    return record


def check_weights(actual: str, record: dict, *, where: str) -> None:
    """Raise ModelIntegrityError unless ``actual`` is the weights sha256 that ``record`` (model.json) holds."""
    expected = record.get("weights_sha256") or ""
    if not expected:
        raise ModelIntegrityError(f"{where}: {METADATA_FILE} records no weights_sha256, so the weights cannot be "
                                  f"verified; save the model with defectkit.models.save_model")
    if actual != expected:
        raise ModelIntegrityError(f"{where}: {WEIGHTS_FILE} sha256 {actual} does not match weights_sha256 "
                                  f"{expected} in {METADATA_FILE}; the weights were modified or corrupted, "
                                  f"re-export the model")


def verify(model_dir: Path, *, where: str = "") -> str:
    """The weights' sha256, after checking it against model.json."""
    model_dir = Path(model_dir)
    where = where or str(model_dir)
    weights = model_dir / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{where}: no {WEIGHTS_FILE}")
    actual = sha256_file(weights)
    check_weights(actual, read_model_json(model_dir, where=where), where=where)
    return actual


def model_files(model_dir: Path) -> tuple[str, ...]:
    """The files of the artifact in ``model_dir``: weights and model.json, and the ONNX export where there is one."""
    model_dir = Path(model_dir)
    exported = (ONNX_FILE, ONNX_RECORD) if (model_dir / ONNX_FILE).is_file() else ()
    return (WEIGHTS_FILE, METADATA_FILE, *exported)
