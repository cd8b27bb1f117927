"""Run compiled pipelines: locally through kfp.local, or on a cluster through the KFP API.

Both paths take the committed YAML, so what runs on a laptop is exactly what
users upload to Kubeflow. This is the one home of Kubeflow API client code:
single runs (:func:`submit`), recurring runs (:func:`create_recurring_run`) and
following a run (:func:`follow_run`). On multi-user Kubeflow every call names
the profile namespace and carries a token (:func:`credentials`).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import yaml

if TYPE_CHECKING:
    import kfp
    from kfp.client.token_credentials_base import TokenCredentialsBase

log = logging.getLogger(__name__)

PIPELINE_DIR = Path(__file__).resolve().parent
TRAINING_YAML = PIPELINE_DIR / "training.yaml"
MONITOR_YAML = PIPELINE_DIR / "monitor.yaml"
PRODUCT_LINES_YAML = PIPELINE_DIR / "product_lines.yaml"
PIPELINE_ROOT_DIR = "pipeline_root"  # under a local run's work dir

# Where a Kubeflow pod finds its projected service-account token for the KFP API, as kfp.client looks for it.
TOKEN_PATH_ENV = "KF_PIPELINES_SA_TOKEN_PATH"
DEFAULT_TOKEN_PATH = "/var/run/secrets/kubeflow/pipelines/token"
FINAL_RUN_STATES = frozenset({"SUCCEEDED", "FAILED", "SKIPPED", "CANCELED"})

_PARAMETER_TYPES = {"STRING": str, "NUMBER_INTEGER": int, "NUMBER_DOUBLE": float, "BOOLEAN": bool}
# Given as JSON on the command line: the type, its JSON name and an example.
_JSON_TYPES = {"LIST": (list, "list", '["a", "b"]'), "STRUCT": (dict, "object", '{"a": 1}')}


def pipeline_parameters(package: Path) -> dict[str, dict]:
    """The root inputs a compiled pipeline declares: name -> {parameterType, defaultValue?, description?}."""
    spec = next(yaml.safe_load_all(package.read_text()))
    return dict(spec["root"].get("inputDefinitions", {}).get("parameters", {}))


def parse_arguments(package: Path, pairs: list[str]) -> dict[str, Any]:
    """Turn ``k=v`` strings into typed pipeline arguments, checked against the package's inputs."""
    declared = pipeline_parameters(package)
    arguments: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep:
            raise ValueError(f"parameter {pair!r} is not of the form name=value")
        if key not in declared:
            raise ValueError(f"{package.name} has no parameter {key!r}; it takes: {', '.join(sorted(declared))}")
        declared_type = declared[key]["parameterType"]
        if declared_type in _JSON_TYPES:
            kind, name, example = _JSON_TYPES[declared_type]
            try:
                value = json.loads(raw)
            except json.JSONDecodeError:
                value = None
            if not isinstance(value, kind):
                raise ValueError(f"parameter {key} takes a JSON {name} (e.g. {key}='{example}'), got {raw!r}")
            arguments[key] = value
            continue
        kind = _PARAMETER_TYPES[declared_type]
        if kind is bool:
            if raw.lower() not in ("true", "false"):
                raise ValueError(f"parameter {key} takes true or false, got {raw!r}")
            arguments[key] = raw.lower() == "true"
            continue
        try:
            arguments[key] = kind(raw)
        except ValueError:
            raise ValueError(f"parameter {key} takes a {kind.__name__}, got {raw!r}") from None
    missing = [k for k, v in declared.items() if "defaultValue" not in v and not v.get("isOptional") and k not in arguments]
    if missing:
        raise ValueError(f"{package.name} needs a value for {', '.join(missing)}")
    return arguments


@dataclass(frozen=True)
class LocalRun:
    """Outputs of a pipeline run by kfp.local: parameters as values, artifacts as local paths."""

    outputs: dict[str, Any]
    pipeline_root: Path

    def path(self, name: str) -> Path:
        return Path(self.outputs[name].path)


def with_run_times(pipeline_yaml: str, created: datetime) -> str:
    """The compiled pipeline with its run-time placeholders of creation and scheduled time substituted as the KFP
    backend does for a run created at ``created`` and not scheduled: both are the creation time, RFC 3339.

    kfp.local does not know these placeholders (it fails on them); the fraction of a second is kept so that
    samples taken just before a local run fall inside the window that ends at its creation.
    """
    from kfp import dsl

    if created.tzinfo is None:
        raise ValueError(f"creation time {created} must carry its time zone, e.g. datetime.now(timezone.utc)")
    stamp = created.astimezone(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")
    for placeholder in (dsl.PIPELINE_JOB_CREATE_TIME_UTC_PLACEHOLDER, dsl.PIPELINE_JOB_SCHEDULE_TIME_UTC_PLACEHOLDER):
        pipeline_yaml = pipeline_yaml.replace(placeholder, stamp)
    return pipeline_yaml


def run_local(package: Path, arguments: dict[str, Any], work_dir: Path) -> LocalRun:
    """Run a compiled pipeline in this interpreter with kfp.local's SubprocessRunner."""
    from kfp import components, local

    work_dir.mkdir(parents=True, exist_ok=True)
    # Every kfp.local task leaves a temporary dir behind: keep them inside the work dir.
    tmp = work_dir / "tmp"
    tmp.mkdir(exist_ok=True)
    os.environ["TMPDIR"] = str(tmp)
    tempfile.tempdir = None
    pipeline_root = work_dir / PIPELINE_ROOT_DIR
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root))
    pipeline = components.load_component_from_text(with_run_times(package.read_text(), datetime.now(timezone.utc)))
    log.info("running %s locally; artifacts under %s", package.name, pipeline_root)
    task = pipeline(**arguments)
    return LocalRun(dict(task.outputs), pipeline_root)


