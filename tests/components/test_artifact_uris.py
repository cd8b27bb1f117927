"""Components read artifacts through the local paths the launcher mounts; an artifact's URI is never handed on.

On a cluster an artifact's URI is gs://, s3:// or minio:// depending on the install, and the
launcher maps it to a local path (``/gcs/...``, ``/s3/...``, ``/minio/...``). MLflow gets files
uploaded from those paths, and KServe gets the registry's own copy of a model
(``registry.storage_uri``), so no system is ever asked to read a URI internal to Kubeflow
Pipelines. The only URI a component keeps is a lineage tag.
"""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMPONENTS = sorted(p.stem for p in (ROOT / "components").glob("*.py") if p.stem not in ("__init__", "images"))
LINEAGE_KEYS = {"kfp_model_uri"}


def _uri_reads(name: str) -> list[tuple[int, str | None]]:
    """(line, dict key it is stored under or None) of every ``<artifact>.uri`` in the component's body."""
    component = getattr(importlib.import_module(f"defectkit_kfp.components.{name}"), name)
    tree = ast.parse(inspect.getsource(component.python_func))
    function = tree.body[0]
    artifacts = {a.arg for a in function.args.args if a.annotation is not None
                 and ast.unparse(a.annotation).replace("Optional[", "").startswith(("Input[", "Output["))}
    keyed = {id(value): key.value for node in ast.walk(tree) if isinstance(node, ast.Dict)
             for key, value in zip(node.keys, node.values) if isinstance(key, ast.Constant)}
    return [(node.lineno, keyed.get(id(node))) for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and node.attr == "uri" and isinstance(node.value, ast.Name)
            and node.value.id in artifacts]


@pytest.mark.parametrize("name", COMPONENTS)
def test_artifact_uris_are_only_kept_as_lineage(name):
    handed_on = [(line, key) for line, key in _uri_reads(name) if key not in LINEAGE_KEYS]
    assert not handed_on, f"{name} hands an artifact's KFP URI on (lines {handed_on}); use .path, or the registry's copy"


def test_the_check_sees_the_lineage_tag():
    assert [key for _, key in _uri_reads("register_model")] == ["kfp_model_uri"]
