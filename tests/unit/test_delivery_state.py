"""The rollout state file and the controller's state machine, resumed after kills at every kind of moment.

The serving platform here is an in-memory stand-in that keeps the Backend contract (as
tests/kube_api.py stands in for Kubernetes); the real local stack is exercised by
tests/integration/test_local_rollout.py.
"""

import json
import math

import numpy as np
import pytest

from defectkit.delivery import record
from defectkit.delivery.analysis import CanaryPolicy, MetricsUnavailable
from defectkit.delivery.backend import BackendError, ProbeAnswer, VariantMetrics
from defectkit.delivery.controller import Controller, Golden, RolloutInProgress, restore_stable
from defectkit.delivery.state import (
    ANALYSING,
    FAILED,
    PROMOTED,
    ROLLED_BACK,
    RolloutState,
    StateStore,
    write_json_atomic,
)
from tests.stand_ins import ManualClock

POLICY = CanaryPolicy(steps=(10, 25, 50, 100), interval_s=30.0, failure_threshold=2, min_requests=50,
                      max_inconclusive=3)
GOLDEN = Golden(names=("test/good/a.png", "test/crack/b.png"), images=(b"a", b"b"), scores=(0.1, 0.9),
                weights_sha256="0" * 64)


class Killed(BaseException):
    """The controller process dying at this instant (nothing after it runs, the state file stays as written)."""


def healthy(weight: int, requests: float = 1000) -> dict:
    scores = tuple(np.random.default_rng(weight).beta(2, 5, 200).tolist())
    canary = requests * weight / 100
    return {"stable": VariantMetrics(requests - canary, 0, 0.01, 0.02, scores),
            "canary": VariantMetrics(canary, 0, 0.01, 0.03, scores)}


def erroring(weight: int) -> dict:
    figures = healthy(weight)
    canary = figures["canary"]
    figures["canary"] = VariantMetrics(canary.requests, canary.requests / 2, 0.01, 0.03, canary.scores)
    return figures


class StandInBackend:
    """Traffic, candidate and figures kept in memory; ``kill`` makes one call die before or after taking effect."""

    def __init__(self, figures=healthy, probe_scores=(0.1, 0.9), precision="fp32") -> None:
        self.precision = precision
        self.figures = figures
        self.probe_scores = list(probe_scores)
        self.stable, self.candidate, self.weight = "stable-model", None, 0
        self.calls: list[str] = []
        self.kill: tuple[str, int, str] | None = None  # (method, nth call, "before" | "after" | "error")
        self.metrics_error: str | None = None
        self.metrics_missing: str | None = None  # figures that cannot be read (Prometheus down), not a bad candidate

    def _call(self, name: str, apply) -> object:
        self.calls.append(name)
        when = None
        if self.kill and self.kill[0] == name and self.calls.count(name) == self.kill[1]:
            when = self.kill[2]
            self.kill = None
        if when == "before":
            raise Killed(name)
        if when == "error":
            raise BackendError(f"{name} broke off")
        result = apply()
        if when == "after":
            raise Killed(name)
        return result

    def deploy_candidate(self, model_uri):
        def apply():
            self.candidate = model_uri
        self._call("deploy_candidate", apply)

    def set_traffic(self, canary_percent):
        def apply():
            if self.candidate is None:
                raise BackendError("no candidate")
            self.weight = canary_percent
        self._call("set_traffic", apply)

    def traffic(self):
        return self._call("traffic", lambda: self.weight)

    def promote(self):
        def apply():
            self.stable, self.weight = self.candidate, 100
        self._call("promote", apply)

    def rollback(self):
        def apply():
            self.weight = 0
        self._call("rollback", apply)

    def metrics(self, window_s):
        def apply():
            if self.metrics_error:
                raise BackendError(self.metrics_error)
            if self.metrics_missing:
                raise MetricsUnavailable(self.metrics_missing)
            return self.figures(self.weight)
        return self._call("metrics", apply)

    def probe(self, images):
        return self._call("probe", lambda: ProbeAnswer(tuple(self.probe_scores[:len(images)]), self.precision))


@pytest.fixture
def clock():
    return ManualClock()


