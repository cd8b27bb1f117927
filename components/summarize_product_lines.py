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
    from defectkit.delivery.product_lines import Outcome, summary_html, summary_markdown, summary_metrics

    results = [Outcome.from_json(o) for o in outcomes]
    with open(summary.path, "w") as f:
        f.write(summary_markdown(results))
    with open(report.path, "w") as f:
        f.write(summary_html(results))
    figures = summary_metrics(results)
    for name, value in figures.items():
        metrics.log_metric(name, value)
    return figures["approved_lines"]
