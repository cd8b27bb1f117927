"""KServe's two deployment modes through the backend, against the Kubernetes API stand-in (tests/kube_api.py).

Knative: canaryTrafficPercent and revisions; Standard: spec.canary, read back from the Gateway API
HTTPRoute; and the places where no canary can happen, refused before anything changes.
"""

from __future__ import annotations

import time
from typing import Callable

import pytest

from defectkit.delivery.kserve import modes
from defectkit.delivery.kserve.api import KubeApi, KubeApiError
from defectkit.delivery.kserve.backend import CanaryUnsupported, KServeBackend, RolloutTimeout
from defectkit.delivery.kserve.canary import canary_name
from defectkit.delivery.kserve.manifest import ServiceConfig
from defectkit.retry import RetryPolicy
from tests.crd import assert_valid
from tests.kube_api import PREFIX, KubeApiStandIn

NAMESPACE, NAME = "ml", "defect"
STABLE_URI, CANDIDATE_URI = "gs://defectkit-models/defect/1", "gs://defectkit-models/defect/2"
CONFIG = ServiceConfig(name=NAME, namespace=NAMESPACE, image="ghcr.io/defectkit/serve:0.1.0", storage_uri=STABLE_URI)
FAST_RETRY = RetryPolicy(attempts=4, initial_delay_s=0.01, max_delay_s=0.05)
STABLE_SERVICE = f"{NAME}-predictor"
CANARY_SERVICE = f"{NAME}-{canary_name(CANDIDATE_URI)}-predictor"


def make_backend(kube: KubeApiStandIn, **kwargs) -> KServeBackend:
    api = KubeApi(kube.url, retry_policy=FAST_RETRY)
    options = {"poll_interval_s": 0.01, "traffic_timeout_s": 3.0, "ready_timeout_s": 3.0, **kwargs}
    return KServeBackend(api, NAMESPACE, NAME, "http://127.0.0.1:9", **options)


def stand_in(**kwargs):
    return KubeApiStandIn(status_delay_s=0.01, **kwargs)


def check(kube: KubeApiStandIn) -> None:
    assert kube.internal_errors == []
    for obj in kube.objects.values():
        assert_valid(obj)


def isvc_patches(kube: KubeApiStandIn) -> list:
    return kube.calls("PATCH", PREFIX)


def predictor_status(kube: KubeApiStandIn, until: Callable[[dict], bool]) -> dict:
    """The predictor's status once the stand-in's controller has caught up (``until`` holds), within 2 s."""
    deadline = time.monotonic() + 2.0
    while True:
        predictor = kube.stored(NAMESPACE, NAME)["status"]["components"]["predictor"]
        if until(predictor) or time.monotonic() > deadline:
            return predictor
        time.sleep(0.01)


# --------------------------------------------------------------------------- which mode


@pytest.mark.parametrize(("default", "expected"), [("Serverless", "Knative"), ("RawDeployment", "Standard"),
                                                   ("Knative", "Knative"), ("Standard", "Standard")])
def test_a_new_service_gets_the_cluster_default_mode(default, expected):
    with stand_in(default_mode=default) as kube:
        backend = make_backend(kube)
        assert backend.ensure_exists(CONFIG) is True
        stored = kube.stored(NAMESPACE, NAME)
        assert stored["status"]["deploymentMode"] == expected
        # Nothing asked for, nothing written: KServe's defaulter annotates a cluster default of Standard
        # (inference_service_defaults.go) and leaves a Knative default unannotated.
        annotation = stored["metadata"].get("annotations", {}).get(modes.ANNOTATION)
        assert annotation == (expected if expected == "Standard" else None)
        assert make_backend(kube).mode() == expected
        check(kube)


def test_the_mode_asked_for_wins_over_the_cluster_default():
    with stand_in(default_mode="Serverless") as kube:
        make_backend(kube, deployment_mode="RawDeployment").ensure_exists(CONFIG)
        assert kube.stored(NAMESPACE, NAME)["status"]["deploymentMode"] == "Standard"
        assert kube.deployments(NAMESPACE, NAME) == {STABLE_SERVICE}