def controller(backend, tmp_path, clock, *, candidate="candidate-model", golden=GOLDEN, policy=POLICY, hooks=None):
    hooks = hooks if hooks is not None else []
    # As rollout.deliver does, the controller is told the model that serves as stable right now.
    return Controller(backend, policy, tmp_path / "state.json", candidate=candidate, candidate_version="7",
                      stable=backend.stable, golden=golden, record_dir=tmp_path / "record",
                      on_promote=lambda s: hooks.append(("promote", s.weight)),
                      on_rollback=lambda s: hooks.append(("rollback", s.weight)), clock=clock, sleep=clock.sleep)


def persisted(tmp_path) -> RolloutState:
    return StateStore(tmp_path / "state.json").load()


def assert_weight_matches(tmp_path, backend):
    state = persisted(tmp_path)
    if state.target_weight is None:
        assert state.weight == backend.weight
    else:
        assert backend.weight in (state.weight, state.target_weight)


# --------------------------------------------------------------------------- the state file


def test_state_round_trips_and_is_written_atomically(tmp_path):
    store = StateStore(tmp_path / "deep" / "state.json")
    assert store.load() is None
    state = RolloutState(candidate="c", backend="local", policy=POLICY.to_json())
    state.event("delivery started")
    store.save(state)
    assert store.load() == state
    assert [p.name for p in store.path.parent.iterdir()] == ["state.json"]  # no temporary file left


