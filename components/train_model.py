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
    steps: int = 1300,
    batch_size: int = 32,
    learning_rate: float = 0.002,
    weight_decay: float = 0.05,
    eval_every: int = 50,
    patience: int = 6,
    seed: int = 0,
    device: str = "auto",
    compile_model: bool = False,
    pretrained_weights: str = "imagenet",
    pretrained_cache: str = "",
    synthetic_anomalies: float = 0.5,
    balanced_sampling: bool = True,
    crop_fraction: float = 1.0,
    augment: bool = True,
    ema_decay: float = 0.99,
) -> NamedTuple("TrainOutputs", [("val_auroc", float), ("best_step", int)]):
    """Train a torchvision classifier to score defects; GPU with bf16 when present, CPU otherwise.

    Args:
        preprocessed: Shards from preprocess_images.
        dataset_fingerprint: Fingerprint of the dataset; part of the cache key.
        architecture: Any torchvision classification model name, e.g. resnet18, resnet50, efficientnet_b0.
        steps: Budget of optimizer steps; early stopping on the smoothed validation AUROC may end sooner.
        batch_size: Images per step; halved automatically on CUDA out-of-memory.
        learning_rate: Peak AdamW learning rate of the one-cycle schedule (linear warm-up, cosine decay).
        weight_decay: AdamW weight decay (not applied to biases and normalisation).
        eval_every: Steps between validations.
        patience: Validations without a better smoothed validation AUROC before stopping; 0 never stops early.
        seed: Seed for initialisation, sampling and augmentation.
        device: auto, cpu, cuda or cuda:N.
        compile_model: Compile the model with torch.compile (CUDA only).
        pretrained_weights: "imagenet" (torchvision's published weights, checked by hash; without internet the run trains from scratch and says so), "" for none, or a .safetensors/.pth state dict at a path, gs:// or s3:// URI.
        pretrained_cache: gs://, s3:// or local directory where downloaded ImageNet weights are kept, so that they are fetched once; "" downloads them each run.
        synthetic_anomalies: Share of each batch's defect half that is good images with a drawn flaw (CutPaste, DRAEM); 1.0 is used when the training split has no defect images.
        balanced_sampling: Half of each batch good parts, the other half spread evenly over the defect types.
        crop_fraction: Side of the random training crop as a fraction of the image (same scale); 1.0 trains on whole images (a crop can cut a real defect out of its image).
        augment: Flips, 90-degree rotations and slight colour jitter.
        ema_decay: Validate and keep an exponential moving average of the weights with this decay; 0 keeps the raw weights.
    """
    import logging
    from pathlib import Path

    from defectkit import train

    logging.basicConfig(level=logging.INFO, force=True)
    config = train.TrainConfig(
        architecture=architecture,
        steps=steps,
        batch_size=batch_size,
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        eval_every=eval_every,
        patience=patience,
        seed=seed,
        device=device,
        compile=compile_model,
        pretrained_weights=pretrained_weights,
        pretrained_cache=pretrained_cache,
        synthetic_anomalies=synthetic_anomalies,
        balanced_sampling=balanced_sampling,
        crop_fraction=crop_fraction,
        augment=augment,
        ema_decay=ema_decay,
    )
    result = train.train(Path(preprocessed.path), Path(model.path), config)
    for record in result.history:
        metrics.log_metric(f"val_auroc_step_{record['step']}", record["val_auroc"])
    metrics.log_metric("best_val_auroc", result.best_val_auroc)
    metrics.log_metric("best_step", result.best_step)
    metrics.log_metric("images_per_second", result.images_per_s)
    model.metadata.update({"framework": "pytorch", "architecture": architecture, "fingerprint": dataset_fingerprint})
    outputs = NamedTuple("TrainOutputs", [("val_auroc", float), ("best_step", int)])
    return outputs(result.best_val_auroc, result.best_step)
