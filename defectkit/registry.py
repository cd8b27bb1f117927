"""The model registry: versions of model artifacts in MLflow, moved through aliases by delivery.

A registered version is an MLflow run holding the model artifact files
(``model.safetensors`` and ``model.json``) under its ``model/`` artifact dir,
plus a model version whose source is that dir. Lineage (dataset fingerprint,
weights sha256, code version, KFP run id) is tagged on both the run and the
version. Aliases carry the delivery state:

- ``challenger``: the newest registered version;
- ``champion``: the version serving production, moved only by :func:`promote`;
- ``previous-champion``: the champion before the last promotion.

A failed canary leaves ``champion`` where it was; :func:`mark` records the
outcome on the version instead.

MLflow aliases are last-writer-wins, so :func:`promote` moves them under a
lock: a registered model named ``<model>.promotion-lock`` (see
:func:`promotion_lock_name`), whose creation the tracking server makes atomic.
Two promotions at once then happen one after the other.

MLflow's client retries every request on connection errors, POSTs included,
so a request the server committed but never answered is sent again: register
and promote are written to come out right when that happens. When the server
stays down past those retries, the step fails with
:class:`RegistryUnavailable`, which names the server and what was left behind.

Any MLflow tracking URI works: a tracking server (``http://...``) or, as the
embedded default, sqlite in a work dir (:meth:`RegistryConfig.embedded`).
``mlflow`` is imported inside the functions, so this module imports without
it; torch is never needed (the deploy image has none), which is why
``model.json`` is read here as plain JSON rather than through
``defectkit.models``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from defectkit import artifact
from defectkit.artifact import ModelIntegrityError
from defectkit.decision_record import JSON_NAME as DECISION_RECORD_JSON
from defectkit.decision_record import MARKDOWN_NAME as DECISION_RECORD_MD
from defectkit.reference import MODEL_DIR as REFERENCE_DIR

log = logging.getLogger(__name__)

CHALLENGER = "challenger"
CHAMPION = "champion"
PREVIOUS_CHAMPION = "previous-champion"

MODEL_ARTIFACT_PATH = "model"

# Lineage tags, on the run and on the model version.
DATASET_FINGERPRINT = "dataset_fingerprint"
WEIGHTS_SHA256 = "weights_sha256"
CODE_VERSION = "code_version"
ARCHITECTURE = "architecture"
KFP_RUN_ID = "kfp_run_id"


# The lock serialising promotions of one registered model; see promote().
PROMOTION_LOCK_SUFFIX = ".promotion-lock"
LOCK_VERSION_TAG = "promoting_version"
LOCK_SINCE_TAG = "since_unix_s"
# Longer than a promotion whose every call waits out MLflow's retries while the server restarts.
PROMOTION_LOCK_STALE_S = 600.0


class RegistryUnavailable(ConnectionError):
    """The tracking server did not answer, even after MLflow's retries; the message says what was left behind."""


class PromotionInProgress(RuntimeError):
    """Another version's promotion held the model's promotion lock for longer than the caller would wait."""


_SQLITE_PREFIX = "sqlite:///"
_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))/?$")
_METRIC_NAME_UNSAFE = re.compile(r"[^\w./ :-]")
# Object stores that both KServe's storage initializer and defectkit.storage read.
_KSERVE_SCHEMES = ("gs", "s3")


