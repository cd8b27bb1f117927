"""The changes a canary makes to a live InferenceService, as JSON merge patches.

Serverless (Knative) mode: ``spec.predictor.canaryTrafficPercent`` splits traffic between
the latest ready revision and the last rolled-out one.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping

from defectkit.delivery.backend import validate_percent
from defectkit.delivery.kserve.manifest import CONTAINER_NAME, STORAGE_URI_ENV, validate_storage_uri


def storage_uri_of(service: Mapping[str, Any]) -> str | None:
    """The model URI the predictor container of a (live) InferenceService serves."""
    for container in service.get("spec", {}).get("predictor", {}).get("containers") or []:
        if container.get("name") == CONTAINER_NAME:
            for var in container.get("env") or []:
                if var.get("name") == STORAGE_URI_ENV:
                    return var.get("value")
    return None


def patch_for_canary(live: Mapping[str, Any], storage_uri: str, percent: int = 0) -> dict[str, Any]:
    """Merge patch that points the predictor at ``storage_uri`` with ``percent`` of traffic on the new revision.

    ``live`` is the InferenceService as last read; its containers are kept as they are
    except for ``STORAGE_URI``, and its resourceVersion makes the API server refuse the
    patch (409 Conflict) if someone changed the object since.
    """
    validate_storage_uri(storage_uri)
    validate_percent(percent)
    containers = copy.deepcopy(live.get("spec", {}).get("predictor", {}).get("containers") or [])
    target = next((c for c in containers if c.get("name") == CONTAINER_NAME), None)
    if target is None:
        name = live.get("metadata", {}).get("name")
        raise ValueError(
            f"InferenceService {name!r} has no predictor container named {CONTAINER_NAME!r}; "
            "create it with build_inference_service (defectkit rollout manifest prints one)"
        )
    env = [var for var in target.get("env") or [] if var.get("name") != STORAGE_URI_ENV]
    target["env"] = [{"name": STORAGE_URI_ENV, "value": storage_uri}, *env]
    patch: dict[str, Any] = {"spec": {"predictor": {"containers": containers, "canaryTrafficPercent": percent}}}
    resource_version = live.get("metadata", {}).get("resourceVersion")
    if resource_version:
        patch["metadata"] = {"resourceVersion": resource_version}
    return patch


def patch_for_traffic(percent: int) -> dict[str, Any]:
    """Merge patch sending ``percent`` of traffic to the latest revision, the rest to the last rolled-out one."""
    return {"spec": {"predictor": {"canaryTrafficPercent": validate_percent(percent)}}}


def patch_for_promotion() -> dict[str, Any]:
    """Merge patch that removes canaryTrafficPercent: KServe then routes 100% to the latest revision."""
    return {"spec": {"predictor": {"canaryTrafficPercent": None}}}


def patch_for_rollback() -> dict[str, Any]:
    """Merge patch that sends all traffic back to the last rolled-out revision (canary at 0%)."""
    return patch_for_traffic(0)