def test_mode_resolution_order():
    api = KubeApi("http://127.0.0.1:9")  # never called while the service says
    annotated = {"metadata": {"annotations": {modes.ANNOTATION: "RawDeployment"}}}
    assert modes.mode_of(annotated, api) == "Standard"
    assert modes.mode_of({**annotated, "status": {"deploymentMode": "Serverless"}}, api) == "Knative"
    with pytest.raises(ValueError, match="'Sideways' is not one of Knative, Standard, ModelMesh"):
        modes.service_mode({"metadata": {"annotations": {modes.ANNOTATION: "Sideways"}}})
    with stand_in(default_mode="RawDeployment") as kube:
        assert modes.mode_of({"metadata": {}}, KubeApi(kube.url)) == "Standard"
        del kube.config_maps[("kserve", "inferenceservice-config")]
        with pytest.raises(ValueError, match="cannot read KServe's default deployment mode.*HTTP 404"):
            modes.cluster_default(KubeApi(kube.url, retry_policy=FAST_RETRY))


def test_the_webhook_keeps_the_mode_and_denies_a_change():
    with stand_in() as kube:
        backend = make_backend(kube)
        backend.ensure_exists(CONFIG)
        with pytest.raises(KubeApiError) as caught:
            backend._patch({"metadata": {"annotations": {modes.ANNOTATION: "Standard"}}})
        assert caught.value.status == 403 and caught.value.reason == "Forbidden"
        assert 'admission webhook "inferenceservice.kserve-webhook-server.validator" denied the request: update ' \
               "rejected: deploymentMode cannot be changed from 'Knative' to 'Standard'" in caught.value.api_message


# --------------------------------------------------------------------------- Standard mode


@pytest.fixture
def standard():
    with stand_in(default_mode="Standard") as kube:
        backend = make_backend(kube)
        backend.ensure_exists(CONFIG)
        yield kube, backend
        check(kube)


def test_standard_canary_is_stepped_through_the_route_weights_and_promoted(standard):
    kube, backend = standard
    backend.deploy_candidate(CANDIDATE_URI)
    assert kube.deployments(NAMESPACE, NAME) == {STABLE_SERVICE, CANARY_SERVICE}
    assert kube.route(NAMESPACE, NAME) == {STABLE_SERVICE: 100, CANARY_SERVICE: 0}
    assert backend.traffic() == 0
    for percent in (10, 50, 100):
        backend.set_traffic(percent)
        assert backend.traffic() == percent
        assert kube.route(NAMESPACE, NAME) == {STABLE_SERVICE: 100 - percent, CANARY_SERVICE: percent}
    stored = kube.stored(NAMESPACE, NAME)
    assert stored["status"]["canaryStatuses"] == [{"name": canary_name(CANDIDATE_URI), "ready": True,
                                                   "trafficPercent": 100}]
    condition = next(c for c in stored["status"]["conditions"] if c["type"] == "CanaryPredictorReady")
    assert (condition["status"], condition["reason"], condition["severity"]) == ("True", "AllCanariesReady", "Info")

    backend.promote()
    stored = kube.stored(NAMESPACE, NAME)
    assert stored["spec"]["predictor"]["name"] == canary_name(CANDIDATE_URI) and stored["spec"]["canary"] == []
    # The canary's Deployment carries on as the stable one; the old stable one is deleted as an orphan.
    assert kube.deployments(NAMESPACE, NAME) == {CANARY_SERVICE}
    assert kube.route(NAMESPACE, NAME) == {CANARY_SERVICE: 1}
    assert backend.traffic() == 100
    assert all(c["type"] != "CanaryPredictorReady" for c in stored["status"]["conditions"])
    # observedGeneration is the Deployment's, so it never caught up with the isvc's generation.
    assert stored["status"]["observedGeneration"] < stored["metadata"]["generation"]


def test_standard_rollback_deletes_the_canary(standard):
    kube, backend = standard
    backend.deploy_candidate(CANDIDATE_URI)
    backend.set_traffic(25)
    backend.rollback()
    assert kube.deployments(NAMESPACE, NAME) == {STABLE_SERVICE}
    assert kube.route(NAMESPACE, NAME) == {STABLE_SERVICE: 1}
    assert backend.traffic() == 0
    assert kube.stored(NAMESPACE, NAME)["spec"]["canary"] == []


