from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Output

from defectkit_kfp.components.images import MONITOR_IMAGE


@dsl.component(base_image=MONITOR_IMAGE, install_kfp_package=False)
def validate_window(
    current: Input[Dataset],
    since: float,
    until: float,
    expectations: Output[HTML],
    results: Output[Artifact],
    metrics: Output[Metrics],
    max_quarantine_fraction: float = 0.1,
) -> NamedTuple("ValidateWindowOutputs", [("passed", bool), ("problems", str)]):
    """Check a window of production samples before it is trusted: undecodable images, answers and image features.

    Great Expectations checks that scores lie in [0, 1], labels are the server's, every sample names its model version, and every image feature is present and in range. A window that fails is not retrained on; the run still goes on, so that its decision record says why.

    Args:
        current: The window's samples (collect_window's output); undecodable ones are in its quarantine/.
        since: Start of the window (UNIX seconds), to name it in the report.
        until: End of the window (UNIX seconds).
        max_quarantine_fraction: Largest share of sampled images that may fail to decode.

    Returns:
        passed: Whether the window passed.
        problems: What failed and what to do, empty when it passed.
    """
    import json
    import logging
    from pathlib import Path

    from defectkit.validation import window as window_validation

    logging.basicConfig(level=logging.INFO, force=True)
    report = window_validation.validate_window(
        Path(current.path), since, until,
        window_validation.WindowValidationConfig(max_quarantine_fraction=max_quarantine_fraction))
    Path(expectations.path).write_text(report.to_html())
    Path(results.path).write_text(json.dumps(report.to_json(), indent=1))
    metrics.log_metric("images", report.images)
    metrics.log_metric("quarantined", len(report.quarantined))
    metrics.log_metric("quarantine_fraction", report.quarantine_fraction)
    metrics.log_metric("checks_failed", sum(not c.success for c in report.checks))
    outputs = NamedTuple("ValidateWindowOutputs", [("passed", bool), ("problems", str)])
    return outputs(report.passed, report.failure_message())
