"""Shared fixtures: a tiny real dataset through each stage, and real servers on 127.0.0.1."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.servers import free_port, start_server

# Tiny on purpose: the stages' behaviour, not model quality, is under test here.
TINY_COUNT = 60
TINY_SIZE = 64
TINY_IMAGE_SIZE = 32


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory) -> Path:
    from defectkit.synthetic import generate_sample

    out = tmp_path_factory.mktemp("sample")
    generate_sample(out, count=TINY_COUNT, size=TINY_SIZE, seed=0)
    return out


@pytest.fixture(scope="session")
def dataset_dir(sample_dir, tmp_path_factory) -> Path:
    from defectkit.validation.dataset import ValidationConfig, validate_dataset

    out = tmp_path_factory.mktemp("dataset")
    validate_dataset(str(sample_dir), out, ValidationConfig(min_images_per_class=2, min_side=16))
    return out


@pytest.fixture(scope="session")
def preprocessed_dir(dataset_dir, tmp_path_factory) -> Path:
    from defectkit.preprocess import PreprocessSpec, preprocess_dataset

    out = tmp_path_factory.mktemp("preprocessed")
    preprocess_dataset(dataset_dir, out, PreprocessSpec(image_size=TINY_IMAGE_SIZE), workers=2)
    return out


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory):
    """gcp-storage-emulator on 127.0.0.1; yields its URL, with STORAGE_EMULATOR_HOST set for this process."""
    port = free_port()
    data = tmp_path_factory.mktemp("gcs")
    url = f"http://127.0.0.1:{port}"
    server = start_server(
        [sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1", "--port", str(port),
         "--default-bucket", "defectkit-test", "--in-memory", "--quiet"],
        url=url,
        health_path="/",
        log_path=data / "emulator.log",
    )
    patch = pytest.MonkeyPatch()
    patch.setenv("STORAGE_EMULATOR_HOST", url)
    try:
        yield url
    finally:
        patch.undo()
        server.stop()
