from kfp import dsl

from defectkit_kfp.components.images import DATA_IMAGE


@dsl.component(base_image=DATA_IMAGE, install_kfp_package=False)
def record_product_line(
    line: dict,
    approved: bool,
    image_auroc: float,
    images: int,
    quarantined: int,
    reasons: str,
) -> dict:
    """One product line's training outcome as a single value, so that the fan-out's results can be collected whole.

    Args:
        line: The product line, as plan_product_lines gives it.
        approved: The evaluation's verdict.
        image_auroc: Test image AUROC of the line's new model.
        images: Images that passed validation.
        quarantined: Files validation quarantined.
        reasons: Why the model was approved or not.

    Returns:
        category, registered_model, service, approved, image_auroc, images, quarantined and reasons.
    """
    from defectkit.delivery.product_lines import Outcome

    return Outcome(category=line["category"], registered_model=line["registered_model"], service=line["service"],
                   approved=approved, image_auroc=image_auroc, images=images, quarantined=quarantined,
                   reasons=reasons).to_json()
