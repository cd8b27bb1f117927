from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Markdown, Output

from defectkit_kfp.components.images import MONITOR_IMAGE


@dsl.component(base_image=MONITOR_IMAGE, install_kfp_package=False)
def decide_retraining(
    drifted: bool,
    drifted_features: str,
    new_images: int,
    since: float,
    until: float,
    current: Input[Dataset],
    record: Output[Artifact],
    summary: Output[Markdown],
    state_uri: str,
    base_dataset_uri: str,
    retraining_data_uri: str,
    run: str,
    min_new_images: int = 100,
    cooldown_s: float = 86400.0,
    defect_class: str = "",
    validation_problems: str = "",
    webhooks: str = "",
) -> NamedTuple("DecideRetrainingOutputs", [("retrain", bool), ("retraining_data", str)]):
    """Decide whether to retrain (valid window AND drift AND enough new images AND cooldown over) and, if so, write the data to retrain on.

    Production images are added to a copy of the training data under train/, labelled as the served model answered: good ones under train/good, defect ones under train/<defect_class> (left out when defect_class is empty, as their defect type is unknown).

    Args:
        drifted: Verdict of detect_drift.
        drifted_features: JSON list of drifted feature names (from detect_drift).
        new_images: Production images in the window (from collect_window).
        since: Start of the window (UNIX seconds).
        until: End of the window (UNIX seconds).
        current: The window's images (collect_window's output).
        state_uri: Directory or gs:// URI that keeps the time of the last retraining.
        base_dataset_uri: Root of the training data the model was trained on ({train,test}/<class>/<image>).
        retraining_data_uri: Root under which each retraining's data (training data plus production images) is written, in a folder of its own named retrain-YYYYmmdd-HHMMSS (UTC).
        run: The run that retrains (the monitor run, whose training sub-pipeline reads the data); remembered for the cooldown.
        min_new_images: Fewest new images worth retraining on.
        cooldown_s: Shortest time between two retrainings, in seconds.
        defect_class: Defect type that images the model called defect are added under; empty leaves them out.
        validation_problems: validate_window's failure message; a window that failed validation is not retrained on.
        webhooks: Who hears of drift found and of a retraining started: comma-separated URLs (generic JSON) or slack+URL (Slack-compatible); empty uses the DEFECTKIT_WEBHOOKS environment variable (e.g. from a Secret), or none. A receiver that is down never fails the step.

    Returns:
        retrain: Whether retraining is due; the data to retrain on is then written.
        retraining_data: URI of the data to retrain on, empty when retraining is not due.
    """
    import json
    import logging
    from pathlib import Path

    from defectkit import monitor

    logging.basicConfig(level=logging.INFO, force=True)
    policy = monitor.MonitorPolicy(min_new_images=min_new_images, cooldown_s=cooldown_s, window_s=until - since)
    entry = monitor.act(
        drifted=drifted,
        drifted_features=json.loads(drifted_features),
        new_images=new_images,
        window=(since, until),
        window_dir=Path(current.path),
        state_uri=state_uri,
        policy=policy,
        base_dataset_uri=base_dataset_uri,
        retraining_data_uri=retraining_data_uri,
        run=run,
        defect_class=defect_class or None,
        validation_problems=validation_problems,
        webhooks=webhooks,
    )
    Path(record.path).write_text(json.dumps(entry, indent=1))
    Path(summary.path).write_text(monitor.render_record(entry))
    outputs = NamedTuple("DecideRetrainingOutputs", [("retrain", bool), ("retraining_data", str)])
    return outputs(bool(entry["retrain"]), entry["retraining_data"] or "")
