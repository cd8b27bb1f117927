from kfp import dsl

from defectkit_kfp.components.images import DEPLOY_IMAGE


@dsl.component(base_image=DEPLOY_IMAGE, install_kfp_package=False)
def restore_traffic(
    tracking_uri: str = "",
    registered_model: str = "defectkit",
    backend: str = "kserve",
    work_dir: str = "runs",
    namespace: str = "default",
    service_name: str = "defectkit",
    prometheus_url: str = "",
    kube_api_url: str = "",
) -> bool:
    """Give the stable model all traffic back if a canary delivery stopped half-way; the pipeline's exit handler.

    Reads the delivery state deploy_canary keeps: in work_dir for the local backend, in a
    ConfigMap beside the InferenceService for kserve (so this runs in any pod). A delivery that finished
    (promoted or rolled back), or none at all, is left alone; an unfinished one is rolled
    back, its version tagged canary=rolled_back and its decision record logged. Returns
    whether traffic was moved back. Pass the same backend settings as to deploy_canary,
    and turn caching off for this task.

    Args:
        tracking_uri: MLflow tracking URI of the registry; empty skips the registry tag and record.
        registered_model: Registered model name in MLflow.
        backend: local or kserve, as given to deploy_canary.
        work_dir: The work directory given to deploy_canary (the local backend's delivery state; the decision record).
        namespace: Kubernetes namespace of the InferenceService (kserve backend).
        service_name: InferenceService name (kserve backend).
        prometheus_url: Prometheus URL, as given to deploy_canary (kserve backend).
        kube_api_url: Kubernetes API URL (kserve backend); empty means in-cluster credentials or the kubeconfig.
    """
    import logging

    from defectkit.delivery import rollout

    logging.basicConfig(level=logging.INFO, force=True)
    config = rollout.DeliveryConfig(
        backend=backend,
        work_dir=work_dir,
        tracking_uri=tracking_uri or None,
        registered_model=registered_model,
        namespace=namespace,
        service_name=service_name,
        prometheus_url=prometheus_url or None,
        api_url=kube_api_url or None,
    )
    return rollout.restore(config, reason="the pipeline run ended before the delivery finished")
