"""Monitor pipeline: collect the sampled production window -> validate it -> detect drift -> decide and start
retraining."""

from kfp import dsl

from defectkit_kfp.components.collect_window import collect_window
from defectkit_kfp.components.decide_retraining import decide_retraining
from defectkit_kfp.components.detect_drift import detect_drift
from defectkit_kfp.components.validate_window import validate_window

NAME = "defectkit-monitor"


@dsl.pipeline(name=NAME, description="Check sampled production images for drift from the served model's training "
              "data and start the training pipeline when drift, enough new data and the cooldown allow it.")
def monitor_pipeline(
    sample_uri: str,
    model_uri: str,
    state_uri: str,
    base_dataset_uri: str,
    retraining_data_uri: str,
    tracking_uri: str = "",
    window_s: float = 86400.0,
    min_new_images: int = 100,
    cooldown_s: float = 86400.0,
    ks_alpha: float = 0.05,
    psi_threshold: float = 0.2,
    defect_class: str = "",
    kfp_host: str = "",
    training_arguments: str = "{}",
    local_work_dir: str = "",
    max_quarantine_fraction: float = 0.1,
):
    """Drift check of the last window of production samples, and retraining when it is due.

    Args:
        sample_uri: Root the model server writes samples to (--sample-uri).
        model_uri: The served model (directory, gs:// or models:/<name>@champion); it carries its drift reference.
        state_uri: Directory or gs:// URI keeping the time of the last retraining.
        base_dataset_uri: Training data root the model was trained on.
        retraining_data_uri: Root under which each retraining's data is written, in a folder of its own per retraining.
        tracking_uri: MLflow tracking URI, for models:/ URIs.
        window_s: Seconds of production samples checked, ending now.
        min_new_images: Fewest new images worth retraining on.
        cooldown_s: Shortest time between two retrainings, in seconds.
        ks_alpha: Significance level of the corrected KS test.
        psi_threshold: Smallest population stability index that counts as a shift.
        defect_class: Defect type for images the model called defect; empty leaves them out of retraining.
        kfp_host: Kubeflow Pipelines API to start retraining on; empty records the decision only.
        training_arguments: JSON object of further training pipeline arguments.
        local_work_dir: Retrain locally (kfp.local) in this directory when no kfp_host is given.
        max_quarantine_fraction: Largest share of sampled images that may fail to decode before the window is not trusted.
    """
    window = collect_window(sample_uri=sample_uri, model_uri=model_uri, window_s=window_s,
                            tracking_uri=tracking_uri)
    validated = validate_window(current=window.outputs["current"], since=window.outputs["since"],
                                until=window.outputs["until"], max_quarantine_fraction=max_quarantine_fraction)
    check = detect_drift(reference=window.outputs["reference"], current=window.outputs["current"],
                         ks_alpha=ks_alpha, psi_threshold=psi_threshold)
    decide_retraining(drifted=check.outputs["drifted"], drifted_features=check.outputs["drifted_features"],
                      new_images=window.outputs["new_images"], since=window.outputs["since"],
                      until=window.outputs["until"], current=window.outputs["current"], state_uri=state_uri,
                      base_dataset_uri=base_dataset_uri, retraining_data_uri=retraining_data_uri,
                      min_new_images=min_new_images, cooldown_s=cooldown_s, defect_class=defect_class,
                      kfp_host=kfp_host, training_arguments=training_arguments, local_work_dir=local_work_dir,
                      validation_problems=validated.outputs["problems"])
