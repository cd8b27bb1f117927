"""The Grafana dashboard (deploy/grafana): current, within Grafana's schema, and over series the server exports.

That its queries answer from a real Prometheus scraping a real server is checked in
tests/integration/test_prometheus_queries.py.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("dashboard", ROOT / "deploy" / "grafana" / "dashboard.py")
dashboard = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(dashboard)


def committed() -> dict:
    return json.loads(dashboard.OUT.read_text())


def expressions(data: dict) -> list[str]:
    return [t["expr"] for panel in data["panels"] for t in panel.get("targets", [])]


def test_the_committed_dashboard_is_what_the_builder_builds():
    assert dashboard.main(["--check"]) == 0


def test_it_is_within_grafanas_schema_and_the_check_sees_what_is_not():
    data = committed()
    assert dashboard.schema_problems(data) == []
    data["panels"][1]["gridPos"]["w"] = "12"
    data["panels"][2]["fieldConfig"]["defaults"]["colour"] = {"mode": "fixed"}
    data["refresh_every"] = "30s"
    data["graphTooltip"] = 7
    assert sorted(dashboard.schema_problems(data)) == [
        "/graph_tooltip: 7 is not one of [0, 1, 2]",
        "/panels[1]/grid_pos/w: '12' is not an integer",
        "/panels[2]/fieldConfig/defaults/colour: not in the schema",
        "/refresh_every: not in the schema",
    ]


def test_every_query_reads_series_the_model_server_exports():
    from prometheus_client import REGISTRY

    import defectkit.serving.metrics  # noqa: F401 - registers the server's metrics

    exported = {sample.name for metric in REGISTRY.collect() for sample in metric.samples}
    exported |= {metric.name + suffix for metric in REGISTRY.collect()
                 for suffix in ("_total", "_bucket", "_sum", "_count", "")}
    used = {name for expr in expressions(committed()) for name in re.findall(r"defectkit_[a-z_]+", expr)}
    assert used and used <= exported, sorted(used - exported)
    assert all('model_version=~"$model_version"' in expr for expr in expressions(committed()))


@pytest.mark.parametrize("signal", ["defectkit_requests_total", "defectkit_request_latency_seconds_bucket",
                                    "defectkit_predictions_total", "defectkit_score_sum",
                                    "defectkit_samples_dropped_total", "defectkit_breaker_state"])
def test_each_alerted_signal_has_a_panel(signal):
    assert any(signal in expr for expr in expressions(committed()))
