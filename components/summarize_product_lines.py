from typing import List

from kfp import dsl
from kfp.dsl import HTML, Markdown, Metrics, Output

from defectkit_kfp.components.images import DATA_IMAGE


@dsl.component(base_image=DATA_IMAGE, install_kfp_package=False)
def summarize_product_lines(
    outcomes: List[dict],
    summary: Output[Markdown],
    report: Output[HTML],
    metrics: Output[Metrics],
) -> int:
    """One table of every product line's outcome: verdict, image AUROC, images, model and service.

    Args:
        outcomes: record_product_line's outputs, collected over the fan-out.

    Returns:
        How many product lines were approved.
    """
    from defectkit.delivery.product_lines import Outcome, summary_html, summary_markdown

    results = [Outcome.from_json(o) for o in outcomes]
    with open(summary.path, "w") as f:
        f.write(summary_markdown(results))
    with open(report.path, "w") as f:
        f.write(summary_html(results))
    for result in results:
        metrics.log_metric(f"image_auroc/{result.category}", result.image_auroc)
    approved = sum(result.approved for result in results)
    metrics.log_metric("approved_lines", approved)
    metrics.log_metric("lines", len(results))
    return approved
