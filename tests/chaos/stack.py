"""What several scenarios share: small real models, real sample images, and a model server process."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from defectkit.models import ModelMetadata, build_model, save_model
from defectkit.preprocess import PreprocessSpec
from tests.servers import ServerProcess, free_port, start_server

ROOT = Path(__file__).resolve().parents[2]
SERVED_NAME = "defectkit"
INFER_PATH = f"/v2/models/{SERVED_NAME}/infer"
IMAGE_SIZE = 32  # the scenarios test the stack's behaviour under faults, not the model's quality


def models(out: Path, count: int = 2) -> list[Path]:
    """``count`` distinct model versions that score alike: model k is model 0 with its defect logit moved by k*1e-4."""
    torch.manual_seed(0)
    module = build_model("resnet18")
    metadata = ModelMetadata(architecture="resnet18", classes=("good", "crack"),
                             preprocess=PreprocessSpec(image_size=IMAGE_SIZE), threshold=0.5,
                             threshold_policy={"kind": "max_f1"})
    dirs = []
    for k in range(count):
        with torch.no_grad():
            module.fc.bias.add_(1e-4 if k else 0.0)
        dirs.append(save_model(module, metadata, out / f"model-{k}"))
    return dirs


def images(out: Path, count: int = 20, size: int = 64) -> list[bytes]:
    """Encoded real sample images (PNG, JPEG) from the synthetic sample generator."""
    from defectkit.synthetic import generate_sample

    generate_sample(out, count=max(count, 40), size=size, seed=0)
    files = sorted(p for p in out.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    return [p.read_bytes() for p in files if "ground_truth" not in p.parts][:count]


def start_model_server(work: Path, model: Path, label: str, *args: str) -> ServerProcess:
    """``defectkit serve`` on 127.0.0.1 serving ``model``; stop it with ``.stop()`` (by PID)."""
    port = free_port()
    return start_server(
        [sys.executable, "-m", "defectkit", "serve", "--model", str(model), "--port", str(port),
         "--served-name", SERVED_NAME, *args],
        url=f"http://127.0.0.1:{port}", health_path="/v2/health/ready", log_path=work / f"{label}.log",
        env={"PYTHONPATH": str(ROOT)}, timeout=120,
    )


@contextmanager
def environ(values: Mapping[str, str], unset: Iterable[str] = ()) -> Iterator[None]:
    """This process's environment with ``values`` set and ``unset`` removed for the block, restored afterwards
    (clients such as boto3 and google-cloud-storage read it when they are created)."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in values.items():
            patch.setenv(name, value)
        for name in unset:
            patch.delenv(name, raising=False)
        yield
