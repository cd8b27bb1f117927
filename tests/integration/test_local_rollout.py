"""Canary delivery on the local stack: real model servers and the router on 127.0.0.1, under real load.

One stack serves the whole module (starting a model server costs seconds); each test
deploys its own candidate beside whatever the stack has as stable. Bad candidates are
good model files served with the server's fault injection. Every process is stopped by PID.
Measured rollback times and traffic splits are printed (visible with ``pytest -q``).
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from defectkit import registry
from defectkit.data import Manifest
from defectkit.cli import build_parser
from defectkit.delivery import record
from defectkit.delivery.analysis import CanaryPolicy
from defectkit.delivery.controller import Controller
from defectkit.delivery.shadow import ShadowPolicy, ShadowReplay, read_shadow_set
from defectkit.delivery.traffic import LoadGenerator
from defectkit.evaluation import build_golden
from defectkit.golden import read_golden
from defectkit.delivery.local import LocalBackend, StackOptions, read_stack, stop_stack
from defectkit.delivery.local.scrape import histogram_quantile, parse_metrics, window_metrics
from defectkit.delivery.local.router import RouterConfig, SmoothWeightedRoundRobin
from defectkit.delivery.state import PROMOTED, ROLLED_BACK, StateStore
from defectkit.models import ModelMetadata, build_model, save_model
from defectkit.preprocess import PreprocessSpec
from tests.conftest import TINY_IMAGE_SIZE

SERVER_ARGS = ("--threads", "1")
SCRAPE_INTERVAL_S = 0.25
ROLLBACK_INTERVAL_S = 1.5
LOAD_RATE = 40.0
SPLIT_LOAD_RATE = 50.0
SPLIT_MIN_REQUESTS = 400
INFER = "/v2/models/defectkit/infer"
ROOT = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[int, Path]:
    """Model k is model 0 with its defect logit moved by k * 1e-4: a distinct version that scores alike."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    module = build_model("resnet18")
    metadata = ModelMetadata(architecture="resnet18", classes=("good", "crack"),
                             preprocess=PreprocessSpec(image_size=TINY_IMAGE_SIZE), threshold=0.5,
                             threshold_policy={"kind": "max_f1"})
    dirs = {}
    for k in range(4):
        with torch.no_grad():
            module.fc.bias.add_(1e-4 if k else 0.0)
        dirs[k] = save_model(module, metadata, root / f"model-{k}")
    return dirs


@pytest.fixture(scope="module")
def images(dataset_dir) -> list[bytes]:
    entries = Manifest.read(dataset_dir).entries
    return [(dataset_dir / e.path).read_bytes() for e in entries[:20]]


@pytest.fixture(scope="module")
def work(tmp_path_factory, models):
    """The local stack, serving model 0 as stable; stopped (by PID) at the end of the module."""
    work = tmp_path_factory.mktemp("work")
    backend = LocalBackend(work, StackOptions(server_args=SERVER_ARGS))
    try:
        backend.ensure_stack(str(models[0]))
        backend.close()
        yield work
    finally:
        stop_stack(work)


def stack_backend(work: Path, **options) -> LocalBackend:
    return LocalBackend(work, StackOptions(server_args=SERVER_ARGS, scrape_interval_s=SCRAPE_INTERVAL_S, **options))


def report(capsys, text: str) -> None:
    with capsys.disabled():
        print(f"\n[delivery] {text}", flush=True)


def first_event(state, name: str) -> float:
    return next(e["t"] for e in state.timeline if e["event"] == name)


def sent_between(load: LoadGenerator, start: float, end: float) -> list[tuple]:
    return [r for r in load.results if start <= r[0] < end]


def stable_failures(load: LoadGenerator) -> list[tuple]:
    """Answers the stable server (or the router on its behalf) gave with a non-2xx status, and lost requests."""
    return [r for r in load.results if r[2] == 0 or (r[3] != "canary" and not 200 <= r[2] < 300)]


# --------------------------------------------------------------------------- the parts, without servers


