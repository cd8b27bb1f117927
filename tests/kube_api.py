"""An HTTP stand-in of the Kubernetes API serving KServe InferenceServices on 127.0.0.1.

What it does like a real API server:
- POST (create), GET, PATCH (``application/merge-patch+json``, RFC 7386) and DELETE on
  ``/apis/serving.kserve.io/v1beta1/namespaces/{ns}/inferenceservices[/{name}]``;
- every stored object is checked against the CRD schema (tests/crd.py): undeclared fields
  are refused with 400 under ``?fieldValidation=Strict`` and pruned with a ``Warning``
  header otherwise; schema violations are refused with 422 Invalid; errors are Status objects;
- ``metadata.resourceVersion`` in a patch is a precondition (409 Conflict when stale);
  ``generation`` moves on spec changes, ``resourceVersion`` on every write; ``status`` is a
  subresource, so clients cannot write it.

What it does like the KServe controller (Serverless mode), after ``status_delay_s``:
a predictor spec change other than ``canaryTrafficPercent`` makes a new revision
``<name>-predictor-0000N``; traffic goes to the latest ready revision by
``canaryTrafficPercent`` and to the last rolled-out revision for the rest; a revision that
gets 100% becomes the rolled-out one. Revisions whose STORAGE_URI is in ``failing_uris``
never become ready; with ``reconciling`` False the status is never updated.
"""

from __future__ import annotations

import copy
import itertools
import json
import threading
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

from tests.crd import object_problems, prune_object

GROUP = "serving.kserve.io"
VERSION = "v1beta1"
PREFIX = f"/apis/{GROUP}/{VERSION}/namespaces/"
PLURAL = "inferenceservices"
MERGE_PATCH = "application/merge-patch+json"
TAG_ROUTING = "serving.kserve.io/enable-tag-routing"


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


def status_object(code: int, reason: str, message: str, *, name: str = "", causes: list[dict] | None = None) -> dict:
    details: dict[str, Any] = {"name": name, "group": GROUP, "kind": PLURAL}
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


@dataclass
class _Rollout:
    """What the KServe controller remembers of one predictor."""

    revisions: int = 0
    template: str | None = None
    latest_created: str | None = None
    latest_ready: str | None = None
    rolled_out: str | None = None
    previous_rolled_out: str | None = None
    failed: set[str] = field(default_factory=set)


