"""Shared fixtures: a tiny real dataset through each stage, and real servers on 127.0.0.1."""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path

import pytest

from tests.servers import free_port, start_prometheus, start_s3_server, start_server

# Tiny on purpose: the stages' behaviour, not model quality, is under test here.
TINY_COUNT = 60
TINY_SIZE = 64
TINY_IMAGE_SIZE = 32


@pytest.fixture(autouse=True)
def _root_logging_restored():
    """``defectkit.cli.main`` configures the root logger (``basicConfig(force=True)``), as a command should; in
    a test that handler writes to the test's captured stderr, closed once the test ends, and would fail every
    later log line. Each test leaves the root logger as it found it."""
    handlers, level = logging.root.handlers[:], logging.root.level
    yield
    logging.root.handlers[:] = handlers
    logging.root.setLevel(level)


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


@pytest.fixture(scope="session")
def prometheus(tmp_path_factory):
    """Starts real Prometheus servers: ``prometheus(targets, scrape_interval_s)`` gives a running one (a
    ServerProcess) scraping those PodTargets; all are stopped by PID at the end of the session."""
    if shutil.which("prometheus") is None:
        pytest.skip("no `prometheus` binary on PATH: these tests query a real Prometheus. Install one (Debian: "
                    "apt-get install prometheus; or a release from prometheus.io) to run them")
    started = []

    def start(targets, scrape_interval_s: float):
        server = start_prometheus(tmp_path_factory.mktemp("prometheus"), targets, scrape_interval_s)
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in started:
            server.stop()


S3_BUCKET = "defectkit-test"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """moto's S3 server on 127.0.0.1 with bucket ``S3_BUCKET``; yields its URL.

    boto3's standard variables point this process, and the servers it starts, at it:
    the same variables KServe's storage initializer reads.
    """
    import boto3

    server = start_s3_server(tmp_path_factory.mktemp("s3") / "moto.log")
    url = server.url
    patch = pytest.MonkeyPatch()
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "MLFLOW_S3_ENDPOINT_URL"):
        patch.delenv(name, raising=False)
    for name, value in {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        patch.setenv(name, value)
    try:
        boto3.client("s3").create_bucket(Bucket=S3_BUCKET)
        yield url
    finally:
        patch.undo()
        server.stop()
