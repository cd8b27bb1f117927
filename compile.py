"""Compile every pipeline and component to YAML beside its source.

    python compile.py            write the YAML
    python compile.py --check    fail when committed YAML is stale or invalid

Validation is strict: the PipelineSpec, every executor and the PlatformSpec
(with each Kubernetes executor config) are parsed with unknown fields
rejected, and every component and executor a task references must exist.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml
from google.protobuf import json_format
from kfp import compiler
from kfp.kubernetes import kubernetes_executor_config_pb2
from kfp.pipeline_spec import pipeline_spec_pb2

ROOT = Path(__file__).resolve().parent
# components/ and pipelines/ install as defectkit_kfp.components and defectkit_kfp.pipelines (setup.cfg).
PACKAGE = "defectkit_kfp"
log = logging.getLogger("compile")


@dataclass(frozen=True)
class Target:
    module: str
    name: str

    @property
    def yaml_path(self) -> Path:
        """Beside the source: ``defectkit_kfp.pipelines.training`` is ``pipelines/training.py`` in the repository."""
        return ROOT / (self.module.removeprefix(PACKAGE + ".").replace(".", "/") + ".yaml")

    def load(self):
        return getattr(importlib.import_module(self.module), self.name)


TARGETS = (
    Target("defectkit_kfp.pipelines.training", "training_pipeline"),
    Target("defectkit_kfp.pipelines.shipping", "ship_model"),
    Target("defectkit_kfp.pipelines.monitor", "monitor_pipeline"),
    Target("defectkit_kfp.pipelines.product_lines", "product_lines_pipeline"),
    Target("defectkit_kfp.components.fingerprint_source", "fingerprint_source"),
    Target("defectkit_kfp.components.validate_images", "validate_images"),
    Target("defectkit_kfp.components.preprocess_images", "preprocess_images"),
    Target("defectkit_kfp.components.train_model", "train_model"),
    Target("defectkit_kfp.components.evaluate_model", "evaluate_model"),
    Target("defectkit_kfp.components.resolve_champion", "resolve_champion"),
    Target("defectkit_kfp.components.register_model", "register_model"),
    Target("defectkit_kfp.components.deploy_canary", "deploy_canary"),
    Target("defectkit_kfp.components.restore_traffic", "restore_traffic"),
    Target("defectkit_kfp.components.detect_drift", "detect_drift"),
    Target("defectkit_kfp.components.collect_window", "collect_window"),
    Target("defectkit_kfp.components.validate_window", "validate_window"),
    Target("defectkit_kfp.components.decide_retraining", "decide_retraining"),
    Target("defectkit_kfp.components.plan_product_lines", "plan_product_lines"),
    Target("defectkit_kfp.components.record_product_line", "record_product_line"),
    Target("defectkit_kfp.components.summarize_product_lines", "summarize_product_lines"),
)


class InvalidSpec(ValueError):
    pass


def validate_yaml(path: Path) -> None:
    """Strictly parse a compiled pipeline or component YAML; raise InvalidSpec naming the problem."""
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    if not 1 <= len(docs) <= 2:
        raise InvalidSpec(f"{path}: expected a PipelineSpec and an optional PlatformSpec, found {len(docs)} documents")
    spec = pipeline_spec_pb2.PipelineSpec()
    try:
        json_format.ParseDict(docs[0], spec)
    except json_format.ParseError as exc:
        raise InvalidSpec(f"{path}: PipelineSpec: {exc}") from exc

    executors = docs[0].get("deploymentSpec", {}).get("executors", {})
    for label, executor in executors.items():
        try:
            json_format.ParseDict(executor, pipeline_spec_pb2.PipelineDeploymentConfig.ExecutorSpec())
        except json_format.ParseError as exc:
            raise InvalidSpec(f"{path}: executor {label}: {exc}") from exc

    components = dict(spec.components)
    for name, component in components.items():
        if component.executor_label and component.executor_label not in executors:
            raise InvalidSpec(f"{path}: component {name} names missing executor {component.executor_label}")
    dags = [spec.root.dag] + [c.dag for c in components.values() if c.HasField("dag")]
    for dag in dags:
        for task_name, task in dag.tasks.items():
            if task.component_ref.name not in components:
                raise InvalidSpec(f"{path}: task {task_name} names missing component {task.component_ref.name}")

    if len(docs) == 2:
        platform = pipeline_spec_pb2.PlatformSpec()
        try:
            json_format.ParseDict(docs[1], platform)
        except json_format.ParseError as exc:
            raise InvalidSpec(f"{path}: PlatformSpec: {exc}") from exc
        for platform_name, platform_config in docs[1].get("platforms", {}).items():
            for label, config in platform_config.get("deploymentSpec", {}).get("executors", {}).items():
                if label not in executors:
                    raise InvalidSpec(f"{path}: platform {platform_name} configures missing executor {label}")
                try:
                    json_format.ParseDict(config, kubernetes_executor_config_pb2.KubernetesExecutorConfig())
                except json_format.ParseError as exc:
                    raise InvalidSpec(f"{path}: {platform_name} executor {label}: {exc}") from exc


def compile_target(target: Target, out: Path) -> None:
    compiler.Compiler().compile(target.load(), str(out))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare against committed YAML instead of writing")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.path.insert(0, str(ROOT))

    problems = []
    with tempfile.TemporaryDirectory() as scratch:
        for target in TARGETS:
            fresh = Path(scratch) / target.yaml_path.name
            compile_target(target, fresh)
            validate_yaml(fresh)
            rel = target.yaml_path.relative_to(ROOT)
            if not args.check:
                target.yaml_path.write_bytes(fresh.read_bytes())
                log.info("wrote %s", rel)
                continue
            if not target.yaml_path.is_file():
                problems.append(f"{rel} is missing: run `make compile`")
                continue
            try:
                validate_yaml(target.yaml_path)
            except InvalidSpec as exc:
                problems.append(str(exc))
            if target.yaml_path.read_bytes() != fresh.read_bytes():
                problems.append(f"{rel} is stale: its source changed; run `make compile` and commit the YAML")
            else:
                log.info("%s is current", rel)
    for problem in problems:
        log.error(problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
