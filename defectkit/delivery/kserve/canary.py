"""The changes a canary makes to a live InferenceService, as JSON merge patches.

Knative mode: ``spec.predictor.canaryTrafficPercent`` splits traffic between the latest
ready revision and the last rolled-out one.

Standard mode (KServe >= 0.20): ``spec.canary`` lists canary predictors, each with a
``name`` (its Deployment is ``{isvc}-{name}-predictor``) and a ``trafficPercent``. Promotion
makes the canary's predictor, name included, the stable one and empties the list, so the
canary's pods carry on without a restart; a rollback empties the list (the comment on
``Canary`` in ``pkg/apis/serving/v1beta1/inference_service.go``).
"""

from __future__ import annotations

import copy
import hashlib
from typing import Any, Mapping

from defectkit.delivery.backend import validate_percent
from defectkit.delivery.kserve.manifest import CONTAINER_NAME, FALLBACK_OPTION, STORAGE_URI_ENV, validate_storage_uri

# The canary's Service is {isvc}-{name}-predictor, a DNS label of at most 63 characters, and the
# longest valid isvc name (names.MAX_NAME_LENGTH) leaves 6 for the canary's name.
CANARY_NAME_LENGTH = 6


def predictor_storage_uri(predictor: Mapping[str, Any]) -> str | None:
    """The model URI a predictor spec's container serves (its ``STORAGE_URI`` variable)."""
    for container in predictor.get("containers") or []:
        if container.get("name") == CONTAINER_NAME:
            for var in container.get("env") or []:
                if var.get("name") == STORAGE_URI_ENV:
                    return var.get("value")
    return None


def storage_uri_of(service: Mapping[str, Any]) -> str | None:
    """The model URI the stable predictor of a (live) InferenceService serves."""
    return predictor_storage_uri(service.get("spec", {}).get("predictor", {}))


def _with_storage_uri(live: Mapping[str, Any], storage_uri: str) -> list[dict[str, Any]]:
    """The live predictor's containers with the model container pointed at ``storage_uri``, and the model
    it replaces (the stable one, the previous champion) as its fallback."""
    containers = copy.deepcopy(live.get("spec", {}).get("predictor", {}).get("containers") or [])
    target = next((c for c in containers if c.get("name") == CONTAINER_NAME), None)
    if target is None:
        name = live.get("metadata", {}).get("name")
        raise ValueError(
            f"InferenceService {name!r} has no predictor container named {CONTAINER_NAME!r}; "
            "create it with build_inference_service (defectkit rollout manifest prints one)"
        )
    stable = storage_uri_of(live)
    if live.get("spec", {}).get("predictor", {}).get("canaryTrafficPercent") == 0:
        # Knative at 0%: the spec still names a candidate that was rolled back (or is being deployed);
        # the stable model is the one that candidate fell back to.
        stable = _option_value(target.get("args") or [], FALLBACK_OPTION) or stable
    env = [var for var in target.get("env") or [] if var.get("name") != STORAGE_URI_ENV]
    target["env"] = [{"name": STORAGE_URI_ENV, "value": storage_uri}, *env]
    if stable and stable.rstrip("/") != storage_uri.rstrip("/"):
        target["args"] = _with_option(target.get("args") or [], FALLBACK_OPTION, stable)
    return containers


def _option_value(args: list[str], option: str) -> str | None:
    """The value of ``option`` in ``args`` (``option value`` or ``option=value``); None when absent."""
    for index, arg in enumerate(args):
        if arg == option and index + 1 < len(args):
            return args[index + 1]
        if arg.startswith(option + "="):
            return arg[len(option) + 1:]
    return None


def _with_option(args: list[str], option: str, value: str) -> list[str]:
    """``args`` with ``option`` set to ``value``, whether it was given as ``option value`` or ``option=value``."""
    kept, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            kept.append(arg)
    return [*kept, option, value]


