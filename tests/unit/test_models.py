"""Building models, pretrained loading from local files, the model artifact and inference."""

from __future__ import annotations

import dataclasses
import json
import logging
import re

import numpy as np
import pytest
import safetensors.torch
import torch
import torchvision

from defectkit import models
from defectkit.models import (
    DefectModel,
    ModelIntegrityError,
    ModelMetadata,
    build_model,
    load_model,
    resolve_device,
    save_model,
)
from defectkit.preprocess import PreprocessSpec

SPEC = PreprocessSpec(image_size=32)


def _metadata(**changes) -> ModelMetadata:
    base = ModelMetadata(architecture="resnet18", classes=("good", "hole", "scratch"), preprocess=SPEC,
                         metrics={"val_auroc": 0.9, "best_epoch": 2}, dataset_fingerprint="f" * 64,
                         training={"config": {"epochs": 2}, "history": []})
    return dataclasses.replace(base, **changes)


def _images(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    module = build_model("resnet18")
    out = save_model(module, _metadata(), tmp_path_factory.mktemp("model"))
    return module, out


@pytest.mark.parametrize("architecture, width", [
    ("resnet18", 512), ("mobilenet_v3_small", 1024), ("efficientnet_b0", 1280), ("convnext_tiny", 768),
    ("squeezenet1_1", 512),
])
def test_build_model_gives_one_logit_and_penultimate_embeddings(architecture, width):
    module = build_model(architecture)
    model = DefectModel(module, _metadata(architecture=architecture), torch.device("cpu"))
    images = _images(3)
    scores = model.scores(images)
    assert scores.shape == (3,) and scores.dtype == np.float32 and np.all((scores >= 0) & (scores <= 1))
    embeddings = model.embeddings(images, batch_size=2)
    assert embeddings.shape == (3, width) and embeddings.dtype == np.float32
    assert model.embeddings(images[:0]).shape == (0, width)


def test_build_model_rejects_unknown_architecture_listing_supported():
    with pytest.raises(ValueError, match="resnet19.*resnet18"):
        build_model("resnet19")


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_pretrained_weights_from_local_file_skip_the_head(tmp_path, suffix, caplog):
    torch.manual_seed(1)
    imagenet_like = torchvision.models.resnet18(num_classes=1000)  # a 1000-class head, as published weights have
    state = imagenet_like.state_dict()
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, path)
    else:
        torch.save({"model": state, "epoch": 90}, path)  # torchvision reference checkpoint layout
    with caplog.at_level(logging.INFO, logger="defectkit.models"):
        module = build_model("resnet18", pretrained_weights=path)
    loaded = module.state_dict()
    torch.testing.assert_close(loaded["conv1.weight"], state["conv1.weight"])
    torch.testing.assert_close(loaded["layer4.1.bn2.running_var"], state["layer4.1.bn2.running_var"])
    assert loaded["fc.weight"].shape == (1, 512)
    assert "skipping 2 tensors" in caplog.text and "fc.weight" in caplog.text


def test_pretrained_weights_of_another_architecture_or_format_are_refused(tmp_path):
    other = tmp_path / "mobilenet.safetensors"
    safetensors.torch.save_file(torchvision.models.mobilenet_v3_small(num_classes=10).state_dict(), other)
    with pytest.raises(ValueError, match="none of the"):
        build_model("resnet18", pretrained_weights=other)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        build_model("resnet18", pretrained_weights=tmp_path / "missing.pth")
    onnx = tmp_path / "weights.onnx"
    onnx.write_bytes(b"\0")
    with pytest.raises(ValueError, match="safetensors"):
        build_model("resnet18", pretrained_weights=onnx)


def test_metadata_json_round_trip_and_replace():
    metadata = _metadata(threshold=0.4, threshold_policy={"kind": "max_f1", "target_fpr": 0.05})
    record = json.loads(json.dumps(metadata.to_json()))
    assert record["format"] == "defectkit.model/v1" and record["output"] == "defect_logit"
    assert record["preprocess"] == {"image_size": 32, "mean": list(SPEC.mean), "std": list(SPEC.std)}
    assert ModelMetadata.from_json(record) == metadata
    assert dataclasses.replace(metadata, threshold=0.7).threshold == 0.7
    assert metadata.defect_types == ("hole", "scratch")
    with pytest.raises(ValueError, match="format"):
        ModelMetadata.from_json({**record, "format": "other/v9"})


def test_save_load_round_trip(saved):
    module, model_dir = saved
    assert sorted(p.name for p in model_dir.iterdir()) == ["model.json", "model.safetensors"]
    record = json.loads((model_dir / "model.json").read_text())
    assert record["weights_sha256"] == models.sha256_file(model_dir / "model.safetensors")
    assert record["code_version"] and record["created"]
    loaded = load_model(model_dir)
    assert loaded.metadata == dataclasses.replace(_metadata(), weights_sha256=record["weights_sha256"],
                                                  created=record["created"])
    images = _images(5)
    reference = DefectModel(module, _metadata(), torch.device("cpu"))
    np.testing.assert_allclose(loaded.scores(images), reference.scores(images), rtol=1e-6)
    np.testing.assert_allclose(loaded.scores(images, batch_size=2), loaded.scores(images), rtol=1e-5)


def test_tampered_weights_are_rejected_before_loading(saved, tmp_path):
    _, model_dir = saved
    for name in ("model.json", "model.safetensors"):
        (tmp_path / name).write_bytes((model_dir / name).read_bytes())
    weights = tmp_path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one bit of one weight: still a valid safetensors file
    weights.write_bytes(bytes(data))
    expected = json.loads((tmp_path / "model.json").read_text())["weights_sha256"]
    with pytest.raises(ModelIntegrityError) as error:
        load_model(tmp_path)
    message = str(error.value)
    assert str(tmp_path) in message and "model.safetensors" in message
    assert expected in message and models.sha256_file(weights) in message


def test_predict_needs_a_threshold_and_checks_input(saved):
    module, _ = saved
    model = DefectModel(module, _metadata(), torch.device("cpu"))
    with pytest.raises(ValueError, match="threshold"):
        model.predict(_images(2))
    judged = DefectModel(module, _metadata(threshold=0.5), torch.device("cpu"))
    scores, labels = judged.predict(_images(4))
    np.testing.assert_array_equal(labels, (scores >= 0.5).astype(np.uint8))
    with pytest.raises(ValueError, match=r"\(N, 32, 32, 3\).*float32"):
        judged.scores(_images(2).astype(np.float32))
    with pytest.raises(ValueError, match="64, 64, 3"):
        judged.scores(_images(2, size=64))


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="'tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="'cuda:0' requested but CUDA is not available"):
            resolve_device("cuda:0")


def test_densenet_checkpoints_with_the_old_layer_names_load_completely(tmp_path):
    # torchvision publishes DenseNet weights under 'denselayer1.norm.1' where the module now says 'norm1'.
    current = torchvision.models.densenet121(weights=None).state_dict()
    published = {re.sub(r"(denselayer\d+\.(?:norm|relu|conv))(\d)", r"\1.\2", k): v for k, v in current.items()}
    assert published.keys() != current.keys()
    torch.save(published, tmp_path / "densenet121-a639ec97.pth")
    module = models.build_model("densenet121", pretrained_weights=tmp_path / "densenet121-a639ec97.pth")
    loaded = module.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in current.items() if not k.startswith("classifier"))
