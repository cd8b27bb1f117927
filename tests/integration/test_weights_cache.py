"""The ImageNet weights cache on object storage: gs:// (the GCS emulator) and s3:// (moto), on 127.0.0.1."""

from __future__ import annotations

import hashlib
import uuid

import pytest
import torchvision

from defectkit import storage
from defectkit.weights import IMAGENET, WeightsIntegrityError, resolve_pretrained
from tests.conftest import S3_BUCKET
from tests.unit.test_weights import _saved, serve, small_weights  # noqa: F401 - fixtures used by name

GCS_BUCKET = "defectkit-test"  # the emulator's default bucket (tests/conftest.py)


@pytest.fixture(params=["gs", "s3"])
def cache_uri(request) -> str:
    """A fresh prefix per test on each remote store."""
    if request.param == "gs":
        request.getfixturevalue("gcs_emulator")
        bucket = GCS_BUCKET
    else:
        request.getfixturevalue("s3_server")
        bucket = S3_BUCKET
    return f"{request.param}://{bucket}/{uuid.uuid4().hex[:8]}/pretrained"


def test_the_download_is_cached_remotely_and_read_back_without_the_server(cache_uri, serve, small_weights,
                                                                          tmp_path):
    server = serve(small_weights)
    first = resolve_pretrained(IMAGENET, "resnet18", scratch=tmp_path / "run1", cache_uri=cache_uri)
    name = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[1]
    assert storage.Store(cache_uri).read(name) == small_weights
    assert f"now cached at {cache_uri}/{name}" in first.note

    server.close()
    second = resolve_pretrained(IMAGENET, "resnet18", scratch=tmp_path / "run2", cache_uri=cache_uri)
    assert second.path == tmp_path / "run2" / name and second.path.read_bytes() == small_weights
    assert (second.source, second.sha256) == (f"{cache_uri}/{name}", first.sha256)
    assert server.gets == 1


def test_a_corrupted_remote_copy_is_refused_and_kept(cache_uri, serve, small_weights, tmp_path):
    server = serve(small_weights)
    name = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[1]
    corrupted = small_weights[:-1] + b"!"
    storage.Store(cache_uri).write(name, corrupted)
    with pytest.raises(WeightsIntegrityError, match=hashlib.sha256(corrupted).hexdigest()):
        resolve_pretrained(IMAGENET, "resnet18", scratch=tmp_path, cache_uri=cache_uri)
    assert storage.Store(cache_uri).read(name) == corrupted and server.gets == 0


def test_an_explicit_remote_state_dict_is_fetched(cache_uri, tmp_path):
    data = _saved({})
    storage.Store(cache_uri).write("mine.pth", data)
    resolved = resolve_pretrained(f"{cache_uri}/mine.pth", "resnet18", scratch=tmp_path)
    assert resolved.path == tmp_path / "mine.pth" and resolved.path.read_bytes() == data
    assert resolved.sha256 == hashlib.sha256(data).hexdigest()
    with pytest.raises(FileNotFoundError, match=f"pretrained weights {cache_uri}/missing.pth not found"):
        resolve_pretrained(f"{cache_uri}/missing.pth", "resnet18", scratch=tmp_path)
