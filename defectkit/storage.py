"""Storage: list, read and write files under a local path, ``file://``, ``gs://`` or ``s3://`` URI.

Every dataset and artifact location in defectkit goes through here, so the rest
of the code only ever sees relative POSIX paths and bytes. Each scheme has one
small backend behind :class:`Store`; the client libraries are imported only by
the backend that needs them.

``s3://`` (AWS, or MinIO: the artifact store of a standalone Kubeflow Pipelines
install) goes through boto3, configured by its standard environment:
``AWS_ENDPOINT_URL`` (an S3-compatible server such as MinIO), ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY`` and ``AWS_DEFAULT_REGION``. KServe's storage
initializer reads the same variables, so one Secret serves both.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Callable, Protocol, TypeVar
from urllib.parse import urlparse

from defectkit.files import create_bytes, write_bytes_atomic
from defectkit.retry import TRANSIENT_HTTP_STATUS, RetryPolicy
from defectkit.retry import retry as retrying

log = logging.getLogger(__name__)

T = TypeVar("T")


DEFAULT_RETRY = RetryPolicy()
# Seconds to connect, and to wait for each read of an answer, in one attempt: the client libraries' own
# default. A server that holds a connection open without answering costs this much per attempt.
DEFAULT_TIMEOUT_S = 60.0
_CONNECT_TIMEOUT_S = 10.0

# S3 error codes worth another try, whatever their HTTP status: throttling, a server-side hiccup, a socket the
# server gave up reading, and a conditional write that raced another (AWS asks for a retry of those).
_S3_TRANSIENT_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "RequestThrottled", "RequestTimeout", "InternalError",
    "ServiceUnavailable", "ConditionalRequestConflict",
})


def _gcs_transient(exc: BaseException) -> bool:
    try:
        from google.api_core import exceptions as gexc
        from google.cloud.storage.exceptions import DataCorruption
        import requests
        import urllib3
    except ImportError:
        return False
    # What google-cloud-storage's own retry would take (it is switched off: one retry rule, ours): throttling,
    # server errors, refused, reset or timed-out connections, and an answer cut short or failing its checksum.
    return isinstance(exc, (gexc.TooManyRequests, gexc.InternalServerError, gexc.BadGateway,
                            gexc.ServiceUnavailable, gexc.GatewayTimeout, requests.ConnectionError,
                            requests.Timeout, requests.exceptions.ChunkedEncodingError,
                            urllib3.exceptions.ProtocolError, DataCorruption))


def _s3_transient(exc: BaseException) -> bool:
    try:
        from botocore import exceptions as bexc
    except ImportError:
        return False
    if isinstance(exc, bexc.ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return status in TRANSIENT_HTTP_STATUS or exc.response.get("Error", {}).get("Code") in _S3_TRANSIENT_CODES
    # Refused or reset connections, timeouts and bodies cut short.
    return isinstance(exc, (bexc.ConnectionError, bexc.HTTPClientError, bexc.IncompleteReadError))


def _is_transient(exc: BaseException) -> bool:
    return isinstance(exc, (ConnectionError, TimeoutError)) or _gcs_transient(exc) or _s3_transient(exc)


def retry(call: Callable[[], T], what: str, policy: RetryPolicy = DEFAULT_RETRY) -> T:
    """Run an idempotent storage ``call``, retrying transient errors with backoff."""
    return retrying(call, what, policy, transient=_is_transient)


def local_path(uri: str) -> Path:
    """The local path of a plain path or ``file://`` URI."""
    if uri.startswith("file://"):
        return Path(urlparse(uri).path)
    if "://" in uri:
        raise ValueError(f"{uri!r} is not a local path or file:// URI")
    return Path(uri)


def _bucket_and_prefix(uri: str) -> tuple[str, str]:
    """``scheme://bucket/some/prefix`` -> ("bucket", "some/prefix/"); the prefix is empty at the bucket's root."""
    parsed = urlparse(uri)
    if not parsed.netloc:
        raise ValueError(f"{uri!r} names no bucket; give {parsed.scheme}://bucket/prefix")
    prefix = parsed.path.strip("/")
    return parsed.netloc, f"{prefix}/" if prefix else ""


class _Backend(Protocol):
    """One scheme's files. Missing files raise FileNotFoundError, refused overwrites FileExistsError."""

    def list(self) -> list[str]: ...

    def versions(self) -> dict[str, str]: ...

    def read(self, rel: str) -> bytes: ...

    def write(self, rel: str, data: bytes, *, overwrite: bool) -> None: ...


