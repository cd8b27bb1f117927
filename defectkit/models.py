"""The defect model: a torchvision classifier with one defect logit, and its artifact.

GPU-safe (torch, torchvision, numpy, safetensors). A model artifact is a
directory holding ``model.safetensors`` and ``model.json``; the JSON carries
the sha256 of the weights file, which every load verifies before the weights
are parsed. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import safetensors.torch
import torch

from defectkit import __version__
from defectkit.artifact import (  # noqa: F401 - ModelIntegrityError is re-exported
    METADATA_FILE,
    MODEL_FORMAT,
    WEIGHTS_FILE,
    ModelIntegrityError,
    check_weights,
    read_model_json,
    sha256_bytes,
    sha256_file,
)
from defectkit.data import GOOD
from defectkit.preprocess import PreprocessSpec

log = logging.getLogger(__name__)

OUTPUT = "defect_logit"
DEFAULT_BATCH_SIZE = 64
AUTO, FP32, BF16 = "auto", "fp32", "bf16"
PRECISIONS = (AUTO, FP32, BF16)

# Their auxiliary classifiers change the training-mode output type; a single logit is all we need.
_NO_AUX_LOGITS = {"googlenet", "inception_v3"}


def supported_architectures() -> list[str]:
    # Imported here: torchvision takes seconds to import (its ops import torch._dynamo), and a server that scores
    # a model's ONNX export never builds a torch module.
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def build_model(architecture: str, *, pretrained_weights: Path | None = None) -> torch.nn.Module:
    """A torchvision classification model with one output (the defect logit).

    ``pretrained_weights`` is a local ``.safetensors`` or ``.pth`` state dict;
    tensors whose shapes differ from the model's (the 1000-class head) are skipped.
    """
    names = supported_architectures()
    if architecture not in names:
        raise ValueError(f"unknown architecture {architecture!r}; supported torchvision models: {', '.join(names)}")
    kwargs = {"aux_logits": False, "init_weights": True} if architecture in _NO_AUX_LOGITS else {}
    import torchvision

    module = torchvision.models.get_model(architecture, weights=None, num_classes=1, **kwargs)
    if pretrained_weights is not None:
        _load_pretrained(module, Path(pretrained_weights))
    return module


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights {path} not found; give a local .safetensors or .pth file")
    if path.suffix == ".safetensors":
        return safetensors.torch.load_file(path)
    if path.suffix in (".pth", ".pt"):
        state = torch.load(path, map_location="cpu", weights_only=True)
        # Training checkpoints (torchvision's references among them) nest the weights under a key.
        for key in ("model", "state_dict"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
        if not isinstance(state, dict):
            raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict of tensors")
        return state
    raise ValueError(f"pretrained weights {path} must be a .safetensors or .pth/.pt state dict")


# torchvision's published DenseNet checkpoints name layers 'norm.1' where the module now has 'norm1'; the same
# pattern torchvision's densenet._load_state_dict renames them with.
_OLD_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def _load_pretrained(module: torch.nn.Module, path: Path) -> None:
    state = _read_state_dict(path)
    state = {(lambda m: m.group(1) + m.group(2) if m else key)(_OLD_DENSENET_KEY.match(key)): value
             for key, value in state.items()}
    own = module.state_dict()
    usable = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    reshaped = sorted(k for k in state if k in own and k not in usable)
    if not usable:
        raise ValueError(f"none of the {len(state)} tensors in {path} fit this model; "
                         f"were they saved from a different architecture?")
    if reshaped:
        log.info("pretrained %s: skipping %d tensors whose shapes differ (the classifier head): %s", path.name,
                 len(reshaped), ", ".join(f"{k} {tuple(state[k].shape)} -> {tuple(own[k].shape)}" for k in reshaped))
    missing = sorted(set(own) - set(usable))
    if len(missing) > len(reshaped):
        log.info("pretrained %s: %d model tensors not in the file keep their fresh initialisation", path.name,
                 len(missing) - len(reshaped))
    module.load_state_dict(usable, strict=False)
    log.info("pretrained %s: loaded %d of %d tensors", path.name, len(usable), len(own))


@dataclass(frozen=True)
class ModelMetadata:
    """Everything needed to use the weights correctly: the content of model.json."""

    architecture: str
    classes: tuple[str, ...]
    preprocess: PreprocessSpec
    threshold: float | None = None
    threshold_policy: dict | None = None
    metrics: dict = field(default_factory=dict)
    dataset_fingerprint: str = ""
    weights_sha256: str = ""
    code_version: str = __version__
    created: str = ""
    training: dict = field(default_factory=dict)

    @property
    def defect_types(self) -> tuple[str, ...]:
        return tuple(c for c in self.classes if c != GOOD)

    def to_json(self) -> dict:
        return {
            "format": MODEL_FORMAT,
            "architecture": self.architecture,
            "classes": list(self.classes),
            "output": OUTPUT,
            "preprocess": self.preprocess.to_json(),
            "threshold": self.threshold,
            "threshold_policy": self.threshold_policy,
            "metrics": self.metrics,
            "dataset_fingerprint": self.dataset_fingerprint,
            "weights_sha256": self.weights_sha256,
            "code_version": self.code_version,
            "created": self.created,
            "training": self.training,
        }

    @classmethod
    def from_json(cls, record: dict) -> ModelMetadata:
        if record.get("format") != MODEL_FORMAT:
            raise ValueError(f"model.json format {record.get('format')!r} is not {MODEL_FORMAT!r}")
        if record.get("output", OUTPUT) != OUTPUT:
            raise ValueError(f"model.json output {record['output']!r} is not {OUTPUT!r}")
        return cls(
            architecture=record["architecture"],
            classes=tuple(record["classes"]),
            preprocess=PreprocessSpec.from_json(record["preprocess"]),
            threshold=record.get("threshold"),
            threshold_policy=record.get("threshold_policy"),
            metrics=record.get("metrics") or {},
            dataset_fingerprint=record.get("dataset_fingerprint", ""),
            weights_sha256=record.get("weights_sha256", ""),
            code_version=record.get("code_version", ""),
            created=record.get("created", ""),
            training=record.get("training") or {},
        )


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The original module behind a torch.compile wrapper, whose state dict keys are unprefixed."""
    return getattr(module, "_orig_mod", module)


