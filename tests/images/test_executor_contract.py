"""Every executor of the compiled pipelines runs in the image its YAML names, as the KFP launcher runs it.

The executor's own ``command`` and ``args`` from pipelines/*.yaml, an executor
input written the way the backend writes it (tests/images/launcher.py), the
image's own non-root user, no network (but for the steps that talk to a stand-in
of the Kubernetes API on the host), and small real inputs under a directory
mounted where a ``gs://`` pipeline root appears in a pod (``/gcs/<bucket>``).
Each test checks what the next task or the KFP UI reads: the output artifacts
on disk, their metadata and the output parameters in the executor output.

Skipped, with the reason, where no container engine answers or an image is not
built: `make images-check` builds the images and runs these tests.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from defectkit_kfp.components import images as component_images
from tests.images import launcher
from tests.images.launcher import Artifact, Launcher

IMAGES = sorted(f"{component_images.REGISTRY}/{p.parent.name}:{component_images.VERSION}"
                for p in (launcher.ROOT / "images").glob("*/Dockerfile"))


# `make images-check` names the images it built: those must be there, not skipped.
REQUIRED = set(os.environ.get("REQUIRED_IMAGES", "").split())


@pytest.fixture(scope="session")
def engine() -> str:
    found = launcher.engine()
    if found is None:
        missing = pytest.fail if REQUIRED else pytest.skip
        missing("no container engine answers (set DOCKER, or install podman or docker); "
                "`make images-check` builds the images and runs these tests")
    return found


def _needs(engine: str, image: str) -> None:
    name = image.rpartition("/")[2].partition(":")[0]
    unusable = pytest.fail if name in REQUIRED else pytest.skip
    if not launcher.image_present(engine, image):
        unusable(f"image {image} is not built: `make images DOCKER=...` or `make images-check`")
    stale = launcher.stale_sources(engine, image)
    if stale:
        unusable(f"image {image} was built from other sources than this tree ({len(stale)} files differ, "
                 f"e.g. {', '.join(stale[:3])}): rebuild it with `make images` or `make images-check`")


@pytest.fixture(scope="module")
def run_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("pipeline-root")


@pytest.fixture(scope="module")
def launch(engine, run_root) -> Launcher:
    bucket = run_root / "bucket"
    bucket.mkdir()
    return Launcher(engine, bucket)


@pytest.fixture(scope="module")
def sample(run_root) -> Path:
    from defectkit.synthetic import generate_sample

    out = run_root / "sample"
    generate_sample(out, count=40, size=64, seed=0)
    return out


def test_a_task_runs_the_same_executor_in_every_pipeline():
    """Testing a task once covers it wherever it appears (monitor.yaml embeds the training pipeline)."""
    by_task: dict[str, set] = {}
    for e in launcher.executors():
        by_task.setdefault(e.task, set()).add((e.image, e.command, e.args))
    assert {task: len(found) for task, found in by_task.items() if len(found) > 1} == {}


def test_every_executor_is_covered():
    """A new executor in the compiled YAML needs its contract test here."""
    assert {e.task for e in launcher.executors()} <= COVERED


@pytest.mark.parametrize("image", IMAGES)
def test_image_runs_as_its_non_root_user(engine, image):
    _needs(engine, image)
    uid = subprocess.run([engine, "run", "--rm", "--network", "none", "--entrypoint", "id", image, "-u"],
                         capture_output=True, text=True, check=True).stdout.strip()
    assert uid != "0", f"{image} runs as root"


def test_serve_image_serves_a_model_as_the_inference_service_starts_it(engine, judged_model, launch):
    """No pipeline step runs on the serve image: KServe runs `defectkit serve` in it, the model mounted at
    /mnt/models (defectkit.delivery.kserve.manifest). Ready means the weights and model.json loaded."""
    import time
    import urllib.request

    from defectkit.delivery.kserve.manifest import MODEL_MOUNT
    from tests.servers import free_port

    image = component_images.SERVE_IMAGE
    _needs(engine, image)
    port = free_port()
    # The predictor's options as manifest.container_args writes them first.
    args = ["--model", MODEL_MOUNT, "--port", "8080", "--host", "0.0.0.0", "--served-name", "defect"]
    name = f"serve-check-{launch.run_id[:8]}"
    subprocess.run([engine, "run", "-d", "--rm", "--name", name, "-p", f"127.0.0.1:{port}:8080",
                    "-v", f"{launch.local(judged_model.uri)}:{MODEL_MOUNT}:ro", "--entrypoint", "defectkit",
                    image, "serve", *args], check=True, capture_output=True)
    try:
        deadline, ready = time.monotonic() + 120, False
        while not ready and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/models/defect/ready", timeout=2) as r:
                    ready = r.status == 200
            except OSError:
                time.sleep(1)
        logs = subprocess.run([engine, "logs", name], capture_output=True, text=True).stdout
        assert ready, f"the model server never became ready:\n{logs[-3000:]}"
    finally:
        subprocess.run([engine, "rm", "-f", name], capture_output=True)


# --- data image: fingerprint_source -> validate_images -> preprocess_images ---------------------------

@pytest.fixture(scope="module")
def fingerprinted(engine, launch, sample):
    executor = launcher.executor("training", "fingerprint-source")
    _needs(engine, executor.image)
    return launch.run(executor, {"source_uri": "/data/sample"}, mounts={sample: "/data/sample:ro"})


def test_fingerprint_source_is_the_librarys_fingerprint_of_the_same_files(fingerprinted, sample):
    from defectkit.data import source_fingerprint

    assert fingerprinted.check().parameters["Output"] == source_fingerprint(str(sample))


@pytest.fixture(scope="module")
def validated(engine, launch, sample, fingerprinted):
    executor = launcher.executor("training", "validate-images")
    _needs(engine, executor.image)
    return launch.run(executor, {"source_uri": "/data/sample", "min_images_per_class": 1, "min_side": 16,
                                 "source_fingerprint": fingerprinted.check().parameters["Output"]},
                      mounts={sample: "/data/sample:ro"})


def test_validate_images(validated, launch):
    result = validated.check()
    manifest = json.loads((launch.local(result.artifacts["dataset"].uri) / "manifest.json").read_text())
    assert len(manifest["entries"]) == 40
    assert manifest["fingerprint"] == result.parameters["fingerprint"]
    assert result.parameters["images"] == 40
    assert result.parameters["quarantined"] == 0
    fingerprint = result.parameters["fingerprint"]
    assert len(fingerprint) == 64
    assert result.artifacts["dataset"].metadata["fingerprint"] == fingerprint
    assert result.artifacts["metrics"].metadata["images"] == 40
    assert "<" in launch.local(result.artifacts["expectations"].uri).read_text()


@pytest.fixture(scope="module")
def preprocessed(engine, launch, validated):
    executor = launcher.executor("training", "preprocess-images")
    _needs(engine, executor.image)
    dataset = validated.check().artifacts["dataset"]
    return launch.run(executor, {"dataset_fingerprint": validated.parameters["fingerprint"], "image_size": 32,
                                 "workers": 1}, {"dataset": dataset})


def test_preprocess_images(preprocessed, validated, launch):
    result = preprocessed.check()
    out = launch.local(result.artifacts["preprocessed"].uri)
    assert (out / "preprocess.json").is_file() and any((out / "shards").iterdir())
    assert result.parameters["Output"] == validated.parameters["fingerprint"]
    assert result.artifacts["preprocessed"].metadata == {"fingerprint": validated.parameters["fingerprint"],
                                                         "image_size": 32}
    assert result.artifacts["metrics"].metadata["images"] == 40


# --- data image: plan_product_lines -> record_product_line -> summarize_product_lines ------------------

def test_plan_product_lines_finds_the_categories_of_a_root(engine, launch, sample, tmp_path):
    executor = launcher.executor("product_lines", "plan-product-lines")
    _needs(engine, executor.image)
    for category in ("carpet", "metal_nut"):
        shutil.copytree(sample, tmp_path / "lines" / category)
    launcher.readable(tmp_path / "lines")
    result = launch.run(executor, {"source_root": "/data/lines", "registered_model": "surfaces",
                                   "kserve_service": "inspect", "serving_work_dir": "/gcs/runs"},
                        mounts={tmp_path / "lines": "/data/lines:ro"}).check()
    assert result.parameters["Output"] == [
        {"category": "carpet", "source_uri": "/data/lines/carpet", "registered_model": "surfaces-carpet",
         "service": "inspect-carpet", "work_dir": "/gcs/runs/carpet"},
        {"category": "metal_nut", "source_uri": "/data/lines/metal_nut", "registered_model": "surfaces-metal-nut",
         "service": "inspect-metal-nut", "work_dir": "/gcs/runs/metal-nut"}]


def test_record_and_summarize_product_lines(engine, launch):
    record = launcher.executor("product_lines", "record-product-line")
    _needs(engine, record.image)
    line = {"category": "metal_nut", "source_uri": "/data/lines/metal_nut", "registered_model": "m-metal-nut",
            "service": "s-metal-nut", "work_dir": "/gcs/runs/metal-nut"}
    outcome = launch.run(record, {"line": line, "approved": True, "image_auroc": 0.97, "images": 40,
                                  "quarantined": 1, "reasons": "all gates passed"}).check().parameters["Output"]
    assert outcome == {"category": "metal_nut", "registered_model": "m-metal-nut", "service": "s-metal-nut",
                       "approved": True, "image_auroc": 0.97, "images": 40, "quarantined": 1,
                       "reasons": "all gates passed"}
    other = {**outcome, "category": "carpet", "approved": False, "image_auroc": 0.5, "reasons": "AUROC below 0.9"}
    summary = launch.run(launcher.executor("product_lines", "summarize-product-lines"),
                         {"outcomes": [outcome, other]}).check()
    assert summary.parameters["Output"] == 1
    assert summary.artifacts["metrics"].metadata == {"image_auroc/metal_nut": 0.97, "image_auroc/carpet": 0.5,
                                                     "approved_lines": 1, "lines": 2}
    table = launch.local(summary.artifacts["summary"].uri).read_text()
    assert table.startswith("# Product lines: 1 of 2 product lines approved")
    assert table.index("| carpet | not approved") < table.index("| metal_nut | approved")
    assert "<table>" in launch.local(summary.artifacts["report"].uri).read_text()


# --- train image: train_model -> evaluate_model, on the CPU (no GPU is asked for) ------------------

@pytest.fixture(scope="module")
def trained(engine, launch, preprocessed, validated):
    executor = launcher.executor("training", "train-model")
    _needs(engine, executor.image)
    return launch.run(executor, {"dataset_fingerprint": validated.parameters["fingerprint"],
                                 "architecture": "squeezenet1_0", "steps": 10, "batch_size": 8, "device": "cpu"},
                      {"preprocessed": preprocessed.check().artifacts["preprocessed"]})


def test_train_model(trained, validated, launch):
    result = trained.check()
    out = launch.local(result.artifacts["model"].uri)
    assert json.loads((out / "model.json").read_text())["architecture"] == "squeezenet1_0"
    assert (out / "model.safetensors").stat().st_size > 0
    assert result.parameters["best_step"] == 10  # one validation, after the last step
    assert 0.0 <= result.parameters["val_auroc"] <= 1.0
    assert result.artifacts["model"].metadata["fingerprint"] == validated.parameters["fingerprint"]


@pytest.fixture(scope="module")
def evaluated(engine, launch, trained, preprocessed, validated):
    executor = launcher.executor("training", "evaluate-model")
    _needs(engine, executor.image)
    champion = Artifact(f"gs://{launcher.BUCKET}/training/upstream/resolve-champion/champion", "system.Model",
                        {"found": False, "source": ""})
    launch.local(champion.uri).mkdir(parents=True)
    return launch.run(executor, {"dataset_fingerprint": validated.parameters["fingerprint"], "min_auroc": 0.0,
                                 "device": "cpu"},
                      {"model": trained.check().artifacts["model"],
                       "preprocessed": preprocessed.artifacts["preprocessed"],
                       "dataset": validated.artifacts["dataset"], "champion": champion})


def test_evaluate_model_first_run_applies_absolute_gates(evaluated, launch):
    result = evaluated.check()
    assert result.parameters["approved"] is True, result.parameters["reasons"]
    judged = launch.local(result.artifacts["judged_model"].uri)
    assert "threshold" in json.loads((judged / "model.json").read_text())
    assert (launch.local(result.artifacts["golden"].uri) / "golden.json").is_file()
    assert result.artifacts["judged_model"].metadata["approved"] is True
    assert "confusionMatrix" in result.artifacts["classification"].metadata
    assert launch.local(result.artifacts["report"].uri).read_text().strip()


# --- monitor image: collect_window -> validate_window -> detect_drift -> decide_retraining ----------

WINDOW_END = 1767963600.0  # 2026-01-09T13:00:00Z


@pytest.fixture(scope="module")
def production_samples(run_root) -> Path:
    """Production images as the model server's sampler stores them: 40 inside the window, 5 after it."""
    from defectkit import sampling, storage
    from defectkit.synthetic import generate_sample

    images = run_root / "production"
    generate_sample(images, count=45, size=64, seed=1)
    files = [p.read_bytes() for p in sorted(images.glob("*/*/*.jpg"))]
    samples = run_root / "samples"
    sampling.write_shards(storage.Store(str(samples)),
                          [(data, 0.1, "good", "1", WINDOW_END - 300 + i) for i, data in enumerate(files[:40])]
                          + [(data, 0.1, "good", "1", WINDOW_END + 1 + i) for i, data in enumerate(files[40:])])
    launcher.readable(samples)
    return samples


