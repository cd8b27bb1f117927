"""A delivery as configured: which backend, which candidate, which registry, then the controller run.

:mod:`defectkit.delivery.controller` is the state machine; this module wires it to a backend
(local stack or KServe), the MLflow registry (alias moves on promotion, the decision record on
the candidate's run) and the golden set, for ``defectkit rollout`` and the deploy_canary and
restore_traffic components.

Pipelines cannot pass None, so the policy travels through them as parameters
(:func:`policy_parameters`): steps comma-separated, and an optional limit that is off as 0.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from defectkit import notify
from defectkit.delivery import analysis, record
from defectkit.delivery.analysis import CanaryPolicy
from defectkit.delivery.approval import ApprovalGate
from defectkit.delivery.controller import RESTORE_COMMAND, Controller, Hook, restore_stable
from defectkit.delivery.shadow import ShadowPolicy, ShadowReplay, read_shadow_set
from defectkit.delivery.state import PROMOTED, ROLLED_BACK, RolloutState, RolloutStore, StateStore, delivery_lock
from defectkit.golden import Golden, read_golden

log = logging.getLogger(__name__)

DELIVERY_DIR = "delivery"
STATE_FILE = "state.json"
SERVICE_LOCK = "service.lock"
CANARY_TAG = "canary"
BACKENDS = ("local", "kserve")
# CanaryPolicy fields that may be None (no limit); a pipeline parameter of 0 means None.
OPTIONAL_LIMITS = ("max_p99_latency_s", "max_p99_ratio")


def policy_parameters(policy: CanaryPolicy = CanaryPolicy()) -> dict[str, Any]:
    """``policy`` as pipeline parameters: steps as "10,25,50,100", a limit that is off as 0."""
    parameters = policy.to_json()
    parameters["steps"] = ",".join(map(str, policy.steps))
    for name in OPTIONAL_LIMITS:
        if parameters[name] is None:
            parameters[name] = 0.0
    return parameters


def policy_from_parameters(**parameters: Any) -> CanaryPolicy:
    """The inverse of :func:`policy_parameters`; fields left out keep CanaryPolicy's defaults."""
    values = dict(parameters)
    if "steps" in values:
        values["steps"] = analysis.parse_steps(values["steps"])
    for name in OPTIONAL_LIMITS:
        if name in values and not values[name]:
            values[name] = None
    # Pipeline clients may send an integer parameter as a whole float (the IR stores 2 as 2.0).
    for name in ("failure_threshold", "min_requests", "max_inconclusive"):
        if isinstance(values.get(name), float) and values[name].is_integer():
            values[name] = int(values[name])
    return CanaryPolicy.from_json(values)


