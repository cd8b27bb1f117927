"""The retraining decision's rules, the last-retrain marker, the decision record and the retraining data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from defectkit.monitor import (
    Decision,
    MonitorPolicy,
    act,
    decide,
    decision_record,
    merge_for_retraining,
    read_last_retrain,
    render_record,
    retraining_data_folder,
    run_window,
    write_last_retrain,
    write_record,
)
from defectkit.sampling import SAMPLES_FILE, Sample

POLICY = MonitorPolicy(min_new_images=100, cooldown_s=3600)
NOW = 1_700_000_000.0


def test_drift_with_enough_data_and_no_earlier_retraining_retrains():
    decision = decide(True, 100, None, NOW, POLICY)
    assert decision == Decision(True, ("the production window passed validation",
                                       "production data drifted from the training reference",
                                       "100 new images >= the minimum of 100",
                                       "no earlier retraining: no cooldown applies"))


@pytest.mark.parametrize("drifted, new_images, last, valid, retrain", [
    (False, 500, None, True, False),  # no drift: never
    (True, 99, None, True, False),  # too little new data
    (True, 500, NOW - 3599, True, False),  # within the cooldown
    (True, 500, NOW - 3600, True, True),  # cooldown just over
    (True, 500, None, False, False),  # the window failed validation
])
def test_each_rule_can_hold_retraining_back(drifted, new_images, last, valid, retrain):
    decision = decide(drifted, new_images, last, NOW, POLICY, window_valid=valid)
    assert decision.retrain is retrain and len(decision.reasons) == 4


def test_a_retraining_stamped_after_now_is_just_now_and_a_zero_cooldown_does_not_hold_back():
    decision = decide(True, 500, NOW + 0.4, NOW, MonitorPolicy(min_new_images=1, cooldown_s=0.0))
    assert decision.retrain and decision.reasons[3] == "last retraining 0 s ago, at least the cooldown of 0 s"
    assert not decide(True, 500, NOW + 0.4, NOW, POLICY).retrain


def test_reasons_say_why():
    reasons = decide(True, 12, NOW - 600, NOW, POLICY, window_valid=False).reasons
    assert reasons[0].startswith("the production window failed validation")
    assert reasons[2] == "12 new images < the minimum of 100"
    assert reasons[3] == "last retraining 600 s ago, within the cooldown of 1.0 h"


@pytest.mark.parametrize("kwargs, match", [
    ({"min_new_images": -1}, "min_new_images"), ({"cooldown_s": float("nan")}, "cooldown_s"),
    ({"window_s": 0}, "window_s must be positive"),
])
def test_policy_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MonitorPolicy(**kwargs)


def test_last_retrain_marker_round_trip(tmp_path):
    assert read_last_retrain(tmp_path / "state") is None
    write_last_retrain(tmp_path / "state", NOW, "run-1")
    assert read_last_retrain(f"file://{tmp_path / 'state'}") == {"at": NOW, "run": "run-1"}


def test_decision_record_json_and_markdown(tmp_path):
    decision = decide(True, 150, NOW - 7200, NOW, POLICY)
    record = decision_record(window=(NOW - 86400, NOW), drift={"drifted": True, "drifted_features": ["brightness"]},
                             new_images=150, last_retrain={"at": NOW - 7200, "run": "run-0"}, now=NOW,
                             policy=POLICY, decision=decision, run="run-1")
    json_path, md_path = write_record(record, tmp_path / "record")
    loaded = json.loads(json_path.read_text())
    assert loaded["retrain"] is True and loaded["cooldown"]["elapsed_s"] == 7200
    assert loaded["drift"]["drifted_features"] == ["brightness"] and loaded["window"]["since"].startswith("2023-11-13")
    markdown = md_path.read_text()
    assert markdown.startswith("# Drift monitor: RETRAIN") and "(brightness)" in markdown and "`run-1`" in markdown
    assert loaded["validation"] == {"passed": True, "problems": ""} and "Window validation" not in markdown

    problems = "production window x failed validation:\n- expectation score_between failed: ..."
    record = decision_record(window=(NOW - 86400, NOW), drift={"drifted": True}, new_images=150, last_retrain=None,
                             now=NOW, policy=POLICY, decision=decide(True, 150, None, NOW, POLICY, window_valid=False),
                             validation=problems)
    assert record["validation"] == {"passed": False, "problems": problems} and record["retrain"] is False
    assert "## Window validation" in render_record(record) and "score_between failed" in render_record(record)


def _window(tmp_path: Path, labels: list[str]) -> Path:
    window = tmp_path / "window"
    (window / "images").mkdir(parents=True)
    lines = []
    for i, label in enumerate(labels):
        (window / "images" / f"s{i}.jpg").write_bytes(f"image {i}".encode())
        lines.append(json.dumps(Sample(f"images/s{i}.jpg", 0.9 if label == "defect" else 0.1, label, "v1",
                                       NOW + i).to_json()))
    (window / SAMPLES_FILE).write_text("\n".join(lines) + "\n")
    return window


def _base(tmp_path: Path) -> Path:
    base = tmp_path / "base"
    for rel in ("train/good/a.jpg", "train/scratch/b.jpg", "test/good/c.jpg"):
        (base / rel).parent.mkdir(parents=True, exist_ok=True)
        (base / rel).write_bytes(rel.encode())
    return base


def test_merge_adds_good_images_and_leaves_unknown_defects_out(tmp_path):
    result = merge_for_retraining(_base(tmp_path), _window(tmp_path, ["good", "defect", "good"]), tmp_path / "out")
    assert result.added == {"good": 2} and result.skipped == 1
    files = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert files == ["test/good/c.jpg", "train/good/a.jpg", "train/good/prod-s0.jpg", "train/good/prod-s2.jpg",
                     "train/scratch/b.jpg"]


def test_merge_with_a_defect_class_or_a_labeler(tmp_path):
    window = _window(tmp_path, ["good", "defect"])
    named = merge_for_retraining(_base(tmp_path), window, tmp_path / "named", defect_class="scratch")
    assert named.added == {"good": 1, "scratch": 1}
    reviewed = merge_for_retraining(_base(tmp_path), window, tmp_path / "reviewed",
                                    labeler=lambda s: "scratch" if s.score > 0.5 else None)
    assert reviewed.added == {"scratch": 1} and reviewed.skipped == 1
    with pytest.raises(ValueError, match="defect_class"):
        merge_for_retraining(_base(tmp_path), window, tmp_path / "bad", defect_class="good")


def _act(tmp_path: Path, *, drifted: bool = True, now: float = NOW) -> dict:
    """A window of one good and one defect image, acted on by monitor run "run-7"."""
    window = tmp_path / "window" if (tmp_path / "window").exists() else _window(tmp_path, ["good", "defect"])
    return act(drifted=drifted, drifted_features=["brightness"] if drifted else [], new_images=500,
               window=(now - 600, now), window_dir=window, state_uri=str(tmp_path / "state"), policy=POLICY,
               base_dataset_uri=str(_base(tmp_path)), retraining_data_uri=str(tmp_path / "retraining"),
               run="run-7", defect_class="scratch", now=now)


def test_act_writes_the_merged_data_and_remembers_the_run(tmp_path):
    record = _act(tmp_path)
    data = retraining_data_folder(str(tmp_path / "retraining"), NOW)
    assert record["run"] == "run-7" and record["retraining_data"] == data and record["retrain"] is True
    assert read_last_retrain(tmp_path / "state") == {"at": NOW, "run": "run-7"}
    assert (Path(data) / "train" / "scratch" / "prod-s1.jpg").is_file()
    assert "Retrained in run `run-7`" in render_record(record)

    again = _act(tmp_path, now=NOW + 60)
    assert not again["retrain"] and again["run"] is None and again["retraining_data"] is None, \
        "the cooldown holds the second retraining back"
    assert read_last_retrain(tmp_path / "state") == {"at": NOW, "run": "run-7"}


def test_act_tells_the_receivers_of_drift_and_of_the_retraining_it_starts(tmp_path, monkeypatch):
    from tests.unit.test_notify import Receiver

    receiver = Receiver()
    try:
        monkeypatch.setenv("DEFECTKIT_WEBHOOKS", receiver.url)  # as a Secret would give it to the step
        _act(tmp_path)
        _act(tmp_path, now=NOW + 60)  # drift again, but the cooldown holds the retraining back
    finally:
        receiver.server.close()
    events = [(b["body"]["event"], b["body"]["details"].get("retraining")) for b in receiver.bodies]
    assert events == [("drift_detected", "yes"), ("retraining_started", None), ("drift_detected", "no")]
    assert receiver.bodies[1]["body"]["details"]["run"] == "run-7"
    assert "cooldown" in receiver.bodies[2]["body"]["details"]["reasons"]


def test_act_writes_nothing_when_retraining_is_not_due(tmp_path):
    record = _act(tmp_path, drifted=False)
    assert record["retrain"] is False and record["run"] is None and record["retraining_data"] is None
    assert read_last_retrain(tmp_path / "state") is None and not (tmp_path / "retraining").exists()


@pytest.mark.parametrize("scheduled, until", [
    ("2026-01-09T13:00:00Z", 1767963600.0),  # as the KFP backend substitutes it (Go's time.RFC3339)
    ("2026-01-09T13:00:00.250Z", 1767963600.25),
    ("2026-01-09T14:00:00+01:00", 1767963600.0),
])
def test_the_window_ends_at_the_scheduled_time(scheduled, until):
    assert run_window(3600.0, scheduled) == (until - 3600.0, until)


def test_an_explicit_window_end_wins_over_the_scheduled_time():
    assert run_window(60.0, "2026-01-09T13:00:00Z", "2026-01-01T00:00:00Z") == (1767225540.0, 1767225600.0)


def test_an_unsubstituted_scheduled_time_is_refused_with_the_way_out():
    with pytest.raises(ValueError, match="was not substituted: .* or give window_end"):
        run_window(600.0, "{{$.pipeline_job_schedule_time_utc}}")


@pytest.mark.parametrize("window_s, scheduled, window_end, message", [
    (600.0, "2026-01-09 13:00", "", "no UTC offset"),
    (600.0, "yesterday", "", "'yesterday' is not RFC 3339"),
    (600.0, "", "", "'' is not RFC 3339"),
    (600.0, "2026-01-09T13:00:00Z", "13:00", "'13:00' is not RFC 3339"),
    (0.0, "2026-01-09T13:00:00Z", "", "window_s=0.0 must be a positive"),
])
def test_bad_window_times_are_named(window_s, scheduled, window_end, message):
    with pytest.raises(ValueError, match=message):
        run_window(window_s, scheduled, window_end)


def test_last_retrain_marker_on_gcs(gcs_emulator):
    uri = "gs://defectkit-test/monitor-state"
    assert read_last_retrain(uri) is None, "a missing marker on gs:// means no earlier retraining"
    write_last_retrain(uri, NOW, "run-1")
    assert read_last_retrain(uri) == {"at": NOW, "run": "run-1"}