@pytest.mark.parametrize("weight", [0, 1, 10, 25, 33, 50, 90, 100])
def test_smooth_weighted_round_robin_is_exact_over_any_100_requests(weight):
    picker = SmoothWeightedRoundRobin({"canary": weight, "stable": 100 - weight})
    picks = [picker.pick() == "canary" for _ in range(1000)]
    assert {sum(picks[i:i + 100]) for i in range(0, 900, 7)} == {weight}
    if 0 < weight <= 50:  # spread out, never bunched: gaps between canary requests differ by at most one
        positions = [i for i, canary in enumerate(picks) if canary]
        assert max(b - a for a, b in zip(positions, positions[1:])) <= 100 // weight + 1


def test_router_config_is_validated():
    with pytest.raises(ValueError, match="needs a canary upstream"):
        RouterConfig(stable="http://127.0.0.1:1", weight=10)
    with pytest.raises(ValueError, match="from 0 to 100"):
        RouterConfig(stable="http://127.0.0.1:1", canary="http://127.0.0.1:2", weight=101)
    with pytest.raises(ValueError, match="http:// URL"):
        RouterConfig.from_json({"stable": "127.0.0.1:1", "canary": None, "weight": 0})
    assert RouterConfig(canary="http://127.0.0.1:2", weight=100).stable is None


def test_window_figures_from_two_scrapes_of_a_metrics_page():
    from prometheus_client import CollectorRegistry, Counter as PromCounter, Histogram, generate_latest

    registry_ = CollectorRegistry()
    requests = PromCounter("defectkit_requests", "", ["model_version", "status"], registry=registry_)
    latency = Histogram("defectkit_request_latency_seconds", "", ["model_version"], registry=registry_,
                        buckets=(0.01, 0.1, 1.0))
    scores = Histogram("defectkit_score", "", ["model_version"], registry=registry_, buckets=(0.5, 1.0))
    requests.labels("v1", "200").inc(10)
    before = parse_metrics(generate_latest(registry_).decode(), 0.0)
    requests.labels("v1", "200").inc(97)
    requests.labels("v1", "503").inc(2)
    requests.labels("v1", "400").inc(1)
    for seconds in [0.005] * 50 + [0.05] * 49 + [0.5]:
        latency.labels("v1").observe(seconds)
    for score in [0.2] * 30 + [0.7] * 70:
        scores.labels("v1").observe(score)
    window = window_metrics(parse_metrics(generate_latest(registry_).decode(), 1.0), before)
    assert (window.requests, window.errors) == (100, 2)
    assert window.p50_latency_s == pytest.approx(0.01)  # the 50th of 100 observations closes the first bucket
    assert window.p99_latency_s == pytest.approx(0.1)
    assert sorted(window.scores) == [0.25] * 30 + [0.75] * 70
    # A restarted server's counters start again from zero.
    assert window_metrics(before, parse_metrics(generate_latest(registry_).decode(), 1.0)).requests == 10


def test_histogram_quantile_interpolates_like_prometheus():
    buckets = [(0.1, 50.0), (0.2, 90.0), (0.4, 100.0), (math.inf, 100.0)]
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.1)
    assert histogram_quantile(0.7, buckets) == pytest.approx(0.15)
    assert histogram_quantile(0.99, buckets) == pytest.approx(0.38)
    assert histogram_quantile(0.99, [(0.1, 0.0), (math.inf, 0.0)]) is None
    assert histogram_quantile(0.99, [(0.1, 1.0), (math.inf, 10.0)]) == 0.1  # beyond the last bound: that bound


# --------------------------------------------------------------------------- bad candidates


BAD_CANDIDATES = {
    "5xx": (("--fault-error-rate", "0.5"), "error_rate"),
    "latency": (("--fault-latency-ms", "600"), "p99_latency"),
    "score_shift": (("--fault-score-shift", "1.0"), "score_shift"),
}