def test_a_canary_that_never_gets_ready_gets_no_traffic(standard):
    kube, backend = standard
    kube.failing_uris.add(CANDIDATE_URI)
    with pytest.raises(RolloutTimeout, match="canary .* not ready.*CanaryPredictorReady=False \\(CanariesNotReady"):
        make_backend(kube, ready_timeout_s=0.3).deploy_candidate(CANDIDATE_URI)
    # KServe weights only ready canaries (#5984): the route never saw it.
    assert kube.route(NAMESPACE, NAME) == {STABLE_SERVICE: 100}
    backend.rollback()
    assert backend.traffic() == 0
    # The route never changed, so rollback() returned at once; KServe then deletes the canary as an orphan.
    deadline = time.monotonic() + 2.0
    while kube.deployments(NAMESPACE, NAME) != {STABLE_SERVICE} and time.monotonic() < deadline:
        time.sleep(0.01)
    assert kube.deployments(NAMESPACE, NAME) == {STABLE_SERVICE}


def test_a_route_without_canary_weights_is_never_reported_as_a_split():
    # KServe v0.20.0: spec.canary exists but the HTTPRoute routes only to the stable Service.
    with stand_in(default_mode="Standard", canary_weights=False) as kube:
        backend = make_backend(kube, traffic_timeout_s=0.3)
        backend.ensure_exists(CONFIG)
        backend.deploy_candidate(CANDIDATE_URI)
        with pytest.raises(RolloutTimeout, match=f"HTTPRoute weights: {STABLE_SERVICE} 100%"):
            backend.set_traffic(10)
        # canaryStatuses echoes the spec; the route is the truth.
        assert kube.stored(NAMESPACE, NAME)["status"]["canaryStatuses"][0]["trafficPercent"] == 10
        assert backend.traffic() == 0


@pytest.mark.parametrize(("settings", "message"), [
    ({"gateway_api": False}, "in Standard mode without a Gateway API HTTPRoute defect-predictor.*enableGatewayApi"),
    ({"canary_in_crd": False}, "this cluster's KServe has no spec.canary.*upgrade KServe"),
])
def test_standard_mode_without_a_real_split_is_refused_before_any_change(settings, message):
    with stand_in(default_mode="Standard", **settings) as kube:
        backend = make_backend(kube)
        backend.ensure_exists(CONFIG)
        before = kube.stored(NAMESPACE, NAME)
        with pytest.raises(CanaryUnsupported, match=message):
            backend.deploy_candidate(CANDIDATE_URI)
        assert isvc_patches(kube) == [] and kube.stored(NAMESPACE, NAME) == before


def test_modelmesh_is_refused_before_any_change():
    with stand_in(default_mode="ModelMesh") as kube:
        kube.objects[(NAMESPACE, NAME)] = {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
                                           "metadata": {"name": NAME, "namespace": NAMESPACE,
                                                        "resourceVersion": "1"},
                                           "spec": {"predictor": {}}, "status": {"deploymentMode": "ModelMesh"}}
        with pytest.raises(CanaryUnsupported, match="runs in ModelMesh mode, where KServe has no canary"):
            make_backend(kube).deploy_candidate(CANDIDATE_URI)
        assert isvc_patches(kube) == []
        with stand_in(default_mode="ModelMesh") as empty:
            with pytest.raises(CanaryUnsupported, match="cannot create InferenceService ml/defect in ModelMesh"):
                make_backend(empty).ensure_exists(CONFIG)


def test_the_webhook_denies_a_canary_outside_standard_mode():
    with stand_in() as kube:
        backend = make_backend(kube)
        backend.ensure_exists(CONFIG)
        with pytest.raises(KubeApiError) as caught:
            backend._patch({"spec": {"canary": [{"predictor": {"name": "c1"}, "trafficPercent": 10}]}})
        assert caught.value.status == 403
        assert "denied the request: canary is only supported in Standard deployment mode" in caught.value.api_message


# --------------------------------------------------------------------------- Knative, as KServe does it


