"""Monitor pipeline: collect the sampled production window -> validate it -> detect drift -> decide -> retrain, in
the same run, with the training pipeline as a sub-pipeline."""

from kfp import dsl

from defectkit_kfp.components.collect_window import collect_window
from defectkit_kfp.components.decide_retraining import decide_retraining
from defectkit_kfp.components.detect_drift import detect_drift
from defectkit_kfp.components.images import SERVE_IMAGE
from defectkit_kfp.components.validate_window import validate_window
from defectkit_kfp.pipelines.shipping import CANARY
from defectkit_kfp.pipelines.training import training_pipeline

NAME = "defectkit-monitor"


# The gate is a pipeline of its own, its condition on an input of that pipeline, as release_if_approved does:
# kfp.local resolves a condition on an input, but not one on a named output of a sibling task.
@dsl.pipeline(name="defectkit-retraining", description="Run the training pipeline on the merged data when the "
              "monitor decided to retrain.")
def retrain_if_due(
    retrain: bool,
    source_uri: str,
    image_size: int,
    architecture: str,
    steps: int,
    batch_size: int,
    learning_rate: float,
    pretrained_weights: str,
    pretrained_cache: str,
    seed: int,
    device: str,
    min_images_per_class: int,
    min_auroc: float,
    max_auroc_drop: float,
    max_f1_drop: float,
    tracking_uri: str,
    registered_model: str,
    deploy_backend: str,
    serving_work_dir: str,
    canary_steps: str,
    canary_interval_s: float,
    canary_min_requests: int,
    kserve_namespace: str,
    kserve_service: str,
    prometheus_url: str,
    prometheus_scrape_interval_s: float,
    kube_api_url: str,
    kserve_deployment_mode: str,
    kserve_serve_image: str,
    webhooks: str,
):
    """Retraining, when it is due; every other input is the training pipeline's.

    Args:
        retrain: decide_retraining's verdict.
        source_uri: The merged retraining data decide_retraining wrote.
    """
    with dsl.If(retrain == True, name="retraining-due"):  # noqa: E712 - a KFP condition, not Python
        training_pipeline(
            source_uri=source_uri,
            image_size=image_size,
            architecture=architecture,
            steps=steps,
            batch_size=batch_size,
            learning_rate=learning_rate,
            pretrained_weights=pretrained_weights,
            pretrained_cache=pretrained_cache,
            seed=seed,
            device=device,
            min_images_per_class=min_images_per_class,
            min_auroc=min_auroc,
            max_auroc_drop=max_auroc_drop,
            max_f1_drop=max_f1_drop,
            tracking_uri=tracking_uri,
            registered_model=registered_model,
            deploy_backend=deploy_backend,
            serving_work_dir=serving_work_dir,
            canary_steps=canary_steps,
            canary_interval_s=canary_interval_s,
            canary_min_requests=canary_min_requests,
            kserve_namespace=kserve_namespace,
            kserve_service=kserve_service,
            prometheus_url=prometheus_url,
            prometheus_scrape_interval_s=prometheus_scrape_interval_s,
            kube_api_url=kube_api_url,
            kserve_deployment_mode=kserve_deployment_mode,
            kserve_serve_image=kserve_serve_image,
            # No shadow replay: after drift the champion's answers on production images are what is in question.
            sample_uri="",
            webhooks=webhooks,
        )


@dsl.pipeline(name=NAME, description="Check sampled production images for drift from the served model's training "
              "data and retrain in the same run when drift, enough new data and the cooldown allow it.")