@pytest.mark.parametrize("fault", list(BAD_CANDIDATES))
def test_a_bad_candidate_is_rolled_back_within_the_failure_threshold(fault, work, models, images, tmp_path, capsys):
    fault_args, failing_check = BAD_CANDIDATES[fault]
    policy = CanaryPolicy(steps=(25, 50, 100), interval_s=ROLLBACK_INTERVAL_S, failure_threshold=2, min_requests=8,
                          max_p99_latency_s=0.3, max_error_rate=0.01)
    backend = stack_backend(work, candidate_args=fault_args)
    try:
        with LoadGenerator(backend.url + INFER, images, LOAD_RATE) as load:
            state = Controller(backend, policy, tmp_path / "state.json", candidate=str(models[2]),
                               stable=str(models[0]), record_dir=tmp_path / "record").run()
            time.sleep(0.5)
        assert state.phase == ROLLED_BACK, state.reason
        assert backend.traffic() == 0 == state.weight
        assert read_stack(work).canary is None
    finally:
        backend.close()
    failed = [a for a in state.analyses if a["verdict"] == "fail"]
    assert len(failed) == policy.failure_threshold
    assert all(failing_check in [c["name"] for c in a["checks"] if not c["passed"]] for a in failed)

    first_traffic = first_event(state, "candidate traffic set")
    decided = first_event(state, "rolling back") - first_traffic
    restored = first_event(state, "traffic back on the stable version") - first_traffic
    last_canary = max(r[0] for r in load.results if r[3] == "canary") - first_traffic
    report(capsys, f"{fault} candidate: rollback decided {decided:.2f} s ({decided / policy.interval_s:.2f} "
                   f"intervals) after it got traffic, stable had all traffic again after {restored:.2f} s "
                   f"({restored / policy.interval_s:.2f} intervals), last request routed to it sent at "
                   f"{last_canary:.2f} s; {len(load.results)} requests")
    # Bound: failure_threshold intervals + one interval, plus one more interval of slack for a loaded machine.
    assert restored <= (policy.failure_threshold + 2) * policy.interval_s
    assert last_canary <= restored
    assert stable_failures(load) == []
    assert not [r for r in load.results if r[0] > first_traffic + restored + 0.2 and r[3] == "canary"]
    assert record.read_record(tmp_path / "record")["verdict"] == ROLLED_BACK


def test_the_golden_probe_stops_a_shifted_candidate_before_any_traffic(work, models, dataset_dir, tmp_path):
    golden = read_golden(build_golden(dataset_dir, models[2], tmp_path / "golden", count=6))
    backend = stack_backend(work, candidate_args=("--fault-score-shift", "0.3"))
    try:
        state = Controller(backend, CanaryPolicy(interval_s=1.0), tmp_path / "state.json",
                           candidate=str(models[2]), golden=golden).run()
    finally:
        backend.close()
    assert state.phase == ROLLED_BACK and state.analyses == []
    assert "golden probe failed" in state.reason and "serving and evaluation disagree" in state.reason
    assert max(e["weight"] for e in state.timeline) == 0
    assert state.probe["max_abs_diff"] > 0.1
    assert read_stack(work).canary is None


def _sampled_production(models, images, root: Path) -> str:
    """The stable model's answers to production images, sampled as its server samples them."""
    from defectkit import sampling, storage
    from defectkit.models import load_model
    from defectkit.preprocess import to_model_input
    from defectkit.serving.predictor import model_version

    stable = load_model(models[0])
    scores = stable.scores(np.stack([to_model_input(data, stable.metadata.preprocess) for data in images]))
    now = time.time()
    sampling.write_shards(storage.Store(str(root)), [
        (data, float(score), "defect" if score >= 0.5 else "good", model_version(stable.metadata), now - 60 + i)
        for i, (data, score) in enumerate(zip(images, scores))])
    return str(root)


