"""The rollout state of a KServe delivery, kept on the cluster beside its InferenceService.

A pipeline step's pod is gone by the time a retry or the exit handler runs, and its
files with it, so the state lives in the cluster, as Flagger and Argo Rollouts keep
theirs with their own resources. Not in an annotation of the InferenceService, though:
KServe copies every isvc annotation (less a configured deny list) into the predictor's
pod template (``buildPredictorResources`` in
``pkg/controller/v1beta1/inferenceservice/components/predictor.go``: ``utils.Filter(isvc.Annotations,
...ServiceAnnotationDisallowedList)``), and in Knative mode that template is the revision
template (``reconcilers/knative/ksvc_reconciler.go``, ``Template.ObjectMeta.Annotations``),
so every state write would start a new revision; in Standard mode a rolling update.
Instead a ConfigMap ``{isvc}-rollout`` in the same namespace holds it, owned by the
InferenceService (deleted with it), and every write carries the resourceVersion last
read, so of two processes driving one service only one can write.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

from defectkit.delivery.kserve import manifest
from defectkit.delivery.kserve.api import KubeApi, KubeApiError
from defectkit.delivery.state import RolloutState, StateConflict

STATE_KEY = "state.json"
SUFFIX = "-rollout"


class ConfigMapStore:
    """The rollout state of InferenceService ``namespace/service`` in ConfigMap ``{service}-rollout``."""

    def __init__(self, api: KubeApi, namespace: str, service: str) -> None:
        self.api = api
        self.namespace = namespace
        self.service = service
        self.name = service + SUFFIX
        self._resource_version: str | None = None

    @property
    def where(self) -> str:
        return f"ConfigMap {self.namespace}/{self.name} (beside InferenceService {self.namespace}/{self.service})"

    @property
    def _collection(self) -> str:
        return f"/api/v1/namespaces/{quote(self.namespace)}/configmaps"

    @property
    def _path(self) -> str:
        return f"{self._collection}/{quote(self.name)}"

    def load(self) -> RolloutState | None:
        try:
            config_map = self.api.request("GET", self._path)
        except KubeApiError as exc:
            if exc.status == 404:
                self._resource_version = None
                return None
            raise
        self._resource_version = config_map["metadata"]["resourceVersion"]
        text = (config_map.get("data") or {}).get(STATE_KEY)
        try:
            return RolloutState.from_json(json.loads(text))
        except (json.JSONDecodeError, TypeError, ValueError) as exc:
            raise ValueError(f"the rollout state in {self.where} is unreadable ({exc}); inspect it (kubectl get "
                             f"configmap {self.name} -n {self.namespace} -o yaml), then delete it to start a new "
                             "delivery") from exc

    def save(self, state: RolloutState) -> None:
        if self._resource_version is None:
            self.load()
        data = {STATE_KEY: json.dumps(state.to_json(), sort_keys=True)}
        if self._resource_version is None:
            saved = self._create(data)
        else:
            body = self._body(data)
            body["metadata"]["resourceVersion"] = self._resource_version
            try:
                saved = self.api.request("PUT", self._path, body=body)
            except KubeApiError as exc:
                if exc.status != 409:
                    raise
                raise StateConflict(f"{self.where} was changed by another process since this one read it: another "
                                    "delivery to this InferenceService is running (or ran meanwhile)") from exc
        self._resource_version = saved["metadata"]["resourceVersion"]

    def _create(self, data: dict[str, str]) -> dict[str, Any]:
        body = self._body(data)
        body["metadata"]["ownerReferences"] = [self._owner()]
        try:
            return self.api.request("POST", self._collection, body=body)
        except KubeApiError as exc:
            if exc.status != 409:
                raise
        # A create retried after a lost answer finds its own first attempt; anything else is another writer.
        existing = self.api.request("GET", self._path)
        if existing.get("data") != data:
            raise StateConflict(f"{self.where} was created by another process meanwhile: another delivery to this "
                                "InferenceService is running")
        return existing

    def _owner(self) -> dict[str, Any]:
        collection = f"/apis/{manifest.API_VERSION}/namespaces/{quote(self.namespace)}/{manifest.PLURAL}"
        service = self.api.request("GET", f"{collection}/{quote(self.service)}")
        # Garbage collection deletes the state with its InferenceService.
        return {"apiVersion": manifest.API_VERSION, "kind": manifest.KIND, "name": self.service,
                "uid": service["metadata"]["uid"]}

    def _body(self, data: dict[str, str]) -> dict[str, Any]:
        return {"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": self.name, "namespace": self.namespace,
                             "labels": {"app.kubernetes.io/managed-by": "defectkit",
                                        "defectkit.io/inferenceservice": self.service}},
                "data": data}
