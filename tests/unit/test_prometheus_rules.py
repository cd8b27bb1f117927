"""The alerting and recording rules in deploy/prometheus: valid for Prometheus, right on their unit tests, and about
series the model server exports."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from defectkit.serving import metrics

RULES_DIR = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
RULES = RULES_DIR / "defectkit-rules.yaml"
RULE_TESTS = RULES_DIR / "defectkit-rules.test.yaml"


def _promtool(*args: str) -> subprocess.CompletedProcess:
    if shutil.which("promtool") is None:
        pytest.skip("no `promtool` on PATH (Debian: apt-get install prometheus)")
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=120, cwd=RULES_DIR)


def test_promtool_accepts_the_rules():
    result = _promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 10 rules found" in result.stdout


def test_every_alert_fires_when_it_should_and_not_before():
    result = _promtool("test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    tested = {case["alertname"] for test in tests for case in test.get("alert_rule_test", [])}
    alerts = {rule["alert"] for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]
              if "alert" in rule}
    assert tested == alerts  # every alert has a unit test


def test_the_rules_read_only_series_the_server_exports():
    exported = set()
    for name in (metrics.REQUESTS_METRIC, "defectkit_predictions", metrics.SAMPLES_DROPPED_METRIC):
        exported.add(metrics.counter_series(name))
    for name in (metrics.LATENCY_METRIC, metrics.SCORE_METRIC):
        exported |= {metrics.bucket_series(name), f"{name}_sum", f"{name}_count"}
    exported.add("defectkit_breaker_state")
    used = set(re.findall(r"\bdefectkit_[a-z_]+", RULES.read_text()))
    assert used and used <= exported, used - exported
    assert f'status=~"{metrics.ERROR_STATUS}"' in RULES.read_text()
