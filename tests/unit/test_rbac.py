"""deploy/rbac: valid Kubernetes RBAC objects that grant the KServe delivery exactly the API calls it makes.

``API_CALLS`` is the one list of those calls. It is checked both ways: against the code (every
``.request("<METHOD>", <path>)`` in defectkit/delivery/kserve is listed, and nothing else) and
against the manifests (each call is granted to the bound service account, and every grant serves a
call).
"""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from kubernetes.client import ApiClient

REPO = Path(__file__).resolve().parents[2]
RBAC_DIR = REPO / "deploy" / "rbac"
KSERVE_CODE = REPO / "defectkit" / "delivery" / "kserve"
USER_NAMESPACE = "kubeflow-user-example-com"
KSERVE_NAMESPACE = "kserve"
SERVICE_ACCOUNT = "default-editor"
RBAC_API = "rbac.authorization.k8s.io/v1"
VERBS = {"GET": "get", "POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}


@dataclass(frozen=True)
class Access:
    """What one API call touches: ``namespace`` None for a cluster-scoped resource, ``name`` None where it
    depends on the service (so RBAC cannot restrict it by resourceNames)."""

    namespace: str | None
    group: str
    resource: str
    name: str | None = None


ISVC = Access(USER_NAMESPACE, "serving.kserve.io", "inferenceservices")
STATE = Access(USER_NAMESPACE, "", "configmaps")
ROUTE = Access(USER_NAMESPACE, "gateway.networking.k8s.io", "httproutes")
KSERVE_CONFIG = Access(KSERVE_NAMESPACE, "", "configmaps", "inferenceservice-config")
ISVC_CRD = Access(None, "apiextensions.k8s.io", "customresourcedefinitions", "inferenceservices.serving.kserve.io")

# (module, HTTP method, path expression) -> what it touches.
API_CALLS: dict[tuple[str, str, str], Access] = {
    ("backend.py", "GET", "self._path"): ISVC,
    ("backend.py", "PATCH", "self._path"): ISVC,
    ("backend.py", "POST", "self._collection"): ISVC,
    ("backend.py", "GET", "CRD_PATH"): ISVC_CRD,
    ("backend.py", "GET", "self._route_path"): ROUTE,
    ("modes.py", "GET", "path"): KSERVE_CONFIG,
    ("state.py", "GET", "self._path"): STATE,
    ("state.py", "PUT", "self._path"): STATE,
    ("state.py", "POST", "self._collection"): STATE,
    ("state.py", "GET", "f'{collection}/{quote(self.service)}'"): ISVC,  # the owner of the state ConfigMap
}


def calls_in_code() -> set[tuple[str, str, str]]:
    """Every ``<x>.request("<METHOD>", <path>, ...)`` under defectkit/delivery/kserve."""
    found = set()
    for module in sorted(KSERVE_CODE.glob("*.py")):
        for node in ast.walk(ast.parse(module.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "request"
                    and len(node.args) >= 2 and isinstance(node.args[0], ast.Constant)
                    and isinstance(node.args[0].value, str)):
                found.add((module.name, node.args[0].value, ast.unparse(node.args[1])))
    return found


class _Response:
    """What ``ApiClient.deserialize`` reads: the body of an API answer."""

    def __init__(self, document: dict) -> None:
        self.data = json.dumps(document)


def documents() -> list[tuple[str, dict]]:
    return [(path.name, doc) for path in sorted(RBAC_DIR.glob("*.yaml"))
            for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def typed(document: dict):
    """The document as the Kubernetes client's model of its kind, which checks required fields and types."""
    return ApiClient().deserialize(_Response(document), f"V1{document['kind']}")


def test_every_document_is_a_valid_rbac_object_with_no_unknown_field():
    docs = documents()
    assert {doc["kind"] for _, doc in docs} == {"Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"}
    for name, doc in docs:
        assert doc["apiVersion"] == RBAC_API, name
        obj = typed(doc)
        # A field the model does not know is dropped by deserialisation, so a typo shows as a difference.
        assert ApiClient().sanitize_for_serialization(obj) == doc, name
        assert obj.metadata.name, name
        if doc["kind"] in ("Role", "RoleBinding"):
            assert obj.metadata.namespace in (USER_NAMESPACE, KSERVE_NAMESPACE), name
        else:
            assert obj.metadata.namespace is None, name


@pytest.mark.parametrize(("edit", "message"), [
    (lambda doc: doc["rules"][0].pop("verbs"), "verbs"),
    (lambda doc: doc.pop("roleRef"), "role_ref"),
])
def test_the_client_models_refuse_a_missing_required_field(edit, message):
    kinds = {doc["kind"]: doc for _, doc in documents()}
    doc = kinds["Role"] if message == "verbs" else kinds["RoleBinding"]
    edit(doc)
    with pytest.raises(ValueError, match=message):
        typed(doc)


def test_the_list_of_api_calls_is_exactly_what_the_code_calls():
    found = calls_in_code()
    assert found - set(API_CALLS) == set(), "new Kubernetes API calls: add them to API_CALLS and to deploy/rbac"
    assert set(API_CALLS) - found == set(), "calls no longer made: remove them from API_CALLS (and their grants)"


def _grants() -> set[tuple[str | None, str, str, str | None, str]]:
    """(namespace, group, resource, resource name or None, verb) granted to the service account."""
    roles = {(doc["kind"], doc["metadata"].get("namespace"), doc["metadata"]["name"]): typed(doc)
             for _, doc in documents() if doc["kind"] in ("Role", "ClusterRole")}
    granted = set()
    for _, doc in documents():
        if doc["kind"] not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        binding = typed(doc)
        subjects = {(s.kind, s.namespace, s.name) for s in binding.subjects}
        assert subjects == {("ServiceAccount", USER_NAMESPACE, SERVICE_ACCOUNT)}, doc["metadata"]["name"]
        namespace = binding.metadata.namespace
        role = roles[(binding.role_ref.kind, namespace if binding.role_ref.kind == "Role" else None,
                      binding.role_ref.name)]
        for rule in role.rules:
            for group in rule.api_groups:
                for resource in rule.resources:
                    for name in rule.resource_names or [None]:
                        granted |= {(namespace, group, resource, name, verb) for verb in rule.verbs}
    return granted


def _needed() -> set[tuple[str | None, str, str, str | None, str]]:
    return {(access.namespace, access.group, access.resource, access.name, VERBS[method])
            for (_, method, _), access in API_CALLS.items()}


def test_every_api_call_is_granted_and_every_grant_serves_a_call():
    granted, needed = _grants(), _needed()
    assert needed - granted == set(), "calls the service account may not make"
    assert granted - needed == set(), "grants no call needs"


def test_fixed_names_are_granted_by_name_only():
    granted = _grants()
    for access in (KSERVE_CONFIG, ISVC_CRD):
        assert (access.namespace, access.group, access.resource, None, "get") not in granted
        assert (access.namespace, access.group, access.resource, access.name, "get") in granted
