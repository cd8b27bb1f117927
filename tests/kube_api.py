"""An HTTP stand-in of a Kubernetes API server with KServe installed, on 127.0.0.1.

Each behaviour copies KServe's or Knative's source (github:kserve/kserve master aaac4e29
unless a tag is named; github:knative/serving); the comments name the file.

API server:
- InferenceServices: POST, GET, PATCH (``application/merge-patch+json``, RFC 7386) and DELETE
  under ``/apis/serving.kserve.io/v1beta1/namespaces/{ns}/inferenceservices``; ConfigMaps
  (POST, GET, PUT, DELETE); HTTPRoutes (GET, only with a Gateway API); the InferenceService
  CRD (GET). Errors are Status objects.
- Strict field validation: undeclared fields are refused with 400 under
  ``?fieldValidation=Strict`` and pruned with a ``Warning`` header otherwise (KEP-2885);
  schema violations are 422 Invalid (tests/crd.py checks both against the CRD).
- ``metadata.resourceVersion`` in a patch or an update is a precondition (409 Conflict);
  ``generation`` moves on spec changes, ``resourceVersion`` on every write; ``status`` is a
  subresource clients cannot write. Deleting an InferenceService deletes the ConfigMaps it owns
  (ownerReferences: the garbage collector).

KServe's webhooks (``inferenceservice.kserve-webhook-server.{defaulter,validator}``):
- the defaulter rewrites legacy mode annotations and adds the annotation when the cluster
  default is Standard or ModelMesh (``pkg/apis/serving/v1beta1/inference_service_defaults.go``
  ``DefaultInferenceService``);
- the validator denies with 403 Forbidden (apiserver ``webhook/errors/statuserror.go``
  ``ToStatusErr``): the name format (``validateInferenceService``, ``InvalidISVCNameFormatError``),
  a mode change (``validateDeploymentMode``), a predictor name change without a model change
  (``validatePredictorNameChange``) and the canary rules (``validateCanarySpecs``), all in
  ``pkg/apis/serving/v1beta1/inference_service_validation.go``.

KServe's controller, ``status_delay_s`` after each write (never with ``reconciling`` False):
- the mode: ``status.deploymentMode``, else the annotation, else the cluster default
  (``controller/v1beta1/inferenceservice/utils/utils.go`` ``GetDeploymentMode``), written to the
  status on every reconcile (``controller.go``);
- Knative mode: see :class:`_Knative`; Standard mode: see :class:`_Standard`.
A model whose STORAGE_URI is in ``failing_uris`` never becomes ready.
"""

from __future__ import annotations

import copy
import itertools
import json
import re
import threading
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

from tests.crd import CRD_PATH, object_problems, prune_object

GROUP = "serving.kserve.io"
VERSION = "v1beta1"
PREFIX = f"/apis/{GROUP}/{VERSION}/namespaces/"
CONFIG_MAP_PREFIX = "/api/v1/namespaces/"
ROUTE_PREFIX = "/apis/gateway.networking.k8s.io/v1/namespaces/"
CRD_URL = f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/inferenceservices.{GROUP}"
PLURAL = "inferenceservices"
MERGE_PATCH = "application/merge-patch+json"
TAG_ROUTING = "serving.kserve.io/enable-tag-routing"
MODE_ANNOTATION = "serving.kserve.io/deploymentMode"
KNATIVE, STANDARD, MODELMESH = "Knative", "Standard", "ModelMesh"
LEGACY_MODES = {"Serverless": KNATIVE, "RawDeployment": STANDARD}
WEBHOOK = "inferenceservice.kserve-webhook-server.validator"
_ISVC_NAME = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: objects merge key by key, null deletes, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def status_object(code: int, reason: str, message: str, *, name: str = "", kind: str = PLURAL,
                  causes: list[dict] | None = None) -> dict:
    details: dict[str, Any] = {"name": name, "group": GROUP if kind == PLURAL else "", "kind": kind}
    if causes:
        details["causes"] = causes
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "details": details, "code": code}


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any


class _Refusal(Exception):
    def __init__(self, code: int, reason: str, message: str, **kwargs: Any) -> None:
        super().__init__(message)
        self.status = status_object(code, reason, message, **kwargs)


def _denied(message: str, name: str) -> _Refusal:
    # apiserver webhook/errors/statuserror.go ToStatusErr: code 403 when the webhook gave none.
    return _Refusal(403, "Forbidden", f'admission webhook "{WEBHOOK}" denied the request: {message}', name=name)


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def storage_uri(predictor: dict) -> str | None:
    """CustomPredictor.GetStorageUri (predictor_custom.go): STORAGE_URI of the kserve-container."""
    for container in predictor.get("containers") or []:
        if container.get("name") == "kserve-container":
            for var in container.get("env") or []:
                if var.get("name") == "STORAGE_URI":
                    return var.get("value")
    return predictor.get("model", {}).get("storageUri")


