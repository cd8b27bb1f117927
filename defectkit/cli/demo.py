"""``defectkit demo [rollback|drift]``: the main job on embedded defaults (`make run`, `make demo-rollback`,
`make demo-drift`).

Everything runs on this machine: a sample dataset, the committed training
pipeline YAML through kfp.local, an MLflow registry on sqlite and a local
serving stack on 127.0.0.1. While a candidate is in its canary, test images are
replayed through the router as production traffic, so the analysis has
requests to judge.
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoDefaults:
    """Embedded defaults: a sample dataset and a canary small enough for 2 CPU cores."""

    count: int = 400
    sample_size: int = 256
    image_size: int = 96  # the sample's defects are large: 96 px scores as 128 did (test AUROC 0.99) in 2/3 the time
    steps: int = 80  # the sample is easy: about a minute of training on 2 CPU cores
    batch_size: int = 32
    seed: int = 0
    canary_steps: str = "25,50,100"
    canary_interval_s: float = 5.0
    canary_min_requests: int = 20
    traffic_per_s: float = 20.0
    # The sample's test split is small: one image moves F1 by about 0.017.
    max_f1_drop: float = 0.05
    registered_model: str = "defectkit"
    served_name: str = "defectkit"


def tracking_uri(work: Path) -> str:
    return f"sqlite:///{work / 'mlflow.db'}"


def ensure_sample(work: Path, defaults: DemoDefaults = DemoDefaults()) -> Path:
    data = work / "data"
    if not (data / "train").is_dir():
        from defectkit.synthetic import generate_sample

        generate_sample(data, count=defaults.count, size=defaults.sample_size, seed=defaults.seed)
    return data


def _test_images(data: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted((data / "test").rglob("*.jpg"))]


@contextmanager
def production_traffic(work: Path, images: list[bytes], rate: float,
                       served_name: str = DemoDefaults.served_name) -> Iterator[None]:
    """Replay ``images`` through the local router whenever it is up, until the block ends."""
    from defectkit.delivery.local import read_stack
    from defectkit.delivery.traffic import LoadGenerator

    stop = threading.Event()
    sent: list[LoadGenerator] = []

    def replay() -> None:
        while not stop.is_set():
            stack = read_stack(work)
            if stack is None or stack.router is None or stack.stable is None:
                stop.wait(0.5)
                continue
            with LoadGenerator(f"{stack.router.url}/v2/models/{served_name}/infer", images, rate) as load:
                sent.append(load)
                while not stop.is_set() and read_stack(work) is not None:
                    stop.wait(0.5)

    thread = threading.Thread(target=replay, name="production-traffic", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(60)
        results = [r for load in sent for r in load.results]
        if results:
            ok = sum(1 for r in results if 200 <= r[2] < 300)
            log.info("replayed %d production requests through the router, %d answered 2xx", len(results), ok)


def delivery_outcome(work: Path) -> dict | None:
    """The decision record of the last delivery in ``work``, if any."""
    from defectkit.delivery.record import JSON_NAME
    from defectkit.delivery.rollout import DELIVERY_DIR

    path = work / DELIVERY_DIR / JSON_NAME
    return json.loads(path.read_text()) if path.is_file() else None


def _training_arguments(work: Path, defaults: DemoDefaults) -> dict:
    return {
        "image_size": defaults.image_size,
        "steps": defaults.steps,
        # ImageNet weights (where they can be downloaded) are fetched once into the work directory.
        "pretrained_cache": str(work / "pretrained"),
        "batch_size": defaults.batch_size,
        "seed": defaults.seed,
        "tracking_uri": tracking_uri(work),
        "registered_model": defaults.registered_model,
        # The compiled pipelines' defaults are a cluster's (kserve); on this machine the stack is local.
        "deploy_backend": "local",
        "serving_work_dir": str(work),
        "canary_steps": defaults.canary_steps,
        "canary_interval_s": defaults.canary_interval_s,
        "canary_min_requests": defaults.canary_min_requests,
        "max_f1_drop": defaults.max_f1_drop,
    }


def train_and_ship(work: Path, defaults: DemoDefaults = DemoDefaults()):
    """One training pipeline run: judged against the registry's champion, shipped through the canary."""
    from defectkit_kfp.pipelines.run import TRAINING_YAML, run_local

    data = ensure_sample(work, defaults)
    arguments = {"source_uri": str(data), **_training_arguments(work, defaults)}
    with production_traffic(work, _test_images(data), defaults.traffic_per_s, defaults.served_name):
        return run_local(TRAINING_YAML, arguments, work / "runs" / time.strftime("%Y%m%d-%H%M%S"))


