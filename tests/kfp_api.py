"""An HTTP stand-in of the Kubeflow Pipelines v2beta1 REST API on 127.0.0.1, in multi-user mode.

It keeps experiments and runs in memory and records every request, so tests
can check what a real KFP API server would have been sent. As KFP's API
server does in multi-user mode (backend/src/apiserver/resource/resource_manager.go,
``ResourceManager.IsAuthorized``: no user identity in the request is
``NewUnauthenticatedError``, HTTP 401; a SubjectAccessReview that does not
allow the verb in the resource's namespace is ``NewPermissionDeniedError``,
HTTP 403), every call but healthz needs a bearer token, and a token reaches
only the namespaces it is granted. A run and a recurring run belong to the
namespace of their experiment.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping

from tests.stand_ins import JsonServer

PREFIX = "/apis/v2beta1"
TOKEN = "kubeflow-user-token"
NAMESPACE = "kubeflow-user"
# Each GET of a run moves it one state on, so that a client waiting for it sees it run and end.
RUN_STATES = ("PENDING", "RUNNING", "SUCCEEDED")


class KfpApiStandIn:
    def __init__(self, grants: dict[str, set[str]] | None = None) -> None:
        """``grants``: bearer token -> namespaces it may use (default: TOKEN -> {NAMESPACE})."""
        self.grants = {TOKEN: {NAMESPACE}} if grants is None else grants
        self.requests: list[tuple[str, str, dict | None]] = []
        self.experiments: dict[str, dict] = {}
        self.runs: dict[str, dict] = {}
        self.recurring_runs: dict[str, dict] = {}
        self._server = JsonServer(self._serve)
        self.url = self._server.url

    def __enter__(self) -> KfpApiStandIn:
        return self

    def __exit__(self, *exc) -> None:
        self._server.close()

    def _namespace_of(self, experiment_id: str | None) -> str | None:
        experiment = self.experiments.get(experiment_id or "")
        return None if experiment is None else experiment.get("namespace", "")

    def _refused(self, authorization: str, namespace: str) -> tuple[int, dict] | None:
        scheme, _, token = authorization.partition(" ")
        if scheme != "Bearer" or token not in self.grants:
            return 401, {"error": "Authentication request failed: no valid bearer token", "code": 16}
        if namespace not in self.grants[token]:
            return 403, {"error": f"PermissionDenied: the token may not use namespace {namespace!r}", "code": 7}
        return None

    def _serve(self, method: str, path: str, query: dict, body: dict | None,
               headers: Mapping[str, str]) -> tuple[int, dict]:
        self.requests.append((method, path, body))
        return self._route(method, path, query, body, headers.get("Authorization", ""))

    def _route(self, method: str, path: str, query: dict, body: dict | None,
               authorization: str) -> tuple[int, dict]:
        if not path.startswith(PREFIX):
            return 404, {"error": f"no route {path}"}
        resource = path[len(PREFIX):].strip("/").split("/")
        if resource == ["healthz"]:
            return 200, {"multi_user": True}
        if resource == ["experiments"] and method == "GET":
            namespace = query.get("namespace", [""])[0]
            if refused := self._refused(authorization, namespace):
                return refused
            wanted = json.dumps(query.get("filter", [""])[0])
            found = [e for e in self.experiments.values()
                     if e["display_name"] in wanted and e.get("namespace", "") == namespace]
            return 200, {"experiments": found, "total_size": len(found)}
        if resource == ["experiments"] and method == "POST":
            if refused := self._refused(authorization, body.get("namespace", "")):
                return refused
            experiment = {**body, "experiment_id": str(uuid.uuid4()), "storage_state": "AVAILABLE"}
            self.experiments[experiment["experiment_id"]] = experiment
            return 200, experiment
        if resource in (["runs"], ["recurringruns"]) and method == "POST":
            namespace = self._namespace_of(body.get("experiment_id"))
            if namespace is None:
                return 400, {"error": f"unknown experiment {body.get('experiment_id')!r}"}
            if refused := self._refused(authorization, namespace):
                return refused
            if resource == ["runs"]:
                run = {**body, "run_id": str(uuid.uuid4()), "state": RUN_STATES[0]}
                self.runs[run["run_id"]] = run
                return 200, run
            recurring = {**body, "recurring_run_id": str(uuid.uuid4()), "status": "ENABLED"}
            self.recurring_runs[recurring["recurring_run_id"]] = recurring
            return 200, recurring
        if resource[:1] == ["runs"] and len(resource) == 2 and method == "GET":
            run = self.runs.get(resource[1])
            if run is None:
                return 404, {"error": "no such run"}
            if refused := self._refused(authorization, self._namespace_of(run["experiment_id"])):
                return refused
            shown = dict(run)
            run["state"] = RUN_STATES[min(RUN_STATES.index(run["state"]) + 1, len(RUN_STATES) - 1)]
            return 200, shown
        return 404, {"error": f"no route {method} {path}"}
