from typing import Optional

from kfp import dsl
from kfp.dsl import Artifact, Input, Markdown, Metrics, Model, Output

from defectkit_kfp.components.images import DEPLOY_IMAGE


# The policy defaults are CanaryPolicy's (defectkit.delivery.analysis) and serve_image's is images.SERVE_IMAGE;
# they are literals here because KFP embeds this function's source in the compiled YAML.
# tests/cli/test_policy_defaults.py keeps the policy's equal, tests/integration/test_rollout_components.py the image.
@dsl.component(base_image=DEPLOY_IMAGE, install_kfp_package=False)
def deploy_canary(
    model: Input[Model],
    tracking_uri: str,
    model_version: str,
    decision_record: Output[Markdown],
    decision_record_json: Output[Artifact],
    metrics: Output[Metrics],
    golden: Optional[Input[Artifact]] = None,
    registered_model: str = "defectkit",
    backend: str = "kserve",
    steps: str = "10,25,50,100",
    interval_s: float = 60.0,
    failure_threshold: int = 2,
    max_error_rate: float = 0.01,
    max_p99_latency_s: float = 0.5,
    max_p99_ratio: float = 0.0,
    max_score_shift: float = 0.2,
    alpha: float = 0.01,
    min_requests: int = 50,
    probe_tolerance: float = 0.0001,
    max_inconclusive: int = 10,
    work_dir: str = "runs",
    namespace: str = "default",
    service_name: str = "defectkit",
    prometheus_url: str = "",
    prometheus_scrape_interval_s: float = 30.0,
    storage_uri: str = "",
    kube_api_url: str = "",
    serve_image: str = "ghcr.io/defectkit/serve:0.1.0",
    deployment_mode: str = "",
    probe_url: str = "",
    min_replicas: int = 1,
    max_replicas: int = 3,
    scale_metric: str = "",
    scale_target: int = 0,
    webhooks: str = "",
    approval_url: str = "",
    approval_before: str = "promotion",
    approval_timeout_s: float = 3600.0,
    sample_uri: str = "",
    shadow_window_s: float = 86400.0,
    shadow_min_images: int = 30,
    shadow_min_agreement: float = 0.9,
    shadow_max_score_shift: float = 0.3,
) -> bool:
    """Ship the registered model through a canary: probe, step traffic, analyse, then promote or roll back.

    Promotion moves the registry alias champion to model_version; a rollback leaves it and
    tags the version canary=rolled_back. A rolled-back canary is an outcome, not a failure:
    the step succeeds and returns False. Writes to the registry and the serving platform,
    so pipelines must turn caching off for this task (task.set_caching_options(False)).
    Pair it with restore_traffic in the pipeline's exit handler. On the kserve backend the
    first model into a namespace without the InferenceService creates it and becomes the
    stable model; the delivery state lives in a ConfigMap beside the service, so a retry or
    the exit handler finds it from any pod, and a second delivery to the same service while
    one runs is refused.

    Args:
        model: Judged model registered as model_version (its lineage in this run). Both backends serve the registry's copy: the local one as models:/, the kserve one from the registry's artifact store (gs:// or s3://, which KServe's storage initializer reads) unless storage_uri is given. Its test figures and paired tests against the champion go into the decision record.
        tracking_uri: MLflow tracking URI of the registry: a tracking server (http://...) or sqlite:///<dir>/mlflow.db.
        model_version: Registry version of the model (register_model's version output).
        golden: Golden set (golden.json and images: test images with their offline scores); the candidate must reproduce the scores before it gets traffic. Without it the probe is skipped.
        registered_model: Registered model name in MLflow.
        backend: local (model servers on 127.0.0.1 behind a weighted router, in work_dir) or kserve (an InferenceService).
        steps: Comma-separated canary traffic percents held in turn; a final 100 is the promotion itself.
        interval_s: Seconds each step is held before its metrics are analysed.
        failure_threshold: Failed analyses that roll the candidate back.
        max_error_rate: Highest accepted share of 5xx answers from the candidate.
        max_p99_latency_s: Highest accepted p99 latency of the candidate, in seconds; 0 turns this check off (then max_p99_ratio must be set).
        max_p99_ratio: Highest accepted ratio of candidate p99 latency to stable p99 latency in the same window; 0 turns this check off.
        max_score_shift: Highest accepted Kolmogorov-Smirnov statistic between candidate and stable defect scores (counted only when significant at alpha).
        alpha: Significance level of the Kolmogorov-Smirnov test on the score distributions.
        min_requests: Candidate requests a window needs to be judged; fewer make it inconclusive.
        probe_tolerance: Largest accepted difference between a golden image's served score and its offline score.
        max_inconclusive: Inconclusive windows in a row (too little traffic to judge) that roll the candidate back.
        work_dir: Directory of the decision record and, for the local backend, the serving stack and the delivery state (which must outlive this step for a crashed delivery to be resumed or restored).
        namespace: Kubernetes namespace of the InferenceService (kserve backend).
        service_name: InferenceService name (kserve backend).
        prometheus_url: Prometheus scraping the predictor pods (kserve backend).
        prometheus_scrape_interval_s: How often that Prometheus scrapes the predictor pods; each analysis queries a window of at least four scrapes, and a step (interval_s) shorter than two scrapes is refused (kserve backend).
        storage_uri: gs:// or s3:// directory of the model for KServe's storage initializer (kserve backend); empty means the registered version's location in the registry's artifact store.
        kube_api_url: Kubernetes API URL (kserve backend); empty means in-cluster credentials or the kubeconfig.
        serve_image: Image of the predictor container, used when the InferenceService is created (kserve backend).
        deployment_mode: KServe deployment mode of a new InferenceService: Knative or Standard; empty means the cluster default (kserve backend). An existing service keeps its own.
        probe_url: The candidate's own URL for the golden probe (kserve backend); empty means its tag URL (Knative) or its canary Service (Standard).
        min_replicas: Fewest replicas of an InferenceService this delivery creates (kserve backend); 0 scales to zero (Knative mode only).
        max_replicas: Most replicas of an InferenceService this delivery creates (kserve backend).
        scale_metric: What a created InferenceService scales on: concurrency or rps (Knative), cpu or memory (either mode); empty for the platform's default.
        scale_target: Per-replica target of scale_metric (requests in flight, requests/s, or percent of the CPU or memory request); 0 for the platform's default.
        webhooks: Who hears of the verdict (promoted, rolled back, or blocked before any traffic): comma-separated URLs (generic JSON) or slack+URL (Slack-compatible); empty uses the DEFECTKIT_WEBHOOKS environment variable (e.g. from a Secret), or none. A receiver that is down never fails the step.
        approval_url: A URL that must answer HTTP 200 to a POST of the delivery's state before the promotion (or the first traffic), asked every 30 s (Flagger's confirm-promotion); empty: no approval gate.
        approval_before: What waits for the approval: promotion or traffic.
        approval_timeout_s: How long to wait for the approval before rolling back, in seconds.
        sample_uri: Where the model servers sample production requests (a directory, gs:// or s3://); when given, a recent window of them is replayed to the candidate before any canary traffic and compared with the champion's answers (shadow replay). Empty: no replay.
        shadow_window_s: How far back the replayed samples reach, in seconds.
        shadow_min_images: Fewer sampled images than this skip the shadow replay (no evidence either way).
        shadow_min_agreement: Lowest share of replayed images the candidate labels as the champion did, each at its own threshold.
        shadow_max_score_shift: Highest Kolmogorov-Smirnov statistic between the champion's and the candidate's scores on the replayed images.
    """
    import json
    import logging
    from pathlib import Path

    from defectkit.delivery import record, rollout
    from defectkit.delivery.approval import ApprovalGate
    from defectkit.delivery.shadow import ShadowPolicy

    logging.basicConfig(level=logging.INFO, force=True)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    policy = rollout.policy_from_parameters(
        steps=steps, interval_s=interval_s, failure_threshold=failure_threshold, max_error_rate=max_error_rate,
        max_p99_latency_s=max_p99_latency_s, max_p99_ratio=max_p99_ratio, max_score_shift=max_score_shift,
        alpha=alpha, min_requests=min_requests, probe_tolerance=probe_tolerance, max_inconclusive=max_inconclusive)
    config = rollout.DeliveryConfig.for_registered_version(
        registered_model, model_version, storage_uri=storage_uri, backend=backend,
        policy=policy, work_dir=work_dir, golden_dir=golden.path if golden is not None else None,
        judged_model_dir=model.path, sample_uri=sample_uri, webhooks=webhooks,
        approval=ApprovalGate(approval_url, approval_before, approval_timeout_s) if approval_url else None, min_replicas=min_replicas, max_replicas=max_replicas,
        scale_metric=scale_metric, scale_target=scale_target or None,
        shadow=ShadowPolicy(window_s=shadow_window_s, min_images=shadow_min_images,
                            min_agreement=shadow_min_agreement, max_score_shift=shadow_max_score_shift),
        tracking_uri=tracking_uri, namespace=namespace, service_name=service_name,
        prometheus_url=prometheus_url or None, prometheus_scrape_interval_s=prometheus_scrape_interval_s,
        api_url=kube_api_url or None, serve_image=serve_image,
        deployment_mode=deployment_mode, probe_url=probe_url or None)
    state = rollout.deliver(config)
    built = record.build_record(state)
    Path(decision_record.path).write_text(record.render_markdown(built))
    Path(decision_record_json.path).write_text(json.dumps(built, indent=2))
    decision_record_json.metadata.update({"verdict": built["verdict"], "reason": built["reason"]})
    promoted = state.phase == "promoted"
    metrics.log_metric("promoted", 1.0 if promoted else 0.0)
    metrics.log_metric("analyses", float(len(state.analyses)))
    metrics.log_metric("failed_checks", float(state.failed_checks))
    metrics.log_metric("final_traffic_percent", float(state.weight))
    if state.shadow and "agreement" in state.shadow:
        metrics.log_metric("shadow_agreement", float(state.shadow["agreement"]))
        metrics.log_metric("shadow_score_shift", float(state.shadow["score_shift"]))
    if built["duration_s"] is not None:
        metrics.log_metric("duration_s", float(built["duration_s"]))
    if state.phase not in ("promoted", "rolled_back"):
        raise RuntimeError(f"the delivery did not finish: {state.reason}")
    return promoted