def test_a_failed_write_leaves_the_previous_state(tmp_path):
    path = tmp_path / "state.json"
    write_json_atomic(path, {"ok": 1})
    with pytest.raises(ValueError):
        write_json_atomic(path, {"bad": math.nan})
    assert json.loads(path.read_text()) == {"ok": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_an_unreadable_state_file_is_reported_with_its_path(tmp_path):
    path = tmp_path / "state.json"
    path.write_text('{"candidate": "c", "backend": "local", "policy": {}, "phase": "dancing"}')
    with pytest.raises(ValueError, match=r"state.json is unreadable.*dancing"):
        StateStore(path).load()
    path.write_text("{torn")
    with pytest.raises(ValueError, match="unreadable"):
        StateStore(path).load()


# --------------------------------------------------------------------------- the state machine


def test_a_healthy_candidate_steps_through_and_is_promoted(tmp_path, clock):
    backend, hooks = StandInBackend(), []
    state = controller(backend, tmp_path, clock, hooks=hooks).run()
    assert state.phase == PROMOTED and state.weight == 100 == backend.weight
    assert backend.stable == "candidate-model"
    assert hooks == [("promote", 100)]
    assert [a["weight"] for a in state.analyses] == [10, 25, 50]
    assert all(a["verdict"] == "pass" for a in state.analyses)
    assert state.probe["max_abs_diff"] == 0
    # Each step was held for one interval.
    assert clock.now == pytest.approx(1_000_000 + 3 * POLICY.interval_s)
    saved = record.read_record(tmp_path / "record")
    assert saved["verdict"] == PROMOTED and len(saved["analyses"]) == 3
    markdown = (tmp_path / "record" / record.MARKDOWN_NAME).read_text()
    assert markdown.startswith("# Canary delivery: PROMOTED") and "registry version 7" in markdown
    # Run again: a finished delivery is not repeated.
    assert controller(backend, tmp_path, clock).run().phase == PROMOTED
    assert backend.calls.count("promote") == 1


def test_the_offline_evidence_is_kept_in_the_state_and_shown_in_the_record(tmp_path, clock):
    comparison = {"metric": "image AUROC", "champion": 0.95, "challenger": 0.96, "difference": -0.01,
                  "standard_error": 0.01, "ci_low": -0.0296, "ci_high": 0.0096, "confidence": 0.95, "p_value": 0.32,
                  "n_defect": 100, "n_good": 110, "method": "DeLong"}
    evidence = {"image_auroc": 0.96, "f1": 0.9, "recall": 0.88, "fpr": 0.05, "n_test": 210,
                "auroc_comparison": comparison}
    backend = StandInBackend()
    Controller(backend, POLICY, tmp_path / "state.json", candidate="candidate-model", stable=backend.stable,
               golden=GOLDEN, record_dir=tmp_path / "record", clock=clock, sleep=clock.sleep,
               evidence=evidence).run()
    assert persisted(tmp_path).evidence == evidence
    assert record.read_record(tmp_path / "record")["evidence"] == evidence
    markdown = (tmp_path / "record" / record.MARKDOWN_NAME).read_text()
    assert "## Offline evidence" in markdown and "Test set of 210 images: image AUROC 0.96" in markdown
    assert ("image AUROC champion 0.9500 - challenger 0.9600 = -0.0100, 95% CI [-0.0296, +0.0096], p = 0.32 "
            "(DeLong, 100 defect and 110 good images)") in markdown
    # Without a judged model the record says so.
    backend = StandInBackend()
    controller(backend, tmp_path / "bare", clock).run()
    assert "None recorded" in (tmp_path / "bare" / "record" / record.MARKDOWN_NAME).read_text()


def test_a_promotion_undone_since_is_delivered_again(tmp_path, clock):
    backend = StandInBackend()
    assert controller(backend, tmp_path, clock).run().phase == PROMOTED
    # Another model was promoted since, recorded in another state file: this one is stale.
    backend.stable = "other-model"
    state = controller(backend, tmp_path, clock).run()
    assert state.phase == PROMOTED and backend.stable == "candidate-model"
    assert backend.calls.count("promote") == 2
    assert state.stable == "other-model" and [a["weight"] for a in state.analyses] == [10, 25, 50]


def test_failed_analyses_reaching_the_threshold_roll_back(tmp_path, clock):
    backend, hooks = StandInBackend(figures=erroring), []
    state = controller(backend, tmp_path, clock, hooks=hooks).run()
    assert state.phase == ROLLED_BACK and state.weight == 0 == backend.weight
    assert hooks == [("rollback", 0)]
    assert state.failed_checks == 2 and [a["verdict"] for a in state.analyses] == ["fail", "fail"]
    assert "failure threshold of 2" in state.reason and "error rate 50.00%" in state.reason
    assert clock.now == pytest.approx(1_000_000 + 2 * POLICY.interval_s)
    assert "ROLLED BACK" in (tmp_path / "record" / record.MARKDOWN_NAME).read_text()


def test_one_failure_below_the_threshold_holds_the_step(tmp_path, clock):
    verdicts = iter([erroring, healthy, healthy, healthy])
    backend = StandInBackend(figures=lambda weight: next(verdicts)(weight))
    state = controller(backend, tmp_path, clock).run()
    assert state.phase == PROMOTED and state.failed_checks == 1
    assert [(a["weight"], a["verdict"]) for a in state.analyses] == [(10, "fail"), (10, "pass"), (25, "pass"),
                                                                       (50, "pass")]


def test_inconclusive_windows_neither_fail_nor_pass_but_are_bounded(tmp_path, clock):
    backend = StandInBackend(figures=lambda weight: healthy(weight, requests=100))  # 10 canary requests at 10%
    state = controller(backend, tmp_path, clock).run()
    assert state.phase == ROLLED_BACK and state.failed_checks == 0
    assert [a["verdict"] for a in state.analyses] == ["inconclusive"] * 3
    assert "fewer than min_requests=50; the candidate cannot be judged" in state.reason


def test_metrics_the_backend_cannot_give_count_as_a_failed_analysis(tmp_path, clock):
    backend = StandInBackend()
    backend.metrics_error = "cannot scrape the canary server's metrics"
    state = controller(backend, tmp_path, clock).run()
    assert state.phase == ROLLED_BACK and state.failed_checks == 2
    assert "cannot scrape" in state.analyses[0]["explanation"]


def test_metrics_that_cannot_be_read_hold_the_step_and_never_promote(tmp_path, clock):
    backend = StandInBackend()
    backend.metrics_missing = "Prometheus at http://prometheus:9090 is unreachable"
    state = controller(backend, tmp_path, clock).run()
    assert state.phase == ROLLED_BACK and state.failed_checks == 0
    assert [a["verdict"] for a in state.analyses] == ["inconclusive"] * POLICY.max_inconclusive
    assert max(a["weight"] for a in state.analyses) == POLICY.steps[0]  # held at the first step throughout
    assert "3 inconclusive analyses in a row" in state.reason and "Prometheus" in state.reason
    assert "too little traffic" not in state.reason


def test_a_golden_mismatch_rolls_back_before_any_traffic(tmp_path, clock):
    backend = StandInBackend(probe_scores=(0.1, 0.95))
    state = controller(backend, tmp_path, clock).run()
    assert state.phase == ROLLED_BACK and "set_traffic" not in backend.calls
    assert "test/crack/b.png scored 0.950000" in state.reason and "0.900000 in offline evaluation" in state.reason
    assert max(entry["weight"] for entry in state.timeline) == 0


@pytest.mark.parametrize("precision, served, verdict", [
    ("fp32", (0.1, 0.9 + 5e-5), PROMOTED),      # fp32 reproduces offline scores to probe_tolerance
    ("fp32", (0.1, 0.9 + 0.004), ROLLED_BACK),  # ... so bf16-sized drift in fp32 means a real difference
    ("bf16", (0.1, 0.9 + 0.004), PROMOTED),     # a GPU serving in bf16 rounds that much: a good model passes
    ("bf16", (0.1, 0.5), ROLLED_BACK),          # a wrong model still fails in bf16
])
def test_the_probe_tolerance_follows_the_precision_the_candidate_serves_in(tmp_path, clock, precision, served,
                                                                           verdict):
    backend = StandInBackend(probe_scores=served, precision=precision)
    state = controller(backend, tmp_path, clock).run()
    assert state.phase == verdict, state.reason
    assert state.probe["served_precision"] == precision and state.probe["golden_precision"] == "fp32"


@pytest.mark.parametrize("kill", [
    ("deploy_candidate", 1, "after"),
    ("probe", 1, "before"),
    ("set_traffic", 1, "before"),
    ("set_traffic", 2, "after"),  # traffic changed, confirmation never written
    ("metrics", 2, "before"),  # mid-analysis
    ("promote", 1, "after"),  # promoted, hook never ran
])
def test_killed_anywhere_and_restarted_the_delivery_completes(tmp_path, clock, kill):
    backend, hooks = StandInBackend(), []
    backend.kill = kill
    with pytest.raises(Killed):
        controller(backend, tmp_path, clock, hooks=hooks).run()
    assert_weight_matches(tmp_path, backend)
    state = controller(backend, tmp_path, clock, hooks=hooks).run()
    assert state.phase == PROMOTED and state.weight == 100 == backend.weight
    assert hooks[-1] == ("promote", 100)
    assert any(e["event"] == "resumed after an interruption" for e in state.timeline)
    assert [a["weight"] for a in state.analyses if a["verdict"] == "pass"] == [10, 25, 50]


def test_killed_during_rollback_and_restarted_the_rollback_completes(tmp_path, clock):
    backend, hooks = StandInBackend(figures=erroring), []
    backend.kill = ("rollback", 1, "before")
    with pytest.raises(Killed):
        controller(backend, tmp_path, clock, hooks=hooks).run()
    assert persisted(tmp_path).target_weight == 0 and backend.weight == 10
    state = controller(backend, tmp_path, clock, hooks=hooks).run()
    assert state.phase == ROLLED_BACK and state.weight == 0 == backend.weight and hooks == [("rollback", 0)]


def test_a_promotion_that_broke_off_is_finished_not_undone(tmp_path, clock):
    backend, hooks = StandInBackend(), []
    backend.kill = ("promote", 1, "error")
    state = controller(backend, tmp_path, clock, hooks=hooks).run()
    assert state.phase == FAILED and state.target_weight == 100 and hooks == []
    assert "run the delivery again to finish the promotion" in state.reason
    assert restore_stable(backend, tmp_path / "state.json") is False and backend.weight == 50
    state = controller(backend, tmp_path, clock, hooks=hooks).run()
    assert state.phase == PROMOTED and state.weight == 100 == backend.weight and hooks == [("promote", 100)]


def test_a_registry_failure_after_the_promotion_is_resumed_as_a_promotion(tmp_path, clock):
    backend, calls = StandInBackend(), []

    def flaky_registry(state):
        calls.append(state.weight)
        if len(calls) == 1:
            raise ConnectionError("MLflow is down")

    run = Controller(backend, POLICY, tmp_path / "state.json", candidate="candidate-model", golden=GOLDEN,
                     on_promote=flaky_registry, clock=clock, sleep=clock.sleep)
    state = run.run()
    assert state.phase == FAILED and state.weight == 100 == backend.weight and state.target_weight == 100
    state = run.run()
    assert state.phase == PROMOTED and calls == [100, 100] and state.target_weight is None


def test_a_rollback_that_broke_off_is_finished_by_a_restore(tmp_path, clock):
    backend = StandInBackend(figures=erroring)
    backend.kill = ("rollback", 1, "error")
    state = controller(backend, tmp_path, clock).run()
    assert state.phase == FAILED and state.target_weight == 0 and backend.weight == 10
    assert "defectkit rollout restore" in state.reason
    with pytest.raises(RolloutInProgress):
        controller(backend, tmp_path, clock, candidate="other-model").run()
    assert restore_stable(backend, tmp_path / "state.json") is True
    assert persisted(tmp_path).phase == ROLLED_BACK and backend.weight == 0


def test_resumed_mid_analysis_the_recorded_weight_is_restored(tmp_path, clock):
    backend = StandInBackend()
    backend.kill = ("metrics", 2, "before")
    with pytest.raises(Killed):
        controller(backend, tmp_path, clock).run()
    assert persisted(tmp_path).phase == ANALYSING and persisted(tmp_path).weight == 25
    backend.weight = 60  # someone moved the traffic while the controller was down
    state = controller(backend, tmp_path, clock).run()
    assert state.phase == PROMOTED
    restored = [e for e in state.timeline if e["event"].startswith("actual traffic differs")]
    assert restored and restored[0]["actual"] == 60 and restored[0]["weight"] == 25


def test_resumed_mid_analysis_an_unhealthy_candidate_is_rolled_back(tmp_path, clock):
    backend = StandInBackend()
    backend.kill = ("metrics", 1, "before")
    with pytest.raises(Killed):
        controller(backend, tmp_path, clock).run()
    backend.probe_scores = [0.5, 0.5]  # the candidate went bad while nobody watched
    state = controller(backend, tmp_path, clock).run()
    assert state.phase == ROLLED_BACK and backend.weight == 0
    assert state.reason.startswith("resumed mid-analysis: golden probe failed")


def test_resumed_mid_analysis_the_window_just_past_is_judged_at_once(tmp_path, clock):
    backend = StandInBackend(figures=erroring)
    backend.kill = ("metrics", 1, "before")
    with pytest.raises(Killed):
        controller(backend, tmp_path, clock).run()
    resumed_at = clock.now
    state = controller(backend, tmp_path, clock).run()
    assert state.phase == ROLLED_BACK and state.failed_checks == 2
    assert state.analyses[0]["t"] == resumed_at  # no wait: the interrupted analysis was made on resuming


def test_another_candidate_waits_for_an_unfinished_delivery(tmp_path, clock):
    backend = StandInBackend()
    backend.kill = ("metrics", 1, "before")
    with pytest.raises(Killed):
        controller(backend, tmp_path, clock).run()
    with pytest.raises(RolloutInProgress, match="unfinished delivery of candidate-model"):
        controller(backend, tmp_path, clock, candidate="other-model").run()


def test_restore_stable_rolls_back_only_an_unfinished_delivery(tmp_path, clock):
    backend, hooks = StandInBackend(), []
    assert restore_stable(backend, tmp_path / "state.json") is False
    backend.kill = ("metrics", 2, "before")
    with pytest.raises(Killed):
        controller(backend, tmp_path, clock).run()
    assert backend.weight == 25
    assert restore_stable(backend, tmp_path / "state.json", reason="the pipeline run failed",
                          on_rollback=lambda s: hooks.append(s.phase), record_dir=tmp_path / "record") is True
    state = persisted(tmp_path)
    assert state.phase == ROLLED_BACK and state.weight == 0 == backend.weight and hooks == ["rolling_back"]
    assert state.reason.startswith("the pipeline run failed (the delivery stopped in phase analysing at 25%")
    assert record.read_record(tmp_path / "record")["verdict"] == ROLLED_BACK
    assert restore_stable(backend, tmp_path / "state.json") is False


def test_an_unexpected_error_rolls_back(tmp_path, clock):
    backend = StandInBackend()

    def broken(weight):
        raise RuntimeError("figures garbled")

    backend.figures = broken
    state = controller(backend, tmp_path, clock).run()
    assert state.phase == ROLLED_BACK and backend.weight == 0
    assert "RuntimeError: figures garbled" in state.error


def test_killed_after_any_backend_call_the_file_agrees_with_the_backend(tmp_path, clock):
    calls_in_a_delivery = 9  # deploy, probe, 3 x (set_traffic, metrics), promote
    for n in range(1, calls_in_a_delivery + 1):
        backend = StandInBackend()
        original = backend._call

        def dying(name, apply, original=original, backend=backend, limit=n):
            result = original(name, apply)
            if len(backend.calls) == limit:
                raise Killed(name)
            return result

        backend._call = dying
        work = tmp_path / str(n)
        with pytest.raises(Killed):
            controller(backend, work, clock).run()
        assert_weight_matches(work, backend)
        backend._call = original
        assert controller(backend, work, clock).run().phase == PROMOTED
        assert persisted(work).weight == 100 == backend.weight


def test_whole_float_integer_parameters_from_a_pipeline_client_are_accepted():
    from defectkit.delivery.rollout import policy_from_parameters

    policy = policy_from_parameters(failure_threshold=3.0, min_requests=20.0, max_inconclusive=4.0)
    assert (policy.failure_threshold, policy.min_requests, policy.max_inconclusive) == (3, 20, 4)
    with pytest.raises(ValueError):
        policy_from_parameters(failure_threshold=2.5)


# --------------------------------------------------------------------------- the approval gate


class Approver:
    """An approval endpoint on 127.0.0.1 answering ``statuses`` in turn (then the last one forever)."""

    def __init__(self, *statuses: int) -> None:
        from tests.stand_ins import JsonServer

        self.statuses, self.asked = list(statuses), []
        self.server = JsonServer(self._route)

    def _route(self, method, path, query, body, headers):
        self.asked.append(body)
        return (self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]), {}


