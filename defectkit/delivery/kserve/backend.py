"""KServe backend: a canary on one InferenceService, driven through the Kubernetes REST API.

KServe (Serverless mode) splits traffic between the last rolled-out revision and the
latest ready one by ``spec.predictor.canaryTrafficPercent``; a new ``STORAGE_URI`` makes a
new revision. This backend patches the InferenceService (JSON merge patch, strict field
validation) and trusts nothing until ``status.components.predictor.traffic`` shows it:
every change waits for the status to report the requested split, or fails with the
status it last saw.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping
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
from defectkit.delivery.kserve import canary, manifest
from defectkit.delivery.kserve.api import KubeApi, KubeApiError
from defectkit.delivery.kserve.prometheus import PodLabels, PrometheusClient, Variant, variant_metrics
from defectkit.retry import RetryableResponse, retry
from defectkit.serving.contract import SCORE_OUTPUT

log = logging.getLogger(__name__)

MERGE_PATCH = "application/merge-patch+json"
_PROBE_TRANSIENT_STATUS = frozenset({502, 503, 504})


class RolloutTimeout(TimeoutError):
    """The InferenceService's status did not reach the requested state in time."""


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


def _ready_condition(service: Mapping[str, Any]) -> str:
    for condition in (service.get("status") or {}).get("conditions") or []:
        if condition.get("type") == "Ready":
            detail = ": ".join(x for x in (condition.get("reason"), condition.get("message")) if x)
            return f"Ready={condition.get('status')}" + (f" ({detail})" if detail else "")
    return "no Ready condition yet"


