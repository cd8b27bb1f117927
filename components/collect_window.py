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
    window_s: float = 86400.0,
    until: float = 0.0,
    tracking_uri: str = "",
) -> NamedTuple("CollectWindowOutputs", [("new_images", int), ("since", float), ("until", float)]):
    """Gather the production images the model server sampled in the last window, with their features and embeddings.

    Args:
        sample_uri: Root the model server writes samples to (its --sample-uri): a directory or gs:// URI.
        model_uri: The served model: a model directory, gs:// URI or models:/<name>@<alias>; it carries the drift reference of its training data.
        window_s: Length of the window in seconds, ending at until.
        until: End of the window as UNIX seconds; 0 means now.
        tracking_uri: MLflow tracking URI, for models:/ URIs.

    Returns:
        new_images: Sampled images in the window that decode.
        since: Start of the window (UNIX seconds).
        until: End of the window (UNIX seconds).
    """
    import logging
    import tempfile
    import time
    from pathlib import Path

    from defectkit import models, registry, sampling
    from defectkit.reference import copy_model_reference

    logging.basicConfig(level=logging.INFO, force=True)
    end = until or time.time()
    model_dir = registry.fetch_model(model_uri, Path(tempfile.mkdtemp()) / "model", tracking_uri=tracking_uri)
    copy_model_reference(model_dir, Path(reference.path), name=model_uri)
    window = sampling.window_to_dataset(sample_uri, end - window_s, end, Path(current.path),
                                        model=models.load_model(model_dir, "cpu"))
    outputs = NamedTuple("CollectWindowOutputs", [("new_images", int), ("since", float), ("until", float)])
    return outputs(window.images, end - window_s, end)