class _Local:
    def __init__(self, root: str, timeout_s: float):
        self._root = root
        self._path = local_path(root)

    def list(self) -> list[str]:
        if not self._path.is_dir():
            raise FileNotFoundError(f"{self._root!r} is not a directory")
        return [p.relative_to(self._path).as_posix() for p in self._path.rglob("*") if p.is_file()]

    def versions(self) -> dict[str, str]:
        # A local file has no content hash to ask for: read it (local datasets are small, and sizes and
        # modification times can stay the same across a rewrite).
        return {rel: hashlib.sha256(self.read(rel)).hexdigest() for rel in self.list()}

    def read(self, rel: str) -> bytes:
        return (self._path / rel).read_bytes()

    def write(self, rel: str, data: bytes, *, overwrite: bool) -> None:
        target = self._path / rel
        if overwrite:
            write_bytes_atomic(target, data)
        elif not create_bytes(target, data):
            raise FileExistsError(f"{target} exists")


class _Gcs:
    def __init__(self, root: str, timeout_s: float):
        from google.cloud import storage as gcs

        bucket, self._prefix = _bucket_and_prefix(root)
        self._bucket = gcs.Client().bucket(bucket)
        # retry=None on every call: google-cloud-storage would otherwise retry inside each of our attempts for up
        # to two minutes, and a create it retried after a lost answer would meet its own object as "exists".
        self._call = {"timeout": (min(_CONNECT_TIMEOUT_S, timeout_s), timeout_s), "retry": None}

    def _blobs(self):
        return self._bucket.client.list_blobs(self._bucket.name, prefix=self._prefix, **self._call)

    def list(self) -> list[str]:
        return [b.name[len(self._prefix):] for b in self._blobs() if not b.name.endswith("/")]

    def versions(self) -> dict[str, str]:
        # GCS keeps a content checksum of every object: crc32c always, md5 for objects not composed of parts.
        return {b.name[len(self._prefix):]: f"{b.size}:{b.crc32c}:{b.md5_hash or ''}"
                for b in self._blobs() if not b.name.endswith("/")}

    def read(self, rel: str) -> bytes:
        from google.api_core.exceptions import NotFound

        try:
            return self._bucket.blob(self._prefix + rel).download_as_bytes(**self._call)
        except NotFound as exc:
            raise FileNotFoundError(f"gs://{self._bucket.name}/{self._prefix}{rel} not found") from exc

    def write(self, rel: str, data: bytes, *, overwrite: bool) -> None:
        from google.api_core.exceptions import PreconditionFailed

        # Generation 0 means "no live object": the write never clobbers and is safe to retry.
        kwargs = {} if overwrite else {"if_generation_match": 0}
        try:
            self._bucket.blob(self._prefix + rel).upload_from_string(data, **kwargs, **self._call)
        except PreconditionFailed as exc:
            raise FileExistsError(f"gs://{self._bucket.name}/{self._prefix}{rel} exists") from exc


class _S3:
    def __init__(self, root: str, timeout_s: float):
        import boto3
        from botocore.config import Config

        self._bucket, self._prefix = _bucket_and_prefix(root)
        # One retry rule, ours: botocore retrying inside each of our attempts would multiply them.
        self._client = boto3.client("s3", config=Config(retries={"total_max_attempts": 1},
                                                        connect_timeout=min(_CONNECT_TIMEOUT_S, timeout_s),
                                                        read_timeout=timeout_s))

    def _uri(self, rel: str = "") -> str:
        return f"s3://{self._bucket}/{self._prefix}{rel}"

    def list(self) -> list[str]:
        pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=self._bucket, Prefix=self._prefix)
        try:
            keys = [item["Key"] for page in pages for item in page.get("Contents", ())]
        except self._client.exceptions.NoSuchBucket as exc:
            raise FileNotFoundError(f"{self._uri()}: bucket {self._bucket!r} does not exist at "
                                    f"{self._client.meta.endpoint_url}; create it or check AWS_ENDPOINT_URL") from exc
        return [key[len(self._prefix):] for key in keys if not key.endswith("/")]

    def versions(self) -> dict[str, str]:
        # An ETag changes whenever the content does (an MD5, or for multipart uploads a hash of the parts' MD5s).
        pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=self._bucket, Prefix=self._prefix)
        return {item["Key"][len(self._prefix):]: f"{item['Size']}:{item['ETag']}"
                for page in pages for item in page.get("Contents", ()) if not item["Key"].endswith("/")}

    def read(self, rel: str) -> bytes:
        errors = self._client.exceptions
        try:
            return self._client.get_object(Bucket=self._bucket, Key=self._prefix + rel)["Body"].read()
        except (errors.NoSuchKey, errors.NoSuchBucket) as exc:
            raise FileNotFoundError(f"{self._uri(rel)} not found") from exc

    def write(self, rel: str, data: bytes, *, overwrite: bool) -> None:
        from botocore.exceptions import ClientError

        # If-None-Match: * (S3 since 2024-08, MinIO, moto) makes the create atomic; a server that ignores it
        # would clobber, which is why only conditional-write servers should hold state written this way.
        kwargs = {} if overwrite else {"IfNoneMatch": "*"}
        try:
            self._client.put_object(Bucket=self._bucket, Key=self._prefix + rel, Body=data, **kwargs)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "PreconditionFailed":
                raise FileExistsError(f"{self._uri(rel)} exists") from exc
            raise


