"""Manifest: the KServe InferenceService that serves a defectkit model, and the patches that move its canary.

The predictor is a custom container running ``defectkit serve``. KServe's storage
initializer downloads the model named by the container's ``STORAGE_URI`` variable into
``/mnt/models`` before the server starts (KServe's documented mechanism for custom
predictors), so the same image serves every model version and changing the URI is
what creates a new revision for a canary. The storage initializer fetches that one URI
only: a fallback model (``--fallback``, e.g. the previous champion) is downloaded by the
server itself at start. Every other option of ``defectkit serve`` comes from
:class:`~defectkit.serving.server.ServingOptions`.

Patches are JSON merge patches (RFC 7386, ``application/merge-patch+json``). A merge
patch replaces lists whole, so the canary patch carries the complete container list,
taken from the live object with only ``STORAGE_URI`` changed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from defectkit.delivery.backend import validate_percent
from defectkit.delivery.kserve import modes
from defectkit.delivery.kserve.names import DNS1123_LABEL, DNS1123_SUBDOMAIN, validate_name
from defectkit.serving.server import ServingOptions

API_VERSION = "serving.kserve.io/v1beta1"
KIND = "InferenceService"
PLURAL = "inferenceservices"
# KServe mounts the storage initializer's volume into the container with this name only.
CONTAINER_NAME = "kserve-container"
MODEL_MOUNT = "/mnt/models"
STORAGE_URI_ENV = "STORAGE_URI"
FALLBACK_OPTION = "--fallback"  # the serve option naming the model that answers while the primary's breaker is open
METRICS_PATH = "/metrics"
# Knative answers on the tag URL (latest-<name>-predictor...) only with tag routing on;
# the delivery probe needs it to reach the candidate before it gets any traffic.
TAG_ROUTING_ANNOTATION = "serving.kserve.io/enable-tag-routing"
# Left "true", KServe's pod mutator points prometheus.io/port at the queue-proxy (9091), or at its metric
# aggregation port (9088) when the cluster runs that extension: neither exists in Standard mode, and the
# first never carries the model server's metrics. "false" keeps the scrape annotations below, which name the
# model server's own port and work in both modes.
PROMETHEUS_ANNOTATION = "serving.kserve.io/enable-prometheus-scraping"

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_BUCKET_NAMES = {
    "gs": re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$"),
    "s3": re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$"),
}
# The Kubernetes resource.Quantity grammar, as the CRD's pattern states it (sign excluded:
# negative resources are never valid).
_QUANTITY = re.compile(
    r"^(?P<number>([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
    r"(?P<suffix>([KMGTPE]i)|[numkMGTPE]|([eE][+-]?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
_BINARY_SUFFIX = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL_SUFFIX = {"n": "1e-9", "u": "1e-6", "m": "1e-3", "": "1", "k": "1e3", "M": "1e6", "G": "1e9",
                   "T": "1e12", "P": "1e15", "E": "1e18"}
# Knative reserves these ports for its queue-proxy sidecar.
_KNATIVE_RESERVED_PORTS = frozenset({8012, 8013, 8022, 9090, 9091})
GPU_RESOURCE = "nvidia.com/gpu"


def parse_quantity(value: str) -> Decimal:
    """The numeric value of a Kubernetes quantity such as ``500m``, ``2Gi`` or ``1e3``."""
    match = _QUANTITY.match(value)
    if not match:
        raise ValueError(f"{value!r} is not a Kubernetes quantity; use e.g. '500m', '2', '512Mi' or '4Gi'")
    number = Decimal(match["number"])
    suffix = match["suffix"] or ""
    if suffix in _BINARY_SUFFIX:
        return number * _BINARY_SUFFIX[suffix]
    if suffix in _DECIMAL_SUFFIX:
        return number * Decimal(_DECIMAL_SUFFIX[suffix])
    return number * Decimal("1" + suffix.lower())


def validate_storage_uri(value: str, what: str = "storage URI") -> str:
    """A ``gs://`` or ``s3://`` ``bucket[/prefix]`` URI that both KServe's storage initializer and the model
    server can download."""
    scheme, sep, rest = value.partition("://")
    if not sep or scheme not in _BUCKET_NAMES:
        raise ValueError(
            f"{what} {value!r} must be a gs://bucket/prefix or s3://bucket/prefix URI holding model.json and "
            "model.safetensors"
        )
    bucket, _, prefix = rest.partition("/")
    if not _BUCKET_NAMES[scheme].match(bucket) or ".." in bucket:
        raise ValueError(f"{what} {value!r} names an invalid bucket {bucket!r}")
    if "//" in prefix or prefix.startswith("/"):
        raise ValueError(f"{what} {value!r} has an empty path segment")
    return value


# The InferenceService CRD's scaleMetric values.
SCALE_METRICS = ("concurrency", "rps", "cpu", "memory")


@dataclass(frozen=True)
class ServiceConfig:
    """What to serve and how big: everything ``build_inference_service`` turns into a manifest.

    ``image`` is the serve image (``defectkit_kfp.components.images.SERVE_IMAGE`` in this project).
    ``served_name`` is the model's name in the ``/v2/models/<name>`` routes.
    ``fallback_uri`` is the model answering while the primary's circuit breaker is open (the previous
    champion's ``gs://`` or ``s3://`` directory); empty for none.
    ``serving`` holds every other option of ``defectkit serve`` (batching, limits, precision, production
    sampling, breaker). ``deployment_mode`` is ``Knative``, ``Standard`` or "" for the cluster's default;
    KServe 0.15 knows these as ``Serverless`` and ``RawDeployment``, which later versions still accept.
    ``env`` holds extra container variables as (name, value) pairs; ``storage_secret`` names a Secret whose
    keys all become container variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL for
    s3:// or MinIO): the server itself reads the fallback and writes samples, with its own credentials.
    """

    name: str
    namespace: str
    image: str
    storage_uri: str
    canary_traffic_percent: int | None = None
    served_name: str = "defectkit"
    cpu_request: str = "1"
    memory_request: str = "2Gi"
    cpu_limit: str = "2"
    memory_limit: str = "4Gi"
    gpu: int = 0
    min_replicas: int = 1
    max_replicas: int = 3
    scale_metric: str = ""  # concurrency, rps, cpu or memory; "" for the platform's (Knative: concurrency; HPA: cpu)
    scale_target: int | None = None  # per replica: requests in flight, requests/s, or % of the CPU/memory request
    port: int = 8080
    prometheus_scraping: bool = True
    tag_routing: bool = True
    service_account: str | None = None
    env: tuple[tuple[str, str], ...] = ()
    fallback_uri: str = ""
    serving: ServingOptions = ServingOptions()
    deployment_mode: str = ""
    storage_secret: str | None = None

    def __post_init__(self) -> None:
        validate_name(self.name)
        if len(self.namespace) > 63 or not DNS1123_LABEL.match(self.namespace):
            raise ValueError(f"namespace {self.namespace!r} is not a DNS-1123 label (lower-case letters, digits, '-')")
        pinned = "@" in self.image or ":" in self.image.rsplit("/", 1)[-1]
        if not pinned or any(c.isspace() for c in self.image):
            raise ValueError(
                f"image {self.image!r} must be a reference with an explicit tag or digest, e.g. registry/serve:0.1.0"
            )
        if self.image.endswith(":latest"):
            raise ValueError(f"image {self.image!r} uses :latest; pin the version tag so revisions are reproducible")
        validate_storage_uri(self.storage_uri)
        if self.canary_traffic_percent is not None:
            validate_percent(self.canary_traffic_percent)
        if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", self.served_name):
            raise ValueError(
                f"served name {self.served_name!r} must be letters, digits, '_', '.' or '-' (it is part of the URL path)"
            )
        pairs = (("cpu", self.cpu_request, self.cpu_limit), ("memory", self.memory_request, self.memory_limit))
        for what, request, limit in pairs:
            if parse_quantity(request) > parse_quantity(limit):
                raise ValueError(
                    f"{what} request {request!r} exceeds its limit {limit!r}; Kubernetes rejects such pods"
                )
        if isinstance(self.gpu, bool) or self.gpu < 0:
            raise ValueError(f"gpu {self.gpu!r} must be a whole number of GPUs, 0 or more")
        if self.min_replicas < 0 or self.max_replicas < 1 or self.min_replicas > self.max_replicas:
            raise ValueError(
                f"replicas min={self.min_replicas} max={self.max_replicas}: need 0 <= min <= max and max >= 1 "
                "(min 0 lets KServe scale to zero)"
            )
        self._check_scaling()
        if not 1 <= self.port <= 65535 or self.port in _KNATIVE_RESERVED_PORTS:
            raise ValueError(
                f"port {self.port} must be 1-65535 and not one Knative reserves {sorted(_KNATIVE_RESERVED_PORTS)}"
            )
        if self.service_account is not None and (
            len(self.service_account) > 253 or not DNS1123_SUBDOMAIN.match(self.service_account)
        ):
            raise ValueError(f"service account {self.service_account!r} is not a valid Kubernetes name")
        names = [name for name, _ in self.env]
        for name in names:
            if not _ENV_NAME.match(name):
                raise ValueError(f"environment variable name {name!r} must match [A-Za-z_][A-Za-z0-9_]*")
        if STORAGE_URI_ENV in names:
            raise ValueError(f"set the model location with storage_uri, not the {STORAGE_URI_ENV} variable")
        if len(set(names)) != len(names):
            raise ValueError(f"environment variables {names} repeat a name")
        if self.fallback_uri:
            validate_storage_uri(self.fallback_uri, "fallback URI")
            if self.fallback_uri.rstrip("/") == self.storage_uri.rstrip("/"):
                raise ValueError(f"fallback URI {self.fallback_uri!r} is the served model itself; give the "
                                 "previous champion's URI, or none")
        if self.deployment_mode and modes.normalise(self.deployment_mode) == modes.MODELMESH:
            raise ValueError(f"deployment mode {self.deployment_mode!r} serves ServingRuntimes only, not a custom "
                             f"predictor container: choose {modes.KNATIVE} or {modes.STANDARD}, or none for the "
                             "cluster's default")
        if self.storage_secret is not None and (
            len(self.storage_secret) > 253 or not DNS1123_SUBDOMAIN.match(self.storage_secret)
        ):
            raise ValueError(f"storage secret {self.storage_secret!r} is not a valid Kubernetes name")
        self._check_serving()

    def _check_scaling(self) -> None:
        """What each deployment mode's autoscaler takes: Knative's KPA scales on concurrency or rps (cpu and memory
        through its HPA class) and down to zero; Standard mode's HorizontalPodAutoscaler scales on cpu or memory
        only, never to zero (KServe docs, "Autoscaling with Kubernetes HPA")."""
        if self.scale_metric and self.scale_metric not in SCALE_METRICS:
            raise ValueError(f"scale metric {self.scale_metric!r} is not one of {', '.join(SCALE_METRICS)} (the "
                             "InferenceService CRD's scaleMetric)")
        if self.scale_target is not None and (isinstance(self.scale_target, bool) or not isinstance(
                self.scale_target, int) or self.scale_target < 1):
            raise ValueError(f"scale target {self.scale_target!r} must be a whole number >= 1 (requests in flight, "
                             "requests/s, or percent of the CPU or memory request, per replica)")
        mode = modes.normalise(self.deployment_mode) if self.deployment_mode else ""
        if mode == modes.STANDARD:
            if self.scale_metric in ("concurrency", "rps"):
                raise ValueError(f"scale metric {self.scale_metric!r} needs Knative's autoscaler; {modes.STANDARD} "
                                 "mode scales with a HorizontalPodAutoscaler on cpu or memory")
            if self.min_replicas == 0:
                raise ValueError(f"min replicas 0 (scale to zero) needs {modes.KNATIVE} mode; {modes.STANDARD} mode "
                                 "keeps at least one replica")

    def _check_serving(self) -> None:
        serving = self.serving
        if not isinstance(serving, ServingOptions):
            raise ValueError(f"serving={serving!r} must be a ServingOptions")
        # A pod's disk goes with the pod, and the drift monitor reads samples from object storage.
        if serving.sample_rate > 0 and not serving.sample_uri.startswith(("gs://", "s3://")):
            raise ValueError(f"sample URI {serving.sample_uri!r} must be a gs:// or s3:// URI on a cluster: "
                             "a directory in the pod is lost with it, and the drift monitor cannot read it")
        if serving.device.startswith("cuda") and not self.gpu:
            raise ValueError(f"device {serving.device!r} needs a GPU: set gpu to 1 or more, or device to auto")


def _labels() -> dict[str, str]:
    return {"app.kubernetes.io/name": "defectkit", "app.kubernetes.io/component": "predictor"}


def container_args(config: ServiceConfig) -> list[str]:
    """The ``defectkit serve`` arguments of the predictor container (the command is ``defectkit serve``)."""
    args = ["--model", MODEL_MOUNT, "--port", str(config.port), "--host", "0.0.0.0",
            "--served-name", config.served_name]
    if config.fallback_uri:
        args += [FALLBACK_OPTION, config.fallback_uri]
    return args + config.serving.args()


def _pod_annotations(config: ServiceConfig) -> dict[str, str]:
    if not config.prometheus_scraping:
        return {}
    port = str(config.port)
    return {
        PROMETHEUS_ANNOTATION: "false",
        # Plain annotation-based scrape configs (the kubernetes-pods job) read these from the pod.
        "prometheus.io/scrape": "true", "prometheus.io/port": port, "prometheus.io/path": METRICS_PATH,
        # Where KServe's metric aggregation, if a cluster turns it on, finds the model server's metrics.
        "prometheus.kserve.io/port": port, "prometheus.kserve.io/path": METRICS_PATH,
    }


def build_inference_service(config: ServiceConfig) -> dict[str, Any]:
    """The InferenceService for ``config`` as the JSON-ready dict the Kubernetes API takes (camelCase)."""
    # kserve takes seconds to import; only manifest building needs it.
    from kserve import V1beta1InferenceService, V1beta1InferenceServiceSpec, V1beta1PredictorSpec
    from kubernetes.client import (
        ApiClient,
        V1Container,
        V1ContainerPort,
        V1EnvFromSource,
        V1EnvVar,
        V1HTTPGetAction,
        V1ObjectMeta,
        V1Probe,
        V1ResourceRequirements,
        V1SecretEnvSource,
        V1SecurityContext,
    )

    limits = {"cpu": config.cpu_limit, "memory": config.memory_limit}
    if config.gpu:
        # Extended resources take their request from the limit.
        limits[GPU_RESOURCE] = str(config.gpu)
    container = V1Container(
        name=CONTAINER_NAME,
        image=config.image,
        command=["defectkit", "serve"],
        args=container_args(config),
        env=[V1EnvVar(name=STORAGE_URI_ENV, value=config.storage_uri)]
        + [V1EnvVar(name=name, value=value) for name, value in config.env],
        env_from=[V1EnvFromSource(secret_ref=V1SecretEnvSource(name=config.storage_secret))]
        if config.storage_secret else None,
        ports=[V1ContainerPort(container_port=config.port, name="http1", protocol="TCP")],
        resources=V1ResourceRequirements(
            requests={"cpu": config.cpu_request, "memory": config.memory_request}, limits=limits
        ),
        # Knative routes traffic to a revision only once this passes: the model is loaded, not just the process up.
        readiness_probe=V1Probe(
            http_get=V1HTTPGetAction(path=f"/v2/models/{config.served_name}/ready", port=config.port),
            period_seconds=5,
        ),
        security_context=V1SecurityContext(run_as_non_root=True, allow_privilege_escalation=False),
    )
    annotations: dict[str, str] = {}
    if config.tag_routing:
        annotations[TAG_ROUTING_ANNOTATION] = "true"
    if config.deployment_mode:
        annotations[modes.ANNOTATION] = config.deployment_mode
    service = V1beta1InferenceService(
        api_version=API_VERSION,
        kind=KIND,
        metadata=V1ObjectMeta(
            name=config.name, namespace=config.namespace, labels=_labels(), annotations=annotations or None
        ),
        spec=V1beta1InferenceServiceSpec(
            predictor=V1beta1PredictorSpec(
                containers=[container],
                min_replicas=config.min_replicas,
                max_replicas=config.max_replicas,
                scale_metric=config.scale_metric or None,
                scale_target=config.scale_target,
                canary_traffic_percent=config.canary_traffic_percent,
                service_account_name=config.service_account,
                annotations=_pod_annotations(config) or None,
                labels=_labels(),
            )
        ),
    )
    return ApiClient().sanitize_for_serialization(service)
