from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Model, Output

from defectkit_kfp.components.images import DEPLOY_IMAGE


@dsl.component(base_image=DEPLOY_IMAGE, install_kfp_package=False)
def resolve_champion(
    champion: Output[Model],
    champion_uri: str = "",
    tracking_uri: str = "",
    registered_model: str = "defectkit",
) -> NamedTuple("ChampionOutputs", [("found", bool), ("source", str)]):
    """Fetch the model the candidate is judged against, with its weights verified.

    The registry's champion can change between runs, so pipelines turn caching
    off for this task. With no champion (a first run) the output artifact is
    empty and evaluation applies absolute gates only.

    Args:
        champion_uri: Explicit champion: models:/<name>@<alias>, models:/<name>/<version>, a local path or a gs:// URI. Empty uses the registry's champion alias.
        tracking_uri: MLflow tracking URI of the registry; empty (and no champion_uri) means no champion.
        registered_model: Registered model name in MLflow.
    """
    import logging
    from pathlib import Path

    from defectkit import registry

    logging.basicConfig(level=logging.INFO, force=True)
    Path(champion.path).mkdir(parents=True, exist_ok=True)
    source = registry.fetch_champion(
        Path(champion.path), champion_uri=champion_uri, tracking_uri=tracking_uri, model_name=registered_model
    )
    champion.metadata.update({"found": source is not None, "source": source or ""})
    outputs = NamedTuple("ChampionOutputs", [("found", bool), ("source", str)])
    return outputs(source is not None, source or "")