@dataclass(frozen=True)
class DeliveryConfig:
    """One delivery, as ``defectkit rollout start`` and the deploy_canary component describe it.

    ``model`` is the candidate: a model directory or ``models:/<name>/<version>`` (an alias
    is pinned to its version) for the local backend, a ``gs://`` storage URI for kserve.
    ``version`` is its registry version, for the registry hooks and the decision record's
    run. ``stable`` is what a local stack that is not running starts with (default: the
    registry's champion; with none, the delivery is a first deployment). The decision
    record defaults to ``work_dir/delivery/``; so does the local backend's state file. The
    kserve backend keeps its state on the cluster, beside the InferenceService
    (:mod:`defectkit.delivery.kserve.state`), where a retried step or the exit handler finds
    it. ``registered_model`` is the MLflow registered model name; ``served_name`` is the name
    in the servers' ``/v2/models/<name>/infer`` route. ``judged_model_dir`` is the evaluation's
    judged model, whose test figures and paired tests against the champion the decision record
    shows (default: ``model`` where it is a model directory). With ``sample_uri`` (where the
    model servers sample requests), a recent window of those requests is replayed to the
    candidate before any traffic, under the ``shadow`` gate (:mod:`defectkit.delivery.shadow`).

    kserve: where the InferenceService does not exist yet, the candidate is its first
    model: it is created from ``serve_image`` in ``deployment_mode`` ("Knative" or
    "Standard"; empty: the cluster's default), with the autoscaling settings
    (``min_replicas``, ``max_replicas``, ``scale_metric``, ``scale_target``), and
    becomes the stable model.
    """

    model: str = ""
    backend: str = "local"
    version: str | None = None
    policy: CanaryPolicy = CanaryPolicy()
    work_dir: str = "runs"
    state_path: str | None = None
    record_dir: str | None = None
    golden_dir: str | None = None
    judged_model_dir: str | None = None
    webhooks: str = ""  # who hears of the verdict: defectkit.notify.webhooks_from
    approval: ApprovalGate | None = None  # a URL that must answer 200 before the promotion (or first traffic)
    sample_uri: str = ""
    shadow: ShadowPolicy = ShadowPolicy()
    tracking_uri: str | None = None
    registered_model: str = "defectkit"
    stable: str | None = None
    served_name: str = "defectkit"
    router_port: int = 0
    server_args: tuple[str, ...] = ()
    candidate_args: tuple[str, ...] = ()
    scrape_interval_s: float = 1.0
    namespace: str = "default"
    service_name: str = "defectkit"
    api_url: str | None = None
    prometheus_url: str | None = None
    # How often the cluster's Prometheus scrapes the predictor pods; the analysis window derives from it.
    prometheus_scrape_interval_s: float = 30.0
    probe_url: str | None = None
    serve_image: str = ""
    deployment_mode: str = ""
    # Autoscaling of an InferenceService the delivery creates (see ServiceConfig).
    min_replicas: int = 1
    max_replicas: int = 3
    scale_metric: str = ""
    scale_target: int | None = None

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend {self.backend!r} must be 'local' or 'kserve'")
        notify.parse_webhooks(self.webhooks)  # a bad receiver is named now, not after the delivery
        if self.backend == "kserve" and self.state_path:
            raise ValueError(f"state_path {self.state_path!r} (--state) applies to the local backend only: the kserve "
                             "backend keeps its state in a ConfigMap beside the InferenceService")
        if self.deployment_mode:
            from defectkit.delivery.kserve import modes

            if modes.normalise(self.deployment_mode) == modes.MODELMESH:
                raise ValueError("deployment_mode ModelMesh cannot serve defectkit's container and has no canary; "
                                 f"choose {modes.KNATIVE} or {modes.STANDARD}")
        if self.backend == "kserve" and not self.prometheus_url:
            raise ValueError("the kserve backend needs prometheus_url (--prometheus-url): canary analysis reads "
                             "the predictor pods' metrics from Prometheus")
        if self.backend == "kserve":
            from defectkit.delivery.kserve.prometheus import query_window_s

            # A step too short for the scrape interval is refused here, before any traffic moves.
            query_window_s(self.prometheus_scrape_interval_s, self.policy.interval_s)

    @property
    def state_file(self) -> Path:
        return Path(self.state_path) if self.state_path else Path(self.work_dir) / DELIVERY_DIR / STATE_FILE

    @property
    def record_path(self) -> Path:
        return Path(self.record_dir) if self.record_dir else Path(self.work_dir) / DELIVERY_DIR

    @classmethod
    def for_registered_version(cls, registered_model: str, version: str, *, storage_uri: str = "",
                               **settings: Any) -> DeliveryConfig:
        """The delivery of ``version`` of ``registered_model``.

        The local backend serves the registry's copy (``models:/``), which outlives the run's artifacts,
        so the stack can restart its servers from it. KServe's storage initializer downloads
        ``storage_uri``, or else the version's artifact in the registry's store
        (:func:`defectkit.registry.storage_uri`: gs:// or s3://), never a path inside a pod.
        """
        if settings.get("backend", "local") != "kserve":
            return cls(model=f"models:/{registered_model}/{version}", version=version,
                       registered_model=registered_model, **settings)
        if not storage_uri:
            from defectkit import registry

            if not settings.get("tracking_uri"):
                raise ValueError(f"version {version} of {registered_model}: the kserve backend serves the registry's "
                                 "copy of the model, so it needs the registry (tracking_uri), or a storage_uri")
            storage_uri = registry.storage_uri(settings["tracking_uri"], registered_model, version)
        return cls(model=storage_uri, version=version, registered_model=registered_model, **settings)