def monitor_pipeline(
    sample_uri: str,
    model_uri: str,
    state_uri: str,
    base_dataset_uri: str,
    retraining_data_uri: str,
    tracking_uri: str = "",
    window_s: float = 86400.0,
    window_end: str = "",
    min_new_images: int = 100,
    cooldown_s: float = 86400.0,
    ks_alpha: float = 0.05,
    psi_threshold: float = 0.2,
    defect_class: str = "",
    max_quarantine_fraction: float = 0.1,
    image_size: int = 160,
    architecture: str = "resnet18",
    steps: int = 1300,
    batch_size: int = 32,
    learning_rate: float = 0.002,
    pretrained_weights: str = "imagenet",
    pretrained_cache: str = "",
    seed: int = 0,
    device: str = "auto",
    min_images_per_class: int = 5,
    min_auroc: float = 0.9,
    max_auroc_drop: float = 0.03,
    max_f1_drop: float = 0.05,
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
    webhooks: str = "",
):
    """Drift check of the last window of production samples, and retraining when it is due.

    Args:
        sample_uri: Root the model server writes samples to (--sample-uri).
        model_uri: The served model (directory, gs:// or models:/<name>@champion); it carries its drift reference.
        state_uri: Directory or gs:// URI keeping the time of the last retraining.
        base_dataset_uri: Training data root the model was trained on.
        retraining_data_uri: Root under which each retraining's data is written, in a folder of its own per retraining.
        tracking_uri: MLflow tracking URI, for models:/ URIs and the retrained model's registration; empty ships no retrained model.
        window_s: Seconds of production samples checked, ending at window_end.
        window_end: End of the window, RFC 3339 (e.g. 2026-01-09T13:00:00Z); empty is the run's scheduled time (a recurring run) or its creation time.
        min_new_images: Fewest new images worth retraining on.
        cooldown_s: Shortest time between two retrainings, in seconds.
        ks_alpha: Significance level of the corrected KS test.
        psi_threshold: Smallest population stability index that counts as a shift.
        defect_class: Defect type for images the model called defect; empty leaves them out of retraining.
        max_quarantine_fraction: Largest share of sampled images that may fail to decode before the window is not trusted.
        image_size: Retraining: side in pixels of the square model input.
        architecture: Retraining: torchvision classification model name.
        steps: Retraining: budget of training steps.
        pretrained_weights: Retraining: "imagenet", "" or a state dict URI (see the training pipeline).
        pretrained_cache: Retraining: where downloaded ImageNet weights are kept; empty downloads them each run.
        batch_size: Retraining: training batch size.
        learning_rate: Retraining: peak learning rate.
        seed: Retraining: seed for the validation split and training.
        device: Retraining: auto, cpu, cuda or cuda:N.
        min_images_per_class: Retraining: minimum good images in train and test, and of each defect type in test.
        min_auroc: Retraining: lowest test image AUROC that can be approved.
        max_auroc_drop: Retraining: how far the retrained model's test AUROC may fall below the champion's, at the upper bound of the 95% interval of DeLong's paired test.
        max_f1_drop: Retraining: how far the retrained model's test F1 may fall below the champion's, at the upper bound of the 95% interval of a paired bootstrap.
        registered_model: Retraining: registered model name in MLflow.
        deploy_backend: Retraining: where an approved model is shipped: local or kserve.
        serving_work_dir: Retraining: directory of the local serving stack and the delivery state.
        canary_steps: Retraining: comma-separated canary traffic percents.
        canary_interval_s: Retraining: seconds each canary step is held and analysed.
        canary_min_requests: Retraining: candidate requests an analysis window needs to be judged.
        kserve_namespace: Retraining: namespace of the InferenceService (kserve backend).
        kserve_service: Retraining: InferenceService name (kserve backend).
        prometheus_url: Retraining: Prometheus scraping the predictor pods (kserve backend).
        prometheus_scrape_interval_s: Retraining: how often that Prometheus scrapes the predictor pods; the canary analysis window derives from it (kserve backend).
        kube_api_url: Retraining: Kubernetes API URL (kserve backend); empty uses in-cluster credentials.
        kserve_deployment_mode: Retraining: KServe deployment mode (Knative or Standard) of an InferenceService the first delivery creates; empty means the cluster default (kserve backend).
        kserve_serve_image: Retraining: predictor image of an InferenceService the first delivery creates (kserve backend).
        webhooks: Who hears of drift found, retraining started, and the retrained model blocked, promoted or rolled back: comma-separated URLs (generic JSON) or slack+URL (Slack-compatible); empty uses the DEFECTKIT_WEBHOOKS environment variable of the steps (e.g. from a Secret), or none.
    """
    # Its real input is the clock and whatever the server sampled since: never served from cache. The
    # backend substitutes the scheduled time (the creation time for a run that was not scheduled).
    window = collect_window(sample_uri=sample_uri, model_uri=model_uri, window_s=window_s, window_end=window_end,
                            scheduled_time=dsl.PIPELINE_JOB_SCHEDULE_TIME_UTC_PLACEHOLDER,
                            tracking_uri=tracking_uri).set_caching_options(False)
    validated = validate_window(current=window.outputs["current"], since=window.outputs["since"],
                                until=window.outputs["until"], max_quarantine_fraction=max_quarantine_fraction)
    check = detect_drift(reference=window.outputs["reference"], current=window.outputs["current"],
                         ks_alpha=ks_alpha, psi_threshold=psi_threshold)
    # Reads and writes the last-retraining marker at state_uri: never served from cache.
    decide = decide_retraining(drifted=check.outputs["drifted"], drifted_features=check.outputs["drifted_features"],
                               new_images=window.outputs["new_images"], since=window.outputs["since"],
                               until=window.outputs["until"], current=window.outputs["current"],
                               state_uri=state_uri, base_dataset_uri=base_dataset_uri,
                               retraining_data_uri=retraining_data_uri, run=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                               min_new_images=min_new_images, cooldown_s=cooldown_s, defect_class=defect_class,
                               validation_problems=validated.outputs["problems"],
                               webhooks=webhooks).set_caching_options(False)
    # In this run, not through the KFP API: no token or namespace needed, and the lineage stays in one run.
    retrain_if_due(
        retrain=decide.outputs["retrain"],
        source_uri=decide.outputs["retraining_data"],
        image_size=image_size,
        architecture=architecture,
        steps=steps,
        batch_size=batch_size,
        learning_rate=learning_rate,
        pretrained_weights=pretrained_weights,
        pretrained_cache=pretrained_cache,
        seed=seed,
        device=device,
        min_images_per_class=min_images_per_class,
        min_auroc=min_auroc,
        max_auroc_drop=max_auroc_drop,
        max_f1_drop=max_f1_drop,
        tracking_uri=tracking_uri,
        registered_model=registered_model,
        deploy_backend=deploy_backend,
        serving_work_dir=serving_work_dir,
        canary_steps=canary_steps,
        canary_interval_s=canary_interval_s,
        canary_min_requests=canary_min_requests,
        kserve_namespace=kserve_namespace,
        kserve_service=kserve_service,
        prometheus_url=prometheus_url,
        prometheus_scrape_interval_s=prometheus_scrape_interval_s,
        kube_api_url=kube_api_url,
        kserve_deployment_mode=kserve_deployment_mode,
        kserve_serve_image=kserve_serve_image,
        webhooks=webhooks,
    )