def _last_dataset_artifact(work: Path) -> Path:
    """The validated dataset of the newest training run in ``work``."""
    found = sorted(work.glob("runs/*/pipeline_root/*/validate-images/dataset"))
    if not found:
        raise FileNotFoundError(f"no training run under {work}/runs: run `make run` first")
    return found[-1]


def ship_broken_candidate(work: Path, defaults: DemoDefaults = DemoDefaults()) -> dict:
    """Register a deliberately broken copy of the champion (it calls every image defective) and canary it."""
    import dataclasses
    import shutil

    import torch

    from defectkit import models, registry
    from defectkit.delivery.analysis import CanaryPolicy, parse_steps
    from defectkit.delivery.rollout import DeliveryConfig, deliver
    from defectkit.evaluation import build_golden

    uri = tracking_uri(work)
    config = registry.RegistryConfig.for_uri(uri, model_name=defaults.registered_model)
    champion = registry.champion(config)
    if champion is None:
        raise ValueError(f"no champion in {uri}: run `make run` first")
    scratch = work / "broken"
    shutil.rmtree(scratch, ignore_errors=True)
    good = registry.resolve(f"models:/{defaults.registered_model}/{champion.version}", scratch / "champion",
                            tracking_uri=uri)
    model = models.load_model(good)
    with torch.no_grad():
        models.final_layer(model.module).bias.add_(8.0)  # every score near 1: everything "defective"
    broken = models.save_model(model.module, dataclasses.replace(model.metadata, created=""), scratch / "model")
    ref = registry.register(config, broken, tags={registry.KFP_RUN_ID: "demo-rollback"})
    data = ensure_sample(work, defaults)
    golden = build_golden(_last_dataset_artifact(work), broken, scratch / "golden")
    policy = CanaryPolicy(steps=parse_steps(defaults.canary_steps), interval_s=defaults.canary_interval_s,
                          min_requests=defaults.canary_min_requests)
    delivery = DeliveryConfig.for_registered_version(
        defaults.registered_model, ref.version, policy=policy, work_dir=str(work),
        golden_dir=str(golden), tracking_uri=uri, served_name=defaults.served_name)
    with production_traffic(work, _test_images(data), defaults.traffic_per_s, defaults.served_name):
        deliver(delivery)
    return delivery_outcome(work) or {}


def _brighter(data: bytes, offset: int = 60) -> bytes:
    """The same image under stronger lighting: the production shift the drift demo plays."""
    import io

    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), np.int16)
    out = io.BytesIO()
    Image.fromarray(np.clip(pixels + offset, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=92)
    return out.getvalue()


def _serve_with_sampling(work: Path, images: list[bytes], samples: Path, defaults: DemoDefaults) -> int:
    """Serve the champion with every request sampled to ``samples`` and send it ``images``; 2xx answers."""
    import base64

    import httpx

    from defectkit.delivery.local import start_model_server, stop_process

    server = start_model_server(
        "sampled", f"models:/{defaults.registered_model}@champion", log_dir=work / "serving",
        name=defaults.served_name,
        args=("--tracking-uri", tracking_uri(work), "--sample-rate", "1", "--sample-uri", str(samples)),
    )
    answered = 0
    try:
        with httpx.Client(timeout=30) as client:
            for data in images:
                body = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                    "data": [base64.b64encode(data).decode()]}]}
                answered += client.post(f"{server.url}/v2/models/{defaults.served_name}/infer", json=body).is_success
    finally:
        stop_process(server)  # SIGTERM: the sampler writes what is still queued on shutdown
    return answered


def drift_loop(work: Path, defaults: DemoDefaults = DemoDefaults()) -> dict:
    """Serve the champion, send it brighter images than it was trained on, then run the monitor pipeline.

    The monitor finds the drift, merges the sampled images into the training data and
    retrains locally; the retrained model is judged and shipped through the canary like any other.
    """
    from defectkit import registry
    from defectkit_kfp.pipelines.run import MONITOR_YAML, run_local

    uri = tracking_uri(work)
    if registry.champion(registry.RegistryConfig.for_uri(uri, model_name=defaults.registered_model)) is None:
        raise ValueError(f"no champion in {uri}: run `make run` first")
    data = ensure_sample(work, defaults)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    samples = work / "samples"
    shifted = [_brighter(image) for image in _test_images(data)]
    answered = _serve_with_sampling(work, shifted, samples, defaults)
    log.info("production played: %d brighter images answered and sampled to %s", answered, samples)
    arguments = {
        "sample_uri": str(samples),
        "model_uri": f"models:/{defaults.registered_model}@champion",
        "tracking_uri": uri,
        "state_uri": str(work / "monitor"),
        "base_dataset_uri": str(data),
        "retraining_data_uri": str(work / "retraining"),
        "min_new_images": 50,
        "cooldown_s": 600.0,
        "defect_class": "stain",
        **_training_arguments(work, defaults),
    }
    with production_traffic(work, _test_images(data), defaults.traffic_per_s, defaults.served_name):
        run = run_local(MONITOR_YAML, arguments, work / "runs" / f"monitor-{stamp}")
    record = json.loads(next(run.pipeline_root.rglob("decide-retraining/record")).read_text())
    # The retraining ran inside the monitor's run: its steps sit beside the monitor's.
    verdicts = sorted(run.pipeline_root.glob("**/evaluate-model/verdict"))
    if verdicts:
        verdict = json.loads(verdicts[-1].read_text())
        record["retraining_verdict"] = {"approved": verdict["approved"], "reasons": verdict["reasons"],
                                        "image_auroc": verdict["image_auroc"]}
    return record