def make_backend(config: DeliveryConfig, candidate: str | None = None):
    """The LocalBackend or KServeBackend ``config`` names, delivering ``candidate``; close() it when done
    (a LocalBackend scrapes)."""
    if config.backend == "local":
        from defectkit.delivery.local import LocalBackend, StackOptions

        return LocalBackend(Path(config.work_dir), StackOptions(
            model_name=config.served_name, tracking_uri=config.tracking_uri, router_port=config.router_port,
            server_args=config.server_args, candidate_args=config.candidate_args,
            scrape_interval_s=config.scrape_interval_s))
    from defectkit.delivery.kserve.api import KubeApi
    from defectkit.delivery.kserve.backend import KServeBackend

    api = KubeApi(config.api_url) if config.api_url else KubeApi.from_kubeconfig()
    from defectkit.delivery.kserve.prometheus import PrometheusClient

    prometheus = PrometheusClient(config.prometheus_url, scrape_interval_s=config.prometheus_scrape_interval_s)
    return KServeBackend(api, config.namespace, config.service_name, prometheus,
                         model_name=config.served_name, probe_url=config.probe_url,
                         deployment_mode=config.deployment_mode or None, candidate_uri=candidate)


def make_store(config: DeliveryConfig, backend) -> RolloutStore:
    """Where the delivery's state lives: a file for the local backend, a ConfigMap beside the InferenceService
    for kserve."""
    if config.backend == "local":
        return StateStore(config.state_file)
    from defectkit.delivery.kserve.state import ConfigMapStore

    return ConfigMapStore(backend.api, config.namespace, config.service_name)


def service_lock(config: DeliveryConfig) -> contextlib.AbstractContextManager[None]:
    """Held while a delivery (or a restore) changes ``config``'s service: the local stack of the work directory.

    The local state file can be moved with ``state_path``, but the stack is one per work directory, so the
    lock lives there. On a cluster the state itself, beside the InferenceService, is the only lock: its
    writes compare resource versions (:class:`defectkit.delivery.kserve.state.ConfigMapStore`).
    """
    if config.backend != "local":
        return contextlib.nullcontext()
    return delivery_lock(Path(config.work_dir) / DELIVERY_DIR / SERVICE_LOCK,
                         f"the local service of {config.work_dir}")


def restore_command(config: DeliveryConfig) -> str:
    """The command that rolls back an unfinished delivery of ``config``'s service."""
    if config.backend == "local":
        return f"{RESTORE_COMMAND} --work {config.work_dir}"
    return f"{RESTORE_COMMAND} --backend kserve --namespace {config.namespace} --name {config.service_name} " \
           "(or the restore_traffic component)"


