"""Decision records on real files: the shared names, writing and reading, and both kinds of record through them."""

from __future__ import annotations

import json

import pytest

from defectkit import decision_record, monitor, registry
from defectkit.delivery import record as rollout_record

NOW = 1_700_000_000.0


def test_write_then_read_round_trip_leaves_both_files_and_no_temporary_ones(tmp_path):
    record = {"verdict": "promoted", "reasons": ["every check passed"], "score": 0.5}
    json_path, md_path = decision_record.write(record, "# Promoted\n", tmp_path / "record")
    assert (json_path.name, md_path.name) == ("decision_record.json", "decision_record.md")
    assert decision_record.read(tmp_path / "record") == record == json.loads(json_path.read_text())
    assert md_path.read_text() == "# Promoted\n"
    decision_record.write({"verdict": "rolled_back"}, "# Rolled back\n", tmp_path / "record")
    assert decision_record.read(tmp_path / "record") == {"verdict": "rolled_back"}
    assert sorted(p.name for p in (tmp_path / "record").iterdir()) == ["decision_record.json", "decision_record.md"]


def test_a_record_json_cannot_hold_is_refused_and_the_old_one_is_kept(tmp_path):
    decision_record.write({"score": 1.0}, "# ok\n", tmp_path)
    with pytest.raises(ValueError):
        decision_record.write({"score": float("nan")}, "# not ok\n", tmp_path)
    assert decision_record.read(tmp_path) == {"score": 1.0}


def test_reading_a_folder_without_a_record_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no decision record"):
        decision_record.read(tmp_path / "empty")


def test_times_are_utc_with_milliseconds():
    assert decision_record.iso(NOW + 0.25) == "2023-11-14T22:13:20.250+00:00"


def test_rollout_monitor_and_registry_use_the_same_file_names(tmp_path):
    assert rollout_record.JSON_NAME == registry.DECISION_RECORD_JSON == decision_record.JSON_NAME
    assert rollout_record.MARKDOWN_NAME == registry.DECISION_RECORD_MD == decision_record.MARKDOWN_NAME
    policy = monitor.MonitorPolicy()
    entry = monitor.decision_record(window=(NOW - 60, NOW), drift={"drifted": False}, new_images=3,
                                    last_retrain=None, now=NOW, policy=policy,
                                    decision=monitor.decide(False, 3, None, NOW, policy))
    monitor.write_record(entry, tmp_path)
    assert decision_record.read(tmp_path) == entry
    assert (tmp_path / decision_record.MARKDOWN_NAME).read_text() == monitor.render_record(entry)
