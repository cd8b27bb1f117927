"""InferenceService manifests and canary patches, checked against the KServe CRD as strictly as kubectl would."""

from __future__ import annotations

import copy
import dataclasses
import itertools

import pytest
import yaml

from defectkit.delivery.kserve.manifest import (
    CONTAINER_NAME,
    MODEL_MOUNT,
    STORAGE_URI_ENV,
    ServiceConfig,
    build_inference_service,
    parse_quantity,
)
from defectkit.delivery.kserve.names import MAX_NAME_LENGTH
from defectkit.serving.server import ServingOptions
from defectkit.cli import build_parser, main
from defectkit.delivery.kserve.canary import (
    patch_for_canary,
    patch_for_promotion,
    patch_for_rollback,
    patch_for_traffic,
    storage_uri_of,
)
from tests.crd import assert_valid, crd_schema, object_problems, patch_problems, schema_errors, unknown_fields
from tests.kube_api import merge_patch

IMAGE = "ghcr.io/defectkit/serve:0.1.0"
STABLE_URI = "gs://defectkit-models/defect/1"
CANDIDATE_URI = "gs://defectkit-models/defect/2"
PREVIOUS_URI = "s3://defectkit-models/defect/0"
# Every serving option away from its default; a new option must be added here to be tested.
NON_DEFAULT_SERVING = {
    "device": "cuda:0", "precision": "bf16", "runtime": "onnxruntime", "threads": 3, "max_batch": 16, "max_wait_ms": 2.5, "batch_workers": 2,
    "timeout_s": 0.75, "max_body_mb": 32.0, "max_images": 8, "max_pixels": 4_000_000, "access_log": True,
    "sample_rate": 0.05, "sample_uri": "gs://defectkit-samples/prod", "sample_seed": 7, "breaker_failures": 9,
    "breaker_window_s": 60.0, "breaker_cooldown_s": 2.5, "fault_error_rate": 0.25, "fault_latency_ms": 40.0,
    "fault_score_shift": -0.1, "fault_duration_s": 90.0, "fault_seed": 11,
}
# The serve options the manifest sets from ServiceConfig itself rather than from ServingOptions.
MANIFEST_SET = {"model", "port", "host", "served_name", "fallback"}
# The registry's address serves models:/ URIs only; a pod gets its models from object storage, and the
# serve image carries no MLflow.
NOT_FOR_A_POD = {"tracking_uri"}


def config(**overrides) -> ServiceConfig:
    return ServiceConfig(**{"name": "defect", "namespace": "ml", "image": IMAGE, "storage_uri": STABLE_URI,
                            **overrides})


def as_stored(manifest: dict) -> dict:
    """The manifest as the API server returns it once created."""
    stored = copy.deepcopy(manifest)
    stored["metadata"] |= {"uid": "4f0c", "generation": 1, "resourceVersion": "1001",
                           "creationTimestamp": "2026-01-01T00:00:00Z"}
    return stored


def predictor(obj: dict) -> dict:
    return obj["spec"]["predictor"]


def container(obj: dict) -> dict:
    (only,) = predictor(obj)["containers"]
    return only


OPTIONS = list(itertools.product(
    (None, 0, 30),                                   # canary traffic percent
    (0, 2),                                          # GPUs
    (None, "defectkit-serve"),                       # service account
    ((), (("LOG_LEVEL", "debug"), ("OMP_NUM_THREADS", "2"))),  # extra env
    (0, 1),                                          # min replicas (0: scale to zero)
))


