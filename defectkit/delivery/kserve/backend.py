"""KServe backend: a canary on one InferenceService, driven through the Kubernetes REST API.

Two deployment modes (:mod:`~defectkit.delivery.kserve.modes`), two ways to canary:

- Knative: ``spec.predictor.canaryTrafficPercent`` splits traffic between the last
  rolled-out revision and the latest ready one; a new ``STORAGE_URI`` makes a new
  revision. The split is read back from ``status.components.predictor.traffic``.
- Standard (KServe >= 0.20): ``spec.canary`` adds a canary Deployment beside the stable
  one. ``status.canaryStatuses[].trafficPercent`` only echoes the spec; the split is real
  only where KServe weights the Gateway API HTTPRoute ``{isvc}-predictor`` (after v0.20.0,
  ``applyCanaryWeights`` in ``reconcilers/ingress/httproute_reconciler.go``), so the
  route's weights are what this backend reads back, and without such a route it refuses
  to start a canary at all.

The backend patches the InferenceService (JSON merge patch, strict field validation)
and trusts nothing until the cluster shows it: every change waits for the requested
split, or fails with what it last saw. It never compares ``status.observedGeneration``
with ``metadata.generation``: KServe copies the former from the Knative Service or the
Deployment (``PropagateStatus``/``PropagateRawStatus``), whose generations count
differently.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator, Mapping
from urllib.parse import quote

import requests

from defectkit.delivery.backend import (
    CANARY,
    EMPTY,
    PROBE_BATCH,
    STABLE,
    ProbeAnswer,
    VariantMetrics,
    infer_request,
    probe_answers,
    validate_percent,
)
from defectkit.delivery.kserve import canary, manifest, modes, names
from defectkit.delivery.kserve.api import KubeApi, KubeApiError
from defectkit.delivery.kserve.prometheus import PodLabels, PrometheusClient, Variant, query_window_s, variant_metrics
from defectkit.retry import RetryableResponse, retry
from defectkit.serving.contract import SCORE_OUTPUT

log = logging.getLogger(__name__)

MERGE_PATCH = "application/merge-patch+json"
_PROBE_TRANSIENT_STATUS = frozenset({502, 503, 504})


HTTPROUTE_API = "gateway.networking.k8s.io/v1"
CRD_PATH = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/inferenceservices.serving.kserve.io"


class RolloutTimeout(TimeoutError):
    """The InferenceService's status did not reach the requested state in time."""


class CanaryUnsupported(ValueError):
    """No canary can happen on this InferenceService (its mode, its KServe version or its ingress)."""


@dataclass(frozen=True)
class TrafficSplit:
    """The predictor's traffic as the status reports it: candidate (newest revision) vs stable.

    The candidate is ``latestCreatedRevision``. KServe routes only to ready revisions, so a
    candidate that never became ready has 0% however the spec reads.
    """

    candidate_revision: str | None
    candidate_ready: bool
    candidate_percent: int
    candidate_url: str | None
    stable_revision: str | None
    stable_percent: int
    total_percent: int
    rolled_out_revision: str | None

    def describe(self) -> str:
        if self.candidate_revision is None:
            return "no revision reported yet"
        ready = "" if self.candidate_ready else " (not ready)"
        parts = [f"newest {self.candidate_revision}{ready} {self.candidate_percent}%"]
        if self.stable_revision is not None:
            parts.append(f"{self.stable_revision} {self.stable_percent}%")
        return ", ".join(parts) + f", rolled out: {self.rolled_out_revision or 'none'}"


def predictor_status(service: Mapping[str, Any]) -> dict[str, Any]:
    return (service.get("status") or {}).get("components", {}).get("predictor") or {}


