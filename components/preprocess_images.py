from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Output

from defectkit_kfp.components.images import DATA_IMAGE


@dsl.component(base_image=DATA_IMAGE, install_kfp_package=False)
def preprocess_images(
    dataset: Input[Dataset],
    dataset_fingerprint: str,
    preprocessed: Output[Dataset],
    metrics: Output[Metrics],
    image_size: int = 160,
    workers: int = 0,
) -> str:
    """Decode and resize every image to the model input size on all cores; write uint8 shards and a feature table.

    Args:
        dataset: Validated dataset (manifest.json plus images) from validate_images.
        dataset_fingerprint: Fingerprint of the dataset; part of the cache key so changed data never reuses a stale result.
        image_size: Side in pixels of the square model input.
        workers: Decoding processes; 0 uses every core.

    Returns:
        The dataset fingerprint, passed through for downstream cache keys.
    """
    import logging
    from pathlib import Path

    from defectkit import preprocess

    logging.basicConfig(level=logging.INFO, force=True)
    result = preprocess.preprocess_dataset(
        Path(dataset.path),
        Path(preprocessed.path),
        preprocess.PreprocessSpec(image_size=image_size),
        workers=workers or None,
        expected_fingerprint=dataset_fingerprint,
    )
    metrics.log_metric("images", sum(result.counts.values()))
    metrics.log_metric("images_per_second", result.images_per_s)
    preprocessed.metadata.update({"fingerprint": dataset_fingerprint, "image_size": image_size})
    return dataset_fingerprint