@pytest.mark.parametrize("shift, verdict", [(0.0, "passed"), (0.6, "failed")])
def test_the_shadow_replay_sends_sampled_production_to_the_candidate_before_any_traffic(
        work, models, images, tmp_path, shift, verdict):
    samples = _sampled_production(models, images, tmp_path / "samples")
    shadow = ShadowReplay(read_shadow_set(samples, time.time(), ShadowPolicy(min_images=10)),
                          ShadowPolicy(min_images=10), 0.5, tmp_path / "record")
    # The passing case promotes its candidate, which the module's stack then serves as stable.
    candidate = next(str(models[k]) for k in (3, 2) if str(models[k]) != read_stack(work).stable.model)
    backend = stack_backend(work, candidate_args=("--fault-score-shift", str(shift)) if shift else ())
    try:
        state = Controller(backend, CanaryPolicy(steps=(50, 100), interval_s=1.0, min_requests=1),
                           tmp_path / "state.json", candidate=candidate, shadow=shadow,
                           record_dir=tmp_path / "record").run()
    finally:
        backend.close()
    assert state.shadow["verdict"] == verdict and state.shadow["images"] == len(images)
    if verdict == "failed":
        # Scores moved by 0.6: no traffic ever reached the candidate.
        assert state.phase == ROLLED_BACK and "shadow replay failed" in state.reason
        assert max(e["weight"] for e in state.timeline) == 0 and state.analyses == []
        assert state.shadow["score_shift"] > 0.3 and state.shadow["mean_abs_score_difference"] > 0.2
        assert (tmp_path / "record" / "shadow" / "disagreements.json").is_file()
    else:
        # The candidate scores as the champion did (its logit differs by 3e-4), on the real servers.
        assert state.shadow["agreement"] == 1.0 and state.shadow["mean_abs_score_difference"] < 1e-3
        assert any(e["event"] == "shadow replay passed" for e in state.timeline)
    assert "## Shadow replay" in (tmp_path / "record" / record.MARKDOWN_NAME).read_text()


# --------------------------------------------------------------------------- promotion


def test_a_good_candidate_is_promoted_under_load_with_a_tight_split(work, models, images, dataset_dir, tmp_path,
                                                                     capsys):
    config = registry.RegistryConfig.embedded(tmp_path / "mlflow")
    first = registry.register(config, models[0])
    registry.promote(config, first.version)
    candidate = registry.register(config, models[1])
    golden_dir = build_golden(dataset_dir, models[1], tmp_path / "golden", count=6)
    interval = SPLIT_MIN_REQUESTS / SPLIT_LOAD_RATE + 1.0
    args = build_parser().parse_args([
        "rollout", "start", "--backend", "local", "--work", str(work), "--model", candidate.uri,
        "--tracking-uri", config.tracking_uri, "--golden", str(golden_dir), "--state", str(tmp_path / "state.json"),
        "--record-dir", str(tmp_path / "record"), "--steps", "10,25,50,100", "--interval-s", str(interval),
        "--min-requests", "20", "--max-p99-latency-s", "1.0", "--serve-arg=--threads=1",
        "--scrape-interval-s", str(SCRAPE_INTERVAL_S)])
    router = read_stack(work).router.url
    with LoadGenerator(router + INFER, images, SPLIT_LOAD_RATE) as load:
        assert args.func(args) == 0
        promoted_at = time.time()
        time.sleep(1.5)
    state = StateStore(tmp_path / "state.json").load()
    assert state.phase == PROMOTED and state.weight == 100
    assert state.probe["max_abs_diff"] <= 1e-4

    # The registry: champion moved, the old one kept as previous-champion, the record on the candidate's run.
    assert registry.champion(config).version == candidate.version
    assert registry.version_for_alias(config, registry.PREVIOUS_CHAMPION).version == first.version
    assert registry.version_for_alias(config, registry.CHAMPION).tags["canary"] == PROMOTED
    from mlflow import MlflowClient

    logged = {a.path for a in MlflowClient(config.tracking_uri).list_artifacts(candidate.run_id)}
    assert {registry.DECISION_RECORD_JSON, registry.DECISION_RECORD_MD} <= logged

    # All traffic on the candidate, which is now the stack's stable server.
    backend = stack_backend(work)
    try:
        assert backend.traffic() == 100
        stack = read_stack(work)
        assert stack.canary is None and stack.stable.model == candidate.uri
        answer = httpx.post(router + INFER, content=load.bodies[0], headers={"content-type": "application/json"})
        assert answer.json()["model_version"] == candidate.version
    finally:
        backend.close()
    assert {r[4] for r in sent_between(load, promoted_at, float("inf")) if r[2] == 200} == {candidate.version}
    assert stable_failures(load) == []

    # The split the clients saw, per step, against the weight set.
    lines = []
    for analysis in state.analyses:
        set_at = max(e["t"] for e in state.timeline
                     if e["event"] == "candidate traffic set" and e["weight"] == analysis["weight"])
        seen = sent_between(load, set_at, analysis["t"])
        canary = sum(1 for r in seen if r[3] == "canary")
        observed = 100 * canary / len(seen)
        lines.append(f"{analysis['weight']}%: {canary}/{len(seen)} = {observed:.2f}%")
        assert len(seen) >= SPLIT_MIN_REQUESTS
        assert abs(observed - analysis["weight"]) <= 5
    statuses = Counter(r[2] for r in load.results)
    report(capsys, f"promotion under {SPLIT_LOAD_RATE:g} req/s ({len(load.results)} requests, statuses "
                   f"{dict(statuses)}): observed canary split per step {'; '.join(lines)}")
    assert [a["weight"] for a in state.analyses if a["verdict"] == "pass"] == [10, 25, 50]
    markdown = (tmp_path / "record" / record.MARKDOWN_NAME).read_text()
    assert markdown.startswith("# Canary delivery: PROMOTED")