def read_traffic(service: Mapping[str, Any]) -> TrafficSplit:
    status = predictor_status(service)
    entries = status.get("traffic") or []
    latest_entry = next((e for e in entries if e.get("latestRevision")), {})
    candidate = status.get("latestCreatedRevision") or latest_entry.get("revisionName")
    mine = [e for e in entries if e.get("revisionName") == candidate]
    others = [e for e in entries if e.get("revisionName") != candidate]
    # With tag routing KServe tags the rolled-out revision "prev"; otherwise pick the busiest other one.
    others.sort(key=lambda e: (e.get("tag") != "prev", -int(e.get("percent") or 0)))
    return TrafficSplit(
        candidate_revision=candidate,
        candidate_ready=candidate is not None and status.get("latestReadyRevision") == candidate,
        candidate_percent=sum(int(e.get("percent") or 0) for e in mine),
        candidate_url=next((e["url"] for e in mine if e.get("url") and e.get("latestRevision")), None),
        stable_revision=others[0].get("revisionName") if others else None,
        stable_percent=sum(int(e.get("percent") or 0) for e in others),
        total_percent=sum(int(e.get("percent") or 0) for e in entries),
        rolled_out_revision=status.get("latestRolledoutRevision"),
    )


def condition(service: Mapping[str, Any], kind: str) -> dict[str, Any] | None:
    return next((c for c in (service.get("status") or {}).get("conditions") or [] if c.get("type") == kind), None)


def _describe_condition(service: Mapping[str, Any], kind: str = "Ready") -> str:
    found = condition(service, kind)
    if found is None:
        return f"no {kind} condition yet"
    detail = ": ".join(x for x in (found.get("reason"), found.get("message")) if x)
    return f"{kind}={found.get('status')}" + (f" ({detail})" if detail else "")


def service_name(isvc: str, predictor_name: str | None) -> str:
    """The Service (and Deployment) of a predictor in Standard mode: ``constants.PredictorServiceName``."""
    return f"{isvc}-{predictor_name}-predictor" if predictor_name else f"{isvc}-predictor"


@dataclass(frozen=True)
class RouteSplit:
    """Standard mode: the weights of the HTTPRoute ``{isvc}-predictor`` per backend Service, as percents.

    ``candidate_service`` is the canary's Service while there is a canary; ``candidate_ready``
    is its ``canaryStatuses[].ready``.
    """

    weights: Mapping[str, int]
    stable_service: str
    candidate_service: str | None
    candidate_ready: bool

    @property
    def candidate_percent(self) -> int:
        return self.weights.get(self.candidate_service, 0) if self.candidate_service else 0

    @property
    def stable_percent(self) -> int:
        return self.weights.get(self.stable_service, 0)

    @property
    def total_percent(self) -> int:
        return sum(self.weights.values())

    def describe(self) -> str:
        routed = ", ".join(f"{name} {percent}%" for name, percent in self.weights.items()) or "no backends"
        canary_state = "no canary" if self.candidate_service is None else \
            f"canary {self.candidate_service} {'ready' if self.candidate_ready else 'not ready'}"
        return f"HTTPRoute weights: {routed}; {canary_state}"


def route_weights(route: Mapping[str, Any]) -> dict[str, int]:
    """Percent of requests per backend Service over the route's rules (weights default to 1, as the
    Gateway API says)."""
    weights: dict[str, float] = {}
    for rule in (route.get("spec") or {}).get("rules") or []:
        refs = rule.get("backendRefs") or []
        total = sum(int(ref.get("weight", 1)) for ref in refs)
        for ref in refs:
            share = 100 * int(ref.get("weight", 1)) / total if total else 0
            weights[ref["name"]] = max(weights.get(ref["name"], 0), share)
    return {name: round(share) for name, share in weights.items()}