def deliver(config: DeliveryConfig) -> RolloutState:
    """Run (or resume) the delivery ``config`` describes; writes the decision record and, with a registry
    and a version, moves the aliases and logs the record to the candidate's run."""
    if config.backend == "local" and importlib.util.find_spec("torch") is None:
        # The local stack starts model servers in this environment; a cluster's deploy image carries no torch.
        raise ValueError("backend=local runs the model servers here and needs torch (defectkit[serve]), which "
                         "this environment lacks, as the deploy image does: on a cluster use backend=kserve")
    candidate, version = _pinned(config.model, config.tracking_uri, config.backend)
    version = config.version or version
    golden = read_golden(Path(config.golden_dir)) if config.golden_dir else None
    if golden is not None and golden.weights_sha256 and (Path(candidate) / "model.json").is_file():
        weights = json.loads((Path(candidate) / "model.json").read_text()).get("weights_sha256")
        if weights != golden.weights_sha256:
            raise ValueError(f"the golden set in {config.golden_dir} was scored by weights {golden.weights_sha256[:12]}"
                             f" but the candidate {candidate} has weights {str(weights)[:12]}; build the golden set "
                             f"with the candidate model")
    on_promote, on_rollback = _hooks(config, version)
    with service_lock(config):
        state = _deliver(config, candidate, version, golden, on_promote, on_rollback)
    record.write_record(state, config.record_path)
    if config.tracking_uri and version:
        log_record(config.tracking_uri, config.registered_model, version, state)
    announce(state, notify.webhooks_from(config.webhooks), config.record_path)
    return state


def announce(state: RolloutState, webhooks: tuple[notify.Webhook, ...], record_dir: Path) -> None:
    """Tell the receivers how the delivery ended: promoted, rolled back, or blocked before any traffic (by the
    golden probe or the shadow replay)."""
    if not webhooks or state.phase not in (PROMOTED, ROLLED_BACK):
        return
    served = max((entry["weight"] for entry in state.timeline), default=0) > 0
    event = notify.PROMOTED if state.phase == PROMOTED else notify.ROLLED_BACK if served else notify.BLOCKED
    name = f"version {state.candidate_version}" if state.candidate_version else state.candidate
    summary = {notify.PROMOTED: f"{name} promoted: it serves all traffic",
               notify.ROLLED_BACK: f"{name} rolled back: the stable model serves all traffic",
               notify.BLOCKED: f"{name} blocked before any traffic"}[event]
    notify.notify(webhooks, event, summary, candidate=state.candidate, version=state.candidate_version,
                  stable=state.stable, backend=state.backend, reason=state.reason, analyses=len(state.analyses),
                  shadow=(state.shadow or {}).get("verdict"), record=str(record_dir))


def _deliver(config: DeliveryConfig, candidate: str, version: str | None, golden: Golden | None,
             on_promote: Hook | None, on_rollback: Hook | None) -> RolloutState:
    evidence = record.evidence_of(config.judged_model_dir or (candidate if Path(candidate).is_dir() else None))
    backend = make_backend(config, candidate)
    try:
        store = make_store(config, backend)
        if config.backend == "local":
            stable = _stable_for_stack(config)
            if backend.stack() is None and stable is None:
                state = _first_deployment(store, "local", candidate, version, config.policy, on_promote,
                                          lambda: backend.ensure_stack(candidate, first_deployment=True),
                                          "no stable version serves yet", evidence)
            else:
                stable = backend.ensure_stack(stable).stable.model
                state = None
        else:
            stable, state = None, _kserve_first_deployment(backend, store, config, candidate, version, on_promote,
                                                           evidence)
        if state is None:
            state = Controller(backend, config.policy, store, candidate=candidate, candidate_version=version,
                               stable=stable, backend_name=config.backend, golden=golden, on_promote=on_promote,
                               on_rollback=on_rollback, restore_command=restore_command(config),
                               evidence=evidence, shadow=_shadow_replay(config, version, evidence),
                               approval=config.approval).run()
    finally:
        _close(backend)
    return state


def restore(config: DeliveryConfig, reason: str = "restore requested") -> bool:
    """``restore_stable`` for the delivery recorded for ``config`` (the pipeline's exit handler).

    Needs nothing from the process that ran the delivery: the kserve backend reads the state
    from the cluster.
    """
    with service_lock(config):
        return _restore(config, reason)


