"""``defectkit rollout start|status|restore|manifest``: ship a model through a canary, or look at one.

Options that belong to one backend sit in that backend's group; given with the other
backend they are refused (exit 2), never ignored.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from defectkit.delivery.analysis import CanaryPolicy
from defectkit.delivery.approval import ApprovalGate
from defectkit.delivery.shadow import ShadowPolicy
from defectkit.delivery.kserve.manifest import SCALE_METRICS, ServiceConfig

BACKENDS = ("local", "kserve")
EXIT_PROMOTED, EXIT_ERROR, EXIT_ROLLED_BACK, EXIT_REFUSED = 0, 2, 3, 4
# Policy fields with a command-line override; the others come from --policy FILE.
POLICY_OVERRIDES = ("steps", "interval_s", "failure_threshold", "min_requests", "max_error_rate",
                    "max_p99_latency_s", "max_score_shift")


class BackendParser(argparse.ArgumentParser):
    """A parser with per-backend option groups: an option of the backend not chosen is an error.

    Backend options default to "not given" while parsing, so that a given one can be told from a
    default; the chosen backend's defaults are filled in afterwards.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.backend_options: dict[str, tuple[str, str, Any]] = {}  # dest -> (flag, backend, default)
        self._backend_groups: dict[str, _BackendGroup] = {}

    def backend_group(self, backend: str) -> _BackendGroup:
        """The option group of ``backend`` (one per backend, however often asked for)."""
        if backend not in self._backend_groups:
            self._backend_groups[backend] = _BackendGroup(self, backend)
        return self._backend_groups[backend]

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        chosen = getattr(namespace, "backend", None)
        for dest, (flag, backend, default) in self.backend_options.items():
            if hasattr(namespace, dest) and chosen is not None and backend != chosen:
                self.error(f"{flag} applies to --backend {backend} only, not --backend {chosen}; "
                           f"drop it or choose --backend {backend}")
            if not hasattr(namespace, dest):
                setattr(namespace, dest, default)
        return namespace, extras


class _BackendGroup:
    def __init__(self, parser: BackendParser, backend: str) -> None:
        self._parser = parser
        self._backend = backend
        self._group = parser.add_argument_group(f"{backend} backend", f"only with --backend {backend}")

    def add_argument(self, flag: str, *, default: Any = None, **kwargs: Any) -> None:
        action = self._group.add_argument(flag, default=argparse.SUPPRESS, **kwargs)
        self._parser.backend_options[action.dest] = (flag, self._backend, default)