@pytest.fixture
def approver():
    made = []

    def make(*statuses: int) -> Approver:
        made.append(Approver(*statuses))
        return made[-1]

    yield make
    for a in made:
        a.server.close()


def _gated(backend, tmp_path, clock, gate):
    return Controller(backend, POLICY, tmp_path / "state.json", candidate="candidate-model", stable=backend.stable,
                      golden=GOLDEN, record_dir=tmp_path / "record", clock=clock, sleep=clock.sleep, approval=gate)


def test_the_promotion_waits_for_a_200_from_the_approval_url(tmp_path, clock, approver):
    from defectkit.delivery.approval import ApprovalGate

    endpoint = approver(403, 503, 200)
    backend = StandInBackend()
    state = _gated(backend, tmp_path, clock, ApprovalGate(f"{endpoint.server.url}/approve?token=x",
                                                          poll_interval_s=60)).run()
    assert state.phase == PROMOTED and backend.calls.count("promote") == 1
    assert [body["stage"] for body in endpoint.asked] == ["promotion"] * 3
    assert endpoint.asked[0]["weight"] == 50 and endpoint.asked[0]["analyses"] == 3
    assert state.approval["asked"] == 3 and state.approval["last_answer"] == "HTTP 200"
    # Asked after every step passed, twice refused 60 s apart: the promotion came 120 s later.
    assert state.approval["approved_at"] - state.approval["requested_at"] == pytest.approx(120)
    markdown = (tmp_path / "record" / record.MARKDOWN_NAME).read_text()
    assert "## Approval" in markdown and "**approved**" in markdown and "token" not in markdown


