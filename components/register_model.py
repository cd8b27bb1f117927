from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Input, Model, Output

from defectkit_kfp.components.images import DEPLOY_IMAGE


@dsl.component(base_image=DEPLOY_IMAGE, install_kfp_package=False)
def register_model(
    model: Input[Model],
    tracking_uri: str,
    registered: Output[Artifact],
    registered_model: str = "defectkit",
    dataset_fingerprint: str = "",
    kfp_run_id: str = "",
) -> NamedTuple("RegisterOutputs", [("version", str), ("model_uri", str)]):
    """Register the judged model in MLflow as a new version with alias challenger.

    Writes to the registry, so pipelines must turn caching off for this task
    (task.set_caching_options(False)); a cached run would skip registration.

    Args:
        model: Judged model from evaluate_model (model.safetensors and model.json, threshold set).
        tracking_uri: MLflow tracking URI: a tracking server (http://...) or sqlite:///<dir>/mlflow.db.
        registered_model: Registered model name in MLflow.
        dataset_fingerprint: Fingerprint of the training dataset; must agree with model.json.
        kfp_run_id: The KFP run that produced the model (pass dsl.PIPELINE_JOB_ID_PLACEHOLDER); tagged for lineage.
    """
    import json
    import logging
    from pathlib import Path

    from defectkit import registry

    logging.basicConfig(level=logging.INFO, force=True)
    tags = {
        registry.KFP_RUN_ID: kfp_run_id,
        registry.DATASET_FINGERPRINT: dataset_fingerprint,
        "kfp_model_uri": model.uri,
    }
    config = registry.RegistryConfig.for_uri(tracking_uri, model_name=registered_model)
    ref = registry.register(config, Path(model.path), tags=tags)
    record = {"name": ref.name, "version": ref.version, "model_uri": ref.uri, "run_id": ref.run_id,
              "source": ref.source}
    Path(registered.path).write_text(json.dumps(record, indent=2))
    registered.metadata.update(record)
    outputs = NamedTuple("RegisterOutputs", [("version", str), ("model_uri", str)])
    return outputs(ref.version, ref.uri)
