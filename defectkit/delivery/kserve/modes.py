"""KServe's deployment modes: which one a service runs in, and which one a new service gets.

KServe decides it in this order (``pkg/controller/v1beta1/inferenceservice/utils/utils.go``
``GetDeploymentMode``): the mode recorded in ``status.deploymentMode``, then the annotation
``serving.kserve.io/deploymentMode``, then ``defaultDeploymentMode`` in the ``deploy`` key of
the ``inferenceservice-config`` ConfigMap in KServe's namespace. The values before v0.16
(Serverless, RawDeployment) are read as their new names (``constants.ParseDeploymentMode``).
"""

from __future__ import annotations

import json
from typing import Any, Mapping
from urllib.parse import quote

from defectkit.delivery.kserve.api import KubeApi, KubeApiError

KNATIVE = "Knative"
STANDARD = "Standard"
MODELMESH = "ModelMesh"
MODES = (KNATIVE, STANDARD, MODELMESH)
# pkg/constants/constants.go: LegacyServerless and LegacyRawDeployment, "deprecated: use Knative/Standard".
LEGACY = {"Serverless": KNATIVE, "RawDeployment": STANDARD}
ANNOTATION = "serving.kserve.io/deploymentMode"
CONFIG_MAP = "inferenceservice-config"
CONFIG_KEY = "deploy"
KSERVE_NAMESPACE = "kserve"


def normalise(value: str, where: str = "deployment mode") -> str:
    """``value`` as KServe >= 0.16 names it: Knative, Standard or ModelMesh."""
    mode = LEGACY.get(value, value)
    if mode not in MODES:
        raise ValueError(f"{where} {value!r} is not one of {', '.join(MODES)} (or the legacy "
                         f"{', '.join(LEGACY)})")
    return mode


def service_mode(service: Mapping[str, Any]) -> str | None:
    """The mode a live InferenceService runs in, from its status or annotation; None if neither says."""
    recorded = (service.get("status") or {}).get("deploymentMode")
    if recorded:
        return normalise(recorded, "status.deploymentMode")
    annotated = ((service.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION)
    if annotated:
        return normalise(annotated, f"annotation {ANNOTATION}")
    return None


def cluster_default(api: KubeApi, kserve_namespace: str = KSERVE_NAMESPACE) -> str:
    """``defaultDeploymentMode`` from KServe's ``inferenceservice-config`` ConfigMap."""
    path = f"/api/v1/namespaces/{quote(kserve_namespace)}/configmaps/{CONFIG_MAP}"
    where = f"ConfigMap {kserve_namespace}/{CONFIG_MAP}"
    try:
        config_map = api.request("GET", path)
    except KubeApiError as exc:
        if exc.status in (403, 404):
            raise ValueError(f"cannot read KServe's default deployment mode from {where} (HTTP {exc.status}): grant "
                             "get on that ConfigMap, or choose the mode of the new InferenceService "
                             f"(deployment_mode {' or '.join(MODES[:2])})") from exc
        raise
    try:
        deploy = json.loads((config_map.get("data") or {})[CONFIG_KEY])
        return normalise(deploy["defaultDeploymentMode"], f"{where} deploy.defaultDeploymentMode")
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{where} has no valid key {CONFIG_KEY!r} with defaultDeploymentMode ({exc}); KServe "
                         "itself refuses to start so") from exc


def mode_of(service: Mapping[str, Any], api: KubeApi, kserve_namespace: str = KSERVE_NAMESPACE) -> str:
    """The mode ``service`` runs in, the cluster default filling in when the service does not say."""
    return service_mode(service) or cluster_default(api, kserve_namespace)
