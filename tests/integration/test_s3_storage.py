"""s3:// storage against moto's S3 server on 127.0.0.1: the same contract as local paths and gs://."""

import logging
import socket
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import pytest
from botocore.exceptions import EndpointConnectionError

from defectkit import storage
from tests.conftest import S3_BUCKET
from tests.servers import free_port

FAST = storage.RetryPolicy(attempts=3, initial_delay_s=0.001, max_delay_s=0.001)


@pytest.fixture
def root(s3_server) -> str:
    """A fresh prefix per test, so that tests never see each other's objects."""
    return f"s3://{S3_BUCKET}/{uuid.uuid4().hex[:8]}/run-1"


def test_list_read_write_under_a_prefix(root):
    store = storage.Store(root + "/")
    store.write("train/good/a.png", b"\x89PNG a")
    store.write("manifest.json", b"{}")
    s3 = boto3.client("s3")
    bucket_root = root.removeprefix(f"s3://{S3_BUCKET}/")
    # A sibling prefix that shares the text of ours, and a console "folder" marker: neither is a file of this store.
    s3.put_object(Bucket=S3_BUCKET, Key=f"{bucket_root}0/other.bin", Body=b"x")
    s3.put_object(Bucket=S3_BUCKET, Key=f"{bucket_root}/empty-folder/", Body=b"")

    assert store.list() == ["manifest.json", "train/good/a.png"]
    assert storage.Store(root).read("train/good/a.png") == b"\x89PNG a"
    assert s3.get_object(Bucket=S3_BUCKET, Key=f"{bucket_root}/manifest.json")["Body"].read() == b"{}"
    assert repr(store) == f"Store({root!r})"


def test_listing_pages_through_more_than_a_thousand_objects(root):
    s3 = boto3.client("s3")
    prefix = root.removeprefix(f"s3://{S3_BUCKET}/")
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: s3.put_object(Bucket=S3_BUCKET, Key=f"{prefix}/{i:04d}", Body=b""), range(1005)))
    names = storage.Store(root).list()
    assert len(names) == 1005 and names[0] == "0000" and names[-1] == "1004"


def test_write_without_overwrite_never_clobbers(root):
    store = storage.Store(root)
    store.write("state.json", b"first", overwrite=False)
    with pytest.raises(FileExistsError, match=f"{root}/state.json exists"):
        store.write("state.json", b"second", overwrite=False)
    assert store.read("state.json") == b"first"
    store.write("state.json", b"third")
    assert store.read("state.json") == b"third"


def test_of_many_creates_of_one_key_at_once_exactly_one_lands(root):
    # S3 lets the first conditional write to finish win and refuses the rest; the test server
    # (tests/s3_server.py) makes moto's check-then-store atomic to match.
    for attempt in range(5):
        stores = [storage.Store(f"{root}/{attempt}", FAST) for _ in range(8)]  # boto3 clients: made in one thread
        start = threading.Barrier(8)

        def create(i: int, stores: list = stores, start: threading.Barrier = start) -> bool:
            start.wait()
            try:
                stores[i].write("claim.json", f"writer {i}".encode(), overwrite=False)
                return True
            except FileExistsError:
                return False

        with ThreadPoolExecutor(8) as pool:
            landed = [i for i, won in enumerate(pool.map(create, range(8))) if won]
        assert len(landed) == 1, landed
        assert stores[0].read("claim.json") == f"writer {landed[0]}".encode()


def test_missing_files_and_buckets_are_clear_errors(root, caplog):
    store = storage.Store(root, FAST)
    assert store.list() == [], "an empty prefix is an empty directory, as on gs://"
    assert store.read_if_exists("nope.json") is None
    with pytest.raises(FileNotFoundError, match=f"{root}/nope.json not found"):
        store.read("nope.json")

    caplog.set_level(logging.WARNING, logger="defectkit.retry")
    missing = storage.Store("s3://no-such-bucket-here/x", FAST)
    with pytest.raises(FileNotFoundError, match="bucket 'no-such-bucket-here' does not exist.*create it"):
        missing.list()
    with pytest.raises(FileNotFoundError):
        missing.read("a")
    assert not [r for r in caplog.records if "retry" in r.getMessage()], "permanent errors are not retried"


def test_download_tree_and_fetch_file(root, tmp_path: Path):
    store = storage.Store(root)
    store.write("model.json", b"{}")
    store.write("reference/features.npy", b"\x93NUMPY")

    copied = storage.download_tree(root, tmp_path / "copy")
    assert copied == tmp_path / "copy"
    assert sorted(p.relative_to(copied).as_posix() for p in copied.rglob("*") if p.is_file()) == [
        "model.json", "reference/features.npy"]
    assert (copied / "reference/features.npy").read_bytes() == b"\x93NUMPY"

    fetched = storage.fetch_file(f"{root}/reference/features.npy", tmp_path)
    assert fetched == tmp_path / "features.npy" and fetched.read_bytes() == b"\x93NUMPY"
    with pytest.raises(FileNotFoundError):
        storage.fetch_file(f"{root}/missing.safetensors", tmp_path)


def test_an_unreachable_endpoint_is_retried_then_reported(s3_server, monkeypatch, caplog):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    caplog.set_level(logging.WARNING, logger="defectkit.retry")
    with pytest.raises(EndpointConnectionError):
        storage.Store(f"s3://{S3_BUCKET}/x", FAST).read("model.json")
    retries = [r for r in caplog.records if "retry" in r.getMessage()]
    assert len(retries) == FAST.attempts - 1


class _AnswerDropper:
    """A TCP proxy to the S3 server that forwards the first request whole but hangs up before its answer.

    That is a write that landed while its caller saw only a broken connection.
    """

    def __init__(self, upstream_port: int):
        self._upstream_port = upstream_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._dropped = False
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        with client, socket.create_connection(("127.0.0.1", self._upstream_port)) as upstream:
            drop, self._dropped = not self._dropped, True
            pumps = [threading.Thread(target=_pump, args=(client, upstream), daemon=True)]
            if not drop:
                pumps.append(threading.Thread(target=_pump, args=(upstream, client), daemon=True))
            for pump in pumps:
                pump.start()
            if drop:
                upstream.recv(1)  # the server has taken the whole request and begun to answer
                return
            for pump in pumps:
                pump.join()

    def close(self) -> None:
        self._listener.close()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
        sink.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def test_a_create_retried_after_a_lost_answer_is_not_a_clash(root, s3_server, monkeypatch, caplog):
    proxy = _AnswerDropper(int(s3_server.rsplit(":", 1)[1]))
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    caplog.set_level(logging.WARNING, logger="defectkit.retry")
    try:
        store = storage.Store(root, FAST)
        store.write("marker.json", b"mine", overwrite=False)
        assert [r for r in caplog.records if "retry 1/" in r.getMessage()], "the first answer was lost"
        assert store.read("marker.json") == b"mine"
        with pytest.raises(FileExistsError):
            store.write("marker.json", b"someone else", overwrite=False)
    finally:
        proxy.close()
