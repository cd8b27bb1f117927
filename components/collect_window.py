from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Output

from defectkit_kfp.components.images import MONITOR_IMAGE


@dsl.component(base_image=MONITOR_IMAGE, install_kfp_package=False)
def collect_window(
    sample_uri: str,
    model_uri: str,
    current: Output[Dataset],
    reference: Output[Artifact],
    scheduled_time: str,
    window_s: float = 86400.0,
    window_end: str = "",
    tracking_uri: str = "",
) -> NamedTuple("CollectWindowOutputs", [("new_images", int), ("since", float), ("until", float)]):
    """Gather the production images the model server sampled in the last window, with their features and embeddings.

    Args:
        sample_uri: Root the model server writes samples to (its --sample-uri): a directory or gs:// URI.
        model_uri: The served model: a model directory, gs:// URI or models:/<name>@<alias>; it carries the drift reference of its training data.
        scheduled_time: The run's scheduled time, RFC 3339; pipelines pass dsl.PIPELINE_JOB_SCHEDULE_TIME_UTC_PLACEHOLDER, which the backend substitutes (the creation time for a run that was not scheduled).
        window_s: Length of the window in seconds.
        window_end: End of the window, RFC 3339 (e.g. 2026-01-09T13:00:00Z); empty ends it at scheduled_time.
        tracking_uri: MLflow tracking URI, for models:/ URIs.

    Returns:
        new_images: Sampled images in the window that decode.
        since: Start of the window (UNIX seconds).
        until: End of the window (UNIX seconds).
    """
    import logging
    import tempfile
    from pathlib import Path

    from defectkit import models, registry, sampling
    from defectkit.monitor import run_window
    from defectkit.reference import copy_model_reference

    logging.basicConfig(level=logging.INFO, force=True)
    start, end = run_window(window_s, scheduled_time, window_end)
    model_dir = registry.fetch_model(model_uri, Path(tempfile.mkdtemp()) / "model", tracking_uri=tracking_uri)
    copy_model_reference(model_dir, Path(reference.path), name=model_uri)
    window = sampling.window_to_dataset(sample_uri, start, end, Path(current.path),
                                        model=models.load_model(model_dir, "cpu"))
    outputs = NamedTuple("CollectWindowOutputs", [("new_images", int), ("since", float), ("until", float)])
    return outputs(window.images, start, end)
