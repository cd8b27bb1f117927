"""Storage: list, read and write files under a local path, ``file://`` or ``gs://`` URI.

Every dataset and artifact location in defectkit goes through here, so the rest
of the code only ever sees relative POSIX paths and bytes.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, TypeVar
from urllib.parse import urlparse

from defectkit.files import write_bytes_atomic
from defectkit.retry import RetryPolicy
from defectkit.retry import retry as retrying

log = logging.getLogger(__name__)

T = TypeVar("T")


DEFAULT_RETRY = RetryPolicy()


def _is_transient(exc: BaseException) -> bool:
    # google-api-core is only present where gs:// is used; import lazily.
    try:
        from google.api_core import exceptions as gexc
    except ImportError:  # pragma: no cover - gs:// unusable without it anyway
        return isinstance(exc, (ConnectionError, TimeoutError))
    transient = (
        gexc.TooManyRequests,
        gexc.InternalServerError,
        gexc.BadGateway,
        gexc.ServiceUnavailable,
        gexc.GatewayTimeout,
        ConnectionError,
        TimeoutError,
    )
    if isinstance(exc, transient):
        return True
    import requests

    return isinstance(exc, (requests.ConnectionError, requests.Timeout))


def retry(call: Callable[[], T], what: str, policy: RetryPolicy = DEFAULT_RETRY) -> T:
    """Run an idempotent storage ``call``, retrying transient errors with backoff."""
    return retrying(call, what, policy, transient=_is_transient)


def is_gcs(uri: str) -> bool:
    return uri.startswith("gs://")


def local_path(uri: str) -> Path:
    """The local path of a plain path or ``file://`` URI."""
    if uri.startswith("file://"):
        return Path(urlparse(uri).path)
    if "://" in uri:
        raise ValueError(f"{uri!r} is not a local path or file:// URI")
    return Path(uri)


def _split_gcs(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    if parsed.scheme != "gs" or not parsed.netloc:
        raise ValueError(f"{uri!r} is not a gs://bucket/prefix URI")
    return parsed.netloc, parsed.path.lstrip("/")


def _gcs_client():
    from google.cloud import storage as gcs

    return gcs.Client()


class Store:
    """Files under one root URI, addressed by relative POSIX path."""

    def __init__(self, root: str, retry_policy: RetryPolicy = DEFAULT_RETRY):
        if not root:
            raise ValueError("storage root must not be empty")
        self.root = root.rstrip("/")
        self.retry_policy = retry_policy
        if is_gcs(self.root):
            self._bucket_name, prefix = _split_gcs(self.root)
            self._prefix = f"{prefix}/" if prefix else ""
            self._bucket = _gcs_client().bucket(self._bucket_name)
        else:
            self._path = local_path(self.root)

    def __repr__(self) -> str:
        return f"Store({self.root!r})"

    def list(self) -> list[str]:
        """Every file under the root, as sorted relative POSIX paths."""
        if is_gcs(self.root):
            def names() -> list[str]:
                blobs = self._bucket.client.list_blobs(self._bucket_name, prefix=self._prefix)
                return [b.name[len(self._prefix):] for b in blobs if not b.name.endswith("/")]

            return sorted(retry(names, f"list {self.root}", self.retry_policy))
        if not self._path.is_dir():
            raise FileNotFoundError(f"{self.root!r} is not a directory")
        return sorted(p.relative_to(self._path).as_posix() for p in self._path.rglob("*") if p.is_file())

    def read(self, rel: str) -> bytes:
        if is_gcs(self.root):
            blob = self._bucket.blob(self._prefix + rel)
            return retry(blob.download_as_bytes, f"read {self.root}/{rel}", self.retry_policy)
        return (self._path / rel).read_bytes()

    def read_if_exists(self, rel: str) -> bytes | None:
        """The file at ``rel``, or None where there is none."""
        if is_gcs(self.root):
            from google.api_core.exceptions import NotFound

            try:
                return self.read(rel)
            except NotFound:
                return None
        try:
            return self.read(rel)
        except FileNotFoundError:
            return None

    def write(self, rel: str, data: bytes, *, overwrite: bool = True) -> None:
        """Write ``data`` at ``rel``; with ``overwrite=False`` an existing file is an error."""
        if is_gcs(self.root):
            blob = self._bucket.blob(self._prefix + rel)
            # Precondition makes the write safe to retry and never clobbers when overwrite=False.
            kwargs = {} if overwrite else {"if_generation_match": 0}
            retry(lambda: blob.upload_from_string(data, **kwargs), f"write {self.root}/{rel}", self.retry_policy)
            return
        target = self._path / rel
        if not overwrite and target.exists():
            raise FileExistsError(f"{target} exists")
        write_bytes_atomic(target, data)


def download_tree(uri: str, dest: Path) -> Path:
    """Copy every file under ``uri`` into ``dest``; a local root is returned as is."""
    if not is_gcs(uri):
        return local_path(uri)
    store = Store(uri)
    for rel in store.list():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(store.read(rel))
    return dest


def fetch_file(uri: str, dest_dir: Path) -> Path:
    """A local path holding the file at ``uri``; gs:// objects are downloaded into ``dest_dir``."""
    if not is_gcs(uri):
        path = local_path(uri)
        if not path.is_file():
            raise FileNotFoundError(f"{uri!r} is not a file")
        return path
    parent, _, name = uri.rpartition("/")
    target = dest_dir / name
    target.write_bytes(Store(parent).read(name))
    return target
