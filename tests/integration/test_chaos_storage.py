"""defectkit.storage behind the chaos suite's fault proxy: real GCS emulator and moto S3 on 127.0.0.1."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import boto3
import pytest
from google.api_core import exceptions as gexc

from defectkit import storage
from tests.chaos.proxy import FaultPlan, FaultProxy
from tests.conftest import S3_BUCKET

GCS_BUCKET = "defectkit-test"  # the emulator's default bucket in tests/conftest.py
FAST = storage.RetryPolicy(attempts=4, initial_delay_s=0.01, max_delay_s=0.05)


@pytest.fixture
def gcs(gcs_emulator, monkeypatch) -> Iterator[tuple[FaultProxy, str]]:
    proxy = FaultProxy(gcs_emulator, "gcs").start()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
    try:
        yield proxy, f"gs://{GCS_BUCKET}/{uuid.uuid4().hex[:8]}"
    finally:
        proxy.stop()


@pytest.fixture
def s3(s3_server, monkeypatch) -> Iterator[tuple[FaultProxy, str]]:
    proxy = FaultProxy(s3_server, "s3").start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    try:
        yield proxy, f"s3://{S3_BUCKET}/{uuid.uuid4().hex[:8]}"
    finally:
        proxy.stop()


@pytest.fixture(params=["gcs", "s3"])
def store(request) -> tuple[FaultProxy, str]:
    return request.getfixturevalue(request.param)


def test_a_create_whose_answer_was_lost_after_it_landed_succeeds_and_never_clobbers(store):
    proxy, root = store
    proxy.set_plan(FaultPlan(kinds=("reset",), probability=1.0, phases=("after",), max_faults=1,
                             methods=("POST", "PUT"), enforce_create_preconditions=True))
    storage.Store(root, FAST).write("state.json", b"first", overwrite=False)
    creates = [e for e in proxy.request_log() if e["object"].endswith("state.json") and e["method"] != "GET"]
    # Both tries carried the precondition; the retry met the object its first try wrote and was refused.
    assert [(e["fault"], e["status"]) for e in creates] == [("reset", 200), ("", 412)]
    assert all(e["if_generation_match"] == "0" or e["if_none_match"] == "*" for e in creates)

    with pytest.raises(FileExistsError):
        storage.Store(root, FAST).write("state.json", b"second", overwrite=False)
    assert storage.Store(root, FAST).read("state.json") == b"first"


def test_a_held_connection_costs_the_store_timeout_not_a_minute(store):
    proxy, root = store
    storage.Store(root, FAST).write("a.bin", b"payload")
    proxy.set_plan(FaultPlan(kinds=("hold",), probability=1.0, phases=("before",), max_faults=1, hold_max_s=60))
    started = time.monotonic()
    assert storage.Store(root, FAST, timeout_s=0.5).read("a.bin") == b"payload"
    assert time.monotonic() - started < 10
    assert proxy.counts()["injected"] == {"hold/before": 1}


def test_an_answer_cut_short_is_never_returned(store):
    proxy, root = store
    data = bytes(range(256)) * 400
    storage.Store(root, FAST).write("big.bin", data)
    proxy.set_plan(FaultPlan(kinds=("reset",), probability=1.0, phases=("mid-body",), max_faults=2,
                             path_pattern="big.bin", methods=("GET",)))
    assert storage.Store(root, FAST).read("big.bin") == data
    assert proxy.counts()["injected"] == {"reset/mid-body": 2}


def test_gcs_calls_are_tried_once_per_attempt_of_our_policy(gcs):
    """google-cloud-storage's own retry is off: a 503 reaches our policy, which alone decides."""
    proxy, root = gcs
    proxy.set_plan(FaultPlan(kinds=("503",), probability=1.0, path_pattern="/o"))
    with pytest.raises(gexc.ServiceUnavailable):
        storage.Store(root, storage.RetryPolicy(attempts=2, initial_delay_s=0.01)).write("x", b"x")
    assert proxy.counts()["injected"] == {"503": 2}


def test_s3_throttling_is_retried_until_it_passes(s3):
    proxy, root = s3
    proxy.set_plan(FaultPlan(kinds=("429", "503"), probability=1.0, max_faults=3))
    storage.Store(root, FAST).write("k", b"v")
    key = root.removeprefix(f"s3://{S3_BUCKET}/") + "/k"
    assert boto3.client("s3").get_object(Bucket=S3_BUCKET, Key=key)["Body"].read() == b"v"


def test_timeout_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="timeout_s"):
        storage.Store(str(tmp_path), timeout_s=0)
