import subprocess
import sys
import threading
from pathlib import Path

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError
from google.api_core import exceptions as gexc

from defectkit import storage


def test_local_and_file_uri_list_read_write(tmp_path: Path):
    store = storage.Store(f"file://{tmp_path}")
    store.write("train/good/a.bin", b"abc")
    store.write("test/scratch/b.bin", b"xyz")
    assert store.list() == ["test/scratch/b.bin", "train/good/a.bin"]
    assert storage.Store(str(tmp_path)).read("train/good/a.bin") == b"abc"
    assert not list(tmp_path.rglob(".*.tmp")), "atomic writes leave no temp files"


def test_write_without_overwrite_refuses_existing(tmp_path: Path):
    store = storage.Store(str(tmp_path))
    store.write("a", b"1")
    with pytest.raises(FileExistsError):
        store.write("a", b"2", overwrite=False)
    assert store.read("a") == b"1"


def test_racing_local_creates_leave_exactly_one_winner_and_no_temporary_files(tmp_path: Path):
    store = storage.Store(str(tmp_path))
    for round_ in range(20):
        barrier = threading.Barrier(4)
        outcomes: list[bytes] = []

        def create(data: bytes, name: str = f"claim-{round_}") -> None:
            barrier.wait()
            try:
                store.write(name, data, overwrite=False)
                outcomes.append(data)
            except FileExistsError:
                pass

        threads = [threading.Thread(target=create, args=(bytes([i]) * 1000,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(outcomes) == 1, f"round {round_}: {len(outcomes)} writers created the same name"
        assert store.read(f"claim-{round_}") == outcomes[0]  # the winner's bytes, whole
    assert not list(tmp_path.glob(".*.tmp"))


def test_missing_root_is_a_clear_error(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        storage.Store(str(tmp_path / "nope")).list()
    with pytest.raises(ValueError, match="not a local path"):
        storage.local_path("s3://bucket/x")


def test_retry_recovers_from_transient_errors_only():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise gexc.ServiceUnavailable("try again")
        return "ok"

    policy = storage.RetryPolicy(attempts=4, initial_delay_s=0.001)
    assert storage.retry(flaky, "flaky", policy) == "ok"
    assert len(calls) == 3

    def forbidden():
        calls.append(1)
        raise gexc.Forbidden("no")

    calls.clear()
    with pytest.raises(gexc.Forbidden):
        storage.retry(forbidden, "forbidden", policy)
    assert len(calls) == 1, "permanent errors are not retried"


def test_retry_gives_up_after_attempts():
    calls = []

    def down():
        calls.append(1)
        raise gexc.ServiceUnavailable("down")

    with pytest.raises(gexc.ServiceUnavailable):
        storage.retry(down, "down", storage.RetryPolicy(attempts=3, initial_delay_s=0.001))
    assert len(calls) == 3


def test_fetch_file_local(tmp_path: Path):
    (tmp_path / "w.safetensors").write_bytes(b"w")
    assert storage.fetch_file(str(tmp_path / "w.safetensors"), tmp_path) == tmp_path / "w.safetensors"
    with pytest.raises(FileNotFoundError):
        storage.fetch_file(str(tmp_path / "missing"), tmp_path)


def _s3_error(code: str, status: int) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}},
                       "PutObject")


@pytest.mark.parametrize("error", [
    _s3_error("SlowDown", 503),
    _s3_error("InternalError", 500),
    _s3_error("ThrottlingException", 400),
    _s3_error("RequestTimeout", 400),
    _s3_error("ConditionalRequestConflict", 409),
    EndpointConnectionError(endpoint_url="http://127.0.0.1:9"),
    ReadTimeoutError(endpoint_url="http://127.0.0.1:9"),
])
def test_s3_throttling_server_and_connection_errors_are_retried(error):
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 2:
            raise error
        return "ok"

    assert storage.retry(flaky, "flaky", storage.RetryPolicy(attempts=2, initial_delay_s=0.001)) == "ok"


@pytest.mark.parametrize("error", [_s3_error("AccessDenied", 403), _s3_error("PreconditionFailed", 412),
                                   _s3_error("NotImplemented", 501), _s3_error("NoSuchKey", 404)])
def test_s3_answers_that_another_try_cannot_change_are_not_retried(error):
    calls = []

    def refused():
        calls.append(1)
        raise error

    with pytest.raises(ClientError):
        storage.retry(refused, "refused", storage.RetryPolicy(attempts=3, initial_delay_s=0.001))
    assert len(calls) == 1


def test_remote_uris_need_a_bucket():
    assert storage.is_remote("s3://bucket/x") and storage.is_remote("gs://bucket")
    assert not storage.is_remote("file:///tmp/x") and not storage.is_remote("/tmp/s3://x")
    with pytest.raises(ValueError, match=r"'s3:///models' names no bucket; give s3://bucket/prefix"):
        storage.Store("s3:///models")


def test_core_imports_and_stores_locally_without_boto3_or_google(tmp_path: Path):
    blocked = ("import sys; sys.modules.update(boto3=None, botocore=None, google=None); "
               "from defectkit import storage; s = storage.Store(sys.argv[1]); s.write('a', b'1'); "
               "assert s.list() == ['a']")
    subprocess.run([sys.executable, "-c", blocked, str(tmp_path)], check=True, cwd=Path(__file__).parents[2])