def _preconditioned(live: Mapping[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """``patch`` refused by the API server (409 Conflict) if the object changed since ``live`` was read."""
    resource_version = live.get("metadata", {}).get("resourceVersion")
    if resource_version:
        patch["metadata"] = {"resourceVersion": resource_version}
    return patch


def patch_for_canary(live: Mapping[str, Any], storage_uri: str, percent: int = 0) -> dict[str, Any]:
    """Merge patch that points the predictor at ``storage_uri`` with ``percent`` of traffic on the new revision.

    ``live`` is the InferenceService as last read; its containers are kept as they are
    except for ``STORAGE_URI``, and its resourceVersion makes the API server refuse the
    patch (409 Conflict) if someone changed the object since.
    """
    validate_storage_uri(storage_uri)
    validate_percent(percent)
    containers = _with_storage_uri(live, storage_uri)
    return _preconditioned(live, {"spec": {"predictor": {"containers": containers, "canaryTrafficPercent": percent}}})


def patch_for_traffic(percent: int) -> dict[str, Any]:
    """Merge patch sending ``percent`` of traffic to the latest revision, the rest to the last rolled-out one."""
    return {"spec": {"predictor": {"canaryTrafficPercent": validate_percent(percent)}}}


def patch_for_promotion() -> dict[str, Any]:
    """Merge patch that removes canaryTrafficPercent: KServe then routes 100% to the latest revision."""
    return {"spec": {"predictor": {"canaryTrafficPercent": None}}}


def patch_for_rollback() -> dict[str, Any]:
    """Merge patch that sends all traffic back to the last rolled-out revision (canary at 0%)."""
    return patch_for_traffic(0)


# Standard mode ------------------------------------------------------------------------


def canary_name(storage_uri: str) -> str:
    """The canary predictor's name for ``storage_uri``: the same URI always gets the same name, so a
    resumed delivery finds its canary."""
    return "c" + hashlib.sha256(storage_uri.encode()).hexdigest()[:CANARY_NAME_LENGTH - 1]


def canary_entry(service: Mapping[str, Any]) -> dict[str, Any] | None:
    """The one entry of ``spec.canary``; None without one. More than one is not a delivery of ours."""
    entries = service.get("spec", {}).get("canary") or []
    if len(entries) > 1:
        names = [e.get("predictor", {}).get("name") for e in entries]
        raise ValueError(f"InferenceService {service.get('metadata', {}).get('name')!r} has {len(entries)} canaries "
                         f"{names}; a delivery drives one. Remove the others (spec.canary) first")
    return copy.deepcopy(entries[0]) if entries else None


def patch_for_standard_canary(live: Mapping[str, Any], storage_uri: str, percent: int = 0) -> dict[str, Any]:
    """Merge patch adding a canary predictor that serves ``storage_uri`` with ``percent`` of traffic.

    The canary carries only its name and containers: KServe builds it from a copy of the
    stable predictor with these merged over (``buildCanaryPredictor``), and its webhook
    refuses replica limits and autoscaling on a canary.
    """
    validate_storage_uri(storage_uri)
    validate_percent(percent)
    predictor = {"name": canary_name(storage_uri), "containers": _with_storage_uri(live, storage_uri)}
    return _preconditioned(live, {"spec": {"canary": [{"predictor": predictor, "trafficPercent": percent}]}})


def patch_for_standard_traffic(live: Mapping[str, Any], percent: int) -> dict[str, Any]:
    """Merge patch giving the live canary ``percent`` of traffic (a merge patch replaces the whole list)."""
    validate_percent(percent)
    entry = _required_canary(live)
    entry["trafficPercent"] = percent
    return _preconditioned(live, {"spec": {"canary": [entry]}})


def patch_for_standard_promotion(live: Mapping[str, Any]) -> dict[str, Any]:
    """Merge patch making the canary's predictor (its name and containers) the stable one, with no canary left."""
    predictor = _required_canary(live)["predictor"]
    return _preconditioned(live, {"spec": {"predictor": {"name": predictor["name"],
                                                         "containers": predictor["containers"]}, "canary": []}})


def patch_for_standard_rollback() -> dict[str, Any]:
    """Merge patch removing the canary: KServe deletes its Deployment and the stable one keeps all traffic."""
    return {"spec": {"canary": []}}


def _required_canary(live: Mapping[str, Any]) -> dict[str, Any]:
    entry = canary_entry(live)
    if entry is None:
        raise ValueError(f"InferenceService {live.get('metadata', {}).get('name')!r} has no canary (spec.canary is "
                         "empty); deploy the candidate first")
    return entry
