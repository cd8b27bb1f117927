"""Shipping pipeline: register a judged model, then canary it (promote or roll back).

Used inside the training pipeline for an approved model, and on its own to
ship a model that was judged elsewhere. ExitHandler must sit at a pipeline's
outermost scope, so the approval gate is a pipeline of its own around it.
"""

from kfp import dsl
from kfp.dsl import Artifact, Input, Model

from defectkit_kfp.components.deploy_canary import deploy_canary
from defectkit_kfp.components.images import SERVE_IMAGE
from defectkit_kfp.components.register_model import register_model
from defectkit_kfp.components.restore_traffic import restore_traffic
from defectkit.delivery.rollout import policy_parameters

NAME = "defectkit-shipping"
# The canary policy's defaults, in the pipeline encoding (0 = an optional limit off).
CANARY = policy_parameters()


@dsl.pipeline(name=NAME, description="Register a judged defect model and ship it through an automated canary.")
def ship_model(
    model: Input[Model],
    golden: Input[Artifact],
    tracking_uri: str,
    registered_model: str = "defectkit",
    dataset_fingerprint: str = "",
    deploy_backend: str = "kserve",
    serving_work_dir: str = "runs",
    canary_steps: str = CANARY["steps"],
    canary_interval_s: float = CANARY["interval_s"],
    canary_failure_threshold: int = CANARY["failure_threshold"],
    canary_max_error_rate: float = CANARY["max_error_rate"],
    canary_max_p99_latency_s: float = CANARY["max_p99_latency_s"],
    canary_max_p99_ratio: float = CANARY["max_p99_ratio"],
    canary_max_score_shift: float = CANARY["max_score_shift"],
    canary_alpha: float = CANARY["alpha"],
    canary_min_requests: int = CANARY["min_requests"],
    canary_probe_tolerance: float = CANARY["probe_tolerance"],
    canary_max_inconclusive: int = CANARY["max_inconclusive"],
    kserve_namespace: str = "default",
    kserve_service: str = "defectkit",
    prometheus_url: str = "",
    prometheus_scrape_interval_s: float = 30.0,
    kube_api_url: str = "",
    kserve_deployment_mode: str = "",
    kserve_serve_image: str = SERVE_IMAGE,
    kserve_min_replicas: int = 1,
    kserve_max_replicas: int = 3,
    kserve_scale_metric: str = "",
    kserve_scale_target: int = 0,
    sample_uri: str = "",
    webhooks: str = "",
    approval_url: str = "",
    approval_before: str = "promotion",
    approval_timeout_s: float = 3600.0,
):
    """Judged model to champion, through a canary.

    Args:
        model: Judged model (threshold set) from evaluate_model.
        golden: Golden set from evaluate_model: test images with their offline scores.
        tracking_uri: MLflow tracking URI of the model registry.
        registered_model: Registered model name in MLflow.
        dataset_fingerprint: Fingerprint of the training dataset, tagged for lineage.
        deploy_backend: local (model servers on 127.0.0.1) or kserve (an InferenceService).
        serving_work_dir: Directory of the decision record and of the local backend's serving stack and delivery state (which must outlive the run); the kserve backend keeps its state on the cluster.
        canary_steps: Comma-separated canary traffic percents; a final 100 is the promotion.
        canary_interval_s: Seconds each canary step is held and analysed.
        canary_failure_threshold: Failed analyses that roll the candidate back.
        canary_max_error_rate: Highest accepted share of 5xx answers from the candidate.
        canary_max_p99_latency_s: Highest accepted p99 latency of the candidate, in seconds; 0 turns this check off (then canary_max_p99_ratio must be set).
        canary_max_p99_ratio: Highest accepted ratio of candidate p99 latency to stable p99 latency in the same window; 0 turns this check off.
        canary_max_score_shift: Highest accepted Kolmogorov-Smirnov statistic between candidate and stable defect scores.
        canary_alpha: Significance level of the Kolmogorov-Smirnov test; a score shift counts only when significant.
        canary_min_requests: Candidate requests an analysis window needs to be judged.
        canary_probe_tolerance: Largest accepted difference between a golden image's served score and its offline score.
        canary_max_inconclusive: Inconclusive analyses in a row (too little traffic to judge) that roll the candidate back.
        kserve_namespace: Namespace of the InferenceService (kserve backend).
        kserve_service: InferenceService name (kserve backend).
        prometheus_url: Prometheus scraping the predictor pods (kserve backend).
        prometheus_scrape_interval_s: How often that Prometheus scrapes the predictor pods; the canary analysis window derives from it (kserve backend).
        kube_api_url: Kubernetes API URL (kserve backend); empty uses in-cluster credentials.
        kserve_deployment_mode: KServe deployment mode (Knative or Standard) of an InferenceService the first delivery creates; empty means the cluster default (kserve backend).
        kserve_serve_image: Predictor image of an InferenceService the first delivery creates (kserve backend).
        kserve_min_replicas: Fewest replicas of an InferenceService the first delivery creates; 0 scales to zero (Knative mode only).
        kserve_max_replicas: Most replicas of an InferenceService the first delivery creates.
        kserve_scale_metric: What that InferenceService scales on: concurrency or rps (Knative), cpu or memory; empty for the platform's default.
        kserve_scale_target: Per-replica target of kserve_scale_metric (requests in flight, requests/s, or percent of the CPU or memory request); 0 for the platform's default.
        sample_uri: Where the model servers sample production requests; when given, a recent window of them is replayed to the candidate before any canary traffic (shadow replay) and must agree with the champion's answers. Empty: no replay.
        webhooks: Who hears of blocked candidates, promotions and rollbacks: comma-separated URLs (generic JSON) or slack+URL (Slack-compatible); empty uses the DEFECTKIT_WEBHOOKS environment variable of the steps (e.g. from a Secret), or none.
        approval_url: A URL that must answer HTTP 200 to a POST of the delivery's state before the promotion (or the first traffic); empty: no approval gate.
        approval_before: What waits for the approval: promotion or traffic.
        approval_timeout_s: How long to wait for the approval before rolling back, in seconds.
    """
    # Whatever fails from here on, stable traffic is restored: a delivery cut off
    # half-way is rolled back, a finished one is left alone.
    restore = restore_traffic(
        tracking_uri=tracking_uri,
        registered_model=registered_model,
        backend=deploy_backend,
        work_dir=serving_work_dir,
        namespace=kserve_namespace,
        service_name=kserve_service,
        prometheus_url=prometheus_url,
        kube_api_url=kube_api_url,
    ).set_caching_options(False)
    with dsl.ExitHandler(restore, name="restore-stable-on-exit"):
        # Both write to the registry or the serving platform: never cached.
        register = register_model(
            model=model,
            tracking_uri=tracking_uri,
            registered_model=registered_model,
            dataset_fingerprint=dataset_fingerprint,
            kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
        ).set_caching_options(False)
        register.set_retry(2, backoff_duration="30s")
        deploy_canary(
            model=model,
            golden=golden,
            tracking_uri=tracking_uri,
            model_version=register.outputs["version"],
            registered_model=registered_model,
            backend=deploy_backend,
            steps=canary_steps,
            interval_s=canary_interval_s,
            failure_threshold=canary_failure_threshold,
            max_error_rate=canary_max_error_rate,
            max_p99_latency_s=canary_max_p99_latency_s,
            max_p99_ratio=canary_max_p99_ratio,
            max_score_shift=canary_max_score_shift,
            alpha=canary_alpha,
            min_requests=canary_min_requests,
            probe_tolerance=canary_probe_tolerance,
            max_inconclusive=canary_max_inconclusive,
            work_dir=serving_work_dir,
            namespace=kserve_namespace,
            service_name=kserve_service,
            prometheus_url=prometheus_url,
            prometheus_scrape_interval_s=prometheus_scrape_interval_s,
            kube_api_url=kube_api_url,
            serve_image=kserve_serve_image,
            deployment_mode=kserve_deployment_mode,
            min_replicas=kserve_min_replicas,
            max_replicas=kserve_max_replicas,
            scale_metric=kserve_scale_metric,
            scale_target=kserve_scale_target,
            sample_uri=sample_uri,
            webhooks=webhooks,
            approval_url=approval_url,
            approval_before=approval_before,
            approval_timeout_s=approval_timeout_s,
        ).set_caching_options(False)