def test_no_approval_within_the_timeout_rolls_back(tmp_path, clock, approver):
    from defectkit.delivery.approval import ApprovalGate

    endpoint = approver(403)
    backend = StandInBackend()
    gate = ApprovalGate(endpoint.server.url, timeout_s=300, poll_interval_s=60)
    state = _gated(backend, tmp_path, clock, gate).run()
    assert state.phase == ROLLED_BACK and backend.weight == 0 and "promote" not in backend.calls
    assert "no approval of the promotion" in state.reason and "last answer HTTP 403" in state.reason
    assert len(endpoint.asked) == 6  # at 0, 60, ..., 300 s
    assert "**not approved** within 300 s" in (tmp_path / "record" / record.MARKDOWN_NAME).read_text()


def test_an_approval_before_traffic_holds_the_first_step(tmp_path, clock, approver):
    from defectkit.delivery.approval import ApprovalGate

    endpoint = approver(403)
    backend = StandInBackend()
    gate = ApprovalGate(endpoint.server.url, before="traffic", timeout_s=120, poll_interval_s=60)
    state = _gated(backend, tmp_path, clock, gate).run()
    assert state.phase == ROLLED_BACK and "set_traffic" not in backend.calls
    assert endpoint.asked[0]["stage"] == "traffic" and endpoint.asked[0]["weight"] == 0
    with pytest.raises(ValueError, match="before='deploy' must be one of promotion, traffic"):
        ApprovalGate("http://127.0.0.1:1", before="deploy")