@dataclass(frozen=True)
class RegistryConfig:
    """Where versions are registered.

    ``artifact_location`` applies only when the experiment does not exist yet;
    empty means the tracking server's default artifact root.
    """

    tracking_uri: str
    model_name: str = "defectkit"
    experiment: str = "defectkit"
    artifact_location: str = ""

    def __post_init__(self) -> None:
        for name in ("tracking_uri", "model_name", "experiment"):
            if not getattr(self, name).strip():
                raise ValueError(f"RegistryConfig.{name} is empty; give a non-empty value")

    @classmethod
    def embedded(cls, work_dir: Path, *, model_name: str = "defectkit") -> RegistryConfig:
        """sqlite at ``work_dir/mlflow.db`` with artifacts in ``work_dir/mlartifacts``: no server needed."""
        work_dir = Path(work_dir).resolve()
        work_dir.mkdir(parents=True, exist_ok=True)
        return cls.for_uri(f"sqlite:///{work_dir / 'mlflow.db'}", model_name=model_name)

    @classmethod
    def for_uri(cls, tracking_uri: str, *, model_name: str = "defectkit") -> RegistryConfig:
        """A tracking URI as users give it; a sqlite database keeps its artifacts in ``mlartifacts`` beside it.

        Without that, MLflow would put a sqlite store's artifacts in ``./mlruns``
        of whatever directory the process happens to run in.
        """
        artifact_location = ""
        if tracking_uri.startswith(_SQLITE_PREFIX):
            database = Path(tracking_uri[len(_SQLITE_PREFIX):].split("?", 1)[0])
            artifact_location = (database.resolve().parent / "mlartifacts").as_uri()
        return cls(tracking_uri=tracking_uri, model_name=model_name, artifact_location=artifact_location)


@dataclass(frozen=True)
class ModelUri:
    """``models:/<name>/<version>`` or ``models:/<name>@<alias>``: the one parser of registry URIs."""

    name: str
    version: str | None = None
    alias: str | None = None

    PREFIX = "models:/"

    @classmethod
    def parse(cls, text: str) -> ModelUri | None:
        """The parsed URI; None for anything that is not a ``models:/`` URI (a path, ``gs://``, ...)."""
        if not text.startswith(cls.PREFIX):
            return None
        match = _MODEL_URI.match(text)
        if match is None:
            raise ValueError(f"model URI {text!r} is not of the form models:/<name>@<alias> or "
                             f"models:/<name>/<version>")
        return cls(match["name"], match["version"], match["alias"])

    def __str__(self) -> str:
        return f"models:/{self.name}@{self.alias}" if self.alias else f"models:/{self.name}/{self.version}"


def pin(uri: ModelUri, tracking_uri: str) -> ModelVersionRef:
    """The version ``uri`` names now: an alias is read once, so it moving later cannot mix two versions."""
    client = _client(tracking_uri)
    if uri.alias is None:
        return _ref(_model_version(client, uri.name, str(uri.version)))
    aliases = _aliases(client, uri.name)
    if uri.alias not in aliases:
        known = ", ".join(f"{a} -> {v}" for a, v in sorted(aliases.items())) or "none"
        raise LookupError(f"{uri}: registered model {uri.name!r} has no alias {uri.alias!r} "
                          f"(its aliases: {known}) in {tracking_uri}")
    return _ref(client.get_model_version(uri.name, aliases[uri.alias]))


@dataclass(frozen=True)
class ModelVersionRef:
    """One registered model version, as read back from the registry."""

    name: str
    version: str
    run_id: str
    source: str = ""
    aliases: tuple[str, ...] = ()
    tags: Mapping[str, str] = field(default_factory=dict)

    @property
    def uri(self) -> str:
        return str(ModelUri(self.name, self.version))