@pytest.fixture(scope="module")
def collected(engine, launch, evaluated, production_samples):
    executor = launcher.executor("monitor", "collect-window")
    _needs(engine, executor.image)
    # The judged model where the pod sees it: the path kfp maps its gs:// URI to.
    model_path = evaluated.check().artifacts["judged_model"].uri.replace("gs://", "/gcs/", 1)
    return launch.run(executor, {"sample_uri": "/data/samples", "model_uri": model_path,
                                 "scheduled_time": "2026-01-09T13:00:00Z", "window_end": "2026-01-09T13:00:00Z",
                                 "window_s": 600.0}, mounts={production_samples: "/data/samples:ro"})


def test_collect_window(collected):
    result = collected.check()
    assert result.parameters["new_images"] == 40
    assert (result.parameters["since"], result.parameters["until"]) == (WINDOW_END - 600, WINDOW_END)


@pytest.fixture(scope="module")
def validated_window(engine, launch, collected):
    executor = launcher.executor("monitor", "validate-window")
    _needs(engine, executor.image)
    window = collected.check()
    return launch.run(executor, {"since": window.parameters["since"], "until": window.parameters["until"]},
                      {"current": window.artifacts["current"]})


def test_validate_window(validated_window, launch):
    result = validated_window.check()
    assert result.parameters == {"passed": True, "problems": ""}
    assert "PASSED" in launch.local(result.artifacts["expectations"].uri).read_text()


