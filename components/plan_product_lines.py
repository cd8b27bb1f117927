from typing import List

from kfp import dsl

from defectkit_kfp.components.images import DATA_IMAGE


@dsl.component(base_image=DATA_IMAGE, install_kfp_package=False)
def plan_product_lines(
    source_root: str,
    categories: List[str] = [],
    registered_model: str = "defectkit",
    kserve_service: str = "defectkit",
    serving_work_dir: str = "runs",
) -> List[dict]:
    """The product lines to train, one model each: the given categories, or every category under the root.

    Args:
        source_root: Root holding one dataset per category: <root>/<category>/{train,test}/<class>/<image> (local path, file://, gs:// or s3://).
        categories: Categories to train (folder names under the root); empty trains every folder that holds both train and test.
        registered_model: Prefix of the registered model names: each line registers as <registered_model>-<category>.
        kserve_service: Prefix of the InferenceService names: each line serves as <kserve_service>-<category>.
        serving_work_dir: Directory under which each line keeps its local serving stack and delivery state.

    Returns:
        One dict per line: category, source_uri, registered_model, service, work_dir (category names as DNS labels, metal_nut -> metal-nut).
    """
    import logging

    from defectkit.delivery.product_lines import plan

    logging.basicConfig(level=logging.INFO, force=True)
    lines = plan(source_root, categories, registered_model=registered_model, service=kserve_service,
                 work_dir=serving_work_dir)
    for line in lines:
        logging.getLogger("defectkit").info("product line %s: %s -> model %s, service %s", line.category,
                                            line.source_uri, line.registered_model, line.service)
    return [line.to_json() for line in lines]
