"""The command tree: backend options refused where they do not apply, every listed option takes effect,
one source for the canary policy's defaults, and a core that never imports kfp or the pipelines."""

from __future__ import annotations

import argparse
import json
import re

import pytest

from defectkit.cli import build_parser, main
from defectkit.cli.rollout import policy_from_args, start_config
from defectkit.delivery.analysis import CanaryPolicy
from defectkit.delivery.rollout import DeliveryConfig, policy_from_parameters, policy_parameters
from defectkit_kfp.components.deploy_canary import deploy_canary
from defectkit_kfp.pipelines.shipping import release_if_approved, ship_model
from defectkit_kfp.pipelines.training import training_pipeline

PROMETHEUS = ("--prometheus-url", "http://prometheus:9090")
# A value other than the default for every option of `rollout start` and `rollout restore`.
VALUES = {
    "--golden": "golden", "--version": "7", "--served-name": "other", "--tracking-uri": "sqlite:///x.db",
    "--registered-model": "other", "--work": "elsewhere", "--state": "s.json", "--record-dir": "record",
    "--steps": "20,100", "--interval-s": "120", "--failure-threshold": "3", "--min-requests": "7",
    "--max-error-rate": "0.2", "--max-p99-latency-s": "2", "--max-score-shift": "0.5",
    "--model": "model", "--stable": "stable", "--router-port": "9999", "--serve-arg": "--threads=1",
    "--candidate-serve-arg": "--fault-error-rate=1", "--scrape-interval-s": "2",
    "--storage-uri": "gs://bucket/model", "--name": "defect", "--namespace": "ml", "--api-url": "http://kube",
    "--prometheus-url": "http://other:9090", "--probe-url": "http://candidate",
    "--prometheus-scrape-interval-s": "15", "--serve-image": "ghcr.io/defectkit/serve:9.9.9",
    "--deployment-mode": "Standard",
    "--min-replicas": "0", "--max-replicas": "5", "--scale-metric": "rps", "--scale-target": "20",
    "--judged-model": "judged", "--webhooks": "https://hooks.example/x", "--approval-url": "https://approve.example/x",
    "--approval-before": "traffic", "--approval-timeout-s": "60", "--approval-interval-s": "5",
    "--sample-uri": "gs://bucket/samples", "--shadow-window-s": "3600", "--shadow-max-images": "100",
    "--shadow-min-images": "10", "--shadow-min-agreement": "0.8", "--shadow-max-score-shift": "0.2",
}
# Options that only mean something beside another: checked with it given.
NEEDS = {"--approval-before": "--approval-url", "--approval-timeout-s": "--approval-url",
         "--approval-interval-s": "--approval-url"}
NOT_CONFIG = {"--help", "--backend", "--dry-run", "--policy"}  # checked by the tests further down


def verb_parser(noun: str, verb: str) -> argparse.ArgumentParser:
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    verbs = next(a for a in commands.choices[noun]._actions if isinstance(a, argparse._SubParsersAction))
    return verbs.choices[verb]


def options(parser: argparse.ArgumentParser) -> list[tuple[str, str | None]]:
    """(flag, owning backend or None) of every option the parser lists."""
    owned = {flag: backend for flag, backend, _ in getattr(parser, "backend_options", {}).values()}
    flags = [next(f for f in a.option_strings if f.startswith("--")) for a in parser._actions if a.option_strings]
    return [(flag, owned.get(flag)) for flag in flags]


def test_every_verb_answers_help():
    for argv in (["rollout", "start"], ["rollout", "status"], ["rollout", "restore"], ["rollout", "manifest"],
                 ["stack", "stop"], ["stack", "status"], ["pipeline", "submit"], ["pipeline", "schedule"],
                 ["serve"], ["sample"], ["train"], ["demo"], ["demo", "rollback"], ["demo", "drift"]):
        with pytest.raises(SystemExit) as exit_:
            main([*argv, "--help"])
        assert exit_.value.code == 0, argv


@pytest.mark.parametrize("verb", ["start", "restore"])
def test_an_option_of_the_other_backend_is_refused(verb, capsys):
    parser = verb_parser("rollout", verb)
    backend_options = [(flag, backend) for flag, backend in options(parser) if backend]
    assert {backend for _, backend in backend_options} == {"local", "kserve"}
    for flag, backend in backend_options:
        other = "kserve" if backend == "local" else "local"
        with pytest.raises(SystemExit) as exit_:
            main(["rollout", verb, "--backend", other, f"{flag}={VALUES[flag]}"])
        assert exit_.value.code == 2
        error = capsys.readouterr().err
        assert f"{flag} applies to --backend {backend} only, not --backend {other}" in error, error


def test_a_kserve_option_with_the_local_backend_is_refused_by_name(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["rollout", "start", "--backend", "local", "--model", "m", "--prometheus-url", "http://p"])
    assert exit_.value.code == 2
    assert "--prometheus-url applies to --backend kserve only, not --backend local" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["rollout", "start", "--backend", "kserve", "--storage-uri", "gs://b/m", *PROMETHEUS, "--serve-arg=-x"])
    assert exit_.value.code == 2
    assert "--serve-arg applies to --backend local only, not --backend kserve" in capsys.readouterr().err


@pytest.mark.parametrize("backend", ["local", "kserve"])
def test_every_option_rollout_start_lists_for_a_backend_changes_the_delivery(backend):
    parser = verb_parser("rollout", "start")
    base = ["rollout", "start", "--backend", backend, *(PROMETHEUS if backend == "kserve" else ())]
    baseline = start_config(build_parser().parse_args(base))
    checked = 0
    for flag, owner in options(parser):
        if flag in NOT_CONFIG or owner not in (None, backend):
            continue
        needed = [f"{NEEDS[flag]}={VALUES[NEEDS[flag]]}"] if flag in NEEDS else []
        reference = start_config(build_parser().parse_args([*base, *needed])) if needed else baseline
        config = start_config(build_parser().parse_args([*base, *needed, f"{flag}={VALUES[flag]}"]))
        assert config != reference, f"{flag} is listed for --backend {backend} but changes nothing"
        checked += 1
    assert checked >= 15
    with pytest.raises(SystemExit):  # an approval setting without the approval URL would do nothing
        start_config(build_parser().parse_args([*base, "--approval-before=traffic"]))


