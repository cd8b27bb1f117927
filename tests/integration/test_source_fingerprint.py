"""The dataset's source fingerprint on object storage: read from listings, it follows every change of content."""

from __future__ import annotations

import uuid

import pytest

from defectkit import storage
from defectkit.data import source_fingerprint
from tests.conftest import S3_BUCKET


@pytest.fixture(params=["gs", "s3"])
def root(request) -> str:
    prefix = uuid.uuid4().hex[:8]
    if request.param == "gs":
        request.getfixturevalue("gcs_emulator")
        return f"gs://defectkit-test/{prefix}"
    request.getfixturevalue("s3_server")
    return f"s3://{S3_BUCKET}/{prefix}"


def test_the_fingerprint_changes_with_content_and_only_then(root):
    store = storage.Store(root)
    store.write("train/good/a.png", b"first")
    store.write("test/hole/b.png", b"second")
    before = source_fingerprint(root)
    assert source_fingerprint(root + "/") == before
    store.write("train/good/a.png", b"FIRST")  # same name, same size, other bytes
    assert source_fingerprint(root) != before
    store.write("train/good/a.png", b"first")
    assert source_fingerprint(root) == before
    store.write("train/good/c.png", b"third")
    assert source_fingerprint(root) != before