@dsl.pipeline(name="defectkit-release", description="Ship a judged model only when it was approved and a registry is configured.")
def release_if_approved(
    approved: bool,
    model: Input[Model],
    golden: Input[Artifact],
    tracking_uri: str,
    registered_model: str = "defectkit",
    dataset_fingerprint: str = "",
    deploy_backend: str = "kserve",
    serving_work_dir: str = "runs",
    canary_steps: str = CANARY["steps"],
    canary_interval_s: float = CANARY["interval_s"],
    canary_failure_threshold: int = CANARY["failure_threshold"],
    canary_max_error_rate: float = CANARY["max_error_rate"],
    canary_max_p99_latency_s: float = CANARY["max_p99_latency_s"],
    canary_max_p99_ratio: float = CANARY["max_p99_ratio"],
    canary_max_score_shift: float = CANARY["max_score_shift"],
    canary_alpha: float = CANARY["alpha"],
    canary_min_requests: int = CANARY["min_requests"],
    canary_probe_tolerance: float = CANARY["probe_tolerance"],
    canary_max_inconclusive: int = CANARY["max_inconclusive"],
    kserve_namespace: str = "default",
    kserve_service: str = "defectkit",
    prometheus_url: str = "",
    prometheus_scrape_interval_s: float = 30.0,
    kube_api_url: str = "",
    kserve_deployment_mode: str = "",
    kserve_serve_image: str = SERVE_IMAGE,
    kserve_min_replicas: int = 1,
    kserve_max_replicas: int = 3,
    kserve_scale_metric: str = "",
    kserve_scale_target: int = 0,
    sample_uri: str = "",
    webhooks: str = "",
    approval_url: str = "",
    approval_before: str = "promotion",
    approval_timeout_s: float = 3600.0,
):
    """The blessing gates the shipping: an unapproved model, or a run without a registry, ships nothing.

    Args:
        approved: evaluate_model's verdict.
        model: Judged model (threshold set) from evaluate_model.
        golden: Golden set from evaluate_model: test images with their offline scores.
        tracking_uri: MLflow tracking URI of the model registry.
        registered_model: Registered model name in MLflow.
        dataset_fingerprint: Fingerprint of the training dataset, tagged for lineage.
        deploy_backend: local (model servers on 127.0.0.1) or kserve (an InferenceService).
        serving_work_dir: Directory of the decision record and of the local backend's serving stack and delivery state (which must outlive the run); the kserve backend keeps its state on the cluster.
        canary_steps: Comma-separated canary traffic percents; a final 100 is the promotion.
        canary_interval_s: Seconds each canary step is held and analysed.
        canary_failure_threshold: Failed analyses that roll the candidate back.
        canary_max_error_rate: Highest accepted share of 5xx answers from the candidate.
        canary_max_p99_latency_s: Highest accepted p99 latency of the candidate, in seconds; 0 turns this check off (then canary_max_p99_ratio must be set).
        canary_max_p99_ratio: Highest accepted ratio of candidate p99 latency to stable p99 latency in the same window; 0 turns this check off.
        canary_max_score_shift: Highest accepted Kolmogorov-Smirnov statistic between candidate and stable defect scores.
        canary_alpha: Significance level of the Kolmogorov-Smirnov test; a score shift counts only when significant.
        canary_min_requests: Candidate requests an analysis window needs to be judged.
        canary_probe_tolerance: Largest accepted difference between a golden image's served score and its offline score.
        canary_max_inconclusive: Inconclusive analyses in a row (too little traffic to judge) that roll the candidate back.
        kserve_namespace: Namespace of the InferenceService (kserve backend).
        kserve_service: InferenceService name (kserve backend).
        prometheus_url: Prometheus scraping the predictor pods (kserve backend).
        prometheus_scrape_interval_s: How often that Prometheus scrapes the predictor pods; the canary analysis window derives from it (kserve backend).
        kube_api_url: Kubernetes API URL (kserve backend); empty uses in-cluster credentials.
        kserve_deployment_mode: KServe deployment mode (Knative or Standard) of an InferenceService the first delivery creates; empty means the cluster default (kserve backend).
        kserve_serve_image: Predictor image of an InferenceService the first delivery creates (kserve backend).
        kserve_min_replicas: Fewest replicas of an InferenceService the first delivery creates; 0 scales to zero (Knative mode only).
        kserve_max_replicas: Most replicas of an InferenceService the first delivery creates.
        kserve_scale_metric: What that InferenceService scales on: concurrency or rps (Knative), cpu or memory; empty for the platform's default.
        kserve_scale_target: Per-replica target of kserve_scale_metric (requests in flight, requests/s, or percent of the CPU or memory request); 0 for the platform's default.
        sample_uri: Where the model servers sample production requests; when given, a recent window of them is replayed to the candidate before any canary traffic (shadow replay) and must agree with the champion's answers. Empty: no replay.
        webhooks: Who hears of blocked candidates, promotions and rollbacks: comma-separated URLs (generic JSON) or slack+URL (Slack-compatible); empty uses the DEFECTKIT_WEBHOOKS environment variable of the steps (e.g. from a Secret), or none.
        approval_url: A URL that must answer HTTP 200 to a POST of the delivery's state before the promotion (or the first traffic); empty: no approval gate.
        approval_before: What waits for the approval: promotion or traffic.
        approval_timeout_s: How long to wait for the approval before rolling back, in seconds.
    """
    with dsl.If(approved == True, name="approved"):  # noqa: E712 - a KFP condition, not Python
        with dsl.If(tracking_uri != "", name="registry-configured"):
            ship_model(
                model=model,
                golden=golden,
                tracking_uri=tracking_uri,
                registered_model=registered_model,
                dataset_fingerprint=dataset_fingerprint,
                deploy_backend=deploy_backend,
                serving_work_dir=serving_work_dir,
                canary_steps=canary_steps,
                canary_interval_s=canary_interval_s,
                canary_failure_threshold=canary_failure_threshold,
                canary_max_error_rate=canary_max_error_rate,
                canary_max_p99_latency_s=canary_max_p99_latency_s,
                canary_max_p99_ratio=canary_max_p99_ratio,
                canary_max_score_shift=canary_max_score_shift,
                canary_alpha=canary_alpha,
                canary_min_requests=canary_min_requests,
                canary_probe_tolerance=canary_probe_tolerance,
                canary_max_inconclusive=canary_max_inconclusive,
                kserve_namespace=kserve_namespace,
                kserve_service=kserve_service,
                prometheus_url=prometheus_url,
                prometheus_scrape_interval_s=prometheus_scrape_interval_s,
                kube_api_url=kube_api_url,
                kserve_deployment_mode=kserve_deployment_mode,
                kserve_serve_image=kserve_serve_image,
                kserve_min_replicas=kserve_min_replicas,
                kserve_max_replicas=kserve_max_replicas,
                kserve_scale_metric=kserve_scale_metric,
                kserve_scale_target=kserve_scale_target,
                sample_uri=sample_uri,
                webhooks=webhooks,
                approval_url=approval_url,
                approval_before=approval_before,
                approval_timeout_s=approval_timeout_s,
            )
