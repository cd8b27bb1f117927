"""Runs an executor of a compiled pipeline in its container the way the Kubeflow Pipelines launcher does.

What the backend does for a container task, and what is copied here
(github:kubeflow/pipelines, backend/src/v2/driver and component/launcher_v2.go):
- the driver resolves the task's inputs, filling each parameter the task does
  not set from the component's ``defaultValue``, and names the outputs: an
  artifact URI under the pipeline root per output artifact, an ``outputFile``
  of ``/tmp/kfp/outputs/<name>`` per output parameter, and
  ``/tmp/kfp_outputs/output_metadata.json`` for the executor output;
- the launcher replaces ``{{$}}`` in the args with that executor input as
  JSON, makes the parents of the local output paths, runs the container's
  ``command`` (the image's entrypoint replaced, its user kept) and reads the
  executor output file back.
Artifacts of a ``gs://`` pipeline root are found under ``/gcs/<bucket>/...``
in the container (kfp's ``Artifact.path``); here a host directory is mounted
there, in place of the GCS FUSE mount or the launcher's copies.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
PIPELINES = ("training", "shipping", "monitor", "product_lines")
BUCKET = "defectkit-test"
EXECUTOR_OUTPUT = "/tmp/kfp_outputs/output_metadata.json"
PARAMETER_OUTPUTS = "/tmp/kfp/outputs"


@dataclass(frozen=True)
class Executor:
    """One ``deploymentSpec.executors`` entry with the component it executes."""

    pipeline: str
    label: str
    image: str
    command: tuple[str, ...]
    args: tuple[str, ...]
    component: dict = field(hash=False, compare=False)

    @property
    def task(self) -> str:
        return self.label.removeprefix("exec-")


@cache
def executors() -> tuple[Executor, ...]:
    found = []
    for pipeline in PIPELINES:
        spec = next(yaml.safe_load_all((ROOT / "pipelines" / f"{pipeline}.yaml").read_text()))
        components = {c["executorLabel"]: c for c in spec["components"].values() if "executorLabel" in c}
        for label, executor in spec["deploymentSpec"]["executors"].items():
            container = executor["container"]
            found.append(Executor(pipeline, label, container["image"], tuple(container["command"]),
                                  tuple(container["args"]), components[label]))
    return tuple(found)


def executor(pipeline: str, task: str) -> Executor:
    return next(e for e in executors() if e.pipeline == pipeline and e.task == task)


def engine() -> str | None:
    """The container engine the Makefile uses (``DOCKER``), else podman or docker; None when none answers."""
    for name in filter(None, (os.environ.get("DOCKER"), "podman", "docker")):
        path = shutil.which(name)
        if path and subprocess.run([path, "info"], capture_output=True, timeout=60).returncode == 0:
            return path
    return None


def image_present(engine_path: str, image: str) -> bool:
    return subprocess.run([engine_path, "image", "inspect", image], capture_output=True).returncode == 0


# What the Dockerfiles copy that decides behaviour (README.md is only package metadata).
SOURCES = ("setup.cfg", "pyproject.toml", "constraints.txt", "defectkit", "components", "pipelines")
IMAGE_SOURCES = "/opt/defectkit"
_HASH_SOURCES = """
import hashlib, json, pathlib, sys
root = pathlib.Path(sys.argv[1])
found = {}
for name in sys.argv[2:]:
    top = root / name
    for path in [top] if top.is_file() else sorted(top.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            found[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
print(json.dumps(found))
"""


def _source_hashes(root: Path) -> dict[str, str]:
    out = subprocess.run([sys.executable, "-c", _HASH_SOURCES, str(root), *SOURCES], capture_output=True,
                         text=True, check=True).stdout
    return json.loads(out)


@cache
def stale_sources(engine_path: str, image: str) -> tuple[str, ...]:
    """Files of ours that differ between the image and this tree: an image built before a change tests old code."""
    out = subprocess.run([engine_path, "run", "--rm", "--network", "none", "--entrypoint", "python3", image,
                          "-c", _HASH_SOURCES, IMAGE_SOURCES, *SOURCES], capture_output=True, text=True, check=True)
    inside, here = json.loads(out.stdout), _source_hashes(ROOT)
    return tuple(sorted(name for name in inside.keys() | here.keys() if inside.get(name) != here.get(name)))


@dataclass
class Artifact:
    """An artifact as the driver hands it over: its URI, type and metadata."""

    uri: str
    schema_title: str
    metadata: dict

    def as_input(self) -> dict:
        return {"artifacts": [{"name": uuid.uuid4().hex[:8], "type": {"schemaTitle": self.schema_title,
                                                                      "schemaVersion": "0.0.1"},
                               "uri": self.uri, "metadata": self.metadata}]}


@dataclass
class Result:
    returncode: int
    output: str
    parameters: dict
    artifacts: dict[str, Artifact]

    def check(self) -> Result:
        assert self.returncode == 0, f"executor failed ({self.returncode}):\n{self.output[-6000:]}"
        return self


class Launcher:
    """One pipeline run's root: a host directory standing for ``gs://BUCKET``."""

    def __init__(self, engine_path: str, bucket_dir: Path) -> None:
        self.engine = engine_path
        self.bucket_dir = bucket_dir
        self.run_id = uuid.uuid4().hex
        _world_writable(bucket_dir)

    def local(self, uri: str) -> Path:
        return self.bucket_dir / uri.removeprefix(f"gs://{BUCKET}/")

    def executor_input(self, executor: Executor, parameters: dict, artifacts: dict[str, Artifact]) -> dict:
        inputs = executor.component.get("inputDefinitions", {})
        values = {name: spec["defaultValue"] for name, spec in inputs.get("parameters", {}).items()
                  if "defaultValue" in spec}
        values.update(parameters)
        missing = [name for name, spec in inputs.get("parameters", {}).items()
                   if name not in values and not spec.get("isOptional")]
        assert not missing, f"{executor.label}: no value for required parameters {missing}"
        unknown = set(parameters) - set(inputs.get("parameters", {}))
        unknown |= set(artifacts) - set(inputs.get("artifacts", {}))
        assert not unknown, f"{executor.label} has no inputs named {sorted(unknown)}"
        outputs = executor.component.get("outputDefinitions", {})
        task_root = f"gs://{BUCKET}/{executor.pipeline}/{self.run_id}/{executor.task}"
        return {
            "inputs": {"parameterValues": _as_protojson(values),
                       "artifacts": {name: a.as_input() for name, a in artifacts.items()}},
            "outputs": {
                "artifacts": {name: {"artifacts": [{"name": name, "type": spec["artifactType"],
                                                    "uri": f"{task_root}/{name}", "metadata": {}}]}
                              for name, spec in outputs.get("artifacts", {}).items()},
                "parameters": {name: {"outputFile": f"{PARAMETER_OUTPUTS}/{name}"}
                               for name in outputs.get("parameters", {})},
                "outputFile": EXECUTOR_OUTPUT,
            },
        }

    def run(self, executor: Executor, parameters: dict | None = None, artifacts: dict[str, Artifact] | None = None,
            *, mounts: dict[Path, str] | None = None, network: str = "none", timeout: float = 600) -> Result:
        """``network`` is "none" unless the step must reach a stand-in on the host's 127.0.0.1 ("host")."""
        executor_input = self.executor_input(executor, parameters or {}, artifacts or {})
        for spec in executor_input["outputs"]["artifacts"].values():
            parent = self.local(spec["artifacts"][0]["uri"]).parent
            parent.mkdir(parents=True, exist_ok=True)
            _world_writable(parent)
        scratch = self.bucket_dir.parent / f"pod-{executor.task}-{uuid.uuid4().hex[:6]}"
        executor_dir, parameter_dir = scratch / "kfp_outputs", scratch / "kfp_parameters"
        for d in (executor_dir, parameter_dir):
            d.mkdir(parents=True)
            _world_writable(d)
        volumes = {self.bucket_dir: f"/gcs/{BUCKET}", executor_dir: os.path.dirname(EXECUTOR_OUTPUT),
                   parameter_dir: PARAMETER_OUTPUTS, **(mounts or {})}
        args = [a.replace("{{$}}", json.dumps(executor_input)) for a in executor.args]
        # Kubernetes' `command` replaces the entrypoint; docker takes only its first word as one.
        entrypoint, *command = executor.command
        cmd = [self.engine, "run", "--rm", "--network", network, "--entrypoint", entrypoint]
        for host, container in volumes.items():
            cmd += ["-v", f"{host}:{container}"]
        proc = subprocess.run([*cmd, executor.image, *command, *args], capture_output=True, text=True,
                              timeout=timeout)
        output_file = executor_dir / os.path.basename(EXECUTOR_OUTPUT)
        executor_output = json.loads(output_file.read_text()) if output_file.is_file() else {}
        produced = {}
        for name, spec in executor_input["outputs"]["artifacts"].items():
            artifact = spec["artifacts"][0]
            written = executor_output.get("artifacts", {}).get(name, {}).get("artifacts", [{}])[0]
            produced[name] = Artifact(artifact["uri"], artifact["type"]["schemaTitle"],
                                      written.get("metadata", {}))
        return Result(proc.returncode, proc.stdout + proc.stderr, executor_output.get("parameterValues", {}), produced)


def _as_protojson(value):
    """Numbers as the Go launcher writes them: parameter values are protobuf doubles, and protojson
    writes a whole one without a fraction (2.0 as ``2``), so an integer parameter arrives as an int."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e21:
        return int(value)
    if isinstance(value, dict):
        return {k: _as_protojson(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_as_protojson(v) for v in value]
    return value


def readable(tree: Path) -> None:
    """Lets the image's user read what the host wrote (our writers create files as 0600)."""
    for path in [tree, *tree.rglob("*")]:
        path.chmod(path.stat().st_mode | (0o555 if path.is_dir() else 0o444))


def _world_writable(path: Path) -> None:
    """The image runs as its own non-root user, whose uid the host does not know; rootless engines remap it."""
    path.chmod(0o777)
