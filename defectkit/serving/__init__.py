"""Serving a defect model: a KServe predictor over the Open Inference Protocol v2.

- :mod:`defectkit.serving.predictor`: ``DefectPredictor`` (a ``kserve.Model``) and ``ServingConfig``;
- :mod:`defectkit.serving.server`: ``serve(...)``, what ``defectkit serve`` runs;
- :mod:`defectkit.serving.protocol`, ``batching``, ``breaker``, ``faults``, ``metrics``: its parts.

Nothing is imported here, so that the metric names can be read (by the delivery
backends, in an image without torch) without loading the server.
"""