def add_commands(commands: argparse._SubParsersAction) -> None:
    rollout = commands.add_parser("rollout", help="ship a model through a canary (local model servers or a KServe "
                                  "InferenceService), follow it, or roll it back")
    verbs = rollout.add_subparsers(dest="verb", required=True, metavar="VERB", parser_class=BackendParser)

    start = verbs.add_parser("start", help="deliver a candidate: probe, step traffic, analyse, then promote or roll "
                             "back (exit 0 promoted, 3 rolled back, 2 failed, 4 refused: another delivery to the service is "
                             "running or unfinished); resumes an unfinished delivery",
                             description="Deliver a candidate through a canary. Running it again for the same "
                             "candidate resumes an interrupted delivery.")
    _add_backend(start)
    start.add_argument("--golden", help="golden set directory (golden.json + images) probed before any traffic")
    start.add_argument("--judged-model", help="the evaluation's judged model directory, whose test figures, paired "
                       "tests and threshold the record and the shadow replay use (default: --model when a directory)")
    start.add_argument("--webhooks", default="", help="who hears of the verdict: comma-separated URLs (generic "
                       "JSON) or slack+URL; default: the DEFECTKIT_WEBHOOKS environment variable, or none")
    gate = start.add_argument_group("approval gate (off by default; Flagger's confirm-promotion)")
    gate.add_argument("--approval-url", default="", help="POSTed the delivery's state before the promotion (or "
                      "the first traffic); only HTTP 200 lets it go on")
    gate_defaults = {field.name: field.default for field in dataclasses.fields(ApprovalGate)}
    gate.add_argument("--approval-before", choices=("promotion", "traffic"),
                      help=f"what waits for the approval (default {gate_defaults['before']})")
    gate.add_argument("--approval-timeout-s", type=float, help="how long to wait for a 200 before rolling back "
                      f"(default {gate_defaults['timeout_s']:g})")
    gate.add_argument("--approval-interval-s", type=float,
                      help=f"seconds between requests (default {gate_defaults['poll_interval_s']:g})")
    shadow = start.add_argument_group("shadow replay (before any traffic: sampled production requests replayed to "
                                      "the candidate and compared with the answers the champion gave)")
    shadow.add_argument("--sample-uri", default="", help="where the model servers sample requests (a directory, "
                        "gs:// or s3://); none: no shadow replay")
    defaults = ShadowPolicy()
    shadow.add_argument("--shadow-window-s", type=float, default=defaults.window_s,
                        help="how far back the replayed samples reach (default %(default)s)")
    shadow.add_argument("--shadow-max-images", type=int, default=defaults.max_images,
                        help="the most (newest) samples replayed (default %(default)s)")
    shadow.add_argument("--shadow-min-images", type=int, default=defaults.min_images,
                        help="fewer samples than this skip the replay (default %(default)s)")
    shadow.add_argument("--shadow-min-agreement", type=float, default=defaults.min_agreement,
                        help="lowest share of images both label alike (default %(default)s)")
    shadow.add_argument("--shadow-max-score-shift", type=float, default=defaults.max_score_shift,
                        help="highest KS statistic between the champion's and the candidate's scores "
                        "(default %(default)s)")
    start.add_argument("--version", help="registry version of the candidate (implied by models:/<name>/<version>)")
    start.add_argument("--served-name", default="defectkit",
                       help="model name in the /v2/models/<name> routes (default %(default)s)")
    start.add_argument("--dry-run", action="store_true",
                       help="print the delivery plan (resolved candidate, policy, state file) as JSON; change nothing")
    _add_registry(start)
    _add_state(start)
    _add_policy(start)
    local = start.backend_group("local")
    local.add_argument("--model", help="candidate: a model directory or models:/<name>/<version> (an alias is pinned)")
    local.add_argument("--stable", help="model the stack starts with when it is not running (default: the "
                       "registry's champion; none means a first deployment)")
    local.add_argument("--router-port", type=int, default=0, help="router port (default: a free one, then kept)")
    local.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                       help="option for every model server, e.g. --serve-arg=--threads=1 (repeatable)")
    local.add_argument("--candidate-serve-arg", action="append", default=[], metavar="ARG",
                       help="option for the candidate's server only, e.g. --candidate-serve-arg=--fault-error-rate=0.5 "
                       "to rehearse a rollback (repeatable)")
    local.add_argument("--scrape-interval-s", type=float, default=1.0, help="metrics scrape interval (default 1.0)")
    kserve = start.backend_group("kserve")
    kserve.add_argument("--storage-uri", help="candidate: gs:// directory of the model (model.json + "
                        "model.safetensors) for KServe's storage initializer")
    _add_kserve_target(kserve)
    kserve.add_argument("--prometheus-scrape-interval-s", type=float, default=30.0,
                        help="how often Prometheus scrapes the predictor pods: each analysis queries at least four "
                        "scrapes, and a step shorter than two is refused (default 30.0)")
    kserve.add_argument("--probe-url", help="the candidate's own URL (default: its tag URL from the status in Knative "
                        "mode, its canary Service in Standard mode)")
    kserve.add_argument("--serve-image", default="", help="predictor image, needed when the InferenceService does "
                        "not exist yet (the candidate then becomes its first model)")
    kserve.add_argument("--deployment-mode", default="", choices=("", "Knative", "Standard"),
                        help="KServe deployment mode of a new InferenceService (default: the cluster's)")
    kserve.add_argument("--min-replicas", type=int, default=1,
                        help="a new InferenceService's fewest replicas; 0 scales to zero (Knative only) (default 1)")
    kserve.add_argument("--max-replicas", type=int, default=3, help="a new InferenceService's most replicas "
                        "(default 3)")
    kserve.add_argument("--scale-metric", default="", choices=("", *SCALE_METRICS),
                        help="what a new InferenceService scales on: concurrency or rps (Knative), cpu or memory "
                        "(default: the platform's)")
    kserve.add_argument("--scale-target", type=int, help="per-replica target of the scale metric: requests in "
                        "flight, requests/s, or percent of the CPU or memory request")
    start.set_defaults(func=cmd_start)

    status = verbs.add_parser("status", help="print the recorded state of the last delivery (phase, traffic, why)")
    _add_backend(status)
    _add_state(status, record=False)
    _add_kserve_target(status.backend_group("kserve"))
    status.set_defaults(func=cmd_status)

    restore = verbs.add_parser("restore", help="roll back an unfinished delivery: all traffic to the stable "
                               "version (what the pipeline's exit handler does); a finished one is left alone")
    _add_backend(restore)
    _add_registry(restore)
    _add_state(restore)
    _add_kserve_target(restore.backend_group("kserve"))
    restore.set_defaults(func=cmd_restore)

    manifest = verbs.add_parser("manifest", help="print the KServe InferenceService manifest for a model "
                                "(YAML, for kubectl apply); changes nothing")
    _add_manifest_options(manifest)
    manifest.set_defaults(func=cmd_manifest)