# --------------------------------------------------------------------------- command line


def add_commands(commands: argparse._SubParsersAction) -> None:
    demo = commands.add_parser("demo", help="sample data, train, judge, register and canary-ship on embedded "
                               "defaults (`make run`); `demo rollback` and `demo drift` play the other outcomes")
    demo.add_argument("--work", default="runs", help="work directory (default %(default)s)")
    demo.set_defaults(func=cmd_demo)
    scenarios = demo.add_subparsers(dest="scenario", metavar="SCENARIO")
    rollback = scenarios.add_parser("rollback", help="ship a deliberately broken candidate against the champion of "
                                    "`demo` and show it rolled back")
    rollback.set_defaults(func=cmd_rollback)
    drift = scenarios.add_parser("drift", help="serve the champion, send it shifted images, detect the drift, "
                                 "retrain on the new data and canary the retrained model")
    drift.set_defaults(func=cmd_drift)
    for scenario in (rollback, drift):
        # SUPPRESS: `demo --work W rollback` keeps W; a default here would overwrite it.
        scenario.add_argument("--work", default=argparse.SUPPRESS, help="work directory of `demo` (default runs)")


def cmd_demo(args: argparse.Namespace) -> int:
    from defectkit.cli.pipeline import collect, run_failed, summary

    started = time.perf_counter()
    work = Path(args.work).resolve()
    try:
        run = train_and_ship(work)
    except RuntimeError as exc:
        raise run_failed(exc, work) from exc
    print(summary(run, collect(run, None), started=started) + _serving_summary(work))
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    work = Path(args.work).resolve()
    record = ship_broken_candidate(work)
    print(_delivery_lines(record, title="broken candidate (calls every image defective)")
          + _serving_summary(work, last_delivery=False))
    return 0 if record.get("verdict") == "rolled_back" else 1


def cmd_drift(args: argparse.Namespace) -> int:
    from defectkit import monitor
    from defectkit.cli.pipeline import run_failed

    work = Path(args.work).resolve()
    try:
        record = drift_loop(work)
    except RuntimeError as exc:
        raise run_failed(exc, work) from exc
    lines = ["", monitor.render_record(record)]
    verdict = record.get("retraining_verdict")
    if verdict:
        lines.append(f"retrained    image AUROC {verdict['image_auroc']:.4f}: "
                     f"{'APPROVED' if verdict['approved'] else 'NOT APPROVED'}")
        lines += [f"  - {reason}" for reason in verdict["reasons"]]
    print("\n".join(lines) + _serving_summary(work))
    return 0


def _delivery_lines(record: dict | None, *, title: str) -> str:
    if not record:
        return "\ndelivery     none (not approved, or no registry)"
    candidate = record["candidate"]
    lines = ["", f"canary       {title}, version {candidate.get('version')}: {record['verdict'].upper()} "
                 f"after {record.get('duration_s')} s, candidate at {record['final_weight']}% traffic"]
    if record.get("reason"):
        lines.append(f"  why        {record['reason']}")
    for entry in record.get("analyses", []):
        lines.append(f"  step {entry['step']} at {entry['weight']}%: {entry['verdict']}: {entry['explanation']}")
    return "\n".join(lines)


def _serving_summary(work: Path, *, last_delivery: bool = True) -> str:
    from defectkit.delivery.local import read_stack

    lines = [_delivery_lines(delivery_outcome(work), title="last delivery")] if last_delivery else [""]
    stack = read_stack(work)
    if stack is not None and stack.router is not None:
        lines += [
            f"serving      champion at {stack.router.url}/v2/models/{DemoDefaults.served_name}/infer "
            f"(Open Inference Protocol v2)",
            f"             stop it with: .venv/bin/defectkit stack stop --work {work}",
        ]
    lines.append(f"registry     {tracking_uri(work)}")
    return "\n".join(lines) + "\n"