def register(config: RegistryConfig, model_dir: Path, *, params: Mapping[str, Any] | None = None,
             tags: Mapping[str, Any] | None = None) -> ModelVersionRef:
    """Log ``model_dir`` as a run and register it as a new version with alias ``challenger``.

    The weights are checked against ``model.json`` first, so a corrupted
    artifact is never registered. ``params`` add to the parameters read from
    ``model.json`` (architecture, image size, threshold, training config);
    ``tags`` (e.g. ``kfp_run_id``) add to the lineage tags and may not
    contradict them.
    """
    from mlflow.entities import Metric, Param

    model_dir = Path(model_dir)
    record = artifact.read_model_json(model_dir)
    sha256 = artifact.verify(model_dir)
    if record.get("threshold") is None:
        raise ValueError(f"{model_dir / artifact.METADATA_FILE} has no decision threshold; register the judged model "
                         f"written by evaluation, not the raw output of training")
    run_tags = _lineage_tags(record, sha256, tags or {}, model_dir)
    given_params = {k: _text(v) for k, v in (params or {}).items()}
    run_params = {k: v for k, v in {**_model_params(record), **given_params}.items() if v}
    now_ms = int(time.time() * 1000)
    metrics = [Metric(name, value, now_ms, 0) for name, value in _numeric_metrics(record.get("metrics") or {})]

    client = _client(config.tracking_uri)
    progress = "nothing was written"
    with _unavailable(config.tracking_uri, f"registering {model_dir}", lambda: progress):
        experiment_id = _experiment_id(client, config)
        run = client.create_run(experiment_id, run_name=f"{config.model_name}-{sha256[:12]}", tags=run_tags)
        run_id = run.info.run_id
        progress = f"run {run_id} was created and is left unfinished; no version was registered"
        try:
            client.log_batch(run_id, metrics=metrics, params=[Param(k, v) for k, v in run_params.items()])
            for name in artifact.model_files(model_dir):  # the ONNX export, where there is one, beside the weights
                client.log_artifact(run_id, str(model_dir / name), MODEL_ARTIFACT_PATH)
            # The drift reference travels with the model, so monitoring a registered version needs nothing else.
            if (model_dir / REFERENCE_DIR).is_dir():
                client.log_artifacts(run_id, str(model_dir / REFERENCE_DIR),
                                     f"{MODEL_ARTIFACT_PATH}/{REFERENCE_DIR}")
            _check_uploaded(client, run_id, model_dir)
        except BaseException:
            _fail_run(client, run_id)
            raise
        client.set_terminated(run_id, "FINISHED")

        _ensure_registered_model(client, config.model_name)
        source = f"{run.info.artifact_uri.rstrip('/')}/{MODEL_ARTIFACT_PATH}"
        progress = (f"run {run_id} holds the complete model, but the version may not exist yet or has no "
                    f"{CHALLENGER} alias; re-running registers it again")
        created = client.create_model_version(
            config.model_name,
            source=source,
            run_id=run_id,
            tags=run_tags,
            description=f"{record['architecture']} trained on dataset {run_tags.get(DATASET_FINGERPRINT, 'unknown')}",
        )
        version = _one_version_of_run(client, config.model_name, run_id, str(created.version))
        client.set_registered_model_alias(config.model_name, CHALLENGER, version)
        progress = f"version {version} is registered as {CHALLENGER}"
        log.info("registered %s version %s (run %s, weights %s) as %s", config.model_name, version, run_id,
                 sha256[:12], CHALLENGER)
        return _ref(client.get_model_version(config.model_name, version))


def promote(config: RegistryConfig, version: str | int, *, wait_s: float = 30.0) -> None:
    """Make ``version`` the champion; the champion it replaces becomes ``previous-champion``.

    The aliases move under the model's promotion lock, so a promotion that
    starts while another version's is under way waits for it (up to
    ``wait_s``, then :class:`PromotionInProgress`) and then replaces it: the
    aliases always read as one promotion after the other. Promoting the
    champion again changes nothing, so a step that failed part-way can be re-run.
    """
    client = _client(config.tracking_uri)
    name = config.model_name
    with _unavailable(config.tracking_uri, f"promoting {name} version {version}",
                      lambda: f"{CHAMPION} is either where it was or at version {version}; re-running finishes it"):
        version = str(_model_version(client, name, str(version)).version)
        with _promotion_lock(client, config, version, wait_s):
            current = _aliases(client, name).get(CHAMPION)
            if current == version:
                log.info("%s version %s is already %s", name, version, CHAMPION)
                return
            # previous-champion first: if we stop in between, champion has not moved and nothing is lost.
            if current is not None:
                client.set_registered_model_alias(name, PREVIOUS_CHAMPION, current)
            client.set_registered_model_alias(name, CHAMPION, version)
        log.info("%s: %s -> version %s (%s: %s)", name, CHAMPION, version, PREVIOUS_CHAMPION, current)


def promotion_lock_name(model_name: str) -> str:
    """The registered model whose existence means a promotion of ``model_name`` is under way."""
    return f"{model_name}{PROMOTION_LOCK_SUFFIX}"