@pytest.fixture(scope="module")
def drift(engine, launch, collected):
    executor = launcher.executor("monitor", "detect-drift")
    _needs(engine, executor.image)
    window = collected.check()
    return launch.run(executor, {}, {"current": window.artifacts["current"],
                                     "reference": window.artifacts["reference"]})


def test_detect_drift(drift, launch):
    result = drift.check()
    assert isinstance(result.parameters["drifted"], bool)
    assert isinstance(result.parameters["drifted_features"], str)
    assert launch.local(result.artifacts["report"].uri).stat().st_size > 0
    assert launch.local(result.artifacts["summary"].uri).read_text().strip()


def test_decide_retraining_needs_enough_new_images(engine, launch, collected, drift, sample):
    executor = launcher.executor("monitor", "decide-retraining")
    _needs(engine, executor.image)
    window, found = collected.check(), drift.check()
    result = launch.run(executor, {
        "drifted": found.parameters["drifted"], "drifted_features": found.parameters["drifted_features"],
        "new_images": window.parameters["new_images"], "since": window.parameters["since"],
        "until": window.parameters["until"], "state_uri": f"/gcs/{launcher.BUCKET}/monitor-state",
        "base_dataset_uri": "/data/sample", "retraining_data_uri": f"/gcs/{launcher.BUCKET}/retraining",
        "run": launch.run_id, "min_new_images": 1000}, {"current": window.artifacts["current"]},
        mounts={sample: "/data/sample:ro"}).check()
    assert result.parameters["retrain"] is False
    record = json.loads(launch.local(result.artifacts["record"].uri).read_text())
    assert record["new_images"] == 40 and not record["retrain"]