def _condition(kind: str, status: str, reason: str = "", message: str = "", *, info: bool = False) -> dict:
    found = {"type": kind, "status": status, "lastTransitionTime": _now()}
    if reason:
        found["reason"] = reason
    if message:
        found["message"] = message
    if info:
        # knative/pkg condition_set.go severity(): conditions outside the happy set are Info.
        found["severity"] = "Info"
    return found


def _ready_conditions(predictor: dict, ingress: dict, extra: list[dict]) -> list[dict]:
    """NewLivingConditionSet(PredictorReady, IngressReady) (status.go): Ready from the unhappy dependent."""
    unhappy = next((c for c in (predictor, ingress) if c["status"] != "True"), None)
    ready = _condition("Ready", "True") if unhappy is None else \
        _condition("Ready", unhappy["status"], unhappy.get("reason", ""), unhappy.get("message", ""))
    return sorted([ready, predictor, ingress, *extra], key=lambda c: c["type"])


@dataclass
class _Revision:
    name: str
    template: str
    ready: bool


@dataclass
class _Knative:
    """The Knative Service ``{isvc}-predictor`` KServe keeps for a predictor, and what Knative does with it.

    - The revision template is the predictor spec without canaryTrafficPercent, plus the isvc's
      annotations (``components/predictor.go`` ``buildPredictorResources``: ``utils.Filter(isvc.Annotations,
      ...)``; ``reconcilers/knative/ksvc_reconciler.go`` ``Template.ObjectMeta.Annotations``). A new
      template makes revision ``{ksvc}-0000N`` after the Configuration's generation; a traffic-only
      change makes none, and reverting to an old template makes a new one (knative/serving
      ``pkg/reconciler/configuration/resources/revision.go``).
    - The ksvc traffic: ``canaryTrafficPercent`` with a rolled-out revision splits ``latestRevision``
      (tag ``latest`` only with enable-tag-routing) and ``prev`` (the last rolled-out revision, always
      tagged); otherwise latest 100 (``ksvc_reconciler.go`` L123-164).
    - ``latestRevision: true`` resolves to the Configuration's latest *ready* revision; a revision
      that fails leaves it on the old one, and Ready False/RevisionFailed (knative ``configuration_lifecycle.go``
      ``MarkLatestCreatedFailed``).
    """

    generation: int = 0
    config_generation: int = 0
    spec: str | None = None
    template: str | None = None
    revisions: list[_Revision] = field(default_factory=list)
    latest_created: str | None = None
    latest_ready: str | None = None


@dataclass
class _Deployment:
    name: str
    template: str
    ready: bool
    generation: int = 1


@dataclass
class _Standard:
    """The Deployments KServe keeps for a predictor in Standard mode (``components/predictor.go``).

    The stable one is ``PredictorServiceName(isvc, spec.predictor.name)``; each canary gets
    ``{isvc}-{name}-predictor``; any other is deleted as an orphan, which is how promotion
    (stable renamed to the canary) keeps the canary's pods and drops the old ones.
    """

    deployments: dict[str, _Deployment] = field(default_factory=dict)