@contextmanager
def _promotion_lock(client, config: RegistryConfig, version: str, wait_s: float) -> Iterator[None]:
    """Hold ``model.promotion-lock`` while the aliases move.

    Creating a registered model is atomic on the server (its name is unique),
    and a lock is owned by the version it promotes, not by the process: the
    create that MLflow's client sends again after its answer was lost, and a
    re-run of a promotion that died holding the lock, both find their own lock.
    """
    from mlflow.exceptions import MlflowException

    lock = promotion_lock_name(config.model_name)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            client.create_registered_model(
                lock, tags={LOCK_VERSION_TAG: version, LOCK_SINCE_TAG: f"{time.time():.3f}"},
                description=f"defectkit: a promotion of {config.model_name} is under way; deleted when it ends")
            break
        except MlflowException as exc:
            # RESOURCE_DOES_NOT_EXIST: the server found the name taken, then the holder released it.
            if getattr(exc, "error_code", None) not in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
                raise
        holder = _lock_tags(client, lock)
        if holder is None:
            continue  # released since; try again
        if holder.get(LOCK_VERSION_TAG) == version:
            break
        # No tags: read while its holder deleted it (the server reads the model and its tags apart).
        since = _float(holder.get(LOCK_SINCE_TAG)) or time.time()
        if time.time() - since > PROMOTION_LOCK_STALE_S:
            log.warning("breaking %s: held for version %s since %.0f s ago, longer than any promotion takes", lock,
                        holder.get(LOCK_VERSION_TAG), time.time() - since)
            _delete_lock(client, lock)
            continue
        if time.monotonic() >= deadline:
            raise PromotionInProgress(
                f"promotion of {config.model_name} version {version} refused: version "
                f"{holder.get(LOCK_VERSION_TAG)} has been being promoted for {time.time() - since:.0f} s "
                f"(registered model {lock!r} at {config.tracking_uri}). Re-run this step once that promotion has "
                f"finished; if no promotion is running, delete {lock!r} (it is broken by itself after "
                f"{PROMOTION_LOCK_STALE_S:.0f} s)")
        time.sleep(0.05 + 0.1 * random.random())
    try:
        yield
    finally:
        holder = _lock_tags(client, lock)
        if holder is not None and holder.get(LOCK_VERSION_TAG) == version:
            _delete_lock(client, lock)


def _lock_tags(client, lock: str) -> dict[str, str] | None:
    from mlflow.exceptions import MlflowException

    try:
        return dict(client.get_registered_model(lock).tags or {})
    except MlflowException as exc:
        if _not_found(exc):
            return None
        raise


