"""Run compiled pipelines: locally through kfp.local, or on a cluster through the KFP API.

Both paths take the committed YAML, so what runs on a laptop is exactly what
users upload to Kubeflow. This is the one home of Kubeflow API client code:
single runs (:func:`submit`), recurring runs (:func:`create_recurring_run`),
and the starter the drift monitor retrains with (:func:`retraining_starter`).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    import kfp

    from defectkit.monitor import RunStarter

log = logging.getLogger(__name__)

PIPELINE_DIR = Path(__file__).resolve().parent
TRAINING_YAML = PIPELINE_DIR / "training.yaml"
MONITOR_YAML = PIPELINE_DIR / "monitor.yaml"
PIPELINE_ROOT_DIR = "pipeline_root"  # under a local run's work dir

_PARAMETER_TYPES = {"STRING": str, "NUMBER_INTEGER": int, "NUMBER_DOUBLE": float, "BOOLEAN": bool}


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
        kind = _PARAMETER_TYPES[declared[key]["parameterType"]]
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
    pipeline = components.load_component_from_file(str(package))
    log.info("running %s locally; artifacts under %s", package.name, pipeline_root)
    task = pipeline(**arguments)
    return LocalRun(dict(task.outputs), pipeline_root)


def run_local_in_process(package: Path, arguments: Mapping[str, Any], work_dir: Path) -> Path:
    """:func:`run_local` in a process of its own (see :func:`main`); returns the run's pipeline root.

    For starting a run from inside a KFP task: the caller may itself be a
    kfp.local task, and kfp.local does not nest in one interpreter.
    """
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    # A KFP task runs with _KFP_RUNTIME=true, under which kfp skips the imports a pipeline run needs.
    env = {k: v for k, v in os.environ.items() if k != "_KFP_RUNTIME"}
    subprocess.run([sys.executable, "-m", "defectkit_kfp.pipelines.run", str(package), str(work_dir),
                    json.dumps(dict(arguments))], check=True, cwd=work_dir, env=env)
    return work_dir / PIPELINE_ROOT_DIR


def _client(host: str, namespace: str | None, existing_token: str | None = None) -> tuple[kfp.Client, dict[str, str]]:
    """A KFP API client for ``host``, and the namespace keyword to pass on to its calls."""
    import kfp

    # kfp.Client treats namespace=None differently from "not given" (multi-user lookup).
    scope = {"namespace": namespace} if namespace else {}
    return kfp.Client(host=host, existing_token=existing_token, **scope), scope


def submit(
    host: str,
    package: Path,
    arguments: dict[str, Any],
    *,
    experiment: str = "defectkit",
    run_name: str | None = None,
    namespace: str | None = None,
    existing_token: str | None = None,
) -> str:
    """Create a run of a compiled pipeline on a Kubeflow Pipelines cluster; returns the run id."""
    client, scope = _client(host, namespace, existing_token)
    result = client.create_run_from_pipeline_package(
        str(package), arguments=arguments, run_name=run_name, experiment_name=experiment, **scope
    )
    log.info("created run %s in experiment %s at %s", result.run_id, experiment, host)
    return result.run_id


def create_recurring_run(host: str, package: Path, cron: str, params: Mapping[str, Any], *,
                         experiment: str = "defectkit", job_name: str = "defectkit-monitor",
                         namespace: str | None = None) -> str:
    """Schedule a compiled pipeline (the monitor) on a KFP cluster, one run at a time; returns the recurring run id.

    ``cron`` has KFP's 6 fields (seconds first).
    """
    if len(cron.split()) != 6:
        raise ValueError(f"cron {cron!r} must have 6 fields (second minute hour day month weekday), "
                         f"e.g. '0 0 * * * *' for hourly")
    client, scope = _client(host, namespace)
    experiment_id = client.create_experiment(experiment, **scope).experiment_id
    job = client.create_recurring_run(experiment_id, job_name, cron_expression=cron, pipeline_package_path=str(package),
                                      params=dict(params), max_concurrency=1)
    log.info("scheduled %s (%s) at %s: recurring run %s", package.name, cron, host, job.recurring_run_id)
    return job.recurring_run_id


def retraining_starter(*, kfp_host: str = "", local_work_dir: Path | None = None, package: Path = TRAINING_YAML,
                       experiment: str = "defectkit", namespace: str | None = None) -> RunStarter | None:
    """How the drift monitor starts a training run: on the KFP cluster at ``kfp_host``, else locally (kfp.local)
    in ``local_work_dir``; None with neither, so that the monitor only records its decision.

    The starter returns the KFP run id, or the local run's pipeline root.
    """
    if kfp_host:
        def on_cluster(arguments: Mapping[str, Any], run_name: str) -> str:
            return submit(kfp_host, package, dict(arguments), experiment=experiment, run_name=run_name,
                          namespace=namespace)

        return on_cluster
    if local_work_dir is not None:
        def on_this_machine(arguments: Mapping[str, Any], run_name: str) -> str:
            # kfp.local names no runs: the work dir tells them apart.
            return str(run_local_in_process(package, arguments, Path(local_work_dir)))

        return on_this_machine
    return None


def main(argv: list[str] | None = None) -> int:
    """``python -m defectkit_kfp.pipelines.run PACKAGE WORK_DIR ARGUMENTS_JSON``: a local run in a process of its own.

    For starting a run from inside a running KFP task (the monitor's local
    retraining), where kfp.local cannot be nested in the same interpreter.
    """
    import argparse

    parser = argparse.ArgumentParser(prog="python -m defectkit_kfp.pipelines.run", description=main.__doc__)
    parser.add_argument("package", type=Path)
    parser.add_argument("work_dir", type=Path)
    parser.add_argument("arguments", help="JSON object of pipeline arguments")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, force=True)
    run = run_local(args.package, json.loads(args.arguments), args.work_dir)
    print(run.pipeline_root)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