def _restore(config: DeliveryConfig, reason: str) -> bool:
    backend = make_backend(config)
    try:
        store = make_store(config, backend)
        state = store.load()
        if state is None:
            log.info("no delivery recorded in %s; nothing to restore", store.where)
            return False
        if config.backend == "kserve":
            backend = make_backend(config, state.candidate)
        _, on_rollback = _hooks(config, state.candidate_version)
        restored = restore_stable(backend, store, reason=reason, on_rollback=on_rollback,
                                  record_dir=config.record_path)
    finally:
        _close(backend)
    if restored and config.tracking_uri and state.candidate_version:
        log_record(config.tracking_uri, config.registered_model, state.candidate_version, store.load())
    return restored


def plan(config: DeliveryConfig) -> dict[str, Any]:
    """What ``deliver(config)`` would do, with the candidate resolved (an alias pinned), changing nothing."""
    candidate, version = _pinned(config.model, config.tracking_uri, config.backend)
    if config.backend == "local":
        state = str(config.state_file)
    else:
        from defectkit.delivery.kserve.state import SUFFIX

        state = f"ConfigMap {config.namespace}/{config.service_name}{SUFFIX}"
    return {"backend": config.backend, "candidate": candidate, "version": config.version or version,
            "policy": config.policy.to_json(), "golden": config.golden_dir, "state": state}


def _close(backend) -> None:
    close = getattr(backend, "close", None)  # a LocalBackend's scraper thread; KServeBackend holds nothing
    if close is not None:
        close()


def _hooks(config: DeliveryConfig, version: str | None) -> tuple[Hook | None, Hook | None]:
    if not (config.tracking_uri and version):
        return None, None
    return registry_hooks(config.tracking_uri, config.registered_model, version)


def _pinned(uri: str, tracking_uri: str | None, backend: str) -> tuple[str, str | None]:
    """(candidate URI, registry version): an alias is pinned to the version it points to now."""
    if not uri:
        raise ValueError("no candidate given: pass --model (local backend: a model directory or models:/ URI) or "
                         "--storage-uri (kserve backend: the gs:// model directory)")
    from defectkit import registry

    parsed = registry.ModelUri.parse(uri)
    if parsed is not None and parsed.alias is None:
        return uri, parsed.version
    if parsed is not None:
        if not tracking_uri:
            raise ValueError(f"{uri} is a registry URI: give the registry with --tracking-uri")
        ref = registry.pin(parsed, tracking_uri)
        return ref.uri, ref.version
    if backend == "kserve":
        from defectkit.delivery.kserve.manifest import validate_storage_uri

        return validate_storage_uri(uri), None
    if "://" in uri:
        return uri, None
    path = Path(uri).resolve()
    if not (path / "model.json").is_file():
        raise FileNotFoundError(f"{path} is not a model directory (no model.json); give the judged model")
    return str(path), None


def _stable_for_stack(config: DeliveryConfig) -> str | None:
    if config.stable:
        return _pinned(config.stable, config.tracking_uri, "local")[0]
    if config.tracking_uri:
        from defectkit import registry

        ref = registry.champion(registry.RegistryConfig.for_uri(config.tracking_uri,
                                                                model_name=config.registered_model))
        return ref.uri if ref is not None else None
    return None


def _kserve_first_deployment(backend, store: RolloutStore, config: DeliveryConfig, candidate: str,
                             version: str | None, on_promote: Hook | None,
                             evidence: dict[str, Any] | None) -> RolloutState | None:
    """The first model of an InferenceService that does not exist yet; None when it exists (a canary follows).

    A service that exists, serves the candidate and has no delivery recorded was created by
    an earlier attempt of this delivery that stopped before recording it: that first
    deployment is finished now.
    """
    from defectkit.delivery.kserve import canary

    if backend.exists():
        if store.load() is not None or canary.storage_uri_of(backend.get()) != candidate:
            return None
        log.warning("InferenceService %s/%s serves %s with no delivery recorded: finishing its first deployment",
                    config.namespace, config.service_name, candidate)
    service = _service_config(config, candidate)
    return _first_deployment(store, "kserve", candidate, version, config.policy, on_promote,
                             lambda: backend.ensure_exists(service),
                             f"InferenceService {config.namespace}/{config.service_name} did not exist", evidence)