@pytest.mark.parametrize(("canary", "gpu", "service_account", "env", "min_replicas"), OPTIONS)
def test_every_manifest_and_patch_result_is_valid(canary, gpu, service_account, env, min_replicas):
    cfg = config(canary_traffic_percent=canary, gpu=gpu, service_account=service_account, env=env,
                 min_replicas=min_replicas)
    manifest = build_inference_service(cfg)
    assert_valid(manifest)

    spec = predictor(manifest)
    assert ("canaryTrafficPercent" in spec) == (canary is not None)
    assert spec.get("canaryTrafficPercent") == canary
    assert spec["minReplicas"] == min_replicas and spec["maxReplicas"] == cfg.max_replicas
    assert spec.get("serviceAccountName") == service_account
    serving = container(manifest)
    assert serving["name"] == CONTAINER_NAME
    assert serving["command"] + serving["args"] == [
        "defectkit", "serve", "--model", "/mnt/models", "--port", "8080", "--host", "0.0.0.0", "--served-name", "defectkit"]
    assert serving["env"] == [{"name": STORAGE_URI_ENV, "value": STABLE_URI}] + [
        {"name": k, "value": v} for k, v in env]
    assert serving["resources"]["limits"].get("nvidia.com/gpu") == (str(gpu) if gpu else None)
    assert storage_uri_of(manifest) == STABLE_URI

    live = as_stored(manifest)
    for patch in (patch_for_canary(live, CANDIDATE_URI, 0), patch_for_canary(live, CANDIDATE_URI, 10),
                  patch_for_traffic(50), patch_for_promotion(), patch_for_rollback()):
        unknown, errors = patch_problems(patch)
        assert not unknown and not errors, (patch, unknown, errors)
        assert_valid(merge_patch(live, patch))

    canaried = merge_patch(live, patch_for_canary(live, CANDIDATE_URI, 10))
    assert storage_uri_of(canaried) == CANDIDATE_URI
    assert predictor(canaried)["canaryTrafficPercent"] == 10
    # The model moves, and the model it replaces becomes its fallback (the previous champion answers while
    # the candidate's breaker is open); the rest of the container (image, env, resources) is kept as it was.
    assert {k: v for k, v in container(canaried).items() if k not in ("env", "args")} == \
        {k: v for k, v in serving.items() if k not in ("env", "args")}
    assert container(canaried)["args"] == serving["args"] + ["--fallback", STABLE_URI]
    assert container(canaried)["env"][1:] == serving["env"][1:]
    # The next candidate after a promotion falls back to the promoted model, replacing the old fallback.
    promoted_live = as_stored(merge_patch(canaried, patch_for_promotion()))
    again = merge_patch(promoted_live, patch_for_canary(promoted_live, "gs://bucket/models/defect/3", 0))
    assert container(again)["args"].count("--fallback") == 1 and container(again)["args"][-1] == CANDIDATE_URI
    # After a Knative rollback the spec still names the rolled-back model: the next one falls back to the
    # stable model, not to it.
    rolled_back = as_stored(merge_patch(canaried, patch_for_rollback()))
    after = merge_patch(rolled_back, patch_for_canary(rolled_back, "gs://bucket/models/defect/3", 0))
    assert container(after)["args"][-2:] == ["--fallback", STABLE_URI]
    promoted = merge_patch(canaried, patch_for_promotion())
    assert "canaryTrafficPercent" not in predictor(promoted)
    assert predictor(merge_patch(canaried, patch_for_rollback()))["canaryTrafficPercent"] == 0


@pytest.mark.parametrize("prometheus", [True, False])
@pytest.mark.parametrize("tag_routing", [True, False])
def test_annotations_for_scraping_and_tag_routing(prometheus, tag_routing):
    manifest = build_inference_service(config(prometheus_scraping=prometheus, tag_routing=tag_routing, port=9000))
    assert_valid(manifest)
    annotations = manifest["metadata"].get("annotations", {})
    pod_annotations = predictor(manifest).get("annotations", {})
    assert (annotations.get("serving.kserve.io/enable-tag-routing") == "true") == tag_routing
    assert "serving.kserve.io/enable-prometheus-scraping" not in annotations
    if prometheus:
        assert pod_annotations["serving.kserve.io/enable-prometheus-scraping"] == "false"
        assert {k: pod_annotations[k] for k in ("prometheus.io/scrape", "prometheus.io/port", "prometheus.io/path")} \
            == {"prometheus.io/scrape": "true", "prometheus.io/port": "9000", "prometheus.io/path": "/metrics"}
    else:
        assert not pod_annotations
    assert container(manifest)["ports"] == [{"containerPort": 9000, "name": "http1", "protocol": "TCP"}]
    assert container(manifest)["readinessProbe"]["httpGet"] == {"path": "/v2/models/defectkit/ready", "port": 9000}


def test_manifest_is_camel_case_json():
    manifest = build_inference_service(config())
    text = yaml.safe_dump(manifest)
    for snake in ("canary_traffic_percent", "min_replicas", "container_port", "api_version", "service_account"):
        assert snake not in text
    assert manifest["apiVersion"] == "serving.kserve.io/v1beta1" and manifest["kind"] == "InferenceService"


@pytest.mark.parametrize(("path", "typo"), [
    (("spec", "predictor"), "canaryTrafficPercentt"),
    (("spec", "predictor", "containers", 0), "envv"),
    (("spec", "predictor", "containers", 0, "resources"), "limit"),
    (("spec",), "predicter"),
    (("metadata",), "annotation"),
])
def test_strict_check_catches_typos_that_the_schema_alone_lets_through(path, typo):
    manifest = build_inference_service(config())
    node = manifest
    for key in path:
        node = node[key]
    node[typo] = 10
    unknown, errors = object_problems(manifest)
    dotted = ".".join(f"[{k}]" if isinstance(k, int) else k for k in path).replace(".[", "[")
    assert unknown == [f"{dotted}.{typo}"]
    # The CRD leaves additionalProperties unset, so jsonschema on its own accepts the typo.
    assert schema_errors({k: v for k, v in manifest.items() if k != "metadata"}, crd_schema()) == []
    assert errors == []


