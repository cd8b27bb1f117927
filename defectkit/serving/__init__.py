"""Serving a defect model: a KServe predictor over the Open Inference Protocol v2.

- :mod:`defectkit.serving.predictor`: ``DefectPredictor`` (a ``kserve.Model``) and ``ServingConfig``;
- :mod:`defectkit.serving.server`: ``serve(...)``, the ``defectkit serve`` command (``add_commands``);
- :mod:`defectkit.serving.protocol`, ``batching``, ``breaker``, ``faults``, ``metrics``: its parts.

Nothing heavy is imported here, so the command line can register ``serve``
without loading kserve or torch.
"""

from __future__ import annotations

from defectkit.serving.server import add_commands, serve

__all__ = ["add_commands", "serve"]