class KServeBackend:
    """The delivery Backend for one KServe InferenceService, in Knative or Standard mode.

    ``probe_url`` is the candidate's own URL for probes before it gets traffic. By default:
    in Knative mode the tag URL KServe reports for the latest revision (tag routing on),
    which resolves through the cluster's ingress; in Standard mode the canary's own Service
    ``http://{isvc}-{canary}-predictor.{namespace}.svc``, reachable from inside the cluster.
    ``deployment_mode`` is the mode a service created here gets (default: the cluster's
    default); a live service's own mode always wins. ``candidate_uri`` is the model being
    delivered, for a process that resumes a delivery without deploying it again. ``standard_pod_label`` is the series
    label that carries a Standard-mode pod's ``app`` label (``{isvc}-{name}-predictor``).
    """

    def __init__(
        self,
        api_url: str | KubeApi,
        namespace: str,
        name: str,
        prometheus_url: str | PrometheusClient,
        *,
        token: str | None = None,
        verify: bool | str = True,
        model_name: str = "defectkit",
        probe_url: str | None = None,
        probe_headers: Mapping[str, str] | None = None,
        probe_batch: int = PROBE_BATCH,
        pod_labels: PodLabels = PodLabels(),
        standard_pod_label: str = "app",
        deployment_mode: str | None = None,
        kserve_namespace: str = modes.KSERVE_NAMESPACE,
        candidate_uri: str | None = None,
        traffic_timeout_s: float = 300.0,
        ready_timeout_s: float = 900.0,
        poll_interval_s: float = 2.0,
    ) -> None:
        if isinstance(api_url, KubeApi):
            if token is not None or verify is not True:
                raise ValueError("token and verify configure a new KubeApi; set them on the KubeApi passed instead")
            self.api = api_url
        else:
            self.api = KubeApi(api_url, token=token, verify=verify)
        self.namespace = namespace
        self.name = names.validate_name(name)
        self.prometheus = (
            prometheus_url if isinstance(prometheus_url, PrometheusClient) else PrometheusClient(prometheus_url)
        )
        self.model_name = model_name
        self.probe_url = probe_url.rstrip("/") if probe_url else None
        self.probe_headers = dict(probe_headers or {})
        self.probe_batch = probe_batch
        self.pod_labels = pod_labels
        self.standard_pod_label = standard_pod_label
        self.deployment_mode = modes.normalise(deployment_mode) if deployment_mode else None
        self.kserve_namespace = kserve_namespace
        self.traffic_timeout_s = traffic_timeout_s
        self.ready_timeout_s = ready_timeout_s
        self.poll_interval_s = poll_interval_s
        self._probe_session = requests.Session()
        # Standard mode: the candidate's model, to tell a promotion from a rollback once spec.canary is empty.
        self._candidate_uri = candidate_uri
        self._mode: str | None = None

    @property
    def _collection(self) -> str:
        return f"/apis/{manifest.API_VERSION}/namespaces/{quote(self.namespace)}/{manifest.PLURAL}"

    @property
    def _path(self) -> str:
        return f"{self._collection}/{quote(self.name)}"

    @property
    def _route_path(self) -> str:
        return f"/apis/{HTTPROUTE_API}/namespaces/{quote(self.namespace)}/httproutes/{quote(self.name)}-predictor"

    def __repr__(self) -> str:
        return f"KServeBackend({self.api.api_url}, {self.namespace}/{self.name})"

    def get(self) -> dict[str, Any]:
        """The InferenceService as the API server has it now."""
        return self.api.request("GET", self._path)

    def exists(self) -> bool:
        try:
            self.get()
            return True
        except KubeApiError as exc:
            if exc.status != 404:
                raise
            return False

    def mode(self, service: Mapping[str, Any] | None = None) -> str:
        """The deployment mode the InferenceService runs in (KServe refuses to change it once recorded)."""
        if self._mode is None:
            self._mode = modes.mode_of(self.get() if service is None else service, self.api, self.kserve_namespace)
        return self._mode

    def _patch(self, patch: dict[str, Any], *, precondition: bool = False) -> dict[str, Any]:
        # Without a resourceVersion precondition a merge patch is safe to resend after a 409.
        return self.api.request(
            "PATCH", self._path, body=patch, content_type=MERGE_PATCH,
            params={"fieldValidation": "Strict"}, retry_conflict=not precondition,
        )

    def _patch_live(self, make_patch: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
        """Read, build a patch preconditioned on what was read, send it; reread and rebuild on 409 Conflict."""
        for _ in range(self.api.retry_policy.attempts - 1):
            try:
                return self._patch(make_patch(self.get()), precondition=True)
            except KubeApiError as exc:
                if exc.status != 409:
                    raise
                log.info("InferenceService %s/%s changed while patching; rereading", self.namespace, self.name)
        return self._patch(make_patch(self.get()), precondition=True)

    # ------------------------------------------------------------------ first deployment

    def ensure_exists(self, config: manifest.ServiceConfig) -> bool:
        """Create the InferenceService for ``config`` unless it exists; True if it was created.

        A new service gets ``deployment_mode`` (default: the cluster's). Either way, waits
        until it is ready and its model serves all traffic.
        """
        if (config.namespace, config.name) != (self.namespace, self.name):
            raise ValueError(
                f"config is for {config.namespace}/{config.name} but this backend drives {self.namespace}/{self.name}"
            )
        created = not self.exists()
        if created:
            self._create(config)
        if self.mode() == modes.KNATIVE:
            self._wait(self.get(), "its first revision ready with 100% of traffic", self.ready_timeout_s,
                       lambda split: split.candidate_ready and split.candidate_percent == 100)
        else:
            # Without a Gateway API route there are no weights to read: Ready is all a new service shows.
            self._wait_standard("it Ready", self.ready_timeout_s, lambda service, split: _is_true(service, "Ready"))
        return created

    def _create(self, config: manifest.ServiceConfig) -> None:
        mode = self.deployment_mode or modes.cluster_default(self.api, self.kserve_namespace)
        if mode == modes.MODELMESH:
            raise CanaryUnsupported(f"cannot create InferenceService {self.namespace}/{self.name} in {mode} mode: "
                                    "defectkit serves a custom container, which ModelMesh does not run; choose "
                                    f"deployment mode {modes.KNATIVE} or {modes.STANDARD}")
        # The mode asked for is written as given (KServe 0.15 knows Serverless/RawDeployment, later ones Knative/
        # Standard); with none asked for, KServe's defaulter applies the cluster's.
        if self.deployment_mode and not config.deployment_mode:
            config = replace(config, deployment_mode=self.deployment_mode)
        replace(config, deployment_mode=mode)  # refuses autoscaling the mode the service will get cannot do
        body = manifest.build_inference_service(config)
        try:
            created = self.api.request("POST", self._collection, body=body, params={"fieldValidation": "Strict"})
        except KubeApiError as exc:
            # A create retried after a lost answer finds its own first attempt.
            if exc.status != 409:
                raise
            created = self.get()
        log.info("created InferenceService %s/%s in %s mode", self.namespace, self.name, mode)
        self._mode = modes.service_mode(created) or mode

    # ------------------------------------------------------------------ Backend

    def deploy_candidate(self, model_uri: str) -> None:
        """Start serving ``model_uri`` beside the stable model at 0% traffic, and wait until it is ready.

        Refuses, before changing anything, where no canary can happen.
        """
        manifest.validate_storage_uri(model_uri)
        live = self.get()
        mode = self.mode(live)
        if mode == modes.STANDARD:
            self._deploy_standard(live, model_uri)
        elif mode == modes.KNATIVE:
            self._deploy_knative(live, model_uri)
        else:
            raise CanaryUnsupported(
                f"InferenceService {self.namespace}/{self.name} runs in {mode} mode, where KServe has no canary; "
                f"recreate it in {modes.KNATIVE} mode (canaryTrafficPercent) or {modes.STANDARD} mode with a Gateway "
                "API ingress (spec.canary)")
        self._candidate_uri = model_uri

    def _deploy_knative(self, live: Mapping[str, Any], model_uri: str) -> None:
        before = read_traffic(live)
        unchanged = canary.storage_uri_of(live) == model_uri
        if unchanged and before.rolled_out_revision is not None \
                and before.rolled_out_revision == before.candidate_revision:
            raise ValueError(
                f"{model_uri} is already the rolled-out model of InferenceService {self.namespace}/{self.name}; "
                "there is no candidate to canary"
            )
        self._patch_live(lambda current: canary.patch_for_canary(current, model_uri, 0))
        log.info("deploying candidate %s to %s/%s at 0%% traffic", model_uri, self.namespace, self.name)

        def candidate_ready(split: TrafficSplit) -> bool:
            # Redeploying the URI already in the spec (a resumed delivery) makes no new revision.
            new_revision = unchanged or split.candidate_revision != before.candidate_revision
            return new_revision and split.candidate_ready and split.candidate_percent == 0 \
                and split.total_percent == 100

        self._wait(self.get(), f"a new ready revision serving {model_uri} at 0%", self.ready_timeout_s,
                   candidate_ready)

    def _deploy_standard(self, live: Mapping[str, Any], model_uri: str) -> None:
        if canary.storage_uri_of(live) == model_uri:
            raise ValueError(f"{model_uri} is already the stable model of InferenceService "
                             f"{self.namespace}/{self.name}; there is no candidate to canary")
        existing = canary.canary_entry(live)
        wanted = canary.canary_name(model_uri)
        if existing is not None and existing["predictor"].get("name") != wanted:
            raise ValueError(
                f"InferenceService {self.namespace}/{self.name} already has canary "
                f"{existing['predictor'].get('name')!r} serving "
                f"{canary.predictor_storage_uri(existing['predictor'])}; roll it back (spec.canary: []) first")
        self._check_standard_canary()
        if existing is None:
            self._patch_live(lambda current: canary.patch_for_standard_canary(current, model_uri, 0))
        log.info("deploying candidate %s to %s/%s as canary %s at 0%% traffic", model_uri, self.namespace, self.name,
                 wanted)
        self._wait_standard(f"canary {wanted} ready serving {model_uri} at 0%", self.ready_timeout_s,
                            lambda service, split: split.candidate_ready and split.candidate_percent == 0
                            and split.total_percent == 100)

    def _check_standard_canary(self) -> None:
        """Refuse, with what to do, where spec.canary would not split traffic."""
        crd = self.api.request("GET", CRD_PATH)
        versions = {v.get("name"): v for v in (crd.get("spec") or {}).get("versions") or []}
        spec = ((versions.get("v1beta1") or {}).get("schema") or {}).get("openAPIV3Schema", {}) \
            .get("properties", {}).get("spec", {}).get("properties", {})
        if "canary" not in spec:
            raise CanaryUnsupported(
                f"InferenceService {self.namespace}/{self.name} runs in {modes.STANDARD} mode, and this cluster's "
                "KServe has no spec.canary (it came with KServe 0.20): upgrade KServe, or deploy the service in "
                f"{modes.KNATIVE} mode")
        try:
            self.api.request("GET", self._route_path)
        except KubeApiError as exc:
            if exc.status != 404:
                raise
            raise CanaryUnsupported(
                f"InferenceService {self.namespace}/{self.name} runs in {modes.STANDARD} mode without a Gateway API "
                f"HTTPRoute {self.name}-predictor: KServe splits spec.canary traffic only through that route "
                "(KServe > 0.20.0), so every request would stay on the stable model. Turn on the Gateway API "
                "ingress (enableGatewayApi in the ingress key of inferenceservice-config), or deploy the service "
                f"in {modes.KNATIVE} mode") from None

    def set_traffic(self, canary_percent: int) -> None:
        """Send ``canary_percent`` of requests to the candidate; returns once the cluster shows it.

        Knative: at 100 KServe records the candidate as the rolled-out revision, after which
        canaryTrafficPercent can no longer send traffic back: use promote() to finish.
        """
        validate_percent(canary_percent)
        if self.mode() == modes.STANDARD:
            self._patch_live(lambda live: canary.patch_for_standard_traffic(live, canary_percent))
            self._wait_standard(f"the canary ready with {canary_percent}% of the route", self.traffic_timeout_s,
                                lambda service, split: split.candidate_ready
                                and split.candidate_percent == canary_percent and split.total_percent == 100)
            return
        self._patch(canary.patch_for_traffic(canary_percent))
        self._wait_for_candidate(canary_percent)

    def traffic(self) -> int:
        """The percent of traffic the candidate gets: Knative, read from the status; Standard, from the HTTPRoute."""
        service = self.get()
        if self.mode(service) == modes.STANDARD:
            return self._route_split(service).candidate_percent
        split = read_traffic(service)
        if split.candidate_revision is None:
            raise RolloutTimeout(
                f"InferenceService {self.namespace}/{self.name} reports no revisions in its status yet"
            )
        return split.candidate_percent

    def promote(self) -> None:
        """Make the candidate the stable model with all traffic."""
        if self.mode() == modes.STANDARD:
            service = self.get()
            entry = canary.canary_entry(service)
            if entry is None and canary.storage_uri_of(service) == self._candidate_uri:
                return  # promoted already (a resumed promotion)
            promoted = service_name(self.name, entry["predictor"]["name"]) if entry else None
            self._patch_live(canary.patch_for_standard_promotion)
            # Only once the route lists the promoted Service alone has KServe caught up with the patch.
            self._wait_standard(f"{promoted} serving all of the route", self.traffic_timeout_s,
                                lambda svc, split: canary.canary_entry(svc) is None
                                and list(split.weights) == [promoted] == [split.stable_service])
            return
        self._patch(canary.patch_for_promotion())
        self._wait_for_candidate(100)

    def rollback(self) -> None:
        """All traffic back to the stable model; Knative keeps the candidate's revision at 0%, Standard deletes
        the canary."""
        service = self.get()
        if self.mode(service) == modes.STANDARD:
            self._patch(canary.patch_for_standard_rollback())
            self._wait_standard("all of the route on the stable predictor", self.traffic_timeout_s,
                                lambda svc, split: split.candidate_service is None
                                and list(split.weights) == [split.stable_service])
            return
        split = read_traffic(service)
        if split.candidate_ready and split.candidate_revision == split.rolled_out_revision:
            raise RuntimeError(
                f"cannot roll back InferenceService {self.namespace}/{self.name}: its newest revision "
                f"{split.candidate_revision} is already the rolled-out one (it was promoted or reached 100%). "
                "Deploy the previous model as a new candidate and promote it instead."
            )
        self._patch(canary.patch_for_rollback())
        self._wait(self.get(), "all traffic on the rolled-out revision", self.traffic_timeout_s,
                   lambda split: split.candidate_percent == 0 and split.total_percent == 100)

    def _wait_for_candidate(self, canary_percent: int) -> None:
        self._wait(
            self.get(), f"the candidate ready with {canary_percent}% of traffic", self.traffic_timeout_s,
            lambda split: split.candidate_ready and split.candidate_percent == canary_percent
            and split.total_percent == 100,
        )

    def _wait(
        self,
        service: Mapping[str, Any],
        goal: str,
        timeout_s: float,
        reached: Callable[[TrafficSplit], bool],
    ) -> None:
        """Knative: poll the status until ``reached`` holds for the traffic it reports."""
        deadline = time.monotonic() + timeout_s
        delays = self._poll_delays()
        while True:
            split = read_traffic(service)
            if reached(split):
                log.info("InferenceService %s/%s: %s", self.namespace, self.name, split.describe())
                return
            if time.monotonic() >= deadline:
                raise RolloutTimeout(
                    f"InferenceService {self.namespace}/{self.name} did not report {goal} within {timeout_s:g}s: "
                    f"its status shows {split.describe()}; {_describe_condition(service)}. "
                    f"See `kubectl get isvc {self.name} -n {self.namespace} -o yaml` and its revisions' events."
                )
            time.sleep(next(delays))
            service = self.get()

    def _route_split(self, service: Mapping[str, Any]) -> RouteSplit:
        try:
            weights = route_weights(self.api.request("GET", self._route_path))
        except KubeApiError as exc:
            if exc.status != 404:
                raise
            weights = {}
        entry = canary.canary_entry(service)
        name = entry["predictor"]["name"] if entry else None
        statuses = {s.get("name"): s for s in (service.get("status") or {}).get("canaryStatuses") or []}
        stable = service_name(self.name, service.get("spec", {}).get("predictor", {}).get("name"))
        if entry is None and self._candidate_uri is not None and canary.storage_uri_of(service) == self._candidate_uri:
            # Promoted: the candidate is the stable predictor now.
            return RouteSplit(weights, stable, stable, True)
        return RouteSplit(weights, stable, service_name(self.name, name) if name else None,
                          bool(name and statuses.get(name, {}).get("ready")))

    def _wait_standard(self, goal: str, timeout_s: float,
                       reached: Callable[[Mapping[str, Any], RouteSplit], bool]) -> None:
        """Standard: poll the service and its HTTPRoute until ``reached`` holds."""
        deadline = time.monotonic() + timeout_s
        delays = self._poll_delays()
        while True:
            service = self.get()
            split = self._route_split(service)
            if reached(service, split):
                log.info("InferenceService %s/%s: %s", self.namespace, self.name, split.describe())
                return
            if time.monotonic() >= deadline:
                raise RolloutTimeout(
                    f"InferenceService {self.namespace}/{self.name} did not show {goal} within {timeout_s:g}s: "
                    f"{split.describe()}; {_describe_condition(service)}; "
                    f"{_describe_condition(service, 'CanaryPredictorReady')}. See `kubectl get isvc {self.name} -n "
                    f"{self.namespace} -o yaml` and `kubectl get httproute {self.name}-predictor -n "
                    f"{self.namespace} -o yaml`."
                )
            time.sleep(next(delays))

    def _poll_delays(self) -> Iterator[float]:
        """Short waits first (a change often lands within a second), growing to ``poll_interval_s``."""
        delay = min(0.05, self.poll_interval_s)
        while True:
            yield delay
            delay = min(delay * 2, self.poll_interval_s)

    def metrics(self, window_s: float) -> dict[str, VariantMetrics]:
        """Requests, 5xx errors, latency quantiles and a score sample per variant ("stable", "canary")
        from Prometheus over a step of ``window_s`` (queried over the window the scrape interval asks for:
        :func:`~defectkit.delivery.kserve.prometheus.query_window_s`); a variant with nothing deployed gets zeros.

        Knative tells variants apart by revision; Standard by Deployment (the pods' ``app`` label).
        """
        window_s = query_window_s(self.prometheus.scrape_interval_s, window_s)
        service = self.get()
        labels = self.pod_labels
        if self.mode(service) == modes.STANDARD:
            split = self._route_split(service)
            stable, candidate = split.stable_service, split.candidate_service
            labels = replace(labels, revision=self.standard_pod_label)
        else:
            traffic = read_traffic(service)
            stable, candidate = traffic.stable_revision, traffic.candidate_revision
        result = {}
        for variant, pods in ((STABLE, stable), (CANARY, candidate)):
            if pods is None:
                result[variant] = EMPTY
            else:
                result[variant] = variant_metrics(
                    self.prometheus, Variant(self.namespace, self.name, pods, labels), window_s
                )
        return result

    def candidate_url(self) -> str:
        """Where probes go: ``probe_url``; else Knative: the latest revision's tag URL from the status,
        Standard: the canary's Service."""
        if self.probe_url:
            return self.probe_url
        service = self.get()
        if self.mode(service) == modes.STANDARD:
            entry = canary.canary_entry(service)
            if entry is None:
                raise ValueError(f"InferenceService {self.namespace}/{self.name} has no canary to probe")
            return f"http://{service_name(self.name, entry['predictor']['name'])}.{self.namespace}.svc"
        split = read_traffic(service)
        if not split.candidate_url:
            raise ValueError(
                f"InferenceService {self.namespace}/{self.name} reports no URL for its latest revision: enable tag "
                f"routing (annotation {manifest.TAG_ROUTING_ANNOTATION}: 'true', ServiceConfig.tag_routing) or pass "
                "probe_url"
            )
        return split.candidate_url.rstrip("/")

    def probe(self, images: list[bytes]) -> ProbeAnswer:
        """Defect scores for ``images`` from the candidate revision itself, whatever the traffic split."""
        url = f"{self.candidate_url()}/v2/models/{quote(self.model_name)}/infer"
        batches = [images[start:start + self.probe_batch] for start in range(0, len(images), self.probe_batch)]
        bodies = [self._post_probe(url, infer_request(batch, (SCORE_OUTPUT,))) for batch in batches]
        return probe_answers(bodies, [len(batch) for batch in batches], url)

    def _post_probe(self, url: str, body: dict[str, Any]) -> dict[str, Any]:
        def post() -> dict[str, Any]:
            response = self._probe_session.post(url, json=body, headers=self.probe_headers, timeout=60)
            # Scale-from-zero and revision warm-up answer 502-504 for a while; anything else is final.
            if response.status_code in _PROBE_TRANSIENT_STATUS:
                raise RetryableResponse(response, response.status_code, response.headers)
            if not response.ok:
                raise ValueError(f"probe {url} failed: HTTP {response.status_code}: {response.text[:300]}")
            return response.json()

        def transient(exc: BaseException) -> bool:
            return isinstance(exc, (RetryableResponse, requests.ConnectionError, requests.Timeout))

        try:
            return retry(post, f"probe {url}", self.api.retry_policy, transient=transient)
        except RetryableResponse as exc:
            raise ValueError(f"probe {url} failed: HTTP {exc.response.status_code}: "
                             f"{exc.response.text[:300]}") from None


def _is_true(service: Mapping[str, Any], kind: str) -> bool:
    found = condition(service, kind)
    return found is not None and found.get("status") == "True"
