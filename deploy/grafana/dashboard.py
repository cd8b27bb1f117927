"""The Grafana dashboard of defectkit's model servers, built with the Grafana Foundation SDK (its types are
generated from Grafana's dashboard schema).

    python deploy/grafana/dashboard.py           write defectkit-dashboard.json beside this file
    python deploy/grafana/dashboard.py --check   fail when the committed JSON is not what this builds

Every panel is by model version, over the series `defectkit serve` exports at /metrics
(defectkit/serving/metrics.py); the limits drawn are those of deploy/prometheus/defectkit-rules.yaml.
Import it in Grafana (Dashboards > New > Import) and pick the Prometheus that scrapes the predictor pods.
"""

from __future__ import annotations

import argparse
import enum
import json
import sys
import types
import typing
from pathlib import Path

from grafana_foundation_sdk.builders import dashboard as grafana, stat, timeseries
from grafana_foundation_sdk.builders.common import GraphThresholdsStyleConfig
from grafana_foundation_sdk.builders.prometheus import Dataquery
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import GraphThresholdsStyleMode
from grafana_foundation_sdk.models.dashboard import (
    Dashboard,
    DataSourceRef,
    Threshold,
    ThresholdsMode,
    ValueMap,
    ValueMappingResult,
    VariableRefresh,
)

OUT = Path(__file__).resolve().with_name("defectkit-dashboard.json")
UID = "defectkit-serving"
PROMETHEUS = DataSourceRef(type_val="prometheus", uid="${datasource}")
# Every query selects the chosen namespaces and model versions; "All" is the regex .*, which also matches a
# series without the label (a Prometheus outside Kubernetes adds no namespace).
SELECTOR = 'namespace=~"$namespace", model_version=~"$model_version"'
RATE = "$__rate_interval"
# The alert rules' limits (deploy/prometheus/defectkit-rules.yaml), drawn as red lines.
MAX_ERROR_RATIO = 0.01
MAX_P99_SECONDS = 0.5
LIMIT_LINE = GraphThresholdsStyleConfig().mode(GraphThresholdsStyleMode.LINE)


def _query(expr: str, legend: str = "{{model_version}}") -> Dataquery:
    return Dataquery().expr(expr).legend_format(legend).datasource(PROMETHEUS)


def _limit(value: float) -> grafana.ThresholdsConfig:
    return (grafana.ThresholdsConfig().mode(ThresholdsMode.ABSOLUTE)
            .steps([Threshold(value=None, color="green"), Threshold(value=value, color="red")]))


def _series(title: str, description: str, unit: str, *queries: Dataquery) -> timeseries.Panel:
    panel = (timeseries.Panel().title(title).description(description).unit(unit).datasource(PROMETHEUS)
             .span(12).height(8).min(0).line_width(2).fill_opacity(10))
    for ref, query in zip("ABCD", queries):
        panel = panel.with_target(query.ref_id(ref))
    return panel


def _ratio(numerator: str, denominator: str) -> str:
    """numerator / denominator per version; 0 (not no data) for a version without a numerator series yet, as
    a server that never answered 5xx has no 5xx series."""
    whole = f"sum by (model_version) (rate({denominator}[{RATE}]))"
    return f"(sum by (model_version) (rate({numerator}[{RATE}])) or 0 * {whole})\n  / {whole}"


def build() -> grafana.Dashboard:
    requests = f"defectkit_requests_total{{{SELECTOR}}}"
    predictions = f"defectkit_predictions_total{{{SELECTOR}}}"
    return (
        grafana.Dashboard("defectkit: model serving")
        .uid(UID)
        .description("Traffic, errors, latency, defect rate, scores, sampling and the circuit breaker of each "
                     "defectkit model version.")
        .tags(["defectkit", "kserve"])
        .refresh("30s")
        .time("now-1h", "now")
        .timezone("browser")
        .with_variable(grafana.DatasourceVariable("datasource").label("Prometheus").type("prometheus"))
        .with_variable(grafana.QueryVariable("namespace").label("Namespace").datasource(PROMETHEUS)
                       .query("label_values(defectkit_requests_total, namespace)")
                       .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).multi(True).include_all(True)
                       .all_value(".*"))
        .with_variable(grafana.QueryVariable("model_version").label("Model version").datasource(PROMETHEUS)
                       .query('label_values(defectkit_requests_total{namespace=~"$namespace"}, model_version)')
                       .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).multi(True).include_all(True)
                       .all_value(".*"))
        .with_row(grafana.Row("Serving"))
        .with_panel(_series(
            "Requests per second", "Answered requests by model version and HTTP status.", "reqps",
            _query(f"sum by (model_version, status) (rate({requests}[{RATE}]))", "{{model_version}} {{status}}")))
        .with_panel(_series(
            "Server errors (5xx)", "Share of requests answered 5xx; the alert fires above 1% for 5 minutes.",
            "percentunit",
            _query(_ratio(f'defectkit_requests_total{{{SELECTOR}, status=~"5.."}}', requests)))
            .thresholds(_limit(MAX_ERROR_RATIO)).thresholds_style(LIMIT_LINE))
        .with_panel(_series(
            "Latency p50 / p99", "Request latency, body received to response; the alert fires on p99 above "
            "0.5 s for 10 minutes.", "s",
            *(_query(f"histogram_quantile({q}, sum by (model_version, le) "
                     f"(rate(defectkit_request_latency_seconds_bucket{{{SELECTOR}}}[{RATE}])))",
                     f"{{{{model_version}}}} p{round(q * 100)}") for q in (0.5, 0.99)))
            .thresholds(_limit(MAX_P99_SECONDS)).thresholds_style(LIMIT_LINE))
        .with_panel(_series(
            "Images per forward pass", "Mean micro-batch size: how much the server batches under load.", "short",
            _query(_ratio(f"defectkit_batch_size_sum{{{SELECTOR}}}", f"defectkit_batch_size_count{{{SELECTOR}}}"))))
        .with_row(grafana.Row("Quality"))
        .with_panel(_series(
            "Defect rate", "Share of images labelled defect at the model's threshold; the alert fires when the "
            "last hour's is over twice the day before's (and above 5%).", "percentunit",
            _query(_ratio(f'defectkit_predictions_total{{{SELECTOR}, label="defect"}}', predictions))))
        .with_panel(_series(
            "Mean defect score", "Mean score returned; the alert fires when the last hour's moves by more than "
            "0.1 from the day before's: check the sampled images for drift.", "short",
            _query(_ratio(f"defectkit_score_sum{{{SELECTOR}}}", f"defectkit_score_count{{{SELECTOR}}}"))).max(1))
        .with_row(grafana.Row("Sampling and protection"))
        .with_panel(_series(
            "Production samples", "Requests sampled for drift monitoring: written to storage, and dropped by "
            "reason (queue_full, write_failed); serving is unaffected by drops.", "ops",
            _query(f"sum by (model_version) (rate(defectkit_samples_written_total{{{SELECTOR}}}[{RATE}]))",
                   "{{model_version}} written"),
            _query(f"sum by (model_version, reason) "
                   f"(rate(defectkit_samples_dropped_total{{{SELECTOR}}}[{RATE}]))",
                   "{{model_version}} dropped ({{reason}})")))
        .with_panel(
            stat.Panel().title("Circuit breaker").description(
                "The primary model's circuit breaker: open means the fallback model (or 503s) answers.")
            .datasource(PROMETHEUS).span(12).height(8)
            .with_target(_query(f"max by (model_version) (defectkit_breaker_state{{{SELECTOR}}})").ref_id("A"))
            .mappings([ValueMap(options={
                "0": ValueMappingResult(text="closed", color="green", index=0),
                "1": ValueMappingResult(text="open", color="red", index=1),
                "2": ValueMappingResult(text="half-open", color="orange", index=2)})]))
    )