class _Refusal(Exception):
    def __init__(self, code: int, reason: str, message: str, **kwargs: Any) -> None:
        super().__init__(message)
        self.status = status_object(code, reason, message, **kwargs)


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class KubeApiStandIn:
    def __init__(self, *, status_delay_s: float = 0.0, token: str | None = None, domain: str = "example.com") -> None:
        self.status_delay_s = status_delay_s
        self.token = token
        self.domain = domain
        self.reconciling = True
        self.failing_uris: set[str] = set()
        self.requests: list[Recorded] = []
        self.objects: dict[tuple[str, str], dict] = {}
        # Problems in objects the stand-in itself wrote (status); a test must see none.
        self.internal_errors: list[str] = []
        self._faults: list[tuple[str, int, bool]] = []
        self._rollouts: dict[tuple[str, str], _Rollout] = {}
        self._versions = itertools.count(1000)
        self._lock = threading.RLock()
        self._timers: list[threading.Timer] = []
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

    def edit(self, namespace: str, name: str, patch: dict) -> None:
        """Change an object as another client would (new resourceVersion, no controller run)."""
        with self._lock:
            key = (namespace, name)
            self.objects[key] = merge_patch(self.objects[key], patch)
            self.objects[key]["metadata"]["resourceVersion"] = str(next(self._versions))

    def calls(self, method: str) -> list[Recorded]:
        return [r for r in self.requests if r.method == method]

    # API server ----------------------------------------------------------------------

    def _validate(self, obj: dict, *, strict: bool, name: str) -> tuple[dict, list[str]]:
        unknown, errors = object_problems(obj)
        warnings = []
        if unknown:
            if strict:
                raise _Refusal(400, "BadRequest", "strict decoding error: "
                               + ", ".join(f'unknown field "{path}"' for path in unknown), name=name)
            warnings = [f'unknown field "{path}"' for path in unknown]
            obj = prune_object(obj)
        if errors:
            raise _Refusal(
                422, "Invalid", f'InferenceService.{GROUP} "{name}" is invalid: ' + "; ".join(errors), name=name,
                causes=[{"reason": "FieldValueInvalid", "message": e, "field": e.split(":", 1)[0]} for e in errors],
            )
        return obj, warnings

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
        obj["metadata"] = {**obj["metadata"], "namespace": namespace, "uid": str(uuid.uuid4()), "generation": 1,
                           "resourceVersion": str(next(self._versions)), "creationTimestamp": _now()}
        self.objects[key] = obj
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
        if "status" in current:
            merged["status"] = current["status"]
        if merged == current:
            return 200, copy.deepcopy(current), warnings
        if merged.get("spec") != current.get("spec"):
            merged["metadata"]["generation"] = current["metadata"]["generation"] + 1
            self._schedule(key)
        merged["metadata"]["resourceVersion"] = str(next(self._versions))
        self.objects[key] = merged
        return 200, copy.deepcopy(merged), warnings

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
        if not path.startswith(PREFIX):
            raise _Refusal(404, "NotFound", f"the server could not find the requested resource ({path})")
        parts = path[len(PREFIX):].split("/")
        if len(parts) < 2 or parts[1] != PLURAL or len(parts) > 3:
            raise _Refusal(404, "NotFound", f"the server could not find the requested resource ({path})")
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
            if self.objects.pop(key, None) is None:
                raise _Refusal(404, "NotFound", f'inferenceservices.{GROUP} "{parts[2]}" not found', name=parts[2])
            self._rollouts.pop(key, None)
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

    def _entry(self, obj: dict, revision: str, percent: int, latest: bool, tag: str) -> dict:
        entry = {"revisionName": revision, "percent": percent, "latestRevision": latest,
                 "configurationName": f"{obj['metadata']['name']}-predictor"}
        if obj["metadata"].get("annotations", {}).get(TAG_ROUTING) == "true":
            namespace = obj["metadata"]["namespace"]
            entry["tag"] = tag
            entry["url"] = f"http://{tag}-{obj['metadata']['name']}-predictor.{namespace}.{self.domain}"
        return entry

    def _reconcile(self, key: tuple[str, str]) -> None:
        with self._lock:
            obj = self.objects.get(key)
            if obj is None or not self.reconciling:
                return
            name, namespace = obj["metadata"]["name"], obj["metadata"]["namespace"]
            predictor = obj["spec"]["predictor"]
            rollout = self._rollouts.setdefault(key, _Rollout())
            template = json.dumps({k: v for k, v in predictor.items() if k != "canaryTrafficPercent"}, sort_keys=True)
            if template != rollout.template:
                rollout.template = template
                rollout.revisions += 1
                revision = f"{name}-predictor-{rollout.revisions:05d}"
                rollout.latest_created = revision
                uris = [e.get("value") for c in predictor.get("containers", []) for e in c.get("env", [])
                        if e.get("name") == "STORAGE_URI"]
                if any(uri in self.failing_uris for uri in uris):
                    rollout.failed.add(revision)
                else:
                    rollout.latest_ready = revision
            latest, canary = rollout.latest_ready, predictor.get("canaryTrafficPercent")
            traffic: list[dict] = []
            if latest is not None:
                if canary is None or rollout.rolled_out is None or latest == rollout.rolled_out:
                    traffic = [self._entry(obj, latest, 100, True, "latest")]
                else:
                    traffic = [self._entry(obj, latest, canary, True, "latest"),
                               self._entry(obj, rollout.rolled_out, 100 - canary, False, "prev")]
                # KServe's status propagation: a ready revision given 100% is the rolled-out one from now on.
                if any(e["revisionName"] == latest and e["percent"] == 100 for e in traffic) \
                        and rollout.rolled_out != latest:
                    rollout.previous_rolled_out, rollout.rolled_out = rollout.rolled_out, latest
            failed = rollout.latest_created in rollout.failed
            ready = latest is not None and not failed
            condition = {"type": "Ready", "status": "True" if ready else "False", "lastTransitionTime": _now()}
            if failed:
                condition |= {"reason": "RevisionFailed", "message": f'Revision "{rollout.latest_created}" failed '
                              "with message: container kserve-container exited: model failed to load."}
            components = {"latestCreatedRevision": rollout.latest_created, "traffic": traffic,
                          "url": f"http://{name}-predictor.{namespace}.{self.domain}"}
            for field_name, value in (("latestReadyRevision", rollout.latest_ready),
                                      ("latestRolledoutRevision", rollout.rolled_out),
                                      ("previousRolledoutRevision", rollout.previous_rolled_out)):
                if value is not None:
                    components[field_name] = value
            obj["status"] = {
                "observedGeneration": obj["metadata"]["generation"],
                "url": f"http://{name}.{namespace}.{self.domain}",
                "deploymentMode": "Serverless",
                "conditions": [condition],
                "components": {"predictor": components},
            }
            obj["metadata"]["resourceVersion"] = str(next(self._versions))
            unknown, errors = object_problems(obj)
            if unknown or errors:
                self.internal_errors.append(f"status written for {key}: unknown {unknown}, errors {errors}")

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

            def do_PATCH(self):  # noqa: N802
                self._serve("PATCH")

            def do_DELETE(self):  # noqa: N802
                self._serve("DELETE")

            def log_message(self, *args: Any) -> None:
                pass

        return Handler