def credentials(token_path: str | None = None) -> TokenCredentialsBase | None:
    """The token credentials of KFP's ``ServiceAccountTokenVolumeCredentials``: the token file is read again for
    every call, as the kubelet rotates it.

    The file is ``token_path``, else ``$KF_PIPELINES_SA_TOKEN_PATH``, else the projected token's default path;
    None when neither is given and no token is at the default path (a single-user install or a port-forward).
    """
    from kfp.client.set_volume_credentials import ServiceAccountTokenVolumeCredentials

    path = token_path or os.environ.get(TOKEN_PATH_ENV)
    if path is None:
        if not Path(DEFAULT_TOKEN_PATH).is_file():
            return None
        path = DEFAULT_TOKEN_PATH
    if not Path(path).is_file():
        raise FileNotFoundError(f"no KFP API token at {path}: mount the service-account token there (a PodDefault "
                                f"or projected volume with audience pipelines.kubeflow.org) or give --token-path")
    return ServiceAccountTokenVolumeCredentials(path)


def _client(host: str, namespace: str | None, token_path: str | None) -> tuple[kfp.Client, dict[str, str]]:
    """A KFP API client for ``host``, and the namespace keyword to pass on to its calls."""
    import kfp

    # kfp.Client treats namespace=None differently from "not given" (multi-user lookup).
    scope = {"namespace": namespace} if namespace else {}
    return kfp.Client(host=host, credentials=credentials(token_path), **scope), scope


def submit(
    host: str,
    package: Path,
    arguments: dict[str, Any],
    *,
    experiment: str = "defectkit",
    run_name: str | None = None,
    namespace: str | None = None,
    token_path: str | None = None,
) -> str:
    """Create a run of a compiled pipeline on a Kubeflow Pipelines cluster; returns the run id.

    ``namespace`` is the Kubeflow profile the run belongs to (multi-user clusters); ``token_path`` as in
    :func:`credentials`.
    """
    client, scope = _client(host, namespace, token_path)
    result = client.create_run_from_pipeline_package(
        str(package), arguments=arguments, run_name=run_name, experiment_name=experiment, **scope
    )
    log.info("created run %s in experiment %s at %s", result.run_id, experiment, host)
    return result.run_id


def create_recurring_run(host: str, package: Path, cron: str, params: Mapping[str, Any], *,
                         experiment: str = "defectkit", job_name: str = "defectkit-monitor",
                         namespace: str | None = None, token_path: str | None = None) -> str:
    """Schedule a compiled pipeline (the monitor) on a KFP cluster, one run at a time; returns the recurring run id.

    ``cron`` has KFP's 6 fields (seconds first). Caching is off for the pipeline's own tasks: each run checks
    a new window, and a cache hit would replay an earlier one. (kfp.Client overrides the root DAG's tasks only,
    so the training sub-pipeline keeps its compiled settings: preprocessing a dataset it has seen is still reused.)
    """
    if len(cron.split()) != 6:
        raise ValueError(f"cron {cron!r} must have 6 fields (second minute hour day month weekday), "
                         f"e.g. '0 0 * * * *' for hourly")
    client, scope = _client(host, namespace, token_path)
    experiment_id = client.create_experiment(experiment, **scope).experiment_id
    job = client.create_recurring_run(experiment_id, job_name, cron_expression=cron, pipeline_package_path=str(package),
                                      params=dict(params), max_concurrency=1, enable_caching=False)
    log.info("scheduled %s (%s) at %s: recurring run %s", package.name, cron, host, job.recurring_run_id)
    return job.recurring_run_id


def follow_run(host: str, run_id: str, *, namespace: str | None = None, token_path: str | None = None,
               poll_s: float = 10.0, timeout_s: float = 3600.0, out: TextIO = sys.stdout) -> str:
    """Wait for a KFP run to end, printing each state it passes through to ``out``; returns the final state.

    Raises TimeoutError, naming the last state, when the run has not ended after ``timeout_s``.
    """
    client, _ = _client(host, namespace, token_path)
    deadline = time.monotonic() + timeout_s
    shown = None
    while True:
        run = client.get_run(run_id)
        state = str(run.state)
        if state != shown:
            print(f"run {run_id} ({run.display_name}): {state}", file=out, flush=True)
            shown = state
        if state in FINAL_RUN_STATES:
            return state
        if time.monotonic() >= deadline:
            raise TimeoutError(f"run {run_id} is still {state} after {timeout_s:.0f} s; follow it in the KFP UI "
                               f"or call follow_run again")
        time.sleep(poll_s)