def test_strict_check_catches_typos_in_patches():
    unknown, _ = patch_problems({"spec": {"predictor": {"canaryTrafficPercentt": None, "canaryTrafficPercnt": 5}}})
    assert unknown == ["spec.predictor.canaryTrafficPercnt"]


def test_strict_walker_honours_open_schemas():
    schema = crd_schema()
    status = {"observedGeneration": 2, "anythingTheControllerAdds": {"x": 1},
              "components": {"predictor": {"traffic": [{"revisionName": "r", "percent": 5}]}}}
    # status preserves unknown fields; components is a map (additionalProperties) of declared objects.
    assert unknown_fields({"status": status}, schema) == []
    # The preserve flag is not inherited: declared objects below it are still pruned, as by the API server.
    status["components"]["predictor"]["trafic"] = []
    assert unknown_fields({"status": status}, schema) == ["status.components.predictor.trafic"]
    resources = {"limits": {"cpu": 2, "example.com/fpga": "1"}}
    limits = {"spec": {"predictor": {"containers": [{"name": "c", "resources": resources}]}}}
    assert unknown_fields(limits, schema) == []  # int-or-string quantities in an open map


@pytest.mark.parametrize(("edit", "message"), [
    (lambda m: predictor(m).update(canaryTrafficPercent="10"), "is not of type 'integer'"),
    (lambda m: container(m).pop("name"), "'name' is a required property"),
    (lambda m: container(m)["resources"]["limits"].update(memory="4 GB"), "does not match"),
    (lambda m: predictor(m).update(scaleMetric="gpu"), "is not one of"),
    (lambda m: m["metadata"]["labels"].update(tier=3), "is not of type 'string'"),
])
def test_schema_violations_are_reported(edit, message):
    manifest = build_inference_service(config())
    edit(manifest)
    unknown, errors = object_problems(manifest)
    assert unknown == []
    assert any(message in e for e in errors), errors


@pytest.mark.parametrize("mode, metric, target, min_replicas", [
    ("Knative", "concurrency", 4, 0),  # scale to zero on requests in flight
    ("Knative", "rps", 50, 1),
    ("Knative", "cpu", 70, 1),
    ("Standard", "cpu", 80, 1),
    ("Standard", "memory", 75, 2),
    ("", "", None, 1),  # the platform's own autoscaling
])
def test_autoscaling_settings_are_valid_for_the_crd_in_each_mode(mode, metric, target, min_replicas):
    manifest = build_inference_service(config(deployment_mode=mode, scale_metric=metric, scale_target=target,
                                              min_replicas=min_replicas, max_replicas=5))
    assert_valid(manifest)
    spec = predictor(manifest)
    assert spec.get("scaleMetric") == (metric or None) and spec.get("scaleTarget") == target
    assert (spec["minReplicas"], spec["maxReplicas"]) == (min_replicas, 5)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"name": "Defect"}, "InferenceService name"),
    ({"name": "1defect"}, "starting with a letter"),
    ({"name": "d" * (MAX_NAME_LENGTH + 1)}, f"at most {MAX_NAME_LENGTH}"),
    ({"namespace": "ML_team"}, "namespace"),
    ({"image": "ghcr.io/defectkit/serve"}, "explicit tag"),
    ({"image": "ghcr.io/defectkit/serve:latest"}, ":latest"),
    ({"image": "localhost:5000/serve"}, "explicit tag"),
    ({"storage_uri": "https://bucket/model"}, "gs://bucket/prefix or s3://bucket/prefix"),
    ({"storage_uri": "/mnt/models"}, "gs://bucket/prefix or s3://bucket/prefix"),
    ({"storage_uri": "gs://AB/model"}, "invalid bucket"),
    ({"storage_uri": "s3://my_bucket/model"}, "invalid bucket"),
    ({"storage_uri": "gs://bucket//model"}, "empty path segment"),
    ({"canary_traffic_percent": 101}, "0 to 100"),
    ({"canary_traffic_percent": -1}, "0 to 100"),
    ({"canary_traffic_percent": True}, "0 to 100"),
    ({"cpu_request": "4", "cpu_limit": "2"}, "exceeds its limit"),
    ({"memory_request": "3Gi", "memory_limit": "3000Mi"}, "exceeds its limit"),
    ({"memory_limit": "lots"}, "not a Kubernetes quantity"),
    ({"gpu": -1}, "gpu"),
    ({"min_replicas": 3, "max_replicas": 2}, "min <= max"),
    ({"max_replicas": 0, "min_replicas": 0}, "max >= 1"),
    ({"port": 8012}, "Knative reserves"),
    ({"scale_metric": "latency"}, "scale metric 'latency' is not one of concurrency, rps, cpu, memory"),
    ({"scale_target": 0}, "scale target 0"),
    ({"deployment_mode": "Standard", "scale_metric": "rps"}, "needs Knative's autoscaler"),
    ({"deployment_mode": "RawDeployment", "min_replicas": 0}, "scale to zero"),
    ({"service_account": "Serve_Account"}, "service account"),
    ({"env": (("STORAGE_URI", "gs://x/y"),)}, "storage_uri"),
    ({"env": (("A", "1"), ("A", "2"))}, "repeat"),
    ({"env": (("1A", "x"),)}, "environment variable name"),
    ({"served_name": "de fect"}, "served name"),
    ({"fallback_uri": "/models/previous"}, "fallback URI '/models/previous' must be a gs://"),
    ({"fallback_uri": STABLE_URI + "/"}, "the served model itself"),
    ({"deployment_mode": "Raw"}, "deployment mode 'Raw' is not one of Knative, Standard"),
    ({"deployment_mode": "standard"}, "deployment mode"),
    ({"deployment_mode": "ModelMesh"}, "ServingRuntimes only"),
    ({"storage_secret": "MinIO creds"}, "storage secret"),
    ({"serving": ServingOptions(sample_rate=0.1, sample_uri="/var/samples")}, "must be a gs:// or s3:// URI"),
    ({"serving": ServingOptions(device="cuda")}, "needs a GPU"),
    ({"serving": {"max_batch": 4}}, "must be a ServingOptions"),
])
def test_config_refuses_what_the_cluster_would(overrides, message):
    with pytest.raises(ValueError, match=message):
        config(**overrides)


