"""Training pipeline: validate -> preprocess -> train -> evaluate."""

from typing import NamedTuple

from kfp import dsl, kubernetes
from kfp.dsl import Artifact, Model

from defectkit_kfp.components.evaluate_model import evaluate_model
from defectkit_kfp.components.fingerprint_source import fingerprint_source
from defectkit_kfp.components.images import SERVE_IMAGE
from defectkit_kfp.components.preprocess_images import preprocess_images
from defectkit_kfp.components.resolve_champion import resolve_champion
from defectkit_kfp.components.train_model import train_model
from defectkit_kfp.components.validate_images import validate_images
from defectkit_kfp.pipelines.shipping import CANARY, release_if_approved

NAME = "defectkit-training"

TrainingOutputs = NamedTuple(
    "TrainingOutputs",
    [
        ("model", Model),
        ("verdict", Artifact),
        ("approved", bool),
        ("reasons", str),
        ("image_auroc", float),
        ("images", int),
        ("quarantined", int),
    ],
)


@dsl.pipeline(
    name=NAME,
    description="Validate images, train a defect classifier, judge it against the champion, register it and ship it "
    "through a canary.",
)
def training_pipeline(
    source_uri: str,
    image_size: int = 160,
    architecture: str = "resnet18",
    steps: int = 1300,
    batch_size: int = 32,
    learning_rate: float = 0.002,
    synthetic_anomalies: float = 0.5,
    pretrained_weights: str = "imagenet",
    pretrained_cache: str = "",
    seed: int = 0,
    device: str = "auto",
    max_quarantine_fraction: float = 0.1,
    min_images_per_class: int = 5,
    threshold_policy: str = "max_f1",
    target_fpr: float = 0.05,
    min_auroc: float = 0.9,
    max_auroc_drop: float = 0.03,
    max_f1_drop: float = 0.05,
    champion_uri: str = "",
    tracking_uri: str = "",
    registered_model: str = "defectkit",
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
) -> TrainingOutputs:
    """Images to a judged defect model.

    Args:
        source_uri: Dataset root (local path, file:// or gs://) laid out as {train,test}/<class>/<image>.
        image_size: Side in pixels of the square model input.
        architecture: torchvision classification model name.
        steps: Budget of training steps (early stopping on the smoothed validation AUROC may end sooner).
        batch_size: Training batch size.
        learning_rate: Peak AdamW learning rate of the one-cycle schedule.
        synthetic_anomalies: Share of each batch's defect half drawn on good images (CutPaste, DRAEM); with no defect images in train, every defect seen in training is synthetic.
        pretrained_weights: "imagenet" (torchvision's published weights, checked by hash; without internet training starts from scratch and the log says so), "" for none, or a .safetensors/.pth state dict (path, gs:// or s3://).
        pretrained_cache: gs://, s3:// or local directory where downloaded ImageNet weights are kept, so that they are fetched once; empty downloads them each run.
        seed: Seed for the validation split and training.
        device: auto, cpu, cuda or cuda:N.
        max_quarantine_fraction: Fail validation above this fraction of bad files.
        min_images_per_class: Minimum good images in train and test, and images of each defect type in test; train may hold few or no defect images.
        threshold_policy: max_f1 or target_fpr.
        target_fpr: False positive rate for the target_fpr policy.
        min_auroc: Lowest test image AUROC that can be approved.
        max_auroc_drop: How far the candidate's test AUROC may fall below the champion's on the same test set, at the upper bound of the 95% interval of DeLong's paired test.
        max_f1_drop: How far the candidate's test F1 may fall below the champion's on the same test set, at the upper bound of the 95% interval of a paired bootstrap.
        champion_uri: Model to judge the candidate against on the same test set (models:/..., path or gs://); empty uses the registry's champion alias.
        tracking_uri: MLflow tracking URI of the model registry; an approved model is registered there. Empty skips registration.
        registered_model: Registered model name in MLflow.
        deploy_backend: Where an approved, registered model is shipped: local (model servers on 127.0.0.1) or kserve (an InferenceService).
        serving_work_dir: Directory of the local serving stack and the delivery state; must outlive the run (a volume or /gcs/ mount on a cluster).
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
    # The backend caches on input values and artifact identities, never on what a URI holds: the
    # source is fingerprinted on every run, and validation (with all that follows) caches on that.
    source = fingerprint_source(source_uri=source_uri).set_caching_options(False)
    # No task retry: storage I/O retries inside with backoff, and a failed validation is a verdict, not a fault.
    validate = validate_images(
        source_uri=source_uri,
        source_fingerprint=source.output,
        max_quarantine_fraction=max_quarantine_fraction,
        min_images_per_class=min_images_per_class,
        seed=seed,
    )
    validate.set_cpu_limit("4").set_memory_limit("8G")
    fingerprint = validate.outputs["fingerprint"]

    preprocess = preprocess_images(
        dataset=validate.outputs["dataset"], dataset_fingerprint=fingerprint, image_size=image_size
    )
    preprocess.set_cpu_limit("8").set_memory_limit("16G").set_retry(2, backoff_duration="30s")

    train = train_model(
        preprocessed=preprocess.outputs["preprocessed"],
        dataset_fingerprint=fingerprint,
        architecture=architecture,
        steps=steps,
        batch_size=batch_size,
        learning_rate=learning_rate,
        synthetic_anomalies=synthetic_anomalies,
        seed=seed,
        device=device,
        pretrained_weights=pretrained_weights,
        pretrained_cache=pretrained_cache,
    )
    train.set_cpu_limit("8").set_memory_limit("32G").set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(1)
    # GPU nodes are usually tainted so that only GPU work lands on them.
    kubernetes.add_toleration(train, key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")
    train.set_retry(1, backoff_duration="60s")

    # The registry's champion can change between runs: never cached.
    champion = resolve_champion(
        champion_uri=champion_uri, tracking_uri=tracking_uri, registered_model=registered_model
    ).set_caching_options(False)
    champion.set_retry(2, backoff_duration="30s")

    evaluate = evaluate_model(
        model=train.outputs["model"],
        preprocessed=preprocess.outputs["preprocessed"],
        dataset=validate.outputs["dataset"],
        dataset_fingerprint=fingerprint,
        champion=champion.outputs["champion"],
        threshold_policy=threshold_policy,
        target_fpr=target_fpr,
        min_auroc=min_auroc,
        max_auroc_drop=max_auroc_drop,
        max_f1_drop=max_f1_drop,
        device=device,
        webhooks=webhooks,
    ).set_caching_options(False)
    evaluate.set_cpu_limit("4").set_memory_limit("16G").set_retry(2, backoff_duration="30s")

    release_if_approved(
        approved=evaluate.outputs["approved"],
        model=evaluate.outputs["judged_model"],
        golden=evaluate.outputs["golden"],
        tracking_uri=tracking_uri,
        registered_model=registered_model,
        dataset_fingerprint=fingerprint,
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

    return TrainingOutputs(
        evaluate.outputs["judged_model"],
        evaluate.outputs["verdict"],
        evaluate.outputs["approved"],
        evaluate.outputs["reasons"],
        evaluate.outputs["image_auroc"],
        validate.outputs["images"],
        validate.outputs["quarantined"],
    )