class KServeBackend:
    """The delivery Backend for one KServe InferenceService (Serverless mode, canary rollout).

    ``probe_url`` is the candidate's own URL for probes before it gets traffic; by default
    the tag URL KServe reports for the latest revision (tag routing on), which resolves
    through the cluster's ingress. Inside the cluster ``http://latest-<name>-predictor.<ns>``
    (Knative's tag service) works too.
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
        self.name = manifest.validate_name(name)
        self.prometheus = (
            prometheus_url if isinstance(prometheus_url, PrometheusClient) else PrometheusClient(prometheus_url)
        )
        self.model_name = model_name
        self.probe_url = probe_url.rstrip("/") if probe_url else None
        self.probe_headers = dict(probe_headers or {})
        self.probe_batch = probe_batch
        self.pod_labels = pod_labels
        self.traffic_timeout_s = traffic_timeout_s
        self.ready_timeout_s = ready_timeout_s
        self.poll_interval_s = poll_interval_s
        self._probe_session = requests.Session()

    @property
    def _collection(self) -> str:
        return f"/apis/{manifest.API_VERSION}/namespaces/{quote(self.namespace)}/{manifest.PLURAL}"

    @property
    def _path(self) -> str:
        return f"{self._collection}/{quote(self.name)}"

    def __repr__(self) -> str:
        return f"KServeBackend({self.api.api_url}, {self.namespace}/{self.name})"

    def get(self) -> dict[str, Any]:
        """The InferenceService as the API server has it now."""
        return self.api.request("GET", self._path)

    def _patch(self, patch: dict[str, Any], *, precondition: bool = False) -> dict[str, Any]:
        # Without a resourceVersion precondition a merge patch is safe to resend after a 409.
        return self.api.request(
            "PATCH", self._path, body=patch, content_type=MERGE_PATCH,
            params={"fieldValidation": "Strict"}, retry_conflict=not precondition,
        )

    def ensure_exists(self, config: manifest.ServiceConfig) -> bool:
        """Create the InferenceService for ``config`` unless it exists; True if it was created.

        Waits until its first revision is ready and serving all traffic.
        """
        if (config.namespace, config.name) != (self.namespace, self.name):
            raise ValueError(
                f"config is for {config.namespace}/{config.name} but this backend drives {self.namespace}/{self.name}"
            )
        try:
            self.get()
            return False
        except KubeApiError as exc:
            if exc.status != 404:
                raise
        body = manifest.build_inference_service(config)
        try:
            created = self.api.request("POST", self._collection, body=body, params={"fieldValidation": "Strict"})
        except KubeApiError as exc:
            # A create retried after a lost answer finds its own first attempt.
            if exc.status != 409:
                raise
            created = self.get()
        log.info("created InferenceService %s/%s", self.namespace, self.name)
        self._wait(created, "its first revision ready with 100% of traffic", self.ready_timeout_s,
                   lambda split: split.candidate_ready and split.candidate_percent == 100)
        return True

    def deploy_candidate(self, model_uri: str) -> None:
        """Start a revision serving ``model_uri`` at 0% traffic, and wait until it is ready."""
        manifest.validate_storage_uri(model_uri)
        for attempt in range(1, self.api.retry_policy.attempts + 1):
            live = self.get()
            before = read_traffic(live)
            unchanged = canary.storage_uri_of(live) == model_uri
            if unchanged and before.rolled_out_revision is not None \
                    and before.rolled_out_revision == before.candidate_revision:
                raise ValueError(
                    f"{model_uri} is already the rolled-out model of InferenceService {self.namespace}/{self.name}; "
                    "there is no candidate to canary"
                )
            try:
                patched = self._patch(canary.patch_for_canary(live, model_uri, 0), precondition=True)
                break
            except KubeApiError as exc:
                if exc.status != 409 or attempt == self.api.retry_policy.attempts:
                    raise
                log.info("InferenceService %s/%s changed while patching; rereading", self.namespace, self.name)
        log.info("deploying candidate %s to %s/%s at 0%% traffic", model_uri, self.namespace, self.name)

        def candidate_ready(split: TrafficSplit) -> bool:
            # Redeploying the URI already in the spec (a resumed delivery) makes no new revision.
            new_revision = unchanged or split.candidate_revision != before.candidate_revision
            return new_revision and split.candidate_ready and split.candidate_percent == 0 \
                and split.total_percent == 100

        self._wait(patched, f"a new ready revision serving {model_uri} at 0%", self.ready_timeout_s, candidate_ready)

    def set_traffic(self, canary_percent: int) -> None:
        """Send ``canary_percent`` of requests to the candidate; returns once the status shows it.

        At 100 KServe records the candidate as the rolled-out revision, after which
        canaryTrafficPercent can no longer send traffic back: use promote() to finish.
        """
        validate_percent(canary_percent)
        patched = self._patch(canary.patch_for_traffic(canary_percent))
        self._wait_for_candidate(patched, canary_percent)

    def traffic(self) -> int:
        """The percent of traffic the candidate (the newest revision) gets, read from the status."""
        split = read_traffic(self.get())
        if split.candidate_revision is None:
            raise RolloutTimeout(
                f"InferenceService {self.namespace}/{self.name} reports no revisions in its status yet"
            )
        return split.candidate_percent

    def promote(self) -> None:
        """Make the candidate the rolled-out revision: canaryTrafficPercent removed, 100% to it."""
        patched = self._patch(canary.patch_for_promotion())
        self._wait_for_candidate(patched, 100)

    def rollback(self) -> None:
        """All traffic back to the rolled-out revision; the candidate stays deployed at 0%."""
        split = read_traffic(self.get())
        if split.candidate_ready and split.candidate_revision == split.rolled_out_revision:
            raise RuntimeError(
                f"cannot roll back InferenceService {self.namespace}/{self.name}: its newest revision "
                f"{split.candidate_revision} is already the rolled-out one (it was promoted or reached 100%). "
                "Deploy the previous model as a new candidate and promote it instead."
            )
        patched = self._patch(canary.patch_for_rollback())
        self._wait(patched, "all traffic on the rolled-out revision", self.traffic_timeout_s,
                   lambda split: split.candidate_percent == 0 and split.total_percent == 100)

    def _wait_for_candidate(self, patched: Mapping[str, Any], canary_percent: int) -> None:
        self._wait(
            patched, f"the candidate ready with {canary_percent}% of traffic", self.traffic_timeout_s,
            lambda split: split.candidate_ready and split.candidate_percent == canary_percent
            and split.total_percent == 100,
        )

    def _wait(
        self,
        patched: Mapping[str, Any],
        goal: str,
        timeout_s: float,
        reached: Callable[[TrafficSplit], bool],
    ) -> None:
        """Poll the status until ``reached`` holds for a status that has seen ``patched``'s generation."""
        generation = int(patched.get("metadata", {}).get("generation") or 0)
        deadline = time.monotonic() + timeout_s
        service: Mapping[str, Any] = patched
        while True:
            status = service.get("status") or {}
            split = read_traffic(service)
            if int(status.get("observedGeneration") or 0) >= generation and reached(split):
                log.info("InferenceService %s/%s: %s", self.namespace, self.name, split.describe())
                return
            if time.monotonic() >= deadline:
                raise RolloutTimeout(
                    f"InferenceService {self.namespace}/{self.name} did not report {goal} within {timeout_s:g}s: "
                    f"its status (observedGeneration {status.get('observedGeneration')}, spec generation "
                    f"{generation}) shows {split.describe()}; {_ready_condition(service)}. "
                    f"See `kubectl get isvc {self.name} -n {self.namespace} -o yaml` and its revisions' events."
                )
            time.sleep(self.poll_interval_s)
            service = self.get()

    def metrics(self, window_s: float) -> dict[str, VariantMetrics]:
        """Requests, 5xx errors, latency quantiles and a score sample per variant ("stable", "canary")
        from Prometheus over the last ``window_s``; a variant with no revision in the status gets zeros."""
        split = read_traffic(self.get())
        result = {}
        for variant, revision in ((STABLE, split.stable_revision), (CANARY, split.candidate_revision)):
            if revision is None:
                result[variant] = EMPTY
            else:
                result[variant] = variant_metrics(
                    self.prometheus, Variant(self.namespace, self.name, revision, self.pod_labels), window_s
                )
        return result

    def candidate_url(self) -> str:
        """Where probes go: ``probe_url``, else the latest revision's tag URL from the status."""
        if self.probe_url:
            return self.probe_url
        split = read_traffic(self.get())
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
