"""The main job on embedded defaults (`make run`, `make demo-rollback`).

Everything runs on this machine: a sample dataset, the committed training
pipeline YAML through kfp.local, an MLflow registry on sqlite and a local
serving stack on 127.0.0.1. While a candidate is in its canary, test images are
replayed through the router as production traffic, so the analysis has
requests to judge.
"""

from __future__ import annotations

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
    image_size: int = 128
    epochs: int = 8
    batch_size: int = 32
    seed: int = 0
    canary_steps: str = "25,50,100"
    canary_interval_s: float = 5.0
    canary_min_requests: int = 20
    traffic_per_s: float = 20.0
    model_name: str = "defectkit"


def tracking_uri(work: Path) -> str:
    return f"sqlite:///{work / 'mlflow.db'}"


def ensure_sample(work: Path, defaults: DemoDefaults = DemoDefaults()) -> Path:
    data = work / "data"
    if not (data / "train").is_dir():
        from defectkit.sample import generate_sample

        generate_sample(data, count=defaults.count, size=defaults.sample_size, seed=defaults.seed)
    return data


def _test_images(data: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted((data / "test").rglob("*.jpg"))]


@contextmanager
def production_traffic(work: Path, images: list[bytes], rate: float,
                       model_name: str = DemoDefaults.model_name) -> Iterator[None]:
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
            with LoadGenerator(f"{stack.router.url}/v2/models/{model_name}/infer", images, rate) as load:
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
    from defectkit.delivery.controller import DELIVERY_DIR
    from defectkit.delivery.record import JSON_NAME

    path = work / DELIVERY_DIR / JSON_NAME
    return json.loads(path.read_text()) if path.is_file() else None


def train_and_ship(work: Path, defaults: DemoDefaults = DemoDefaults()):
    """One training pipeline run: judged against the registry's champion, shipped through the canary."""
    from pipelines.run import TRAINING_YAML, run_local

    data = ensure_sample(work, defaults)
    arguments = {
        "source_uri": str(data),
        "image_size": defaults.image_size,
        "epochs": defaults.epochs,
        "batch_size": defaults.batch_size,
        "seed": defaults.seed,
        "tracking_uri": tracking_uri(work),
        "model_name": defaults.model_name,
        "serving_work_dir": str(work),
        "canary_steps": defaults.canary_steps,
        "canary_interval_s": defaults.canary_interval_s,
        "canary_min_requests": defaults.canary_min_requests,
    }
    with production_traffic(work, _test_images(data), defaults.traffic_per_s, defaults.model_name):
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
    from defectkit.delivery.controller import DeliveryConfig, deliver
    from defectkit.golden import build_golden

    uri = tracking_uri(work)
    config = registry.RegistryConfig.for_uri(uri, model_name=defaults.model_name)
    champion = registry.champion(config)
    if champion is None:
        raise ValueError(f"no champion in {uri}: run `make run` first")
    scratch = work / "broken"
    shutil.rmtree(scratch, ignore_errors=True)
    good = registry.resolve(f"models:/{defaults.model_name}/{champion.version}", scratch / "champion",
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
    delivery = DeliveryConfig(model=f"models:/{defaults.model_name}/{ref.version}", version=ref.version,
                              policy=policy, work_dir=str(work), golden_dir=str(golden), tracking_uri=uri,
                              registered_model=defaults.model_name, model_name=defaults.model_name)
    with production_traffic(work, _test_images(data), defaults.traffic_per_s, defaults.model_name):
        deliver(delivery)
    return delivery_outcome(work) or {}