def _service_config(config: DeliveryConfig, candidate: str):
    from defectkit.delivery.kserve.manifest import ServiceConfig

    if not config.serve_image:
        raise ValueError(f"InferenceService {config.namespace}/{config.service_name} does not exist, and creating it "
                         "needs the serve image: give serve_image (deploy_canary's serve_image, --serve-image)")
    return ServiceConfig(name=config.service_name, namespace=config.namespace, image=config.serve_image,
                         storage_uri=candidate, served_name=config.served_name,
                         deployment_mode=config.deployment_mode, min_replicas=config.min_replicas,
                         max_replicas=config.max_replicas, scale_metric=config.scale_metric,
                         scale_target=config.scale_target)


def _shadow_replay(config: DeliveryConfig, version: str | None,
                   evidence: dict[str, Any] | None) -> ShadowReplay | None:
    """The recent sampled requests to replay to the candidate (none without a sample store)."""
    if not config.sample_uri:
        return None
    from defectkit.serving.contract import VERSION_PREFIX_LENGTH

    evidence = evidence or {}
    # What the candidate itself answered (in an earlier canary of it) is not the champion's answer.
    own = {version, (evidence.get("weights_sha256") or "")[:VERSION_PREFIX_LENGTH]} - {None, ""}
    samples = read_shadow_set(config.sample_uri, time.time(), config.shadow, exclude_versions=own)
    log.info("shadow replay: %d sampled requests from the last %g s of %s", len(samples.images),
             config.shadow.window_s, config.sample_uri)
    return ShadowReplay(samples, config.shadow, evidence.get("threshold"), config.record_path)


def _first_deployment(store: RolloutStore, backend_name: str, candidate: str, version: str | None,
                      policy: CanaryPolicy, on_promote: Hook | None, start: Callable[[], object],
                      why: str, evidence: dict[str, Any] | None) -> RolloutState:
    """Nothing serves yet: ``start`` makes the candidate the stable version, with nothing to compare it with.

    A state file records the intent before ``start``; a store on the cluster lives beside the
    service ``start`` creates, so it is written once that service exists.
    """
    state = RolloutState(candidate=candidate, candidate_version=version, backend=backend_name,
                         policy=policy.to_json(), evidence=evidence)
    state.event(f"first deployment: {why}")
    state.target_weight = 100
    if isinstance(store, StateStore):
        store.save(state)
    start()
    state.weight, state.target_weight = 100, None
    state.event("candidate serves all traffic")
    store.save(state)
    if on_promote is not None:
        on_promote(state)
    state.phase = PROMOTED
    state.reason = f"first deployment: {why}, so there was nothing to compare the candidate with"
    state.event("delivery finished: promoted")
    store.save(state)
    return state


# --------------------------------------------------------------------------- registry hooks


def registry_hooks(tracking_uri: str, registered_model: str, version: str) -> tuple[Hook, Hook]:
    """on_promote (alias champion -> version) and on_rollback (tag canary=rolled_back, champion kept)."""
    from defectkit import registry

    config = registry.RegistryConfig.for_uri(tracking_uri, model_name=registered_model)

    def promoted(state: RolloutState) -> None:
        registry.promote(config, version)
        registry.mark(config, version, CANARY_TAG, PROMOTED)

    def rolled_back(state: RolloutState) -> None:
        registry.mark(config, version, CANARY_TAG, ROLLED_BACK)

    return promoted, rolled_back


def log_record(tracking_uri: str, registered_model: str, version: str, state: RolloutState) -> None:
    """Attach the decision record to the run of the registered ``version``."""
    from mlflow import MlflowClient

    from defectkit import registry

    config = registry.RegistryConfig.for_uri(tracking_uri, model_name=registered_model)
    run_id = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri) \
        .get_model_version(registered_model, version).run_id
    built = record.build_record(state)
    registry.log_decision_record(config, run_id, built, record.render_markdown(built))