# --- deploy image: register_model, resolve_champion, deploy_canary, restore_traffic -------------------

FINGERPRINT = "f" * 64


@pytest.fixture(scope="module")
def judged_model(launch) -> Artifact:
    """A judged model as evaluate_model leaves it, written here: the deploy image has no torch to make one."""
    import torch

    from defectkit.models import ModelMetadata, build_model, save_model
    from defectkit.preprocess import PreprocessSpec

    torch.manual_seed(0)
    uri = f"gs://{launcher.BUCKET}/training/upstream/evaluate-model/model"
    metadata = ModelMetadata(
        architecture="squeezenet1_0", classes=("good", "hole"), preprocess=PreprocessSpec(image_size=32),
        threshold=0.5, threshold_policy={"kind": "max_f1"},
        metrics={"val_auroc": 0.9, "test": {"image_auroc": 0.95}}, dataset_fingerprint=FINGERPRINT,
        training={"config": {"epochs": 1}, "history": []})
    save_model(build_model("squeezenet1_0"), metadata, launch.local(uri))
    launcher.readable(launch.local(uri))
    return Artifact(uri, "system.Model", {})


def _tracking_uri() -> str:
    return f"sqlite:////gcs/{launcher.BUCKET}/registry/mlflow.db"


@pytest.fixture(scope="module")
def registered(engine, launch, judged_model):
    executor = launcher.executor("shipping", "register-model")
    _needs(engine, executor.image)
    registry_dir = launch.bucket_dir / "registry"
    registry_dir.mkdir(exist_ok=True)
    registry_dir.chmod(0o777)
    return launch.run(executor, {"tracking_uri": _tracking_uri(), "dataset_fingerprint": FINGERPRINT,
                                 "kfp_run_id": launch.run_id}, {"model": judged_model})