def _delete_lock(client, lock: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.delete_registered_model(lock)
    except MlflowException as exc:
        # Gone already: the delete was sent again after its answer was lost, or another promotion broke it.
        if not _not_found(exc):
            raise


def _float(text: str | None) -> float:
    try:
        return float(text or 0.0)
    except ValueError:
        return 0.0


def version_for_alias(config: RegistryConfig, alias: str) -> ModelVersionRef | None:
    """The version ``alias`` points to; None when the alias (or the registered model) does not exist yet."""
    client = _client(config.tracking_uri)
    try:
        version = _aliases(client, config.model_name).get(alias)
    except LookupError:
        return None
    return None if version is None else _ref(client.get_model_version(config.model_name, version))


def champion(config: RegistryConfig) -> ModelVersionRef | None:
    return version_for_alias(config, CHAMPION)


def mark(config: RegistryConfig, version: str | int, key: str, value: str) -> None:
    """Tag a version, e.g. ``mark(config, "3", "canary", "rolled_back")``."""
    client = _client(config.tracking_uri)
    with _unavailable(config.tracking_uri, f"tagging {config.model_name} version {version} {key}={value}",
                      lambda: "the tag may not be set; re-running sets it"):
        version = str(_model_version(client, config.model_name, str(version)).version)
        client.set_model_version_tag(config.model_name, version, key, value)


def storage_uri(tracking_uri: str, registered_model: str, version: str | int) -> str:
    """The ``gs://`` or ``s3://`` directory holding ``version``'s model files, for KServe's storage initializer.

    That is where the registry's artifact store keeps the version's ``model/``
    dir, never a location inside a pipeline run: the registry's copy outlives
    the run. A store KServe cannot read (a local path, ``file://``, or the
    tracking server's proxied ``mlflow-artifacts:/`` store) is a ValueError that
    says how to configure the server instead.
    """
    client = _client(tracking_uri)
    version = str(_model_version(client, registered_model, str(version)).version)
    location = client.get_model_version_download_uri(registered_model, version).rstrip("/")
    parsed = urlparse(location)
    if parsed.scheme in _KSERVE_SCHEMES and parsed.netloc:
        return location
    raise ValueError(
        f"version {version} of {registered_model!r} at {tracking_uri} is stored at {location!r}, "
        f"{_why_unreadable(parsed.scheme)}. Start the MLflow server with --default-artifact-root "
        f"s3://<bucket>/<prefix> or gs://<bucket>/<prefix>, which applies to experiments created afterwards "
        f"(--artifacts-destination alone keeps clients on the proxied mlflow-artifacts:/ store), or register "
        f"into a new experiment with such an artifact_location (RegistryConfig.artifact_location); then "
        f"register the model again"
    )


def _why_unreadable(scheme: str) -> str:
    if scheme in ("", "file"):
        return "a path on the registry's disk, which KServe's storage initializer cannot reach"
    if scheme in ("mlflow-artifacts", "http", "https"):
        return "the tracking server's artifact proxy, which KServe's storage initializer cannot read"
    return f"a {scheme}:// store, which defectkit does not deliver to KServe from (gs:// and s3:// only)"


def resolve(uri: str, dest: Path, *, tracking_uri: str) -> Path:
    """Download ``models:/<name>@<alias>`` or ``models:/<name>/<version>`` into ``dest`` and verify it.

    The weights must match both the sha256 in the downloaded ``model.json``
    and the sha256 the version was registered with, so that neither a
    modified weights file nor a rewritten ``model.json`` gets through.
    ``dest`` must not exist or be empty; it is filled only once verified.
    """
    import mlflow.artifacts

    parsed = ModelUri.parse(uri)
    if parsed is None:
        raise ValueError(f"model URI {uri!r} is not of the form models:/<name>@<alias> or models:/<name>/<version>")
    name = parsed.name
    client = _client(tracking_uri)
    version = pin(parsed, tracking_uri)

    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise FileExistsError(f"{dest} already exists and is not an empty directory; resolve {uri} into a new one")
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".resolve-", dir=dest.parent))
    try:
        local = Path(mlflow.artifacts.download_artifacts(
            artifact_uri=client.get_model_version_download_uri(name, version.version),
            dst_path=str(staging),
            tracking_uri=tracking_uri,
        ))
        where = f"{uri} (version {version.version}, {version.source})"
        sha256 = artifact.verify(local, where=where)
        registered = version.tags.get(WEIGHTS_SHA256)
        if registered and registered != sha256:
            raise ModelIntegrityError(f"{where}: weights sha256 {sha256} matches its model.json but version "
                                      f"{version.version} was registered with weights {registered}; the stored "
                                      f"artifact was replaced, register the model again")
        os.replace(local, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("resolved %s to version %s in %s (weights %s verified)", uri, version.version, dest, sha256[:12])
    return dest


def fetch_model(uri: str, dest: Path, *, tracking_uri: str = "") -> Path:
    """A verified local copy of the model at ``uri``: ``models:/...``, a local path or a gs:// URI."""
    if ModelUri.parse(uri) is not None:
        if not tracking_uri:
            raise ValueError(f"{uri} names a registered model: give the tracking URI of its registry")
        return resolve(uri, dest, tracking_uri=tracking_uri)
    from defectkit import storage

    local = storage.download_tree(uri, Path(dest))
    artifact.verify(local, where=uri)
    return local


def fetch_champion(dest: Path, *, champion_uri: str = "", tracking_uri: str = "",
                   model_name: str = "defectkit") -> str | None:
    """Fetch the model a candidate is judged against into ``dest``; returns where it came from, or None.

    An explicit ``champion_uri`` wins; otherwise the registry's ``champion``
    alias, when a tracking URI is given and the alias exists (a first run has none).
    """
    if champion_uri:
        local = fetch_model(champion_uri, dest, tracking_uri=tracking_uri)
        if local != Path(dest):  # a local champion directory is read in place; the artifact gets a copy
            shutil.copytree(local, dest, dirs_exist_ok=True)
        return champion_uri
    if not tracking_uri:
        return None
    current = champion(RegistryConfig.for_uri(tracking_uri, model_name=model_name))
    if current is None:
        log.info("registered model %s has no %s yet: absolute gates only", model_name, CHAMPION)
        return None
    resolve(current.uri, dest, tracking_uri=tracking_uri)
    return current.uri


def log_decision_record(config: RegistryConfig, run_id: str, record: Mapping[str, Any], markdown: str) -> None:
    """Attach the decision record (JSON and Markdown) to the run of a registered version."""
    from mlflow.exceptions import MlflowException

    client = _client(config.tracking_uri)
    try:
        client.get_run(run_id)
    except MlflowException as exc:
        if _not_found(exc):
            raise LookupError(f"run {run_id!r} not found at {config.tracking_uri}; give the run_id of a "
                              f"registered version (ModelVersionRef.run_id)") from exc
        raise
    client.log_text(run_id, json.dumps(record, indent=2), DECISION_RECORD_JSON)
    client.log_text(run_id, markdown, DECISION_RECORD_MD)


def _client(tracking_uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


@contextmanager
def _unavailable(tracking_uri: str, what: str, left: Callable[[], str]) -> Iterator[None]:
    """Turn "the server did not answer" into :class:`RegistryUnavailable` saying what ``left`` behind."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as exc:
        if not _unreachable(exc):
            raise
        raise RegistryUnavailable(
            f"MLflow tracking server {tracking_uri} did not answer while {what}, after MLflow's retries "
            f"({exc}). State: {left()}. Check that the server is up (restarted on the same store it loses "
            f"nothing), then re-run the step") from exc


def _unreachable(exc: BaseException) -> bool:
    """Whether MLflow gave up on reaching the server (refused, reset, timed out, 5xx after retries)."""
    import requests

    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, (requests.exceptions.RequestException, ConnectionError, TimeoutError)):
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return False


def _fail_run(client, run_id: str) -> None:
    """Mark the run FAILED where the server lets us; the error being raised matters more than this one."""
    from mlflow.exceptions import MlflowException

    try:
        client.set_terminated(run_id, "FAILED")
    except MlflowException as exc:
        log.warning("could not mark run %s FAILED: %s", run_id, exc)


def _check_uploaded(client, run_id: str, model_dir: Path) -> None:
    """The server holds every model file at its full size, before any version can point at them."""
    stored = {Path(f.path).name: f.file_size for f in client.list_artifacts(run_id, MODEL_ARTIFACT_PATH)}
    for name in artifact.model_files(model_dir):
        size = (model_dir / name).stat().st_size
        if stored.get(name) != size:
            raise ModelIntegrityError(f"run {run_id}: {MODEL_ARTIFACT_PATH}/{name} is stored with "
                                      f"{stored.get(name)} bytes, the model has {size}; nothing was registered, "
                                      f"re-run the step")


def _one_version_of_run(client, name: str, run_id: str, created: str) -> str:
    """The one version registered from ``run_id``: the first, when a resent create made more.

    MLflow's client sends a create again when the server committed it but its
    answer was lost; the later copies are deleted before any alias can point at them.
    """
    found = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"))
    if len(found) <= 1:
        return created
    for extra in found[1:]:
        log.warning("%s version %s repeats version %s (both from run %s): deleting it", name, extra, found[0],
                    run_id)
        client.delete_model_version(name, str(extra))
    return str(found[0])


def _not_found(exc: Exception) -> bool:
    return getattr(exc, "error_code", None) == "RESOURCE_DOES_NOT_EXIST"


def _aliases(client, name: str) -> dict[str, str]:
    """alias -> version; versions as strings, which the sqlite store otherwise returns as ints."""
    from mlflow.exceptions import MlflowException

    try:
        aliases = client.get_registered_model(name).aliases
    except MlflowException as exc:
        if _not_found(exc):
            raise LookupError(f"no registered model {name!r} at {client.tracking_uri}; register a version "
                              f"first") from exc
        raise
    return {alias: str(version) for alias, version in aliases.items()}


def _model_version(client, name: str, version: str):
    from mlflow.exceptions import MlflowException

    if not version.isdigit():
        raise ValueError(f"model version {version!r} of {name!r} is not a version number")
    try:
        return client.get_model_version(name, version)
    except MlflowException as exc:
        if _not_found(exc):
            raise LookupError(f"registered model {name!r} has no version {version!r} at "
                              f"{client.tracking_uri}") from exc
        raise


def _ensure_registered_model(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, description="defectkit defect classifiers; aliases: "
                                                         f"{CHALLENGER}, {CHAMPION}, {PREVIOUS_CHAMPION}")
    except MlflowException as exc:
        # Another pipeline may have created it since; either way it exists now.
        if getattr(exc, "error_code", None) != "RESOURCE_ALREADY_EXISTS":
            raise


def _experiment_id(client, config: RegistryConfig) -> str:
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(config.experiment)
    if experiment is None:
        try:
            return client.create_experiment(config.experiment, artifact_location=config.artifact_location or None)
        except MlflowException as exc:
            if getattr(exc, "error_code", None) != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment = client.get_experiment_by_name(config.experiment)
    if experiment.lifecycle_stage != "active":
        raise ValueError(f"MLflow experiment {config.experiment!r} is deleted; restore it "
                         f"(mlflow experiments restore --experiment-id {experiment.experiment_id}) or choose another")
    return experiment.experiment_id


def _ref(version) -> ModelVersionRef:
    return ModelVersionRef(
        name=version.name,
        version=str(version.version),
        run_id=version.run_id or "",
        source=version.source or "",
        aliases=tuple(sorted(version.aliases or ())),
        tags=dict(version.tags or {}),
    )


def _lineage_tags(record: dict, sha256: str, extra: Mapping[str, Any], model_dir: Path) -> dict[str, str]:
    lineage = {
        DATASET_FINGERPRINT: str(record.get("dataset_fingerprint") or ""),
        WEIGHTS_SHA256: sha256,
        CODE_VERSION: str(record.get("code_version") or ""),
        ARCHITECTURE: str(record["architecture"]),
    }
    given = {k: _text(v) for k, v in extra.items() if _text(v)}
    for key, value in given.items():
        if lineage.get(key) and value != lineage[key]:
            raise ValueError(f"tag {key}={value!r} contradicts {model_dir / artifact.METADATA_FILE}, which records "
                             f"{lineage[key]!r}; was this model trained on another dataset?")
    return {k: v for k, v in {**lineage, **given}.items() if v}


def _model_params(record: dict) -> dict[str, str]:
    params = {
        "architecture": str(record["architecture"]),
        "image_size": _text((record.get("preprocess") or {}).get("image_size")),
        "threshold": _text(record.get("threshold")),
        "threshold_policy": _text(record.get("threshold_policy")),
        "classes": ",".join(record.get("classes") or ()),
    }
    config = (record.get("training") or {}).get("config") or {}
    params.update({f"train.{k}": _text(v) for k, v in config.items()})
    return params


def _numeric_metrics(metrics: Mapping[str, Any], prefix: str = "") -> list[tuple[str, float]]:
    """Numbers anywhere in model.json's metrics, nested keys joined with dots (test.image_auroc)."""
    found: list[tuple[str, float]] = []
    for key, value in metrics.items():
        name = _METRIC_NAME_UNSAFE.sub("_", f"{prefix}{key}")
        if isinstance(value, Mapping):
            found += _numeric_metrics(value, f"{name}.")
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            found.append((name, float(value)))
    return found


def _text(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)