def test_knative_revisions_rollout_bookkeeping_and_rewind():
    with stand_in() as kube:
        backend = make_backend(kube)
        backend.ensure_exists(CONFIG)
        backend.deploy_candidate(CANDIDATE_URI)
        backend.set_traffic(30)
        predictor = kube.stored(NAMESPACE, NAME)["status"]["components"]["predictor"]
        revision_1, revision_2 = f"{NAME}-predictor-00001", f"{NAME}-predictor-00002"
        assert (predictor["latestCreatedRevision"], predictor["latestReadyRevision"],
                predictor["latestRolledoutRevision"]) == (revision_2, revision_2, revision_1)
        assert "previousRolledoutRevision" not in predictor
        # Tag routing on: both entries tagged, each with its own URL.
        by_tag = {e["tag"]: e for e in predictor["traffic"]}
        assert by_tag["latest"]["percent"] == 30 and by_tag["prev"]["revisionName"] == revision_1
        assert by_tag["prev"]["url"] == f"http://prev-{NAME}-predictor.{NAMESPACE}.example.com"

        backend.promote()
        predictor = kube.stored(NAMESPACE, NAME)["status"]["components"]["predictor"]
        assert (predictor["latestRolledoutRevision"], predictor["previousRolledoutRevision"]) == \
            (revision_2, revision_1)
        # The documented rollback after a promotion: canary 0 on an unchanged spec rewinds to the previous one.
        backend._patch({"spec": {"predictor": {"canaryTrafficPercent": 0}}})
        predictor = predictor_status(kube, lambda p: p["latestRolledoutRevision"] == revision_1)
        assert predictor["latestRolledoutRevision"] == revision_1
        assert {e["revisionName"]: e["percent"] for e in predictor["traffic"]} == {revision_2: 0, revision_1: 100}
        # An annotation change alone is a new template, hence a new revision.
        backend._patch({"metadata": {"annotations": {"team": "vision"}}})
        revision_3 = f"{NAME}-predictor-00003"
        assert predictor_status(kube, lambda p: p["latestCreatedRevision"] == revision_3)["latestCreatedRevision"] \
            == revision_3
        check(kube)


def test_a_failed_knative_revision_keeps_traffic_on_the_old_one():
    with stand_in() as kube:
        make_backend(kube).ensure_exists(CONFIG)
        kube.failing_uris.add(CANDIDATE_URI)
        with pytest.raises(RolloutTimeout):
            make_backend(kube, ready_timeout_s=0.2).deploy_candidate(CANDIDATE_URI)
        status = kube.stored(NAMESPACE, NAME)["status"]
        conditions = {c["type"]: c for c in status["conditions"]}
        assert (conditions["Ready"]["status"], conditions["Ready"]["reason"]) == ("False", "RevisionFailed")
        assert conditions["IngressReady"]["status"] == "True"
        predictor = status["components"]["predictor"]
        assert predictor["latestCreatedRevision"] == f"{NAME}-predictor-00002"
        assert predictor["latestReadyRevision"] == f"{NAME}-predictor-00001"
        assert sum(e["percent"] for e in predictor["traffic"] if e["revisionName"] == f"{NAME}-predictor-00001") == 100
        check(kube)


def test_the_webhook_denies_an_invalid_name_and_strict_decoding_names_the_field():
    with stand_in() as kube:
        api = KubeApi(kube.url, retry_policy=FAST_RETRY)
        collection = f"{PREFIX}{NAMESPACE}/inferenceservices"
        body = {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
                "metadata": {"name": "1defect"}, "spec": {"predictor": {"containers": [{"name": "kserve-container",
                                                                                        "image": "x:1"}]}}}
        with pytest.raises(KubeApiError) as caught:
            api.request("POST", collection, body=body)
        assert caught.value.status == 403 and 'the InferenceService "1defect" is invalid' in caught.value.api_message
        body["metadata"]["name"], body["spec"]["predictor"]["foo"] = NAME, 1
        with pytest.raises(KubeApiError) as caught:
            api.request("POST", collection, body=body, params={"fieldValidation": "Strict"})
        assert caught.value.status == 400
        assert caught.value.api_message == 'InferenceService in version "v1beta1" cannot be handled as a ' \
                                           'InferenceService: strict decoding error: unknown field "spec.predictor.foo"'
        assert kube.objects == {}
