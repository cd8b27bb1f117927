from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from defectkit_kfp.components.images import TRAIN_IMAGE


@dsl.component(base_image=TRAIN_IMAGE, install_kfp_package=False)
def train_model(
    preprocessed: Input[Dataset],
    dataset_fingerprint: str,
    model: Output[Model],
    metrics: Output[Metrics],
    architecture: str = "resnet18",
    epochs: int = 10,
    batch_size: int = 32,
    learning_rate: float = 0.001,
    patience: int = 3,
    seed: int = 0,
    device: str = "auto",
    compile_model: bool = False,
    pretrained_weights_uri: str = "",
) -> NamedTuple("TrainOutputs", [("val_auroc", float), ("best_epoch", int)]):
    """Train a torchvision classifier to score defects; GPU with bf16 when present, CPU otherwise.

    Args:
        preprocessed: Shards from preprocess_images.
        dataset_fingerprint: Fingerprint of the dataset; part of the cache key.
        architecture: Any torchvision classification model name, e.g. resnet18, resnet50, efficientnet_b0.
        epochs: Maximum epochs; early stopping on validation AUROC may end sooner.
        batch_size: Images per step; halved automatically on CUDA out-of-memory.
        learning_rate: Peak AdamW learning rate.
        patience: Epochs without validation AUROC improvement before stopping.
        seed: Seed for initialisation, shuffling and augmentation.
        device: auto, cpu, cuda or cuda:N.
        compile_model: Compile the model with torch.compile (CUDA only).
        pretrained_weights_uri: Optional state dict (.safetensors or .pth) at a local path or gs:// URI; never downloaded from the internet.
    """
    import logging
    from pathlib import Path

    from defectkit import train

    logging.basicConfig(level=logging.INFO, force=True)
    config = train.TrainConfig(
        architecture=architecture,
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        patience=patience,
        seed=seed,
        device=device,
        compile=compile_model,
        pretrained_weights=pretrained_weights_uri,
    )
    result = train.train(Path(preprocessed.path), Path(model.path), config)
    for epoch in result.history:
        metrics.log_metric(f"val_auroc_epoch_{epoch['epoch']}", epoch["val_auroc"])
    metrics.log_metric("best_val_auroc", result.best_val_auroc)
    metrics.log_metric("images_per_second", result.images_per_s)
    model.metadata.update({"framework": "pytorch", "architecture": architecture, "fingerprint": dataset_fingerprint})
    outputs = NamedTuple("TrainOutputs", [("val_auroc", float), ("best_epoch", int)])
    return outputs(result.best_val_auroc, result.best_epoch)