class KubeApiStandIn:
    def __init__(self, *, status_delay_s: float = 0.0, token: str | None = None, domain: str = "example.com",
                 default_mode: str = "Serverless", gateway_api: bool = True, canary_weights: bool = True,
                 canary_in_crd: bool = True, kserve_namespace: str = "kserve") -> None:
        """``default_mode`` is the cluster default in inferenceservice-config (the shipped ConfigMap says
        Serverless). ``gateway_api`` makes KServe keep an HTTPRoute per predictor; ``canary_weights`` is
        KServe after v0.20.0 (#5912) weighting it for spec.canary; ``canary_in_crd`` False is a KServe
        before v0.20 (no spec.canary in its CRD)."""
        self.status_delay_s = status_delay_s
        self.token = token
        self.domain = domain
        self.gateway_api = gateway_api
        self.canary_weights = canary_weights
        self.canary_in_crd = canary_in_crd
        self.kserve_namespace = kserve_namespace
        self.reconciling = True
        self.failing_uris: set[str] = set()
        self.requests: list[Recorded] = []
        self.objects: dict[tuple[str, str], dict] = {}
        self.config_maps: dict[tuple[str, str], dict] = {}
        self.routes: dict[tuple[str, str], dict] = {}
        # Problems in objects the stand-in itself wrote (status); a test must see none.
        self.internal_errors: list[str] = []
        self._faults: list[tuple[str, int, bool]] = []
        self._knative: dict[tuple[str, str], _Knative] = {}
        self._standard: dict[tuple[str, str], _Standard] = {}
        self._versions = itertools.count(1000)
        self._lock = threading.RLock()
        self._timers: list[threading.Timer] = []
        self._crd: dict | None = None
        self.config_maps[(kserve_namespace, "inferenceservice-config")] = self._stamp({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "inferenceservice-config", "namespace": kserve_namespace},
            "data": {"deploy": json.dumps({"defaultDeploymentMode": default_mode})}})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        # A short poll interval keeps shutdown (and so each test's teardown) quick.
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> KubeApiStandIn:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        with self._lock:
            for timer in self._timers:
                timer.cancel()
        self._server.shutdown()
        self._server.server_close()

    # Test controls -------------------------------------------------------------------

    def fail_next(self, method: str, code: int, count: int = 1, *, after_applying: bool = False) -> None:
        """Answer the next ``count`` ``method`` requests with ``code`` (a transient fault).

        With ``after_applying`` the request takes effect first and only its answer is lost.
        """
        with self._lock:
            self._faults += [(method, code, after_applying)] * count

    def _fault(self, method: str, after_applying: bool) -> None:
        for index, fault in enumerate(self._faults):
            if fault[0] == method and fault[2] == after_applying:
                del self._faults[index]
                reasons = {409: "Conflict", 429: "TooManyRequests", 503: "ServiceUnavailable"}
                reason = reasons.get(fault[1], "InternalError")
                raise _Refusal(fault[1], reason, f"injected {fault[1]}")

    def stored(self, namespace: str, name: str) -> dict:
        with self._lock:
            return copy.deepcopy(self.objects[(namespace, name)])

    def route(self, namespace: str, name: str) -> dict[str, int]:
        """The weights of HTTPRoute ``{name}-predictor`` by backend Service."""
        with self._lock:
            refs = self.routes[(namespace, f"{name}-predictor")]["spec"]["rules"][0]["backendRefs"]
            return {ref["name"]: ref.get("weight", 1) for ref in refs}

    def deployments(self, namespace: str, name: str) -> set[str]:
        with self._lock:
            return set(self._standard[(namespace, name)].deployments)

    def edit(self, namespace: str, name: str, patch: dict) -> None:
        """Change an object as another client would (new resourceVersion, no controller run)."""
        with self._lock:
            key = (namespace, name)
            self.objects[key] = merge_patch(self.objects[key], patch)
            self.objects[key]["metadata"]["resourceVersion"] = str(next(self._versions))

    def calls(self, method: str, prefix: str = PREFIX) -> list[Recorded]:
        """Requests of ``method`` under ``prefix`` (InferenceServices by default)."""
        return [r for r in self.requests if r.method == method and r.path.startswith(prefix)]

    def _stamp(self, obj: dict) -> dict:
        obj["metadata"] = {**obj["metadata"], "uid": obj["metadata"].get("uid") or str(uuid.uuid4()),
                           "resourceVersion": str(next(self._versions)),
                           "creationTimestamp": obj["metadata"].get("creationTimestamp") or _now()}
        return obj

    # API server: InferenceServices ---------------------------------------------------

    def _validate(self, obj: dict, *, strict: bool, name: str) -> tuple[dict, list[str]]:
        unknown, errors = object_problems(obj)
        if not self.canary_in_crd and "canary" in obj.get("spec", {}):
            unknown.append("spec.canary")
        warnings = []
        if unknown:
            if strict:
                raise _Refusal(400, "BadRequest", f'InferenceService in version "{VERSION}" cannot be handled as a '
                               "InferenceService: strict decoding error: "
                               + ", ".join(f'unknown field "{path}"' for path in unknown), name=name)
            warnings = [f'unknown field "{path}"' for path in unknown]
            obj = prune_object(obj)
            if not self.canary_in_crd:
                obj.get("spec", {}).pop("canary", None)
        if errors:
            raise _Refusal(
                422, "Invalid", f'InferenceService.{GROUP} "{name}" is invalid: ' + "; ".join(errors), name=name,
                causes=[{"reason": "FieldValueInvalid", "message": e, "field": e.split(":", 1)[0]} for e in errors],
            )
        return obj, warnings

    def _default_mode(self) -> str:
        deploy = json.loads(self.config_maps[(self.kserve_namespace, "inferenceservice-config")]["data"]["deploy"])
        mode = deploy["defaultDeploymentMode"]
        return LEGACY_MODES.get(mode, mode)

    def _default(self, obj: dict) -> None:
        """The mutating webhook: inference_service_defaults.go DefaultInferenceService L163-186."""
        annotations = obj["metadata"].setdefault("annotations", {})
        if MODE_ANNOTATION in annotations:
            annotations[MODE_ANNOTATION] = LEGACY_MODES.get(annotations[MODE_ANNOTATION],
                                                            annotations[MODE_ANNOTATION])
        elif self._default_mode() in (STANDARD, MODELMESH):
            annotations[MODE_ANNOTATION] = self._default_mode()
        if not annotations:
            del obj["metadata"]["annotations"]

    def _admit(self, obj: dict, old: dict | None) -> None:
        """The validating webhook (inference_service_validation.go ValidateCreate/ValidateUpdate)."""
        name = obj["metadata"]["name"]
        if old is not None:
            recorded = (old.get("status") or {}).get("deploymentMode")
            annotated = obj["metadata"].get("annotations", {}).get(MODE_ANNOTATION)
            if recorded and annotated and annotated != LEGACY_MODES.get(recorded, recorded):
                raise _denied(f"update rejected: deploymentMode cannot be changed from '{recorded}' to "
                              f"'{annotated}'", name)
            old_name, new_name = old["spec"]["predictor"].get("name"), obj["spec"]["predictor"].get("name")
            if old_name != new_name and storage_uri(old["spec"]["predictor"]) == storage_uri(obj["spec"]["predictor"]):
                raise _denied("predictor.name change requires a model change (e.g. storageUri)", name)
        if not _ISVC_NAME.match(name):
            raise _denied(f'the InferenceService "{name}" is invalid: a InferenceService name must consist of lower '
                          "case alphanumeric characters or '-', and must start with alphabetical character. (e.g. "
                          "\"my-name\" or \"abc-123\", regex used for validation is '[a-z]([-a-z0-9]*[a-z0-9])?')",
                          name)
        self._admit_canaries(obj)

    def _admit_canaries(self, obj: dict) -> None:
        """validateCanarySpecs L183-266."""
        canaries, name = obj["spec"].get("canary") or [], obj["metadata"]["name"]
        if not canaries:
            return
        stable = obj["spec"]["predictor"]
        if obj["metadata"].get("annotations", {}).get(MODE_ANNOTATION) != STANDARD:
            raise _denied("canary is only supported in Standard deployment mode", name)
        if storage_uri(stable) is None:
            raise _denied("canary requires a stable predictor with a model (multi-model serving is not supported "
                          "with canary)", name)
        names, total = set(), 0
        for index, entry in enumerate(canaries):
            predictor, canary_name = entry["predictor"], entry["predictor"].get("name")
            if not canary_name:
                raise _denied(f"canary[{index}] predictor.name is required", name)
            if canary_name in names:
                raise _denied(f'canary predictor.name "{canary_name}" is duplicated', name)
            names.add(canary_name)
            if canary_name == stable.get("name"):
                raise _denied(f'canary predictor.name "{canary_name}" conflicts with stable predictor name', name)
            percent = entry["trafficPercent"]
            if not 0 <= percent <= 100:
                raise _denied(f'canary "{canary_name}" trafficPercent must be between 0 and 100, got {percent}', name)
            total += percent
            for fixed in ("maxReplicas", "scaleTarget", "scaleMetric", "autoScaling"):
                if predictor.get(fixed):
                    raise _denied(f'canary "{canary_name}" must not set {fixed} (canary uses fixed replicas)', name)
            if "minReplicas" in predictor and predictor["minReplicas"] > stable.get("minReplicas", 1):
                raise _denied(f'canary "{canary_name}" minReplicas ({predictor["minReplicas"]}) must not exceed '
                              f'stable predictor minReplicas ({stable.get("minReplicas", 1)})', name)
        if total > 100:
            raise _denied(f"sum of canary trafficPercent values ({total}) must be <= 100", name)

    def _create(self, namespace: str, body: Any, strict: bool) -> tuple[int, dict, list[str]]:
        if not isinstance(body, dict) or not isinstance(body.get("metadata"), dict):
            raise _Refusal(400, "BadRequest", "the body must be an InferenceService object with metadata")
        name = body["metadata"].get("name")
        if not name:
            raise _Refusal(422, "Invalid", "metadata.name: Required value: name is required")
        if body["metadata"].get("namespace", namespace) != namespace:
            raise _Refusal(400, "BadRequest", "the namespace of the provided object does not match the namespace "
                           "sent on the request", name=name)
        obj, warnings = self._validate({k: v for k, v in body.items() if k != "status"}, strict=strict, name=name)
        key = (namespace, name)
        if key in self.objects:
            raise _Refusal(409, "AlreadyExists", f'inferenceservices.{GROUP} "{name}" already exists', name=name)
        self._default(obj)
        self._admit(obj, None)
        obj["metadata"] = {**obj["metadata"], "namespace": namespace, "generation": 1}
        self.objects[key] = self._stamp(obj)
        self._schedule(key)
        return 201, copy.deepcopy(obj), warnings

    def _patch(self, key: tuple[str, str], body: Any, content_type: str, strict: bool) -> tuple[int, dict, list[str]]:
        name = key[1]
        if content_type != MERGE_PATCH:
            raise _Refusal(415, "UnsupportedMediaType", f"the body of the request was in an unknown format - "
                           f"accepted media types include: {MERGE_PATCH}", name=name)
        if not isinstance(body, dict):
            raise _Refusal(400, "BadRequest", "a merge patch must be a JSON object", name=name)
        current = self.objects.get(key)
        if current is None:
            raise _Refusal(404, "NotFound", f'inferenceservices.{GROUP} "{name}" not found', name=name)
        wanted = (body.get("metadata") or {}).get("resourceVersion")
        if wanted is not None and wanted != current["metadata"]["resourceVersion"]:
            raise _Refusal(409, "Conflict", f'Operation cannot be fulfilled on inferenceservices.{GROUP} "{name}": '
                           "the object has been modified; please apply your changes to the latest version and try "
                           "again", name=name)
        # status is a subresource: writes through the main resource leave it alone.
        merged = merge_patch({k: v for k, v in current.items() if k != "status"},
                             {k: v for k, v in body.items() if k != "status"})
        server_owned = {k: current["metadata"][k] for k in
                        ("name", "namespace", "uid", "generation", "resourceVersion", "creationTimestamp")}
        merged["metadata"] = {**merged.get("metadata", {}), **server_owned}
        merged, warnings = self._validate(merged, strict=strict, name=name)
        self._default(merged)
        self._admit(merged, current)
        if "status" in current:
            merged["status"] = current["status"]
        if merged == current:
            return 200, copy.deepcopy(current), warnings
        if merged.get("spec") != current.get("spec"):
            merged["metadata"]["generation"] = current["metadata"]["generation"] + 1
        merged["metadata"]["resourceVersion"] = str(next(self._versions))
        self.objects[key] = merged
        self._schedule(key)
        return 200, copy.deepcopy(merged), warnings

    # API server: ConfigMaps, HTTPRoutes, the CRD --------------------------------------

    def _config_map(self, method: str, namespace: str, name: str | None, body: Any) -> tuple[int, dict, list[str]]:
        def not_found() -> _Refusal:
            return _Refusal(404, "NotFound", f'configmaps "{name}" not found', name=name or "", kind="configmaps")

        key = (namespace, name or "")
        if name is None:
            if method != "POST":
                raise _Refusal(405, "MethodNotAllowed", f"{method} is not supported on the collection here")
            name = body["metadata"]["name"]
            key = (namespace, name)
            if key in self.config_maps:
                raise _Refusal(409, "AlreadyExists", f'configmaps "{name}" already exists', name=name,
                               kind="configmaps")
            created = self._stamp({**copy.deepcopy(body), "metadata": {**body["metadata"], "namespace": namespace}})
            self.config_maps[key] = created
            return 201, copy.deepcopy(created), []
        if key not in self.config_maps:
            raise not_found()
        current = self.config_maps[key]
        if method == "GET":
            return 200, copy.deepcopy(current), []
        if method == "PUT":
            wanted = body["metadata"].get("resourceVersion")
            if wanted is not None and wanted != current["metadata"]["resourceVersion"]:
                raise _Refusal(409, "Conflict", f'Operation cannot be fulfilled on configmaps "{name}": the object '
                               "has been modified; please apply your changes to the latest version and try again",
                               name=name, kind="configmaps")
            updated = copy.deepcopy(body)
            updated["metadata"] = {**body["metadata"], "uid": current["metadata"]["uid"],
                                   "creationTimestamp": current["metadata"]["creationTimestamp"],
                                   "ownerReferences": body["metadata"].get("ownerReferences")
                                   or current["metadata"].get("ownerReferences", [])}
            self.config_maps[key] = self._stamp(updated)
            return 200, copy.deepcopy(self.config_maps[key]), []
        if method == "DELETE":
            del self.config_maps[key]
            return 200, {"kind": "Status", "apiVersion": "v1", "status": "Success"}, []
        raise _Refusal(405, "MethodNotAllowed", f"{method} is not supported here")

    def _get_route(self, namespace: str, name: str) -> tuple[int, dict, list[str]]:
        if not self.gateway_api:
            raise _Refusal(404, "NotFound", "the server could not find the requested resource")
        if (namespace, name) not in self.routes:
            raise _Refusal(404, "NotFound", f'httproutes.gateway.networking.k8s.io "{name}" not found', name=name,
                           kind="httproutes")
        return 200, copy.deepcopy(self.routes[(namespace, name)]), []

    def _get_crd(self) -> tuple[int, dict, list[str]]:
        import yaml

        if self._crd is None:
            self._crd = yaml.load(CRD_PATH.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        crd = copy.deepcopy(self._crd) if not self.canary_in_crd else self._crd
        if not self.canary_in_crd:
            for version in crd["spec"]["versions"]:
                version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"].pop("canary", None)
        return 200, crd, []

    def _route(self, method: str, path: str, query: dict[str, str], content_type: str, body: Any,
               authorization: str | None) -> tuple[int, dict, list[str]]:
        if self.token is not None and authorization != f"Bearer {self.token}":
            raise _Refusal(401, "Unauthorized", "Unauthorized")
        self._fault(method, after_applying=False)
        answer = self._apply(method, path, query, content_type, body)
        self._fault(method, after_applying=True)
        return answer

    def _apply(self, method: str, path: str, query: dict[str, str], content_type: str,
               body: Any) -> tuple[int, dict, list[str]]:
        missing = _Refusal(404, "NotFound", f"the server could not find the requested resource ({path})")
        if path == CRD_URL and method == "GET":
            return self._get_crd()
        if path.startswith(CONFIG_MAP_PREFIX):
            parts = path[len(CONFIG_MAP_PREFIX):].split("/")
            if len(parts) not in (2, 3) or parts[1] != "configmaps":
                raise missing
            return self._config_map(method, parts[0], parts[2] if len(parts) == 3 else None, body)
        if path.startswith(ROUTE_PREFIX):
            parts = path[len(ROUTE_PREFIX):].split("/")
            if len(parts) != 3 or parts[1] != "httproutes" or method != "GET":
                raise missing
            return self._get_route(parts[0], parts[2])
        if not path.startswith(PREFIX):
            raise missing
        parts = path[len(PREFIX):].split("/")
        if len(parts) < 2 or parts[1] != PLURAL or len(parts) > 3:
            raise missing
        namespace = parts[0]
        strict = query.get("fieldValidation") == "Strict"
        if len(parts) == 2:
            if method == "POST":
                return self._create(namespace, body, strict)
            raise _Refusal(405, "MethodNotAllowed", f"{method} is not supported on the collection here")
        key = (namespace, parts[2])
        if method == "GET":
            if key not in self.objects:
                raise _Refusal(404, "NotFound", f'inferenceservices.{GROUP} "{parts[2]}" not found', name=parts[2])
            return 200, copy.deepcopy(self.objects[key]), []
        if method == "PATCH":
            return self._patch(key, body, content_type, strict)
        if method == "DELETE":
            deleted = self.objects.pop(key, None)
            if deleted is None:
                raise _Refusal(404, "NotFound", f'inferenceservices.{GROUP} "{parts[2]}" not found', name=parts[2])
            self._knative.pop(key, None)
            self._standard.pop(key, None)
            self.routes.pop((namespace, f"{parts[2]}-predictor"), None)
            uid = deleted["metadata"]["uid"]
            for owned in [k for k, cm in self.config_maps.items()
                          if any(o.get("uid") == uid for o in cm["metadata"].get("ownerReferences") or [])]:
                del self.config_maps[owned]
            return 200, {"kind": "Status", "apiVersion": "v1", "status": "Success",
                         "details": {"name": parts[2], "group": GROUP, "kind": PLURAL}}, []
        raise _Refusal(405, "MethodNotAllowed", f"{method} is not supported here")

    # KServe controller ----------------------------------------------------------------

    def _schedule(self, key: tuple[str, str]) -> None:
        if self.status_delay_s <= 0:
            self._reconcile(key)
            return
        timer = threading.Timer(self.status_delay_s, self._reconcile, args=(key,))
        timer.daemon = True
        self._timers.append(timer)
        timer.start()

    def _mode(self, obj: dict) -> str:
        """utils.go GetDeploymentMode: status first, then the annotation, then the cluster default."""
        recorded = (obj.get("status") or {}).get("deploymentMode")
        annotated = obj["metadata"].get("annotations", {}).get(MODE_ANNOTATION)
        mode = recorded or annotated or self._default_mode()
        return LEGACY_MODES.get(mode, mode)

    def _reconcile(self, key: tuple[str, str]) -> None:
        with self._lock:
            obj = self.objects.get(key)
            if obj is None or not self.reconciling:
                return
            mode = self._mode(obj)
            if mode == KNATIVE:
                status = self._reconcile_knative(key, obj)
                # A rewound latestRolledoutRevision changes the ksvc traffic on the next reconcile, which the
                # status update itself triggers.
                while (status["components"]["predictor"].get("latestRolledoutRevision")
                       != (obj.get("status") or {}).get("components", {}).get("predictor", {})
                       .get("latestRolledoutRevision")):
                    obj["status"] = status
                    status = self._reconcile_knative(key, obj)
            elif mode == STANDARD:
                status = self._reconcile_standard(key, obj)
            else:
                status = {"conditions": _ready_conditions(_condition("PredictorReady", "Unknown"),
                                                          _condition("IngressReady", "Unknown"), [])}
            status["deploymentMode"] = mode
            obj["status"] = status
            obj["metadata"]["resourceVersion"] = str(next(self._versions))
            unknown, errors = object_problems(obj)
            if unknown or errors:
                self.internal_errors.append(f"status written for {key}: unknown {unknown}, errors {errors}")

    def _reconcile_knative(self, key: tuple[str, str], obj: dict) -> dict:
        name, namespace = obj["metadata"]["name"], obj["metadata"]["namespace"]
        ksvc_name = f"{name}-predictor"
        predictor = obj["spec"]["predictor"]
        annotations = obj["metadata"].get("annotations", {})
        ksvc = self._knative.setdefault(key, _Knative())
        previous = (obj.get("status") or {}).get("components", {}).get("predictor", {})
        template = json.dumps({"spec": {k: v for k, v in predictor.items() if k != "canaryTrafficPercent"},
                               "annotations": {**annotations, **predictor.get("annotations", {})}}, sort_keys=True)
        if template != ksvc.template:
            ksvc.template = template
            ksvc.config_generation += 1
            revision = _Revision(f"{ksvc_name}-{ksvc.config_generation:05d}", template,
                                 ready=storage_uri(predictor) not in self.failing_uris)
            ksvc.revisions.append(revision)
            ksvc.latest_created = revision.name
            if revision.ready:
                ksvc.latest_ready = revision.name
        # ksvc_reconciler.go L123-164: the ksvc's spec traffic.
        rolled_out = previous.get("latestRolledoutRevision", "")
        percent = predictor.get("canaryTrafficPercent")
        tag_routing = annotations.get(TAG_ROUTING) == "true"
        spec_traffic: list[dict] = []
        if percent is not None and rolled_out:
            spec_traffic.append({"latestRevision": True, "percent": percent, "tag": "latest" if tag_routing else ""})
            if percent < 100:
                spec_traffic.append({"revisionName": rolled_out, "latestRevision": False, "percent": 100 - percent,
                                     "tag": "prev"})
        else:
            spec_traffic.append({"latestRevision": True, "percent": 100, "tag": "latest" if tag_routing else ""})
        spec = json.dumps([template, spec_traffic], sort_keys=True)
        if spec != ksvc.spec:
            ksvc.spec, ksvc.generation = spec, ksvc.generation + 1
        # Knative's Route: latestRevision resolves to the latest *ready* revision; tagged entries get a URL.
        traffic = []
        if ksvc.latest_ready is not None:
            for target in spec_traffic:
                entry = {"revisionName": target.get("revisionName") or ksvc.latest_ready,
                         "latestRevision": target["latestRevision"], "percent": target["percent"]}
                if target["tag"]:
                    entry["tag"] = target["tag"]
                    entry["url"] = f"http://{target['tag']}-{ksvc_name}.{namespace}.{self.domain}"
                traffic.append(entry)
        component = self._propagate(previous, ksvc, traffic)
        failed = ksvc.latest_created != ksvc.latest_ready
        if ksvc.latest_ready is None and not failed:
            predictor_ready = _condition("PredictorReady", "Unknown")
        elif failed:
            # configuration_lifecycle.go MarkLatestCreatedFailed, through the ksvc's Ready.
            predictor_ready = _condition("PredictorReady", "False", "RevisionFailed",
                                         f'Revision "{ksvc.latest_created}" failed with message: Container failed '
                                         "with: model failed to load.")
        else:
            predictor_ready = _condition("PredictorReady", "True")
        url = f"http://{ksvc_name}.{namespace}.{self.domain}"
        if predictor_ready["status"] == "True" or previous.get("url"):
            component["url"] = url  # PropagateStatus sets it once Ready and never clears it
        # ingress_reconciler.go L82-127: IngressReady once the predictor has a URL, even after a failed update.
        ingress = _condition("IngressReady", "True") if component.get("url") else \
            _condition("IngressReady", "False", "PredictorIngressNotCreated", "Predictor ingress not created")
        routes_ready = _condition("RoutesReady", "True" if traffic else "Unknown", info=True)
        latest = _condition("LatestDeploymentReady", predictor_ready["status"],
                            "" if predictor_ready["status"] == "True" else "PredictorConfigurationReady not ready",
                            info=True)
        extra = [routes_ready, latest,
                 {**predictor_ready, "type": "PredictorConfigurationReady", "severity": "Info"},
                 {**routes_ready, "type": "PredictorRouteReady"}]
        status = {"observedGeneration": ksvc.generation,  # the ksvc's (status.go L635), not the isvc's
                  "conditions": _ready_conditions(predictor_ready, ingress, extra),
                  "components": {"predictor": component}}
        if component.get("url"):
            status["url"] = f"http://{name}.{namespace}.{self.domain}"
        return status

    @staticmethod
    def _propagate(previous: dict, ksvc: _Knative, traffic: list[dict]) -> dict:
        """inference_service_status.go PropagateStatus L567-636: the rolled-out bookkeeping and its rewind."""
        latest_rolled_out = previous.get("latestRolledoutRevision", "")
        previous_rolled_out = previous.get("previousRolledoutRevision", "")
        per_revision: dict[str, int] = {}
        for entry in traffic:
            per_revision[entry["revisionName"]] = per_revision.get(entry["revisionName"], 0) + entry["percent"]
        for entry in traffic:
            if entry["revisionName"] != ksvc.latest_ready or not entry["latestRevision"]:
                continue
            if latest_rolled_out != ksvc.latest_ready:
                if entry["percent"] == 100:
                    previous_rolled_out, latest_rolled_out = latest_rolled_out, ksvc.latest_ready
            elif ksvc.latest_ready == ksvc.latest_created and entry["percent"] < 100 \
                    and per_revision.get(entry["revisionName"]) == 100 and previous_rolled_out:
                # Rolled out with 100% and then rolled back: rewind to the one before.
                latest_rolled_out = previous_rolled_out
        component: dict[str, Any] = {"traffic": traffic}
        for name, value in (("latestCreatedRevision", ksvc.latest_created), ("latestReadyRevision", ksvc.latest_ready),
                            ("latestRolledoutRevision", latest_rolled_out),
                            ("previousRolledoutRevision", previous_rolled_out)):
            if value:  # omitempty
                component[name] = value
        return component

    def _reconcile_standard(self, key: tuple[str, str], obj: dict) -> dict:
        name, namespace = obj["metadata"]["name"], obj["metadata"]["namespace"]
        predictor, canaries = obj["spec"]["predictor"], obj["spec"].get("canary") or []
        state = self._standard.setdefault(key, _Standard())
        wanted: dict[str, dict] = {self._service(name, predictor.get("name")): predictor}
        for entry in canaries:
            # buildCanaryPredictor: the stable predictor with the canary's fields merged over it.
            wanted[self._service(name, entry["predictor"]["name"])] = {**predictor, **entry["predictor"]}
        for deployment in list(state.deployments):
            if deployment not in wanted:
                del state.deployments[deployment]  # orphan cleanup
        for deployment, spec in wanted.items():
            template = json.dumps(spec, sort_keys=True)
            current = state.deployments.get(deployment)
            ready = storage_uri(spec) not in self.failing_uris
            if current is None:
                state.deployments[deployment] = _Deployment(deployment, template, ready)
            elif current.template != template:
                current.template, current.ready, current.generation = template, ready, current.generation + 1
        stable = state.deployments[self._service(name, predictor.get("name"))]
        canary_statuses = [{"name": e["predictor"]["name"], "trafficPercent": e["trafficPercent"],
                            "ready": state.deployments[self._service(name, e["predictor"]["name"])].ready}
                           for e in canaries]
        predictor_ready = _condition("PredictorReady", "True") if stable.ready else \
            _condition("PredictorReady", "False", "ProgressDeadlineExceeded",
                       f'ReplicaSet "{stable.name}" has timed out progressing.')
        ingress = _condition("IngressReady", "True") if stable.ready else \
            _condition("IngressReady", "False", "PredictorIngressNotCreated", "Predictor ingress not created")
        extra = [_condition("Stopped", "False", info=True)]
        if canaries:
            all_ready = all(s["ready"] for s in canary_statuses)
            extra.append(_condition("CanaryPredictorReady", "True" if all_ready else "False",
                                    "AllCanariesReady" if all_ready else "CanariesNotReady", info=True))
        if self.gateway_api:
            self.routes[(namespace, f"{name}-predictor")] = self._http_route(obj, stable.name, canary_statuses)
        status = {"observedGeneration": stable.generation,  # deploymentList[0].Status.ObservedGeneration
                  "conditions": _ready_conditions(predictor_ready, ingress, extra),
                  "components": {"predictor": {"url": f"http://{name}-predictor.{namespace}.{self.domain}"}
                                 if stable.ready else {}}}
        if canaries:
            status["canaryStatuses"] = canary_statuses
        if stable.ready:
            status["url"] = f"http://{name}.{namespace}.{self.domain}"
        return status

    @staticmethod
    def _service(isvc: str, predictor_name: str | None) -> str:
        """constants.PredictorServiceName."""
        return f"{isvc}-{predictor_name}-predictor" if predictor_name else f"{isvc}-predictor"

    def _http_route(self, obj: dict, stable: str, canary_statuses: list[dict]) -> dict:
        """httproute_reconciler.go: the route {isvc}-predictor to the stable Service; after v0.20.0
        applyCanaryWeights (L684-743) weights only ready canaries, the stable one taking the rest."""
        name, namespace = obj["metadata"]["name"], obj["metadata"]["namespace"]
        backends = [{"kind": "Service", "name": stable, "port": 80}]
        if self.canary_weights and obj["spec"].get("canary"):
            ready = [s for s in canary_statuses if s["ready"]]
            backends[0]["weight"] = 100 - sum(s["trafficPercent"] for s in ready)
            backends += [{"kind": "Service", "name": self._service(name, s["name"]), "port": 80,
                          "weight": s["trafficPercent"]} for s in ready]
        return {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
                "metadata": {"name": f"{name}-predictor", "namespace": namespace},
                "spec": {"hostnames": [f"{name}-predictor.{namespace}.{self.domain}"],
                         "rules": [{"backendRefs": backends}]}}

    # HTTP ------------------------------------------------------------------------------

    def _handler(self):
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self, method: str) -> None:
                parsed = urlparse(self.path)
                query = {k: v[-1] for k, v in parse_qs(parsed.query).items()}
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip()
                warnings: list[str] = []
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = raw
                with stand_in._lock:
                    stand_in.requests.append(Recorded(method, parsed.path, query, dict(self.headers), body))
                    try:
                        if isinstance(body, bytes):
                            raise _Refusal(400, "BadRequest", "the request body is not JSON")
                        status, payload, warnings = stand_in._route(
                            method, parsed.path, query, content_type, body, self.headers.get("Authorization")
                        )
                    except _Refusal as refusal:
                        status, payload = refusal.status["code"], refusal.status
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for warning in warnings:
                    escaped = warning.replace("\\", "\\\\").replace('"', '\\"')
                    self.send_header("Warning", f'299 - "{escaped}"')
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):  # noqa: N802 - http.server's naming
                self._serve("GET")

            def do_POST(self):  # noqa: N802
                self._serve("POST")

            def do_PUT(self):  # noqa: N802
                self._serve("PUT")

            def do_PATCH(self):  # noqa: N802
                self._serve("PATCH")

            def do_DELETE(self):  # noqa: N802
                self._serve("DELETE")

            def log_message(self, *args: Any) -> None:
                pass

        return Handler
