from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, ClassificationMetrics, Dataset, Input, Markdown, Metrics, Model, Output

from defectkit_kfp.components.images import TRAIN_IMAGE


@dsl.component(base_image=TRAIN_IMAGE, install_kfp_package=False)
def evaluate_model(
    model: Input[Model],
    preprocessed: Input[Dataset],
    dataset: Input[Dataset],
    dataset_fingerprint: str,
    judged_model: Output[Model],
    verdict: Output[Artifact],
    metrics: Output[Metrics],
    classification: Output[ClassificationMetrics],
    report: Output[Markdown],
    golden: Output[Artifact],
    champion: Input[Model],
    threshold_policy: str = "max_f1",
    target_fpr: float = 0.05,
    min_auroc: float = 0.9,
    min_recall: float = 0.0,
    max_fpr: float = 1.0,
    max_auroc_drop: float = 0.03,
    max_f1_drop: float = 0.05,
    device: str = "auto",
    webhooks: str = "",
) -> NamedTuple("EvaluateOutputs", [("approved", bool), ("reasons", str), ("image_auroc", float)]):
    """Score the model on the frozen test split, choose its decision threshold and decide whether it is approved.

    The judged model carries its ONNX export (model.onnx, with the threshold and preprocessing in its metadata),
    whose scores on the golden set match PyTorch's within 1e-4.

    Args:
        model: Trained model from train_model.
        preprocessed: Shards from preprocess_images (validation and test splits).
        dataset: Validated dataset, used to re-decode raw files for a champion trained at another input size.
        dataset_fingerprint: Fingerprint of the dataset the model is judged on.
        champion: Current champion from resolve_champion; an empty artifact (first run) applies absolute gates only.
        threshold_policy: max_f1 (maximise F1 on validation) or target_fpr (highest recall with validation false positive rate at most target_fpr).
        target_fpr: False positive rate for the target_fpr policy.
        min_auroc: Absolute gate: lowest accepted test image AUROC.
        min_recall: Absolute gate: lowest accepted test recall at the chosen threshold.
        max_fpr: Absolute gate: highest accepted test false positive rate.
        max_auroc_drop: Relative gate (non-inferiority): how far the candidate's AUROC may fall below the champion's, read at the upper bound of the 95% interval of DeLong's paired test on the same test images.
        max_f1_drop: Relative gate (non-inferiority): how far the candidate's F1 may fall below the champion's, read at the upper bound of the 95% interval of a paired bootstrap on the same test images.
        device: auto, cpu, cuda or cuda:N.
        webhooks: Who hears of a candidate the gates block: comma-separated URLs (generic JSON) or slack+URL (Slack-compatible); empty uses the DEFECTKIT_WEBHOOKS environment variable (e.g. from a Secret), or none. A receiver that is down never fails the step.
    """
    import json
    import logging
    from pathlib import Path

    from defectkit import evaluation

    logging.basicConfig(level=logging.INFO, force=True)
    result = evaluation.judge(
        Path(model.path),
        Path(preprocessed.path),
        Path(dataset.path),
        Path(champion.path),
        judged_model_dir=Path(judged_model.path),
        golden_dir=Path(golden.path),
        metrics_path=Path(verdict.path),
        report_path=Path(report.path),
        policy=evaluation.ThresholdPolicy(kind=threshold_policy, target_fpr=target_fpr),
        gates=evaluation.Gates(min_auroc=min_auroc, min_recall=min_recall, max_fpr=max_fpr,
                               max_auroc_drop=max_auroc_drop, max_f1_drop=max_f1_drop),
        device=device,
        webhooks=webhooks,
    )
    for name, value in result.metrics.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics.log_metric(name, value)
    # Per defect type, so that the run's metrics table shows which defects the model misses.
    for prefix, per_type in (("recall", result.metrics["recall_by_defect_type"]),
                             ("auroc", result.metrics["auroc_by_defect_type"])):
        for defect_type, value in per_type.items():
            metrics.log_metric(f"{prefix}_{defect_type}", value)
    # The paired tests against the champion: the drop (champion - candidate) with its interval and p-value.
    for key in evaluation.COMPARISONS.values():
        if key in result.metrics:
            for field in ("difference", "ci_low", "ci_high", "p_value"):
                metrics.log_metric(f"{key}_{field}", result.metrics[key][field])
    if result.export is not None:  # the ONNX export beside the weights, scored against PyTorch on the golden set
        metrics.log_metric("onnx_parity_max_abs_diff", result.export["parity"]["max_abs_diff"])
    roc = result.roc_curve
    classification.log_roc_curve(roc["fpr"], roc["tpr"], roc["thresholds"])
    classification.log_confusion_matrix(["good", "defect"], result.confusion_matrix)
    judged_model.metadata.update(
        {"approved": result.blessing.approved, "fingerprint": dataset_fingerprint, "image_auroc": result.metrics["image_auroc"]}
    )
    outputs = NamedTuple("EvaluateOutputs", [("approved", bool), ("reasons", str), ("image_auroc", float)])
    return outputs(result.blessing.approved, json.dumps(list(result.blessing.reasons)), result.metrics["image_auroc"])
