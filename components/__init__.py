"""Kubeflow Pipelines components: one verb per module, thin wrappers over defectkit."""
