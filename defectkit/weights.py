"""Starting weights for training: none, torchvision's published ImageNet weights, or a state dict of one's own.

GPU-safe (stdlib, torch, torchvision): the gs:// and s3:// clients are imported
by :mod:`defectkit.storage` only when such a URI is used.

``"imagenet"`` downloads the weights torchvision publishes for the architecture
(the URL of its ``DEFAULT`` weights enum member, an ImageNet-1K training) and
checks them against the hash torchvision publishes in the file name, as
``torch.hub`` does. With a cache URI the checked file is written there, so later
runs (and clusters without internet, once the cache is seeded) never download
again. A cluster without internet and without a cached copy trains from scratch
after one warning: the starting weights are an optimisation, not an input the
run cannot do without. A state dict the user names explicitly is different:
a missing file is an error.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torchvision

from defectkit import storage
from defectkit.files import replacing
from defectkit.retry import TRANSIENT_HTTP_STATUS, RetryPolicy, retry

log = logging.getLogger(__name__)

IMAGENET = "imagenet"
# The state dict formats models.build_model reads.
STATE_DICT_SUFFIXES = (".safetensors", ".pth", ".pt")
_URI_SCHEMES = ("file", "gs", "s3")
_ACCEPTED = (f"'' (train from scratch), {IMAGENET!r} (torchvision's published ImageNet weights), or a local path, "
             f"file://, gs:// or s3:// URI of a {'/'.join(STATE_DICT_SUFFIXES)} state dict")

# torch.hub's rule for the hash a published file name carries: ``HASH_REGEX = re.compile(r"-([a-f0-9]*)\.")`` in
# torch/hub.py, searched in the file name by ``load_state_dict_from_url(check_hash=True)`` and compared by
# ``download_url_to_file`` as ``digest[:len(hash_prefix)] != hash_prefix``. The same rule here means a file
# torch.hub would accept is accepted, and one it would refuse is refused.
HASH_REGEX = re.compile(r"-([a-f0-9]*)\.")

_CHUNK = 1 << 20
# A download cut short or a server's hiccup is worth another try; an unreachable host (no DNS, refused, timed
# out) is not: a cluster without internet stays without it, and each retry would cost another timeout.
_DOWNLOAD_RETRY = RetryPolicy(attempts=3, initial_delay_s=1.0, max_delay_s=4.0)


class WeightsIntegrityError(ValueError):
    """A weights file whose sha256 does not match the hash published for it."""


@dataclass(frozen=True)
class PublishedWeights:
    """The ImageNet weights torchvision publishes for one architecture."""

    architecture: str
    weights: str  # torchvision's name for them, e.g. "ResNet18_Weights.IMAGENET1K_V1"
    url: str
    file_name: str
    hash_prefix: str  # the first hex digits of the file's sha256, as published in its name

    def matches(self, sha256: str) -> bool:
        """Whether a file of this ``sha256`` is the published one (as far as the published prefix says)."""
        return sha256.startswith(self.hash_prefix)


@dataclass(frozen=True)
class ResolvedWeights:
    """The starting weights a training run uses, and where they came from."""

    path: Path | None  # a local state dict file for models.build_model; None trains from scratch
    source: str  # the URL or URI the weights came from; "" when there are none
    sha256: str  # full sha256 of the file at ``path``; "" when there is none
    note: str  # one human line saying what was used, or why nothing was


def hash_prefix(file_name: str) -> str:
    """The sha256 prefix published in ``file_name`` by torch.hub's rule (``resnet18-f37072fd.pth`` ->
    ``f37072fd``); "" where the name carries none."""
    match = HASH_REGEX.search(file_name)
    return match.group(1) if match else ""


def published_weights(architecture: str) -> PublishedWeights | None:
    """torchvision's default ImageNet-1K weights for ``architecture``; None where it publishes none.

    An architecture torchvision does not know is a ValueError, and so are published weights whose file name
    carries no hash: they could not be checked, and an unchecked download is not used.
    """
    try:
        enum = torchvision.models.get_model_weights(architecture)
    except ValueError as exc:
        # Unknown names and builders without a ``weights`` argument both raise ValueError; only the first is
        # the caller's mistake.
        if architecture not in torchvision.models.list_models():
            raise ValueError(f"unknown architecture {architecture!r}; torchvision models: "
                             f"{', '.join(torchvision.models.list_models(module=torchvision.models))}") from exc
        return None
    default = getattr(enum, "DEFAULT", None)
    # Detection, segmentation and video models default to COCO or Kinetics weights: not ImageNet ones.
    if default is None or not default.name.startswith("IMAGENET1K"):
        return None
    file_name = Path(urlparse(default.url).path).name
    prefix = hash_prefix(file_name)
    if not prefix:
        raise ValueError(f"torchvision's {architecture} weights at {default.url} carry no sha256 prefix in their "
                         f"file name, so a download cannot be checked; download them yourself and give their path")
    return PublishedWeights(architecture=architecture, weights=f"{type(default).__name__}.{default.name}",
                            url=default.url, file_name=file_name, hash_prefix=prefix)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_spec(spec: str) -> str:
    """'' or IMAGENET as they are, else the URI of a state dict, checked for its scheme and suffix."""
    if spec in ("", IMAGENET):
        return spec
    scheme = urlparse(spec).scheme if "://" in spec else ""
    if scheme and scheme not in _URI_SCHEMES:
        hint = (f"; for torchvision's ImageNet weights give {IMAGENET!r}, for other weights copy them to "
                f"storage first" if scheme in ("http", "https") else "")
        raise ValueError(f"pretrained weights {spec!r}: scheme {scheme}:// is not accepted{hint}. "
                         f"Accepted: {_ACCEPTED}")
    if not spec.endswith(STATE_DICT_SUFFIXES):
        raise ValueError(f"pretrained weights {spec!r} are not accepted. Accepted: {_ACCEPTED}")
    return spec


def resolve_pretrained(spec: str, architecture: str, *, scratch: Path, cache_uri: str = "",
                       timeout_s: float = 30.0) -> ResolvedWeights:
    """The starting weights ``spec`` names for ``architecture``, as a local file ready for models.build_model.

    ``spec`` is "" (train from scratch), ``"imagenet"`` (torchvision's published weights, checked against
    their published hash; read from ``cache_uri`` where a copy is there, else downloaded and written there),
    or a local path, file://, gs:// or s3:// URI of a state dict. Local copies of remote files go to
    ``scratch``. ``timeout_s`` bounds each network wait of a download.
    """
    spec = _check_spec(spec)
    if timeout_s <= 0:
        raise ValueError(f"timeout_s={timeout_s!r} must be positive")
    if spec == "":
        return ResolvedWeights(None, "", "", "no pretrained weights: training from scratch")
    scratch = Path(scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    if spec == IMAGENET:
        return _imagenet(architecture, scratch, cache_uri, timeout_s)
    try:
        path = storage.fetch_file(spec, scratch)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"pretrained weights {spec} not found ({exc}); give an existing "
                                f"{'/'.join(STATE_DICT_SUFFIXES)} file, {IMAGENET!r}, or '' to train from scratch"
                                ) from exc
    sha256 = _sha256_file(path)
    note = f"pretrained weights from {spec}, sha256 {sha256}"
    log.info("%s", note)
    return ResolvedWeights(path, spec, sha256, note)


def _imagenet(architecture: str, scratch: Path, cache_uri: str, timeout_s: float) -> ResolvedWeights:
    published = published_weights(architecture)
    if published is None:
        note = f"no pretrained weights: torchvision publishes no ImageNet weights for {architecture}; " \
               f"training from scratch"
        log.warning("%s", note)
        return ResolvedWeights(None, "", "", note)
    cached = _from_cache(published, cache_uri, scratch)
    if cached is not None:
        return cached
    target = scratch / published.file_name
    try:
        sha256 = retry(lambda: _download(published, target, timeout_s), f"download {published.url}",
                       _DOWNLOAD_RETRY, transient=_transient_download_error)
    except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as exc:
        # No DNS, a refused or dropped connection, a timeout, an HTTP error (HTTPError is a URLError): all mean
        # the weights cannot be had from here. A full disk (OSError) and a hash mismatch (WeightsIntegrityError,
        # a ValueError) are real errors and pass.
        note = f"no pretrained weights: {published.url} could not be reached ({_reason(exc)}); " \
               f"training from scratch"
        log.warning("%s", note)
        return ResolvedWeights(None, "", "", note)
    cache_note = _write_cache(published, target, cache_uri)
    note = f"ImageNet weights of {architecture} ({published.weights}) from {published.url}, sha256 {sha256}" \
           f"{cache_note}"
    log.info("%s", note)
    return ResolvedWeights(target, published.url, sha256, note)


def _from_cache(published: PublishedWeights, cache_uri: str, scratch: Path) -> ResolvedWeights | None:
    """The cached copy, checked; None where there is no cache or no copy in it."""
    if not cache_uri:
        return None
    uri = f"{cache_uri.rstrip('/')}/{published.file_name}"
    try:
        path = storage.fetch_file(uri, scratch)
    except FileNotFoundError:
        return None
    sha256 = _sha256_file(path)
    if not published.matches(sha256):
        # Neither used nor deleted: a wrong file in a shared cache is someone's to look at, not ours to erase.
        raise WeightsIntegrityError(
            f"cached weights {uri} have sha256 {sha256}, but torchvision publishes {published.hash_prefix}... "
            f"for {published.file_name} ({published.url}); the cached copy is corrupted or not what its name says. "
            f"Delete it to download again")
    note = f"ImageNet weights of {published.architecture} ({published.weights}) from cache {uri} " \
           f"(published at {published.url}), sha256 {sha256}"
    log.info("%s", note)
    return ResolvedWeights(path, uri, sha256, note)


def _download(published: PublishedWeights, target: Path, timeout_s: float) -> str:
    """Stream ``published.url`` into ``target`` and return its sha256; a file whose hash does not match is
    refused and leaves nothing behind."""
    digest = hashlib.sha256()
    request = urllib.request.Request(published.url, headers={"User-Agent": "defectkit"})
    with urllib.request.urlopen(request, timeout=timeout_s) as response, replacing(target) as tmp:
        with open(tmp, "wb") as out:
            for chunk in iter(lambda: response.read(_CHUNK), b""):
                digest.update(chunk)
                out.write(chunk)
        sha256 = digest.hexdigest()
        if not published.matches(sha256):
            # Raised inside ``replacing``: the temporary file goes, ``target`` is never written.
            raise WeightsIntegrityError(
                f"download of {published.url} has sha256 {sha256}, but its file name publishes "
                f"{published.hash_prefix}...; refusing it (a corrupted or tampered download, or a wrong URL)")
    return sha256


def _transient_download_error(exc: BaseException) -> bool:
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code in TRANSIENT_HTTP_STATUS
    # The connection was made and then dropped mid-body: another try may well succeed.
    return isinstance(exc, (http.client.IncompleteRead, ConnectionResetError))


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        exc = exc.reason if isinstance(exc.reason, BaseException) else exc
    if isinstance(exc, TimeoutError):  # socket.timeout is TimeoutError since Python 3.10
        return "timed out"
    return f"{type(exc).__name__}: {exc}"


def _write_cache(published: PublishedWeights, path: Path, cache_uri: str) -> str:
    """Write the checked file into the cache; a failure costs the next run a download, so it is a warning and
    the run goes on. Returns a clause for the note."""
    if not cache_uri:
        return ""
    uri = f"{cache_uri.rstrip('/')}/{published.file_name}"
    try:
        store = storage.Store(cache_uri)
        try:
            # Store writes are atomic (a local temp file renamed; one object PUT). overwrite=False: a copy that
            # appeared meanwhile is another run's download of the same file, and is checked on every read.
            store.write(published.file_name, path.read_bytes(), overwrite=False)
        except FileExistsError:
            if store.read_if_exists(published.file_name) is None:
                raise  # not a copy there: the cache location itself is unusable (a file where a folder goes)
            return f", cached at {uri} by another run meanwhile"
    except Exception as exc:  # noqa: BLE001 - any storage failure: the weights in hand are still good
        log.warning("could not write %s into the cache (%s: %s); the next run downloads it again", uri,
                    type(exc).__name__, exc)
        return f", not cached ({type(exc).__name__})"
    return f", now cached at {uri}"
