"""Training pipeline: validate -> preprocess -> train -> evaluate."""

from typing import NamedTuple

from kfp import dsl, kubernetes
from kfp.dsl import Artifact, Model

from components.evaluate_model import evaluate_model
from components.preprocess_images import preprocess_images
from components.register_model import register_model
from components.resolve_champion import resolve_champion
from components.train_model import train_model
from components.validate_images import validate_images

NAME = "defectkit-training"

TrainingOutputs = NamedTuple(
    "TrainingOutputs",
    [
        ("model", Model),
        ("verdict", Artifact),
        ("approved", bool),
        ("reasons", str),
        ("image_auroc", float),
        ("images", int),
        ("quarantined", int),
    ],
)


@dsl.pipeline(name=NAME, description="Validate images, preprocess, train a defect classifier and judge it against the champion.")
def training_pipeline(
    source_uri: str,
    image_size: int = 224,
    architecture: str = "resnet18",
    epochs: int = 10,
    batch_size: int = 32,
    learning_rate: float = 0.001,
    seed: int = 0,
    device: str = "auto",
    max_quarantine_fraction: float = 0.1,
    min_images_per_class: int = 5,
    threshold_policy: str = "max_f1",
    target_fpr: float = 0.05,
    min_auroc: float = 0.9,
    champion_uri: str = "",
    tracking_uri: str = "",
    model_name: str = "defectkit",
    pretrained_weights_uri: str = "",
) -> TrainingOutputs:
    """Images to a judged defect model.

    Args:
        source_uri: Dataset root (local path, file:// or gs://) laid out as {train,test}/<class>/<image>.
        image_size: Side in pixels of the square model input.
        architecture: torchvision classification model name.
        epochs: Maximum training epochs (early stopping may end sooner).
        batch_size: Training batch size.
        learning_rate: Peak learning rate.
        seed: Seed for the validation split and training.
        device: auto, cpu, cuda or cuda:N.
        max_quarantine_fraction: Fail validation above this fraction of bad files.
        min_images_per_class: Minimum images per class in train and test.
        threshold_policy: max_f1 or target_fpr.
        target_fpr: False positive rate for the target_fpr policy.
        min_auroc: Lowest test image AUROC that can be approved.
        champion_uri: Model to judge the candidate against on the same test set (models:/..., path or gs://); empty uses the registry's champion alias.
        tracking_uri: MLflow tracking URI of the model registry; an approved model is registered there. Empty skips registration.
        model_name: Registered model name in MLflow.
        pretrained_weights_uri: Optional starting weights (local path or gs://).
    """
    # Reads mutable data at a URI: never served from cache. No task retry: storage
    # I/O retries inside with backoff, and a failed validation is a verdict, not a fault.
    validate = validate_images(
        source_uri=source_uri,
        max_quarantine_fraction=max_quarantine_fraction,
        min_images_per_class=min_images_per_class,
        seed=seed,
    ).set_caching_options(False)
    validate.set_cpu_limit("4").set_memory_limit("8G")
    fingerprint = validate.outputs["fingerprint"]

    preprocess = preprocess_images(
        dataset=validate.outputs["dataset"], dataset_fingerprint=fingerprint, image_size=image_size
    )
    preprocess.set_cpu_limit("8").set_memory_limit("16G").set_retry(2, backoff_duration="30s")

    train = train_model(
        preprocessed=preprocess.outputs["preprocessed"],
        dataset_fingerprint=fingerprint,
        architecture=architecture,
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        seed=seed,
        device=device,
        pretrained_weights_uri=pretrained_weights_uri,
    )
    train.set_cpu_limit("8").set_memory_limit("32G").set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(1)
    # GPU nodes are usually tainted so that only GPU work lands on them.
    kubernetes.add_toleration(train, key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")
    train.set_retry(1, backoff_duration="60s")

    # The registry's champion can change between runs: never cached.
    champion = resolve_champion(
        champion_uri=champion_uri, tracking_uri=tracking_uri, model_name=model_name
    ).set_caching_options(False)
    champion.set_retry(2, backoff_duration="30s")

    evaluate = evaluate_model(
        model=train.outputs["model"],
        preprocessed=preprocess.outputs["preprocessed"],
        dataset=validate.outputs["dataset"],
        dataset_fingerprint=fingerprint,
        champion=champion.outputs["champion"],
        threshold_policy=threshold_policy,
        target_fpr=target_fpr,
        min_auroc=min_auroc,
        device=device,
    ).set_caching_options(False)
    evaluate.set_cpu_limit("4").set_memory_limit("16G").set_retry(2, backoff_duration="30s")

    with dsl.If(evaluate.outputs["approved"] == True, name="approved"):  # noqa: E712 - a KFP condition, not Python
        with dsl.If(tracking_uri != "", name="registry-configured"):
            # Writes to the registry: never cached.
            register_model(
                model=evaluate.outputs["judged_model"],
                tracking_uri=tracking_uri,
                model_name=model_name,
                dataset_fingerprint=fingerprint,
                kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
            ).set_caching_options(False)

    return TrainingOutputs(
        evaluate.outputs["judged_model"],
        evaluate.outputs["verdict"],
        evaluate.outputs["approved"],
        evaluate.outputs["reasons"],
        evaluate.outputs["image_auroc"],
        validate.outputs["images"],
        validate.outputs["quarantined"],
    )
