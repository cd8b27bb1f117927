"""Validate objects against the KServe InferenceService CRD as a strict API server would.

Two checks, both needed:
- ``jsonschema`` against the CRD's openAPIV3Schema for types, enums, patterns, required.
- a walker that rejects fields the schema does not declare, like
  ``kubectl apply --validate=strict`` (server-side ``fieldValidation=Strict``). The CRD
  leaves ``additionalProperties`` unset almost everywhere, so jsonschema alone lets a
  typo such as ``canaryTrafficPercentt`` through; the API server would prune it silently.

Root ``metadata`` is plain ``type: object`` in every CRD: the API server checks it as
ObjectMeta itself, and so does the walker.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jsonschema
import yaml

_CRD = Path("shared", "schemas", "kserve", "serving.kserve.io_inferenceservices.yaml")
_REPO = Path(__file__).resolve().parents[1]
# The shared schemas sit beside the repository, or inside it where a checkout carries them.
CRD_PATH = next((root / _CRD for root in (_REPO, _REPO.parent) if (root / _CRD).is_file()), _REPO.parent / _CRD)

OBJECT_META_FIELDS = frozenset({
    "name", "generateName", "namespace", "selfLink", "uid", "resourceVersion", "generation",
    "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "labels", "annotations",
    "ownerReferences", "finalizers", "managedFields",
})
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
OBJECT_META_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "generateName": {"type": "string"},
        "namespace": {"type": "string"},
        "uid": {"type": "string"},
        "resourceVersion": {"type": "string"},
        "generation": {"type": "integer"},
        "labels": _STRING_MAP,
        "annotations": _STRING_MAP,
        "finalizers": {"type": "array", "items": {"type": "string"}},
    },
}


@functools.cache
def _crd_version(version: str) -> dict[str, Any]:
    # The CRD is 2 MB; the C loader reads it in about half a second.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load(CRD_PATH.read_text(), Loader=loader)
    for entry in crd["spec"]["versions"]:
        if entry["name"] == version:
            return entry
    raise KeyError(f"{CRD_PATH} has no version {version!r}")


def crd_schema(version: str = "v1beta1") -> dict[str, Any]:
    """The openAPIV3Schema of ``version`` of the InferenceService CRD."""
    return _crd_version(version)["schema"]["openAPIV3Schema"]


@functools.cache
def _patch_schema(version: str) -> dict[str, Any]:
    return _partial(crd_schema(version))


def _path(parent: str, key: str | int) -> str:
    return f"{parent}[{key}]" if isinstance(key, int) else (f"{parent}.{key}" if parent else key)


def unknown_fields(value: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Paths of fields in ``value`` that ``schema`` does not declare (what strict validation rejects)."""
    if schema.get("x-kubernetes-int-or-string"):
        return []
    found: list[str] = []
    if isinstance(value, dict):
        properties = schema.get("properties")
        additional = schema.get("additionalProperties")
        preserve = schema.get("x-kubernetes-preserve-unknown-fields", False)
        for key, item in value.items():
            if properties is not None and key in properties:
                found += unknown_fields(item, properties[key], _path(path, key))
            elif isinstance(additional, dict):
                found += unknown_fields(item, additional, _path(path, key))
            elif additional is True or preserve:
                continue
            else:
                # A structural object schema without properties keeps no fields: they are pruned.
                found.append(_path(path, key))
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            found += unknown_fields(item, schema["items"], _path(path, index))
    return found


def prune_unknown(value: Any, schema: dict[str, Any]) -> Any:
    """``value`` without the fields ``unknown_fields`` reports: what the API server stores when not strict."""
    if schema.get("x-kubernetes-int-or-string"):
        return value
    if isinstance(value, dict):
        properties = schema.get("properties")
        additional = schema.get("additionalProperties")
        preserve = schema.get("x-kubernetes-preserve-unknown-fields", False)
        kept = {}
        for key, item in value.items():
            if properties is not None and key in properties:
                kept[key] = prune_unknown(item, properties[key])
            elif isinstance(additional, dict):
                kept[key] = prune_unknown(item, additional)
            elif additional is True or preserve:
                kept[key] = item
        return kept
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [prune_unknown(item, schema["items"]) for item in value]
    return value


def prune_object(obj: dict[str, Any], version: str = "v1beta1") -> dict[str, Any]:
    """A whole object (or merge patch) with undeclared fields dropped, ObjectMeta included."""
    pruned = prune_unknown({k: v for k, v in obj.items() if k != "metadata"}, crd_schema(version))
    if isinstance(obj.get("metadata"), dict):
        pruned["metadata"] = {k: v for k, v in obj["metadata"].items() if k in OBJECT_META_FIELDS}
    return {key: pruned[key] for key in obj if key in pruned}


def schema_errors(value: Any, schema: dict[str, Any]) -> list[str]:
    """jsonschema violations as 'path: message' strings, sorted by path."""
    validator = jsonschema.Draft7Validator(schema)
    errors = []
    for error in validator.iter_errors(value):
        where = ".".join(str(p) for p in error.absolute_path) or "<root>"
        errors.append(f"{where}: {error.message}")
    return sorted(errors)


def _unknown_with_metadata(obj: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    unknown = unknown_fields({k: v for k, v in obj.items() if k != "metadata"}, schema)
    metadata = obj.get("metadata")
    if isinstance(metadata, dict):
        unknown += [_path("metadata", key) for key in metadata if key not in OBJECT_META_FIELDS]
    return unknown


def _metadata_errors(obj: dict[str, Any]) -> list[str]:
    metadata = obj.get("metadata")
    if not isinstance(metadata, dict):
        return []
    return [f"metadata.{e}" for e in schema_errors(metadata, OBJECT_META_SCHEMA)]


def object_problems(obj: dict[str, Any], version: str = "v1beta1") -> tuple[list[str], list[str]]:
    """(unknown field paths, schema errors) of a whole InferenceService object."""
    schema = crd_schema(version)
    errors = schema_errors(obj, schema) + _metadata_errors(obj)
    if obj.get("apiVersion") != f"serving.kserve.io/{version}":
        errors.append(f"apiVersion: {obj.get('apiVersion')!r} is not 'serving.kserve.io/{version}'")
    if obj.get("kind") != "InferenceService":
        errors.append(f"kind: {obj.get('kind')!r} is not 'InferenceService'")
    return _unknown_with_metadata(obj, schema), errors


def patch_problems(patch: dict[str, Any], version: str = "v1beta1") -> tuple[list[str], list[str]]:
    """(unknown field paths, type errors) of a merge patch: a partial object where null deletes a field."""
    present = _without_nulls(patch)
    return (
        _unknown_with_metadata(present, crd_schema(version)),
        schema_errors(present, _patch_schema(version)) + _metadata_errors(present),
    )


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _partial(schema: Any) -> Any:
    """``schema`` with top-level object requirements dropped: a patch names only what changes.

    Lists in a merge patch replace the whole list, so items keep their requirements.
    """
    if not isinstance(schema, dict):
        return schema
    result = {k: v for k, v in schema.items() if k != "required"}
    if "properties" in schema:
        result["properties"] = {k: _partial(v) for k, v in schema["properties"].items()}
    if isinstance(schema.get("additionalProperties"), dict):
        result["additionalProperties"] = _partial(schema["additionalProperties"])
    return result


def assert_valid(obj: dict[str, Any]) -> None:
    unknown, errors = object_problems(obj)
    assert not unknown, f"fields the CRD does not declare: {unknown}"
    assert not errors, f"schema violations: {errors}"
