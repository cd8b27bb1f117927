"""Product-lines pipeline: one model per category of a dataset root, each through the training pipeline (validate,
train, judge, register, canary) under its own registered name and InferenceService, then one summary table."""

from typing import List, NamedTuple

from kfp import dsl
from kfp.dsl import Markdown

from defectkit_kfp.components.images import SERVE_IMAGE
from defectkit_kfp.components.plan_product_lines import plan_product_lines
from defectkit_kfp.components.record_product_line import record_product_line
from defectkit_kfp.components.summarize_product_lines import summarize_product_lines
from defectkit_kfp.pipelines.shipping import CANARY
from defectkit_kfp.pipelines.training import training_pipeline

NAME = "defectkit-product-lines"
# At most this many lines train at once: each training step asks for a GPU. A compile-time setting in KFP.
PARALLELISM = 4

ProductLinesOutputs = NamedTuple("ProductLinesOutputs", [("approved", int), ("summary", Markdown)])


@dsl.pipeline(name=NAME, description="Train, judge, register and ship one defect model per product line "
              "(category folder of a dataset root), then summarise them in one table.")
def product_lines_pipeline(
    source_root: str,
    categories: List[str] = [],
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
    tracking_uri: str = "",
    registered_model: str = "defectkit",
    deploy_backend: str = "kserve",
    serving_work_dir: str = "runs",
    canary_steps: str = CANARY["steps"],
    canary_interval_s: float = CANARY["interval_s"],
    canary_min_requests: int = CANARY["min_requests"],
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
    webhooks: str = "",
    approval_url: str = "",
    approval_before: str = "promotion",
    approval_timeout_s: float = 3600.0,
) -> ProductLinesOutputs:
    """One defect model per product line. Each line's champion is its own registered model's champion alias;
    the canary's other settings are the training pipeline's defaults.

    Args:
        source_root: Root holding one dataset per category: <root>/<category>/{train,test}/<class>/<image> (local path, file://, gs:// or s3://).
        categories: Categories to train (folder names under the root); empty trains every folder holding both train and test.
        image_size: Side in pixels of the square model input.
        architecture: torchvision classification model name.
        steps: Budget of training steps per line (early stopping on the smoothed validation AUROC may end sooner).
        batch_size: Training batch size.
        learning_rate: Peak AdamW learning rate of the one-cycle schedule.
        synthetic_anomalies: Share of each batch's defect half drawn on good images (CutPaste, DRAEM); with no defect images in train, every defect seen in training is synthetic.
        pretrained_weights: "imagenet" (torchvision's published weights, checked by hash; without internet training starts from scratch and the log says so), "" for none, or a .safetensors/.pth state dict (path, gs:// or s3://).
        pretrained_cache: gs://, s3:// or local directory where downloaded ImageNet weights are kept, so that they are fetched once; empty downloads them each run.
        seed: Seed for the validation split and training.
        device: auto, cpu, cuda or cuda:N.
        max_quarantine_fraction: Fail a line's validation above this fraction of bad files.
        min_images_per_class: Minimum good images in train and test, and images of each defect type in test; train may hold few or no defect images.
        threshold_policy: max_f1 or target_fpr.
        target_fpr: False positive rate for the target_fpr policy.
        min_auroc: Lowest test image AUROC that can be approved.
        max_auroc_drop: How far a line's candidate AUROC may fall below its champion's, at the upper bound of the 95% interval of DeLong's paired test.
        max_f1_drop: How far a line's candidate F1 may fall below its champion's, at the upper bound of the 95% interval of a paired bootstrap.
        tracking_uri: MLflow tracking URI of the model registry; approved models are registered there. Empty skips registration and shipping.
        registered_model: Prefix of the registered model names: each line registers as <registered_model>-<category>.
        deploy_backend: Where approved, registered models are shipped: local (model servers on 127.0.0.1) or kserve (an InferenceService per line).
        serving_work_dir: Directory under which each line keeps its serving stack and delivery state (<serving_work_dir>/<category>); must outlive the run.
        canary_steps: Comma-separated canary traffic percents; a final 100 is the promotion.
        canary_interval_s: Seconds each canary step is held and analysed.
        canary_min_requests: Candidate requests an analysis window needs to be judged.
        kserve_namespace: Namespace of the InferenceServices (kserve backend).
        kserve_service: Prefix of the InferenceService names: each line serves as <kserve_service>-<category> (kserve backend).
        prometheus_url: Prometheus scraping the predictor pods (kserve backend).
        prometheus_scrape_interval_s: How often that Prometheus scrapes the predictor pods (kserve backend).
        kube_api_url: Kubernetes API URL (kserve backend); empty uses in-cluster credentials.
        kserve_deployment_mode: KServe deployment mode (Knative or Standard) of InferenceServices the first deliveries create; empty means the cluster default.
        kserve_serve_image: Predictor image of InferenceServices the first deliveries create.
        kserve_min_replicas: Fewest replicas of each new InferenceService; 0 scales to zero (Knative mode only).
        kserve_max_replicas: Most replicas of each new InferenceService.
        kserve_scale_metric: What each new InferenceService scales on: concurrency or rps (Knative), cpu or memory; empty for the platform's default.
        kserve_scale_target: Per-replica target of kserve_scale_metric; 0 for the platform's default.
        webhooks: Who hears of blocked candidates, promotions and rollbacks: comma-separated URLs (generic JSON) or slack+URL (Slack-compatible); empty uses the DEFECTKIT_WEBHOOKS environment variable of the steps, or none.
        approval_url: A URL that must answer HTTP 200 to a POST of each delivery's state before its promotion (or first traffic); empty: no approval gate.
        approval_before: What waits for the approval: promotion or traffic.
        approval_timeout_s: How long to wait for an approval before rolling back, in seconds.

    Returns:
        approved: How many product lines were approved; summary: one table row per line.
    """
    lines = plan_product_lines(source_root=source_root, categories=categories, registered_model=registered_model,
                               kserve_service=kserve_service, serving_work_dir=serving_work_dir)
    with dsl.ParallelFor(lines.output, parallelism=PARALLELISM, name="product-line") as line:
        trained = training_pipeline(
            source_uri=line.source_uri,
            image_size=image_size,
            architecture=architecture,
            steps=steps,
            batch_size=batch_size,
            learning_rate=learning_rate,
            synthetic_anomalies=synthetic_anomalies,
            pretrained_weights=pretrained_weights,
            pretrained_cache=pretrained_cache,
            seed=seed,
            device=device,
            max_quarantine_fraction=max_quarantine_fraction,
            min_images_per_class=min_images_per_class,
            threshold_policy=threshold_policy,
            target_fpr=target_fpr,
            min_auroc=min_auroc,
            max_auroc_drop=max_auroc_drop,
            max_f1_drop=max_f1_drop,
            tracking_uri=tracking_uri,
            registered_model=line.registered_model,
            deploy_backend=deploy_backend,
            serving_work_dir=line.work_dir,
            canary_steps=canary_steps,
            canary_interval_s=canary_interval_s,
            canary_min_requests=canary_min_requests,
            kserve_namespace=kserve_namespace,
            kserve_service=line.service,
            prometheus_url=prometheus_url,
            prometheus_scrape_interval_s=prometheus_scrape_interval_s,
            kube_api_url=kube_api_url,
            kserve_deployment_mode=kserve_deployment_mode,
            kserve_serve_image=kserve_serve_image,
            kserve_min_replicas=kserve_min_replicas,
            kserve_max_replicas=kserve_max_replicas,
            kserve_scale_metric=kserve_scale_metric,
            kserve_scale_target=kserve_scale_target,
            webhooks=webhooks,
            approval_url=approval_url,
            approval_before=approval_before,
            approval_timeout_s=approval_timeout_s,
        )
        outcome = record_product_line(
            line=line,
            approved=trained.outputs["approved"],
            image_auroc=trained.outputs["image_auroc"],
            images=trained.outputs["images"],
            quarantined=trained.outputs["quarantined"],
            reasons=trained.outputs["reasons"],
        )
    summary = summarize_product_lines(outcomes=dsl.Collected(outcome.output))
    return ProductLinesOutputs(summary.outputs["Output"], summary.outputs["summary"])
