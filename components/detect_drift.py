from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Output

from defectkit_kfp.components.images import MONITOR_IMAGE


@dsl.component(base_image=MONITOR_IMAGE, install_kfp_package=False)
def detect_drift(
    reference: Input[Artifact],
    current: Input[Dataset],
    report: Output[HTML],
    scores: Output[Artifact],
    summary: Output[Markdown],
    metrics: Output[Metrics],
    ks_alpha: float = 0.05,
    psi_threshold: float = 0.2,
    correction: str = "bh",
    min_rows: int = 30,
) -> NamedTuple("DetectDriftOutputs", [("drifted", bool), ("drifted_features", str)]):
    """Compare current production data with the training reference, feature by feature; decide whether it drifted.

    A feature drifts when its Kolmogorov-Smirnov p-value, corrected over all features, is below ks_alpha and its population stability index is above psi_threshold.

    Args:
        reference: Directory with features.csv (per-image features; a preprocess_images output works as is) and optionally embeddings.npz (a saved defectkit.reference.Reference of model embeddings).
        current: Directory with features.csv of recent production images (same feature columns) and optionally embeddings.npy ((rows, dimensions) float32).
        ks_alpha: Significance level of the corrected KS test.
        psi_threshold: Smallest population stability index that counts as a meaningful shift.
        correction: Multiple-testing correction across features: bh (Benjamini-Hochberg), bonferroni or none.
        min_rows: Fewest current rows worth testing; fewer fails the step.

    Returns:
        drifted: Whether any feature (or embedding dimension) drifted.
        drifted_features: JSON list of the drifted feature names.
    """
    import json
    import logging
    from pathlib import Path

    from defectkit import drift

    logging.basicConfig(level=logging.INFO, force=True)
    thresholds = drift.DriftThresholds(ks_alpha=ks_alpha, correction=correction, psi=psi_threshold, min_rows=min_rows)
    result = drift.detect_artifact_drift(Path(reference.path), Path(current.path), thresholds, Path(report.path))
    Path(scores.path).write_text(json.dumps(result.to_json(), indent=1))
    Path(summary.path).write_text(result.to_markdown())
    for name, value in result.metrics().items():
        metrics.log_metric(name, value)
    outputs = NamedTuple("DetectDriftOutputs", [("drifted", bool), ("drifted_features", str)])
    return outputs(result.drifted, json.dumps(list(result.drifted_features)))
