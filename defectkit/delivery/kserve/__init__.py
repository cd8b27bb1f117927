"""The KServe backend: one InferenceService on a Kubernetes cluster.

- :mod:`~defectkit.delivery.kserve.api`: ``KubeApi``, the Kubernetes REST client, and its errors;
- :mod:`~defectkit.delivery.kserve.manifest`: InferenceService manifests;
- :mod:`~defectkit.delivery.kserve.modes`: KServe's deployment modes (Knative, Standard) and how a service's is found;
- :mod:`~defectkit.delivery.kserve.canary`: the changes a canary makes to a live InferenceService;
- :mod:`~defectkit.delivery.kserve.prometheus`: the canary's metrics from Prometheus (PromQL);
- :mod:`~defectkit.delivery.kserve.state`: the rollout state in a ConfigMap beside the InferenceService;
- :mod:`~defectkit.delivery.kserve.backend`: ``KServeBackend``, the delivery Backend over one InferenceService.
"""
