"""The controller holds its delivery for the whole run, and a killed one leaves a state another run resumes.

The full kill-at-every-transition run against real model servers is the chaos scenario
``controller_kill`` (tests/chaos/scenario_controller.py); these are its quick parts.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from defectkit.delivery.analysis import CanaryPolicy
from defectkit.delivery.controller import Controller
from defectkit.delivery.local import LocalBackend
from defectkit.delivery.state import RolloutInProgress, RolloutState, StateStore
from tests.chaos.scenario_controller import LAUNCH, transition

ROOT = Path(__file__).resolve().parents[2]
POLICY = CanaryPolicy(steps=(50, 100), interval_s=1.0)


def test_transitions_are_named_by_event_phase_weight_and_pending_target():
    state = RolloutState(candidate="c", backend="local", policy=POLICY.to_json())
    state.event("delivery started")
    assert transition(state) == "delivery started [deploying 0%]"
    state.phase, state.target_weight = "stepping", 50
    state.event("setting candidate traffic")
    assert transition(state) == "setting candidate traffic [stepping 0%->50%]"


def test_a_second_controller_is_refused_for_as_long_as_the_first_runs(tmp_path):
    backend = LocalBackend(tmp_path / "svc")  # no stack runs there: the delivery fails and rolls back
    refused: list[str] = []

    def second_delivery(state: RolloutState) -> None:
        # Runs inside the first controller's run, after its rollback moved the traffic.
        with pytest.raises(RolloutInProgress) as caught:
            Controller(backend, POLICY, tmp_path / "state.json", candidate="other").run()
        refused.append(str(caught.value))

    try:
        state = Controller(backend, POLICY, tmp_path / "state.json", candidate="first",
                           on_rollback=second_delivery).run()
    finally:
        backend.close()
    assert state.phase == "rolled_back"
    assert refused and "running right now" in refused[0]
    assert StateStore(tmp_path / "state.json").load().candidate == "first"


def test_a_controller_killed_right_after_a_save_leaves_that_state_and_no_lock(tmp_path):
    """The launcher the chaos scenario uses: the save happens, then SIGKILL; the next run resumes it."""
    state_path = tmp_path / "state.json"
    argv = ["rollout", "start", "--backend", "local", "--work", str(tmp_path / "svc"), "--model",
            str(_model(tmp_path)), "--stable", str(_model(tmp_path, 1)), "--state", str(state_path),
            "--steps", "50,100", "--interval-s", "1", "--serve-arg=--threads=1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CHAOS_KILL_AT": "delivery started [deploying 0%]"}
    # The stack (router, stable server) starts first; the controller dies before it deploys the candidate.
    process = subprocess.run([sys.executable, "-c", LAUNCH, *argv], env=env, capture_output=True, timeout=300)
    try:
        assert process.returncode == -signal.SIGKILL, process.stderr.decode()[-2000:]
        state = StateStore(state_path).load()
        assert transition(state) == "delivery started [deploying 0%]" and state.weight == 0
        # The lock died with the process: a restore is not refused, and rolls the delivery back.
        from defectkit.delivery import rollout

        assert rollout.restore(rollout.DeliveryConfig(work_dir=str(tmp_path / "svc"), state_path=str(state_path)))
        assert StateStore(state_path).load().phase == "rolled_back"
    finally:
        from defectkit.delivery.local import stop_stack

        stop_stack(tmp_path / "svc")


def _model(tmp_path: Path, k: int = 0) -> Path:
    from tests.chaos.stack import models

    directory = tmp_path / "models"
    if not (directory / f"model-{k}").exists():
        models(directory, 2)
    return directory / f"model-{k}"
