"""One source for the training defaults: the components and the pipeline say what the core's configuration says.

KFP embeds a component's source in the YAML, so its defaults must be literals;
these tests hold them to ``TrainConfig`` and ``PreprocessSpec``.
"""

from __future__ import annotations

import dataclasses

import pytest

from defectkit.preprocess import PreprocessSpec
from defectkit.train import TrainConfig
from defectkit_kfp.components.preprocess_images import preprocess_images
from defectkit_kfp.components.train_model import train_model
from defectkit_kfp.pipelines.training import training_pipeline

CORE_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)} | {
    "image_size": PreprocessSpec().image_size}


def _defaults(component) -> dict:
    return {name: spec.default for name, spec in component.component_spec.inputs.items() if spec.default is not None}


@pytest.mark.parametrize("component", [train_model, preprocess_images, training_pipeline], ids=lambda c: c.name)
def test_defaults_are_the_core_defaults(component):
    shared = {name: value for name, value in _defaults(component).items() if name in CORE_DEFAULTS}
    assert shared, f"{component.name} shares no training setting with the core"
    assert shared == {name: CORE_DEFAULTS[name] for name in shared}