@pytest.mark.parametrize("backend", ["local", "kserve"])
def test_every_option_rollout_restore_lists_changes_the_restore(backend):
    from defectkit.cli.rollout import _delivery_settings

    parser = verb_parser("rollout", "restore")
    base = ["rollout", "restore", "--backend", backend, *(PROMETHEUS if backend == "kserve" else ())]
    baseline = DeliveryConfig(**_delivery_settings(build_parser().parse_args(base)))
    for flag, owner in options(parser):
        if flag in NOT_CONFIG or owner not in (None, backend):
            continue
        changed = DeliveryConfig(**_delivery_settings(build_parser().parse_args([*base, f"{flag}={VALUES[flag]}"])))
        assert changed != baseline, flag


def test_every_option_rollout_manifest_lists_reaches_the_manifest(capsys):
    base = ["rollout", "manifest", "--storage-uri", "gs://bucket/model", "--image", "ghcr.io/defectkit/serve:0.1.0"]
    values = {"--storage-uri": "gs://bucket/other", "--image": "ghcr.io/defectkit/serve:0.2.0", "--name": "defect",
              "--namespace": "ml", "--served-name": "other", "--canary-percent": "10", "--cpu": "500m",
              "--memory": "1Gi", "--cpu-limit": "3", "--memory-limit": "5Gi", "--gpu": "1", "--min-replicas": "0",
              "--max-replicas": "5", "--service-account": "reader", "--env": "A=1"}
    assert main(base) == 0
    baseline = capsys.readouterr().out
    for flag, _ in options(verb_parser("rollout", "manifest")):
        if flag == "--help":
            continue
        argv = [*base, flag, values[flag]]
        assert main(argv) == 0
        assert capsys.readouterr().out != baseline, flag


def test_the_policy_file_and_the_overrides(tmp_path):
    assert policy_from_args(build_parser().parse_args(["rollout", "start"])) == CanaryPolicy()
    for name, text in (("policy.yaml", "steps: [20, 100]\nalpha: 0.05\nmax_p99_ratio: 1.5\nmax_inconclusive: 3\n"),
                       ("policy.json", json.dumps({"steps": [20, 100], "alpha": 0.05, "max_p99_ratio": 1.5,
                                                   "max_inconclusive": 3}))):
        (tmp_path / name).write_text(text)
        args = build_parser().parse_args(["rollout", "start", "--policy", str(tmp_path / name), "--interval-s", "5"])
        assert policy_from_args(args) == CanaryPolicy(steps=(20, 100), alpha=0.05, max_p99_ratio=1.5,
                                                      max_inconclusive=3, interval_s=5.0)
    (tmp_path / "bad.yaml").write_text("stepz: [10]\n")
    with pytest.raises(ValueError, match="stepz"):
        policy_from_args(build_parser().parse_args(["rollout", "start", "--policy", str(tmp_path / "bad.yaml")]))
    args = build_parser().parse_args(["rollout", "start", "--max-p99-latency-s", "0", "--policy",
                                      str(tmp_path / "policy.yaml")])
    assert policy_from_args(args).max_p99_latency_s is None


def test_dry_run_prints_the_plan_and_changes_nothing(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.json").write_text("{}")
    assert main(["rollout", "start", "--dry-run", "--work", str(tmp_path / "work"), "--model", str(model)]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["candidate"] == str(model) and plan["policy"] == CanaryPolicy().to_json()
    assert not (tmp_path / "work").exists()


# --------------------------------------------------------------------------- one source for the policy defaults


def test_pipeline_encoding_of_the_policy_round_trips():
    assert policy_from_parameters(**policy_parameters()) == CanaryPolicy()
    ratio_only = CanaryPolicy(max_p99_latency_s=None, max_p99_ratio=2.0)
    assert policy_parameters(ratio_only)["max_p99_latency_s"] == 0.0
    assert policy_from_parameters(**policy_parameters(ratio_only)) == ratio_only


def test_component_defaults_are_canary_policy_defaults():
    inputs = deploy_canary.component_spec.inputs
    expected = policy_parameters()
    assert set(expected) <= set(inputs), "every policy setting is a parameter of deploy_canary"
    assert {name: inputs[name].default for name in expected} == expected
    assert all(inputs[name].description for name in expected)


@pytest.mark.parametrize("pipeline", [ship_model, release_if_approved, training_pipeline],
                         ids=lambda p: p.name)
def test_pipeline_defaults_are_canary_policy_defaults(pipeline):
    inputs = pipeline.component_spec.inputs
    expected = {f"canary_{name}": value for name, value in policy_parameters().items()}
    assert {name: inputs[name].default for name in expected} == expected
    assert all(inputs[name].description for name in expected)


def test_cli_defaults_are_canary_policy_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["rollout", "start", "--help"])
    listed = re.sub(r"\s+", " ", capsys.readouterr().out)
    defaults = CanaryPolicy()
    for flag, value in (("--steps", ",".join(map(str, defaults.steps))), ("--interval-s", defaults.interval_s),
                        ("--min-requests", defaults.min_requests), ("--max-error-rate", defaults.max_error_rate)):
        assert re.search(rf"{flag} \S+ .*?\(default {re.escape(str(value))}\)", listed), flag