def test_register_model(registered, launch):
    result = registered.check()
    assert result.parameters["version"] == "1"
    assert result.parameters["model_uri"] == result.artifacts["registered"].metadata["model_uri"]
    record = json.loads(launch.local(result.artifacts["registered"].uri).read_text())
    assert record["version"] == "1" and record["name"] == "defectkit"
    assert (launch.bucket_dir / "registry" / "mlflow.db").is_file()


def test_resolve_champion_fetches_a_registered_version(engine, launch, registered, judged_model):
    registered.check()
    executor = launcher.executor("training", "resolve-champion")
    _needs(engine, executor.image)
    result = launch.run(executor, {"tracking_uri": _tracking_uri(), "champion_uri": "models:/defectkit/1"}).check()
    assert result.parameters["found"] is True
    champion = launch.local(result.artifacts["champion"].uri)
    assert (champion / "model.safetensors").read_bytes() == \
        (launch.local(judged_model.uri) / "model.safetensors").read_bytes()
    assert json.loads((champion / "model.json").read_text())["dataset_fingerprint"] == FINGERPRINT
    assert result.artifacts["champion"].metadata["found"] is True


def test_resolve_champion_without_registry_finds_none(engine, launch):
    executor = launcher.executor("training", "resolve-champion")
    _needs(engine, executor.image)
    result = launch.run(executor).check()
    assert result.parameters == {"found": False, "source": ""}
    assert result.artifacts["champion"].metadata["found"] is False


def test_restore_traffic_with_no_delivery_moves_nothing(engine, launch):
    """The exit handler of every shipping run: it must start in the image even when nothing was delivered."""
    executor = launcher.executor("shipping", "restore-traffic")
    _needs(engine, executor.image)
    work = launch.bucket_dir / "deliveries"
    work.mkdir()
    work.chmod(0o777)
    result = launch.run(executor, {"tracking_uri": _tracking_uri(), "backend": "local",
                                   "work_dir": f"/gcs/{launcher.BUCKET}/deliveries"}).check()
    assert result.parameters["Output"] is False


def test_restore_traffic_on_kserve_reads_the_delivery_state_from_the_cluster(engine, launch):
    """The kserve backend's whole import path and its Kubernetes client, in the image, against the API stand-in."""
    from tests.kube_api import KubeApiStandIn

    executor = launcher.executor("shipping", "restore-traffic")
    _needs(engine, executor.image)
    with KubeApiStandIn() as kube:
        result = launch.run(executor, {"backend": "kserve", "kube_api_url": kube.url, "namespace": "ml",
                                       "service_name": "defect", "prometheus_url": "http://127.0.0.1:9",
                                       "work_dir": f"/gcs/{launcher.BUCKET}/kserve-deliveries"},
                            network="host").check()
        assert result.parameters["Output"] is False
        assert any(r.method == "GET" for r in kube.requests), "the step never asked the API server"
        assert kube.internal_errors == []


def test_deploy_canary_local_backend_refuses_clearly_in_the_deploy_image(engine, launch, registered,
                                                                         judged_model):
    """The local backend serves models with torch, which the deploy image leaves out (the cluster uses kserve).

    The step must fail at once, saying why and what to pass instead, not after a
    model server that cannot start has timed out.
    """
    registered.check()
    executor = launcher.executor("shipping", "deploy-canary")
    _needs(engine, executor.image)
    result = launch.run(executor, {"tracking_uri": _tracking_uri(), "model_version": "1", "backend": "local",
                                   "work_dir": f"/gcs/{launcher.BUCKET}/canary", "interval_s": 1.0},
                        {"model": judged_model}, timeout=120)
    output = result.output
    assert result.returncode != 0
    assert "torch" in output and "backend=kserve" in output, f"no clear refusal; the step said:\n{output[-3000:]}"


COVERED = {"fingerprint-source", "validate-images", "preprocess-images", "train-model", "evaluate-model",
           "register-model", "resolve-champion", "restore-traffic", "deploy-canary", "collect-window",
           "validate-window", "detect-drift", "decide-retraining", "plan-product-lines", "record-product-line",
           "summarize-product-lines"}