def test_config_accepts_digests_and_registry_ports():
    config(image="localhost:5000/serve:0.1.0")
    config(image="ghcr.io/defectkit/serve@sha256:" + "a" * 64)
    config(storage_uri="gs://defectkit-models")
    config(storage_uri="s3://mlflow/1/abc/artifacts/model")


@pytest.mark.parametrize(("overrides", "message"), [
    ({"max_batch": 0}, "batching max_batch=0"),
    ({"max_wait_ms": -1.0}, "max_wait_ms"),
    ({"breaker_failures": 0}, "breaker failures=0"),
    ({"fault_error_rate": 1.5}, "fault error_rate=1.5"),
    ({"sample_rate": 0.5}, "needs a storage URI"),
    ({"sample_rate": 2.0, "sample_uri": "gs://b/s"}, "between 0 and 1"),
    ({"precision": "fp16"}, "precision 'fp16' is not one of auto, fp32, bf16"),
    ({"device": "gpu"}, "device 'gpu'"),
    ({"threads": -1}, "threads=-1"),
    ({"timeout_s": 0.0}, "timeout_s=0.0"),
    ({"max_body_mb": float("inf")}, "max_body_mb=inf"),
    ({"max_images": 0}, "max_images=0"),
    ({"max_pixels": 0}, "max_pixels=0"),
])
def test_serving_options_refuse_what_the_server_would(overrides, message):
    with pytest.raises(ValueError, match=message):
        ServingOptions(**overrides)


def _parsed_container(manifest: dict):
    serving = container(manifest)
    assert serving["command"] == ["defectkit", "serve"]
    return build_parser().parse_args(serving["command"][1:] + serving["args"])


def test_every_serve_option_reaches_the_container_and_round_trips_through_the_serve_parser():
    fields = {field.name for field in dataclasses.fields(ServingOptions)}
    assert set(NON_DEFAULT_SERVING) == fields
    defaults = ServingOptions()
    assert all(getattr(defaults, name) != value for name, value in NON_DEFAULT_SERVING.items())
    serving = ServingOptions(**NON_DEFAULT_SERVING)
    cfg = config(serving=serving, fallback_uri=PREVIOUS_URI, gpu=1, port=9000, served_name="bolts")
    manifest = build_inference_service(cfg)
    assert_valid(manifest)
    parsed = _parsed_container(manifest)
    assert ServingOptions.from_namespace(parsed) == serving
    assert (parsed.model, parsed.port, parsed.host, parsed.served_name, parsed.fallback, parsed.tracking_uri) == \
        (MODEL_MOUNT, 9000, "0.0.0.0", "bolts", PREVIOUS_URI, None)
    # Every option of `defectkit serve` is either a serving option or set by the manifest itself.
    options = set(vars(build_parser().parse_args(["serve", "--model", "m"]))) - {"command", "verbose", "func"}
    assert options == fields | MANIFEST_SET | NOT_FOR_A_POD