def save_model(module: torch.nn.Module, metadata: ModelMetadata, out_dir: Path) -> Path:
    """Write ``model.safetensors`` and ``model.json`` (with the weights' sha256) to ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Cloned so that tensors sharing storage (which safetensors refuses) are saved independently.
    state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in unwrap(module).state_dict().items()}
    weights = out_dir / WEIGHTS_FILE
    # One metadata key only: safetensors writes the metadata map in hash order, which differs between
    # processes, and identical weights must give an identical file (and sha256).
    safetensors.torch.save_file(state, weights, metadata={"format": "pt"})
    created = metadata.created or datetime.now(timezone.utc).isoformat(timespec="seconds")
    record = replace(metadata, weights_sha256=sha256_file(weights), created=created)
    (out_dir / METADATA_FILE).write_text(json.dumps(record.to_json(), indent=1))
    return out_dir


def read_metadata(model_dir: Path) -> ModelMetadata:
    return ModelMetadata.from_json(read_model_json(Path(model_dir)))


def load_model(model_dir: Path, device: str | torch.device = "cpu", precision: str = AUTO) -> DefectModel:
    """Load a model artifact after checking its weights against the sha256 in model.json.

    ``precision`` is what the forward pass computes in: ``auto`` (bf16 on CUDA, fp32 elsewhere), ``fp32``
    or ``bf16``."""
    model_dir = Path(model_dir)
    record = read_model_json(model_dir)
    metadata = ModelMetadata.from_json(record)
    data = (model_dir / WEIGHTS_FILE).read_bytes()  # hashed and parsed from the same bytes: nothing changes between
    check_weights(sha256_bytes(data), record, where=str(model_dir))
    module = build_model(metadata.architecture)
    module.load_state_dict(safetensors.torch.load(data), strict=True)
    torch_device = resolve_device(device)
    return DefectModel(module, metadata, torch_device, resolve_precision(precision, torch_device))


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without it is an error, not a silent fallback."""
    if isinstance(device, torch.device):
        device = str(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {device!r} requested but CUDA is not available here "
                               f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); "
                               f"use device='cpu' or 'auto'")
        resolved = torch.device(device)
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise RuntimeError(f"device {device!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
        return resolved
    raise ValueError(f"device {device!r} is not one of 'auto', 'cpu', 'cuda', 'cuda:N'")


def normalize(images: torch.Tensor, spec: PreprocessSpec) -> torch.Tensor:
    """uint8 NHWC (on any device) -> float32 NCHW normalised with the spec's mean and std.

    Permuting NHWC to NCHW is a view with channels_last strides, the layout
    convolutions run fastest in, so no copy is made for the layout.
    """
    return standardize(to_unit_float(images), spec)


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC -> float32 NCHW in [0, 1], channels_last."""
    return images.permute(0, 3, 1, 2).float().div_(255.0)


def standardize(x: torch.Tensor, spec: PreprocessSpec) -> torch.Tensor:
    """float NCHW in [0, 1] -> (x - mean) / std per channel, channels_last."""
    mean = torch.tensor(spec.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` is bf16 on CUDA (tensor cores) and fp32 elsewhere; ``fp32`` and ``bf16`` are taken as they are."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == AUTO:
        return BF16 if device.type == "cuda" else FP32
    return precision


def training_precision(device: torch.device) -> str:
    """bf16 on CUDA and on CPUs with native bf16 arithmetic (AVX512-BF16 or AMX), where it is faster; else fp32."""
    if device.type == "cuda":
        return BF16
    native = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() or \
        getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return BF16 if native else FP32


def autocast(device: torch.device, precision: str = AUTO) -> torch.autocast:
    """The forward pass in ``precision`` (see :func:`resolve_precision`)."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                          enabled=resolve_precision(precision, device) == BF16)


def final_layer(module: torch.nn.Module) -> torch.nn.Module:
    """The classifier layer producing the logit: the last Linear (or last Conv2d, as in SqueezeNet)."""
    linears = [m for m in unwrap(module).modules() if isinstance(m, torch.nn.Linear)]
    if linears:
        return linears[-1]
    convs = [m for m in unwrap(module).modules() if isinstance(m, torch.nn.Conv2d)]
    if convs:
        return convs[-1]
    raise ValueError(f"{type(module).__name__} has no Linear or Conv2d layer to take embeddings from")


def _check_images(images: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    images = np.asarray(images)
    expected = (spec.image_size, spec.image_size, 3)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != expected:
        raise ValueError(f"images must be uint8 of shape (N, {expected[0]}, {expected[1]}, 3) as preprocessed for "
                         f"this model, got {images.dtype} {images.shape}")
    return images


@torch.inference_mode()
def score_images(module: torch.nn.Module, images: np.ndarray | torch.Tensor, spec: PreprocessSpec,
                 device: torch.device, batch_size: int = DEFAULT_BATCH_SIZE, precision: str = AUTO) -> np.ndarray:
    """Defect probabilities (sigmoid of the logit) for uint8 NHWC images, in batches."""
    images = torch.as_tensor(images)
    out = np.empty(images.shape[0], dtype=np.float32)
    for start in range(0, images.shape[0], batch_size):
        batch = images[start:start + batch_size].to(device, non_blocking=True)
        with autocast(device, precision):
            logits = module(normalize(batch, spec))
        out[start:start + batch.shape[0]] = torch.sigmoid(logits.float().reshape(-1)).cpu().numpy()
    return out


class DefectModel:
    """A loaded model in eval mode, with the metadata that says how to feed it and read its output."""

    def __init__(self, module: torch.nn.Module, metadata: ModelMetadata, device: torch.device,
                 precision: str = AUTO) -> None:
        self.device = device
        self.precision = resolve_precision(precision, device)
        self.metadata = metadata
        self.module = module.to(device, memory_format=torch.channels_last).eval()

    def __repr__(self) -> str:
        return (f"DefectModel({self.metadata.architecture}, {self.metadata.preprocess.image_size} px, "
                f"threshold={self.metadata.threshold}, device={self.device}, {self.precision})")

    def scores(self, images: np.ndarray, *, batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
        """float32 defect probabilities for uint8 NHWC images preprocessed with ``metadata.preprocess``."""
        images = _check_images(images, self.metadata.preprocess)
        return score_images(self.module, images, self.metadata.preprocess, self.device, batch_size, self.precision)

    def predict(self, images: np.ndarray, *, batch_size: int = DEFAULT_BATCH_SIZE) -> tuple[np.ndarray, np.ndarray]:
        """(scores, labels) with label 1 (defect) where score >= the model's threshold."""
        if self.metadata.threshold is None:
            raise ValueError("this model has no decision threshold yet; evaluate it first (evaluation writes the "
                             "threshold into model.json) or use scores()")
        scores = self.scores(images, batch_size=batch_size)
        return scores, (scores >= self.metadata.threshold).astype(np.uint8)

    @torch.inference_mode()
    def embeddings(self, images: np.ndarray, *, batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
        """float32 penultimate-layer features (the classifier layer's input), one row per image."""
        images = torch.as_tensor(_check_images(images, self.metadata.preprocess))
        layer = final_layer(self.module)
        width = layer.in_features if isinstance(layer, torch.nn.Linear) else layer.in_channels
        captured: list[torch.Tensor] = []
        hook = layer.register_forward_hook(lambda _module, inputs, _output: captured.append(inputs[0]))
        chunks = [np.zeros((0, width), np.float32)]
        try:
            for start in range(0, images.shape[0], batch_size):
                batch = images[start:start + batch_size].to(self.device, non_blocking=True)
                with autocast(self.device, self.precision):
                    self.module(normalize(batch, self.metadata.preprocess))
                features = captured.pop().float()
                if features.ndim > 2:  # a convolutional head sees feature maps: pool them
                    features = features.flatten(2).mean(dim=2)
                chunks.append(features.cpu().numpy())
        finally:
            hook.remove()
        return np.concatenate(chunks)
