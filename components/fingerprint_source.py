from kfp import dsl

from defectkit_kfp.components.images import DATA_IMAGE


@dsl.component(base_image=DATA_IMAGE, install_kfp_package=False)
def fingerprint_source(source_uri: str) -> str:
    """Fingerprint what a dataset root holds now, from its listing: every file's path and content checksum.

    Its real input is "whatever is at this URI now", so pipelines must never cache this task
    (task.set_caching_options(False)); the steps after it cache on its output instead.

    Args:
        source_uri: Dataset root: a local path, file://, gs:// or s3:// URI.

    Returns:
        A sha256 hex digest that changes whenever any file under the root is added, removed or rewritten.
    """
    import logging

    from defectkit.data import source_fingerprint

    logging.basicConfig(level=logging.INFO, force=True)
    fingerprint = source_fingerprint(source_uri)
    logging.getLogger("defectkit").info("source %s: fingerprint %s", source_uri, fingerprint)
    return fingerprint
