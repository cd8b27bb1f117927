"""Races the chaos suite found: two deliveries to one service, two monitor runs on one window.

Real processes hold the locks (and die by SIGKILL); the monitor's claims are made on local
disk and on moto's S3 server.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from defectkit import monitor
from defectkit.cli import main
from defectkit.delivery.analysis import CanaryPolicy
from defectkit.delivery.controller import Controller, restore_stable
from defectkit.delivery.local import LocalBackend
from defectkit.delivery.rollout import DELIVERY_DIR, SERVICE_LOCK, DeliveryConfig, service_lock
from defectkit.delivery.state import RolloutInProgress, RolloutState, StateConflict, StateStore

ROOT = Path(__file__).resolve().parents[2]
POLICY = CanaryPolicy(steps=(50, 100), interval_s=1.0)

HOLD = """
import sys, time
from pathlib import Path
from defectkit.delivery.state import delivery_lock
with delivery_lock(Path(sys.argv[1]), "the test service"):
    print("held", flush=True)
    time.sleep(120)
"""


def hold_in_another_process(path: Path) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert process.stdout.readline().strip() == b"held"
    return process


def kill(process: subprocess.Popen) -> None:
    os.kill(process.pid, signal.SIGKILL)
    process.wait(10)


# --------------------------------------------------------------------------- deliveries


def test_a_second_delivery_is_refused_while_another_process_drives_one_and_not_after_it_died(tmp_path):
    state = tmp_path / "delivery" / "state.json"
    state.parent.mkdir()
    other = hold_in_another_process(state.parent)
    backend = LocalBackend(tmp_path / "svc")
    try:
        with pytest.raises(RolloutInProgress, match="running right now"):
            Controller(backend, POLICY, state, candidate="model-b").run()
        assert not state.exists(), "the refused delivery wrote nothing"
        with pytest.raises(RolloutInProgress, match="running right now"):
            restore_stable(backend, state)
    finally:
        kill(other)
    # The kernel dropped the dead holder's lock: the delivery runs (and, with no stack running, rolls back).
    final = Controller(backend, POLICY, state, candidate="model-b").run()
    backend.close()
    assert final.phase == "rolled_back" and "not running" in final.reason


def test_a_state_store_refuses_to_overwrite_what_another_writer_saved(tmp_path):
    path = tmp_path / "state.json"
    mine, theirs = StateStore(path), StateStore(path)
    assert mine.load() is None and theirs.load() is None
    theirs.save(RolloutState(candidate="theirs", backend="local", policy=POLICY.to_json()))
    with pytest.raises(StateConflict, match="created by another process"):
        mine.save(RolloutState(candidate="mine", backend="local", policy=POLICY.to_json()))
    state = mine.load()
    theirs.load()
    theirs.save(state)
    with pytest.raises(StateConflict, match="changed by another process"):
        mine.save(state)
    assert StateStore(path).load().candidate == "theirs"


def test_a_store_that_does_not_hold_the_delivery_cannot_write_while_another_process_holds_it(tmp_path):
    path = tmp_path / "state.json"
    other = hold_in_another_process(tmp_path)
    try:
        with pytest.raises(StateConflict, match="held by another process"):
            StateStore(path).save(RolloutState(candidate="c", backend="local", policy=POLICY.to_json()))
    finally:
        kill(other)
    assert not path.exists()


def test_the_service_lock_covers_every_state_file_of_the_work_directory(tmp_path):
    config = DeliveryConfig(model="unused", work_dir=str(tmp_path), state_path=str(tmp_path / "elsewhere.json"))
    other = hold_in_another_process(tmp_path / DELIVERY_DIR / SERVICE_LOCK)
    try:
        with pytest.raises(RolloutInProgress, match=f"the local service of {tmp_path}.*pid {other.pid}"):
            with service_lock(config):
                pass
    finally:
        kill(other)
    with service_lock(config):
        pass


def test_rollout_start_is_refused_with_exit_4_while_the_service_is_being_delivered(tmp_path, capsys):
    from tests.chaos.stack import models

    model = models(tmp_path / "models", 1)[0]
    other = hold_in_another_process(tmp_path / "work" / DELIVERY_DIR / SERVICE_LOCK)
    try:
        code = main(["rollout", "start", "--backend", "local", "--work", str(tmp_path / "work"), "--model",
                     str(model)])
    finally:
        kill(other)
    assert code == 4
    assert "REFUSED: a delivery to the local service" in capsys.readouterr().err
    assert not (tmp_path / "work" / "serving").exists(), "nothing was started"


# --------------------------------------------------------------------------- monitor runs


def _window(tmp_path: Path) -> tuple[Path, Path]:
    from defectkit import sampling, storage
    from defectkit.preprocess import PreprocessSpec
    from defectkit.synthetic import generate_sample

    generate_sample(tmp_path / "base", count=26, size=32, seed=0)
    files = sorted(p.read_bytes() for p in (tmp_path / "base").rglob("*.jpg"))[:4]
    at = time.time()
    sampling.write_shards(storage.Store(str(tmp_path / "samples")),
                          [(data, 0.2, "good", "v1", at + i / 1000) for i, data in enumerate(files)])
    sampling.window_to_dataset(tmp_path / "samples", at - 1, at + 60, tmp_path / "window",
                               spec=PreprocessSpec(image_size=32))
    return tmp_path / "base", tmp_path / "window"


def _act(tmp_path: Path, state_uri: str, run: str, until: float, now: float) -> dict:
    base, window = (tmp_path / "base", tmp_path / "window") if (tmp_path / "window").exists() else _window(tmp_path)
    return monitor.act(drifted=True, drifted_features=["brightness"], new_images=4, window=(until - 600, until),
                       window_dir=window, state_uri=state_uri,
                       policy=monitor.MonitorPolicy(min_new_images=1, cooldown_s=0.0, window_s=600),
                       base_dataset_uri=str(base), retraining_data_uri=str(tmp_path / "retraining"), run=run,
                       defect_class="stain", now=now)


def test_two_runs_that_read_the_same_last_retraining_retrain_once(tmp_path):
    state = str(tmp_path / "state")
    first = _act(tmp_path, state, "run-a", until=1000.0, now=5000.0)
    assert first["retrain"]
    # run-b read no marker either (it raced run-a): its claim on the first retraining is taken.
    won, claim = monitor.claim_retraining(state, None, (400.0, 1000.0), 5001.0, "run-b")
    assert not won and claim.run == "run-a" and claim.at == 5000.0
    second = _act(tmp_path, state, "run-b", until=1000.0, now=5001.0)
    assert not second["retrain"] and second["retraining_data"] is None
    assert any(r.startswith("monitor run run-a already retrain") for r in second["reasons"])
    assert monitor.read_last_retrain(state) == {"at": 5000.0, "run": "run-a"}


def test_a_retried_run_keeps_its_own_claim_and_its_first_time(tmp_path):
    state = str(tmp_path / "state")
    won, claim = monitor.claim_retraining(state, None, (400.0, 1000.0), 5000.0, "run-a")
    assert won and claim.at == 5000.0
    # The first attempt died after claiming; the retry (same run, later) goes on with that claim.
    record = _act(tmp_path, state, "run-a", until=1000.0, now=5100.0)
    assert record["retrain"] and record["retraining_data"] == monitor.retraining_data_folder(
        str(tmp_path / "retraining"), 5000.0)
    assert monitor.read_last_retrain(state) == {"at": 5000.0, "run": "run-a"}


def test_a_run_on_a_later_window_follows_a_claim_whose_marker_was_never_written(tmp_path):
    state = str(tmp_path / "state")
    monitor.claim_retraining(state, None, (400.0, 1000.0), 5000.0, "run-a")  # run-a died before merging
    record = _act(tmp_path, state, "run-c", until=1600.0, now=6000.0)
    assert record["retrain"] and record["cooldown"]["last_retrain"] == {"at": 5000.0, "run": "run-a"}
    assert monitor.read_last_retrain(state) == {"at": 6000.0, "run": "run-c"}


def test_claims_on_s3_are_create_only(s3_server):
    from tests.conftest import S3_BUCKET

    state = f"s3://{S3_BUCKET}/monitor-race-{time.time_ns()}"
    won, _ = monitor.claim_retraining(state, None, (0.0, 600.0), 10.0, "run-a")
    lost, claim = monitor.claim_retraining(state, None, (0.0, 600.0), 11.0, "run-b")
    assert won and not lost and claim.run == "run-a"


RACE = """
import json, sys, time
from pathlib import Path
from defectkit import monitor
job = json.loads(sys.argv[1])
time.sleep(max(0.0, job["start_at"] - time.time()))
record = monitor.act(drifted=True, drifted_features=[], new_images=4, window=(job["until"] - 600, job["until"]),
                     window_dir=Path(job["window"]), state_uri=job["state"],
                     policy=monitor.MonitorPolicy(min_new_images=1, cooldown_s=0.0, window_s=600),
                     base_dataset_uri=job["base"], retraining_data_uri=job["retraining"], run=job["run"])
print(json.dumps(record["retrain"]))
"""


def test_two_monitor_processes_on_one_window_at_the_same_instant_retrain_once(tmp_path):
    base, window = _window(tmp_path)
    for round_ in range(3):
        start_at = time.time() + 1.5
        jobs = [{"start_at": start_at, "until": 1000.0 + 600 * round_, "window": str(window),
                 "state": str(tmp_path / "state"), "base": str(base), "retraining": str(tmp_path / f"r{round_}"),
                 "run": f"run-{round_}-{side}"} for side in "ab"]
        processes = [subprocess.Popen([sys.executable, "-c", RACE, json.dumps(job)], stdout=subprocess.PIPE,
                                      env={**os.environ, "PYTHONPATH": str(ROOT)}) for job in jobs]
        answers = [json.loads(p.communicate(timeout=60)[0].decode().splitlines()[-1]) for p in processes]
        assert sorted(answers) == [False, True], answers
