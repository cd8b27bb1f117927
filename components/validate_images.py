from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Metrics, Output

from defectkit_kfp.components.images import DATA_IMAGE


@dsl.component(base_image=DATA_IMAGE, install_kfp_package=False)
def validate_images(
    source_uri: str,
    source_fingerprint: str,
    dataset: Output[Dataset],
    quarantine: Output[Artifact],
    expectations: Output[HTML],
    metrics: Output[Metrics],
    max_quarantine_fraction: float = 0.1,
    val_fraction: float = 0.2,
    min_images_per_class: int = 5,
    min_side: int = 32,
    max_side: int = 8192,
    allowed_classes: str = "",
    seed: int = 0,
) -> NamedTuple("ValidateOutputs", [("fingerprint", str), ("images", int), ("quarantined", int)]):
    """Safely decode every image, quarantine bad files and check the dataset with Great Expectations.

    Args:
        source_uri: Dataset root: a local path, file://, gs:// or s3:// URI laid out as {train,test}/<class>/<image>, class "good" meaning no defect.
        source_fingerprint: What fingerprint_source found under source_uri: the input this step's cache keys on, so that unchanged data reuses this step and everything after it, and changed data never does. The step fails if the files changed while it read them.
        max_quarantine_fraction: Fail the step when more than this fraction of files is quarantined (corrupt, truncated, empty, unsupported, oversized, renamed).
        val_fraction: Fraction of each train class moved to the validation split (seeded, stratified).
        min_images_per_class: Minimum good images in train and in test, and images of each defect type in test; train may hold few or no defect images (training draws synthetic anomalies).
        min_side: Smallest accepted image width or height in pixels.
        max_side: Largest accepted image width or height in pixels.
        allowed_classes: Comma-separated class names accepted; empty accepts any.
        seed: Seed of the validation split.
    """
    import logging
    from pathlib import Path

    from defectkit.validation import dataset as dataset_validation

    logging.basicConfig(level=logging.INFO, force=True)
    config = dataset_validation.ValidationConfig(
        max_quarantine_fraction=max_quarantine_fraction,
        val_fraction=val_fraction,
        seed=seed,
        min_side=min_side,
        max_side=max_side,
        min_images_per_class=min_images_per_class,
        allowed_classes=tuple(c.strip() for c in allowed_classes.split(",") if c.strip()),
    )
    report = dataset_validation.validate_dataset(
        source_uri, Path(dataset.path), config, quarantine_dir=Path(quarantine.path), raise_on_failure=False,
        source_fingerprint=source_fingerprint,
    )
    Path(expectations.path).write_text(report.to_html())
    metrics.log_metric("images", len(report.manifest.entries))
    metrics.log_metric("quarantined", len(report.quarantined))
    metrics.log_metric("quarantine_fraction", report.quarantine_fraction)
    metrics.log_metric("checks_passed", sum(c.success for c in report.checks))
    metrics.log_metric("checks_failed", sum(not c.success for c in report.checks))
    dataset.metadata["fingerprint"] = report.manifest.fingerprint
    if not report.passed:
        raise dataset_validation.ValidationFailed(report)
    outputs = NamedTuple("ValidateOutputs", [("fingerprint", str), ("images", int), ("quarantined", int)])
    return outputs(report.manifest.fingerprint, len(report.manifest.entries), len(report.quarantined))
