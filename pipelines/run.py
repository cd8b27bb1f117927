"""Run compiled pipelines: locally through kfp.local, or on a cluster through the KFP API.

Both paths take the committed YAML, so what runs on a laptop is exactly what
users upload to Kubeflow.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

PIPELINE_DIR = Path(__file__).resolve().parent
TRAINING_YAML = PIPELINE_DIR / "training.yaml"
MONITOR_YAML = PIPELINE_DIR / "monitor.yaml"

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
    pipeline_root = work_dir / "pipeline_root"
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root))
    pipeline = components.load_component_from_file(str(package))
    log.info("running %s locally; artifacts under %s", package.name, pipeline_root)
    task = pipeline(**arguments)
    return LocalRun(dict(task.outputs), pipeline_root)


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
    import kfp

    # kfp.Client treats namespace=None differently from "not given" (multi-user lookup).
    scope = {"namespace": namespace} if namespace else {}
    client = kfp.Client(host=host, existing_token=existing_token, **scope)
    result = client.create_run_from_pipeline_package(
        str(package), arguments=arguments, run_name=run_name, experiment_name=experiment, **scope
    )
    log.info("created run %s in experiment %s at %s", result.run_id, experiment, host)
    return result.run_id


def main(argv: list[str] | None = None) -> int:
    """``python -m defectkit_kfp.pipelines.run PACKAGE WORK_DIR ARGUMENTS_JSON``: a local run in a process of its own.

    For starting a run from inside a running KFP task (the monitor's local
    retraining), where kfp.local cannot be nested in the same interpreter.
    """
    import argparse
    import json

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