def _add_backend(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", choices=BACKENDS, default="local",
                        help="local: model servers behind a weighted router on 127.0.0.1; kserve: an "
                        "InferenceService (default %(default)s)")


def _add_registry(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tracking-uri", help="MLflow registry: promotion moves alias champion, a rollback tags the "
                        "version, and the decision record is logged to the candidate's run")
    parser.add_argument("--registered-model", default="defectkit",
                        help="registered model name in MLflow (default %(default)s)")


def _add_state(parser: BackendParser, *, record: bool = True) -> None:
    parser.add_argument("--work", default="runs", help="work directory: the local serving stack and the delivery "
                        "state live under it (default %(default)s)")
    # The kserve backend keeps its state beside the InferenceService, never in a file.
    parser.backend_group("local").add_argument("--state", help="rollout state file (default WORK/delivery/state.json)")
    if record:
        parser.add_argument("--record-dir", help="where the decision record goes (default WORK/delivery)")


def _add_kserve_target(group: _BackendGroup) -> None:
    group.add_argument("--name", default="defectkit", help="InferenceService name (default defectkit)")
    group.add_argument("--namespace", default="default", help="Kubernetes namespace (default default)")
    group.add_argument("--api-url", help="Kubernetes API URL (default: kubeconfig, or in-cluster credentials)")
    group.add_argument("--prometheus-url", help="Prometheus scraping the predictor pods (required)")


def _add_policy(parser: argparse.ArgumentParser) -> None:
    defaults = CanaryPolicy()
    policy = parser.add_argument_group(
        "canary policy", "A policy file sets any field of the policy; the options below override it. "
        "Unset fields keep the defaults shown.")
    policy.add_argument("--policy", type=Path, metavar="FILE", help="canary policy as JSON or YAML, e.g. "
                        '{"steps": [10, 50, 100], "interval_s": 60, "alpha": 0.05, "max_p99_ratio": 1.5}')
    policy.add_argument("--steps", help="canary traffic percents; a final 100 is the promotion "
                        f"(default {','.join(map(str, defaults.steps))})")
    policy.add_argument("--interval-s", type=float, help=f"seconds each step is held (default {defaults.interval_s})")
    policy.add_argument("--failure-threshold", type=int,
                        help=f"failed analyses that roll back (default {defaults.failure_threshold})")
    policy.add_argument("--min-requests", type=int,
                        help=f"canary requests a window needs to be judged (default {defaults.min_requests})")
    policy.add_argument("--max-error-rate", type=float,
                        help=f"highest share of 5xx answers (default {defaults.max_error_rate})")
    policy.add_argument("--max-p99-latency-s", type=float,
                        help=f"absolute p99 latency limit; 0 turns it off (default {defaults.max_p99_latency_s})")
    policy.add_argument("--max-score-shift", type=float,
                        help=f"KS statistic limit on the score distribution (default {defaults.max_score_shift})")


