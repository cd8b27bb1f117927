"""An HTTP stand-in of the Kubeflow Pipelines v2beta1 REST API on 127.0.0.1.

It keeps experiments and runs in memory and records every request, so tests
can check what a real KFP API server would have been sent.
"""

from __future__ import annotations

import json
import uuid

from tests.stand_ins import JsonServer

PREFIX = "/apis/v2beta1"


class KfpApiStandIn:
    def __init__(self) -> None:
        self.requests: list[tuple[str, str, dict | None]] = []
        self.experiments: dict[str, dict] = {}
        self.runs: dict[str, dict] = {}
        self.recurring_runs: dict[str, dict] = {}
        self._server = JsonServer(self._recorded)
        self.url = self._server.url

    def __enter__(self) -> KfpApiStandIn:
        return self

    def __exit__(self, *exc) -> None:
        self._server.close()

    def _recorded(self, method: str, path: str, query: dict, body: dict | None) -> tuple[int, dict]:
        self.requests.append((method, path, body))
        return self._route(method, path, query, body)

    def _route(self, method: str, path: str, query: dict, body: dict | None) -> tuple[int, dict]:
        if not path.startswith(PREFIX):
            return 404, {"error": f"no route {path}"}
        resource = path[len(PREFIX):].strip("/").split("/")
        if resource == ["healthz"]:
            return 200, {"multi_user": False}
        if resource == ["experiments"] and method == "GET":
            wanted = json.dumps(query.get("filter", [""])[0])
            found = [e for e in self.experiments.values() if e["display_name"] in wanted]
            return 200, {"experiments": found, "total_size": len(found)}
        if resource == ["experiments"] and method == "POST":
            experiment = {**body, "experiment_id": str(uuid.uuid4()), "storage_state": "AVAILABLE"}
            self.experiments[experiment["experiment_id"]] = experiment
            return 200, experiment
        if resource == ["runs"] and method == "POST":
            if body.get("experiment_id") not in self.experiments:
                return 400, {"error": f"unknown experiment {body.get('experiment_id')!r}"}
            run = {**body, "run_id": str(uuid.uuid4()), "state": "PENDING"}
            self.runs[run["run_id"]] = run
            return 200, run
        if resource[:1] == ["runs"] and len(resource) == 2 and method == "GET":
            run = self.runs.get(resource[1])
            return (200, run) if run else (404, {"error": "no such run"})
        if resource == ["recurringruns"] and method == "POST":
            recurring = {**body, "recurring_run_id": str(uuid.uuid4()), "status": "ENABLED"}
            self.recurring_runs[recurring["recurring_run_id"]] = recurring
            return 200, recurring
        return 404, {"error": f"no route {method} {path}"}