def test_default_serving_options_add_no_arguments():
    manifest = build_inference_service(config())
    assert container(manifest)["args"] == [
        "--model", MODEL_MOUNT, "--port", "8080", "--host", "0.0.0.0", "--served-name", "defectkit"]
    assert ServingOptions.from_namespace(_parsed_container(manifest)) == ServingOptions()


@pytest.mark.parametrize("mode", ["", "Knative", "Standard", "Serverless", "RawDeployment"])
def test_deployment_mode_annotation_and_scraping_fit_every_mode(mode):
    cfg = config(deployment_mode=mode, fallback_uri=PREVIOUS_URI, storage_secret="minio-credentials",
                 serving=ServingOptions(sample_rate=0.01, sample_uri="s3://defectkit-samples/prod"))
    manifest = build_inference_service(cfg)
    assert_valid(manifest)
    assert manifest["metadata"]["annotations"].get("serving.kserve.io/deploymentMode") == (mode or None)
    # The same scrape target in every mode: the model server's own port, with KServe told not to move it to a
    # queue-proxy port that Standard mode does not have.
    assert predictor(manifest)["annotations"] == {
        "serving.kserve.io/enable-prometheus-scraping": "false",
        "prometheus.io/scrape": "true", "prometheus.io/port": "8080", "prometheus.io/path": "/metrics",
        "prometheus.kserve.io/port": "8080", "prometheus.kserve.io/path": "/metrics",
    }
    assert container(manifest)["envFrom"] == [{"secretRef": {"name": "minio-credentials"}}]
    assert _parsed_container(manifest).sample_uri == "s3://defectkit-samples/prod"
    live = as_stored(manifest)
    for patch in (patch_for_canary(live, CANDIDATE_URI, 0), patch_for_traffic(50), patch_for_promotion()):
        assert_valid(merge_patch(live, patch))


@pytest.mark.parametrize(("text", "value"), [
    ("500m", 0.5), ("2", 2), ("1.5", 1.5), ("2Gi", 2 * 2**30), ("3000Mi", 3000 * 2**20), ("1k", 1000),
    ("1e3", 1000), ("100n", 1e-7), (".5", 0.5),
])
def test_parse_quantity(text, value):
    assert float(parse_quantity(text)) == pytest.approx(value)


def test_patches_refuse_bad_input():
    live = as_stored(build_inference_service(config()))
    with pytest.raises(ValueError, match="gs://"):
        patch_for_canary(live, "/tmp/model", 0)
    with pytest.raises(ValueError, match="0 to 100"):
        patch_for_traffic(150)
    del live["spec"]["predictor"]["containers"][0]["name"]
    with pytest.raises(ValueError, match=CONTAINER_NAME):
        patch_for_canary(live, CANDIDATE_URI, 0)


def test_canary_patch_carries_the_resource_version_precondition():
    live = as_stored(build_inference_service(config()))
    assert patch_for_canary(live, CANDIDATE_URI)["metadata"] == {"resourceVersion": "1001"}
    assert "metadata" not in patch_for_canary(build_inference_service(config()), CANDIDATE_URI)


def test_rollout_manifest_prints_the_manifest(capsys):
    assert main([
        "rollout", "manifest", "--name", "defect", "--namespace", "ml",
        "--storage-uri", CANDIDATE_URI, "--canary-percent", "10", "--image", IMAGE, "--gpu", "1",
        "--min-replicas", "0", "--service-account", "defectkit-serve", "--env", "LOG_LEVEL=debug",
    ]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert_valid(printed)
    assert printed == build_inference_service(config(
        storage_uri=CANDIDATE_URI, canary_traffic_percent=10, gpu=1, min_replicas=0,
        service_account="defectkit-serve", env=(("LOG_LEVEL", "debug"),),
    ))


def test_rollout_manifest_names_what_is_missing(capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["rollout", "manifest", "--storage-uri", CANDIDATE_URI])
    assert exit_.value.code == 2 and "--image" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["rollout", "manifest", "--storage-uri", CANDIDATE_URI, "--image", IMAGE,
                                   "--env", "NOVALUE"])