def render() -> str:
    data = json.loads(json.dumps(build().build(), cls=JSONEncoder))
    for number, panel in enumerate(data["panels"], start=1):  # Grafana links and shares panels by id
        panel["id"] = number
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def schema_problems(data: dict) -> list[str]:
    """Where ``data`` (a dashboard's JSON) departs from Grafana's dashboard schema, as the SDK's types state
    it: a field the schema does not have, or a value not of the field's type."""
    model = Dashboard.from_json(data)
    typed = json.loads(json.dumps(model, cls=JSONEncoder))
    return _unknown_fields(data, typed, "") + _type_problems(model, Dashboard, "")


def _unknown_fields(given, typed, path: str) -> list[str]:
    """The SDK reads the fields its schema has and drops the others."""
    if isinstance(given, dict) and isinstance(typed, dict):
        return [f"{path}/{key}: not in the schema" for key in given if key not in typed] + [
            p for key in given if key in typed for p in _unknown_fields(given[key], typed[key], f"{path}/{key}")]
    if isinstance(given, list) and isinstance(typed, list):
        return [p for i, (a, b) in enumerate(zip(given, typed)) for p in _unknown_fields(a, b, f"{path}[{i}]")]
    return []


def _type_problems(value, hint, path: str) -> list[str]:
    """``value`` against the SDK's type annotation ``hint`` (the SDK stores what it reads unchecked)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return []
        tried = [_type_problems(value, arg, path) for arg in args if arg is not type(None)]
        return [] if any(not problems for problems in tried) else tried[0]
    if origin is typing.Literal:
        return [] if value in args else [f"{path or '/'}: {value!r} is not one of {args}"]
    if origin is list:
        if not isinstance(value, list):
            return [f"{path or '/'}: {value!r} is not a list"]
        return [p for i, item in enumerate(value) for p in _type_problems(item, args[0], f"{path}[{i}]")]
    if origin is dict:
        if not isinstance(value, dict):
            return [f"{path or '/'}: {value!r} is not an object"]
        return [p for key, item in value.items() for p in _type_problems(item, args[1], f"{path}/{key}")]
    if not isinstance(hint, type) or hint is object:
        return []
    if issubclass(hint, enum.Enum):
        return [] if value in {member.value for member in hint} else [f"{path}: {value!r} is not one of "
                                                                     f"{[m.value for m in hint]}"]
    if hint in (int, float):
        ok = isinstance(value, (int, float) if hint is float else int) and not isinstance(value, bool)
        return [] if ok else [f"{path}: {value!r} is not a{'n integer' if hint is int else ' number'}"]
    if hint in (str, bool):
        return [] if isinstance(value, hint) else [f"{path}: {value!r} is not a {hint.__name__}"]
    if hint.__module__.startswith("grafana_foundation_sdk.models"):
        if not isinstance(value, hint):
            return [f"{path}: {value!r} is not a {hint.__name__}"]
        fields = typing.get_type_hints(hint.__init__)
        return [p for name, field in fields.items() if name != "return"
                for p in _type_problems(getattr(value, name, None), field, f"{path}/{name}")]
    return []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare with the committed JSON instead of writing")
    args = parser.parse_args(argv)
    text = render()
    if problems := schema_problems(json.loads(text)):
        print("the dashboard departs from Grafana's schema:\n" + "\n".join(problems), file=sys.stderr)
        return 1
    if not args.check:
        OUT.write_text(text)
        print(f"wrote {OUT}")
        return 0
    if not OUT.is_file() or OUT.read_text() != text:
        print(f"{OUT} is stale: run python deploy/grafana/dashboard.py and commit it", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