# --------------------------------------------------------------------------- crash and resume


LAUNCH = """
import sys
from defectkit.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_controller_killed_mid_rollout_resumes_and_recorded_weight_is_actual(work, models, images, dataset_dir,
                                                                               tmp_path, capsys):
    golden_dir = build_golden(dataset_dir, models[3], tmp_path / "golden", count=4)
    state_path = tmp_path / "state.json"
    argv = ["rollout", "start", "--backend", "local", "--work", str(work), "--model", str(models[3]),
            "--golden", str(golden_dir), "--state", str(state_path), "--record-dir", str(tmp_path / "record"),
            "--steps", "10,25,50,100", "--interval-s", "2", "--min-requests", "5", "--max-p99-latency-s", "1.0",
            "--serve-arg=--threads=1", "--scrape-interval-s", str(SCRAPE_INTERVAL_S)]
    router = read_stack(work).router.url
    store = StateStore(state_path)
    with LoadGenerator(router + INFER, images, LOAD_RATE) as load:
        with open(tmp_path / "controller.log", "wb") as log_file:
            process = subprocess.Popen([sys.executable, "-c", LAUNCH, *argv], stdout=log_file,
                                       stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        try:
            deadline = time.monotonic() + 120
            while True:
                state = store.load()
                if state is not None and state.phase == "analysing" and state.weight == 25:
                    break
                assert process.poll() is None, (tmp_path / "controller.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "the delivery never reached 25%"
                time.sleep(0.05)
            time.sleep(0.7)  # well inside the analysis interval
            os.kill(process.pid, signal.SIGKILL)
        finally:
            if process.poll() is None:
                process.kill()
            process.wait(30)
        killed_at = time.time()

        backend = stack_backend(work)
        try:
            state = store.load()
            assert state.target_weight is None and state.weight == backend.traffic() == 25
            time.sleep(1.0)  # traffic keeps flowing with nobody watching
            args = build_parser().parse_args(argv)
            assert args.func(args) == 0
            state = store.load()
            assert state.phase == PROMOTED and state.weight == backend.traffic() == 100
        finally:
            backend.close()
    resumed = [e for e in state.timeline if e["event"] == "resumed after an interruption"]
    assert resumed and resumed[0]["interrupted_phase"] == "analysing"
    assert [a["weight"] for a in state.analyses if a["verdict"] == "pass"] == [10, 25, 50]
    assert read_stack(work).stable.model == str(models[3])
    assert stable_failures(load) == []
    during = sent_between(load, killed_at, resumed[0]["t"])
    report(capsys, f"controller SIGKILLed at 25%: the stack kept the split while it was down "
                   f"({sum(r[3] == 'canary' for r in during)}/{len(during)} requests to the canary), then the "
                   f"restarted controller resumed and promoted")