def policy_from_args(args: argparse.Namespace) -> CanaryPolicy:
    """The --policy file's policy (CanaryPolicy's defaults without one), with the options given on top."""
    from defectkit.delivery import rollout

    policy = CanaryPolicy()
    if args.policy is not None:
        import yaml  # YAML 1.2 is a superset of JSON: one reader for both

        try:
            document = yaml.safe_load(args.policy.read_text())
        except yaml.YAMLError as exc:
            raise ValueError(f"--policy {args.policy}: not JSON or YAML: {exc}") from None
        if not isinstance(document, dict):
            raise ValueError(f"--policy {args.policy} must hold a mapping of policy fields, e.g. {{\"steps\": [10, 100]}}")
        policy = CanaryPolicy.from_json(document)
    overrides = {name: getattr(args, name) for name in POLICY_OVERRIDES if getattr(args, name) is not None}
    if not overrides:
        return policy
    return rollout.policy_from_parameters(**{**rollout.policy_parameters(policy), **overrides})


def _delivery_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The DeliveryConfig fields that ``start`` and ``restore`` share."""
    settings = dict(backend=args.backend, work_dir=args.work, state_path=args.state, record_dir=args.record_dir,
                    tracking_uri=args.tracking_uri, registered_model=args.registered_model)
    if args.backend == "kserve":
        settings.update(namespace=args.namespace, service_name=args.name, api_url=args.api_url,
                        prometheus_url=args.prometheus_url)
    return settings


def start_config(args: argparse.Namespace):
    """The :class:`~defectkit.delivery.rollout.DeliveryConfig` of ``rollout start``."""
    from defectkit.delivery.rollout import DeliveryConfig

    settings = _delivery_settings(args)
    if args.backend == "kserve":
        settings.update(model=args.storage_uri or "", probe_url=args.probe_url, serve_image=args.serve_image,
                        deployment_mode=args.deployment_mode,
                        prometheus_scrape_interval_s=args.prometheus_scrape_interval_s,
                        min_replicas=args.min_replicas, max_replicas=args.max_replicas,
                        scale_metric=args.scale_metric, scale_target=args.scale_target)
    else:
        settings.update(model=args.model or "", stable=args.stable, router_port=args.router_port,
                        server_args=tuple(args.serve_arg), candidate_args=tuple(args.candidate_serve_arg),
                        scrape_interval_s=args.scrape_interval_s)
    shadow = ShadowPolicy(window_s=args.shadow_window_s, max_images=args.shadow_max_images,
                          min_images=args.shadow_min_images, min_agreement=args.shadow_min_agreement,
                          max_score_shift=args.shadow_max_score_shift)
    return DeliveryConfig(version=args.version, policy=policy_from_args(args), golden_dir=args.golden,
                          judged_model_dir=args.judged_model, sample_uri=args.sample_uri, shadow=shadow,
                          webhooks=args.webhooks, approval=approval_gate(args),
                          served_name=args.served_name, **settings)


def approval_gate(args: argparse.Namespace) -> ApprovalGate | None:
    """The approval gate the --approval-* options describe; the others need --approval-url."""
    settings = {"before": args.approval_before, "timeout_s": args.approval_timeout_s,
                "poll_interval_s": args.approval_interval_s}
    given = {name: value for name, value in settings.items() if value is not None}
    if not args.approval_url:
        if given:
            raise SystemExit("defectkit rollout start: error: --approval-before, --approval-timeout-s and "
                             "--approval-interval-s need --approval-url")
        return None
    return ApprovalGate(args.approval_url, **given)


def cmd_start(args: argparse.Namespace) -> int:
    from defectkit.delivery import record, rollout
    from defectkit.delivery.state import PROMOTED, ROLLED_BACK, RolloutInProgress

    config = start_config(args)
    if args.dry_run:
        print(json.dumps(rollout.plan(config), indent=2))
        return 0
    try:
        state = rollout.deliver(config)
    except RolloutInProgress as exc:
        # Refused before anything changed: distinct from a failed delivery, so a scheduler can wait and retry.
        print(f"REFUSED: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    print(f"{state.phase.upper()}: {state.reason}\ndecision record: {config.record_path / record.MARKDOWN_NAME}")
    return {PROMOTED: EXIT_PROMOTED, ROLLED_BACK: EXIT_ROLLED_BACK}.get(state.phase, EXIT_ERROR)


def cmd_restore(args: argparse.Namespace) -> int:
    from defectkit.delivery import rollout
    from defectkit.delivery.state import RolloutInProgress

    try:
        restored = rollout.restore(rollout.DeliveryConfig(**_delivery_settings(args)),
                                   reason="restore requested (defectkit rollout restore)")
    except RolloutInProgress as exc:
        print(f"REFUSED: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    print("stable traffic restored" if restored else "nothing to restore")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from defectkit.delivery.state import RolloutStore, StateStore

    store: RolloutStore
    if args.backend == "kserve":
        from defectkit.delivery.kserve.api import KubeApi
        from defectkit.delivery.kserve.state import ConfigMapStore

        api = KubeApi(args.api_url) if args.api_url else KubeApi.from_kubeconfig()
        store = ConfigMapStore(api, args.namespace, args.name)
    else:
        from defectkit.delivery.rollout import DELIVERY_DIR, STATE_FILE

        store = StateStore(Path(args.state) if args.state else Path(args.work) / DELIVERY_DIR / STATE_FILE)
    state = store.load()
    if state is None:
        print(f"no delivery recorded in {store.where}")
        return 0
    print(json.dumps({"candidate": state.candidate, "version": state.candidate_version, "backend": state.backend,
                      "phase": state.phase, "weight": state.weight, "step": state.step_index,
                      "failed_checks": state.failed_checks, "reason": state.reason}, indent=2))
    return 0


def _env_pair(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--env {text!r} must be NAME=VALUE")
    return name, value


def _add_manifest_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--storage-uri", required=True,
                        help="gs:// URI of the model directory (model.json + model.safetensors)")
    parser.add_argument("--image", required=True,
                        help="serve image with an explicit tag, e.g. ghcr.io/defectkit/serve:0.1.0")
    parser.add_argument("--name", default="defectkit", help="InferenceService name (default %(default)s)")
    parser.add_argument("--namespace", default="default", help="Kubernetes namespace (default %(default)s)")
    parser.add_argument("--served-name", default=ServiceConfig.served_name,
                        help="model name in the /v2/models/<name> routes (default %(default)s)")
    parser.add_argument("--canary-percent", type=int, help="initial canaryTrafficPercent (0-100)")
    resources = parser.add_argument_group("resources and scaling")
    resources.add_argument("--cpu", default=ServiceConfig.cpu_request, help="CPU request (default %(default)s)")
    resources.add_argument("--memory", default=ServiceConfig.memory_request, help="memory request (default %(default)s)")
    resources.add_argument("--cpu-limit", default=ServiceConfig.cpu_limit, help="CPU limit (default %(default)s)")
    resources.add_argument("--memory-limit", default=ServiceConfig.memory_limit,
                           help="memory limit (default %(default)s)")
    resources.add_argument("--gpu", type=int, default=ServiceConfig.gpu, help="NVIDIA GPUs per replica (default %(default)s)")
    resources.add_argument("--min-replicas", type=int, default=ServiceConfig.min_replicas,
                           help="0 allows scale to zero (default %(default)s)")
    resources.add_argument("--max-replicas", type=int, default=ServiceConfig.max_replicas, help="(default %(default)s)")
    parser.add_argument("--service-account", help="service account with read access to the model bucket")
    parser.add_argument("--env", type=_env_pair, action="append", default=[], metavar="NAME=VALUE",
                        help="extra container environment variable (repeatable)")


def cmd_manifest(args: argparse.Namespace) -> int:
    import yaml

    from defectkit.delivery.kserve.manifest import build_inference_service

    config = ServiceConfig(
        name=args.name, namespace=args.namespace, image=args.image, storage_uri=args.storage_uri,
        canary_traffic_percent=args.canary_percent, served_name=args.served_name, cpu_request=args.cpu,
        memory_request=args.memory, cpu_limit=args.cpu_limit, memory_limit=args.memory_limit, gpu=args.gpu,
        min_replicas=args.min_replicas, max_replicas=args.max_replicas, service_account=args.service_account,
        env=tuple(args.env))
    sys.stdout.write(yaml.safe_dump(build_inference_service(config), sort_keys=False))
    return 0