_REMOTE: dict[str, Callable[[str, float], _Backend]] = {"gs": _Gcs, "s3": _S3}


def is_remote(uri: str) -> bool:
    """Whether ``uri`` names object storage (``gs://``, ``s3://``) rather than a local path."""
    return urlparse(uri).scheme in _REMOTE


class Store:
    """Files under one root URI, addressed by relative POSIX path.

    Each call is tried up to ``retry_policy.attempts`` times; one attempt waits at most ``timeout_s``
    to connect and for each read of the answer.
    """

    def __init__(self, root: str, retry_policy: RetryPolicy = DEFAULT_RETRY, *, timeout_s: float = DEFAULT_TIMEOUT_S):
        if not root:
            raise ValueError("storage root must not be empty")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s={timeout_s!r} must be a positive number of seconds")
        self.root = root.rstrip("/")
        self.retry_policy = retry_policy
        self.timeout_s = timeout_s
        self._backend: _Backend = _REMOTE.get(urlparse(self.root).scheme, _Local)(self.root, timeout_s)

    def __repr__(self) -> str:
        return f"Store({self.root!r})"

    def _retry(self, call: Callable[[], T], what: str) -> T:
        return retry(call, what, self.retry_policy)

    def list(self) -> list[str]:
        """Every file under the root, as sorted relative POSIX paths."""
        return sorted(self._retry(self._backend.list, f"list {self.root}"))

    def versions(self) -> dict[str, str]:
        """Every file under the root with a token that changes whenever its content does: a content hash
        (sha256 locally, the object checksums on gs://, the ETag on s3://), read without downloading."""
        return dict(sorted(self._retry(self._backend.versions, f"list {self.root}").items()))

    def read(self, rel: str) -> bytes:
        """The bytes at ``rel``; FileNotFoundError where there is no such file."""
        return self._retry(lambda: self._backend.read(rel), f"read {self.root}/{rel}")

    def read_if_exists(self, rel: str) -> bytes | None:
        """The file at ``rel``, or None where there is none."""
        try:
            return self.read(rel)
        except FileNotFoundError:
            return None

    def write(self, rel: str, data: bytes, *, overwrite: bool = True) -> None:
        """Write ``data`` at ``rel``; with ``overwrite=False`` an existing file is a FileExistsError."""
        attempts = 0

        def put() -> None:
            nonlocal attempts
            attempts += 1
            self._backend.write(rel, data, overwrite=overwrite)

        try:
            self._retry(put, f"write {self.root}/{rel}")
        except FileExistsError:
            # A create retried after a lost answer meets the object its own first try wrote: that is success.
            if attempts > 1 and self.read_if_exists(rel) == data:
                return
            raise


def download_tree(uri: str, dest: Path) -> Path:
    """Copy every file under ``uri`` into ``dest``; a local root is returned as is."""
    if not is_remote(uri):
        return local_path(uri)
    store = Store(uri)
    for rel in store.list():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(store.read(rel))
    return dest


def fetch_file(uri: str, dest_dir: Path) -> Path:
    """A local path holding the file at ``uri``; gs:// and s3:// objects are downloaded into ``dest_dir``."""
    if not is_remote(uri):
        path = local_path(uri)
        if not path.is_file():
            raise FileNotFoundError(f"{uri!r} is not a file")
        return path
    parent, _, name = uri.rpartition("/")
    target = dest_dir / name
    target.write_bytes(Store(parent).read(name))
    return target
