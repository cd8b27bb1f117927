"""One source for the training and gate defaults: the components and the pipelines say what the core's
configuration says.

KFP embeds a component's source in the YAML, so its defaults must be literals;
these tests hold them to ``TrainConfig``, ``PreprocessSpec`` and ``Gates``.
"""

from __future__ import annotations

import dataclasses

import pytest

from defectkit.evaluation import Gates
from defectkit.preprocess import PreprocessSpec
from defectkit.train import TrainConfig
from defectkit_kfp.components.deploy_canary import deploy_canary
from defectkit_kfp.components.evaluate_model import evaluate_model
from defectkit_kfp.components.preprocess_images import preprocess_images
from defectkit_kfp.components.train_model import train_model
from defectkit_kfp.pipelines.monitor import monitor_pipeline
from defectkit_kfp.pipelines.product_lines import product_lines_pipeline
from defectkit_kfp.pipelines.shipping import release_if_approved, ship_model
from defectkit_kfp.pipelines.training import training_pipeline

CORE_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)} | {
    "image_size": PreprocessSpec().image_size}


def _defaults(component) -> dict:
    return {name: spec.default for name, spec in component.component_spec.inputs.items() if spec.default is not None}


GATE_DEFAULTS = {f.name: f.default for f in dataclasses.fields(Gates)}


@pytest.mark.parametrize("component", [train_model, preprocess_images, training_pipeline, product_lines_pipeline],
                         ids=lambda c: c.name)
def test_defaults_are_the_core_defaults(component):
    shared = {name: value for name, value in _defaults(component).items() if name in CORE_DEFAULTS}
    assert shared, f"{component.name} shares no training setting with the core"
    assert shared == {name: CORE_DEFAULTS[name] for name in shared}


@pytest.mark.parametrize("component", [evaluate_model, training_pipeline, monitor_pipeline, product_lines_pipeline],
                         ids=lambda c: c.name)
def test_gate_defaults_are_the_core_defaults(component):
    shared = {name: value for name, value in _defaults(component).items() if name in GATE_DEFAULTS}
    assert {"min_auroc", "max_auroc_drop", "max_f1_drop"} <= set(shared)
    assert shared == {name: GATE_DEFAULTS[name] for name in shared}


@pytest.mark.parametrize("pipeline", [ship_model, release_if_approved, training_pipeline, product_lines_pipeline],
                         ids=lambda p: p.name)
def test_delivery_defaults_are_deploy_canarys(pipeline):
    """What a pipeline passes to deploy_canary defaults as deploy_canary does (``kserve_`` or ``canary_`` prefixed
    or not; the training settings of the same name aside)."""
    component = _defaults(deploy_canary)

    def target(name: str) -> str:
        return name.removeprefix("kserve_").removeprefix("canary_")

    shared = {name: value for name, value in _defaults(pipeline).items()
              if target(name) in component and name not in CORE_DEFAULTS and target(name) != "serve_image"}
    assert {"kserve_min_replicas", "kserve_scale_metric", "approval_before", "canary_steps"} <= set(shared)
    assert shared == {name: component[target(name)] for name in shared}
