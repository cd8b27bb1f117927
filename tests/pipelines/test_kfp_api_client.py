"""`defectkit pipeline submit|schedule` and the run helpers against a multi-user HTTP stand-in of the KFP API on
127.0.0.1."""

import io

import pytest
import yaml
from kfp_server_api.exceptions import ApiException

from defectkit import cli
from defectkit_kfp.pipelines.run import (
    MONITOR_YAML,
    PRODUCT_LINES_YAML,
    TOKEN_PATH_ENV,
    TRAINING_YAML,
    create_recurring_run,
    follow_run,
    parse_arguments,
    submit,
)
from tests.kfp_api import NAMESPACE, TOKEN, KfpApiStandIn

MONITOR_REQUIRED = ["sample_uri=gs://b/samples", "model_uri=models:/defectkit@champion", "state_uri=gs://b/state",
                    "base_dataset_uri=gs://b/data", "retraining_data_uri=gs://b/retraining"]


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")  # projected tokens may end in a newline
    return str(path)


def test_submit_creates_experiment_and_run_in_the_namespace_with_typed_parameters(capsys, token_file):
    with KfpApiStandIn() as api:
        auth = ["--namespace", NAMESPACE, "--token-path", token_file]
        code = cli.main(
            ["pipeline", "submit", "--host", api.url, "--param", "source_uri=gs://bucket/data", "--param", "steps=300",
             "--param", "learning_rate=0.01", "--run-name", "nightly", "--experiment", "surfaces", *auth]
        )
        assert code == 0
        run_id = capsys.readouterr().out.strip().splitlines()[-1]
        run = api.runs[run_id]
        assert [(e["display_name"], e["namespace"]) for e in api.experiments.values()] == [("surfaces", NAMESPACE)]
        assert run["display_name"] == "nightly"
        assert run["runtime_config"]["parameters"] == {"source_uri": "gs://bucket/data", "steps": 300, "learning_rate": 0.01}
        committed = next(yaml.safe_load_all(TRAINING_YAML.read_text()))
        assert run["pipeline_spec"]["pipeline_spec"]["pipelineInfo"] == committed["pipelineInfo"]
        assert run["pipeline_spec"]["platform_spec"]["platforms"]["kubernetes"]

        # A second submission reuses the experiment.
        assert cli.main(["pipeline", "submit", "--host", api.url, "--param", "source_uri=gs://b/d", "--experiment",
                         "surfaces", *auth]) == 0
        assert len(api.experiments) == 1 and len(api.runs) == 2


def test_the_token_path_comes_from_the_environment_as_in_a_kubeflow_pod(token_file, monkeypatch):
    monkeypatch.setenv(TOKEN_PATH_ENV, token_file)
    with KfpApiStandIn() as api:
        run_id = submit(api.url, TRAINING_YAML, {"source_uri": "gs://b/d"}, namespace=NAMESPACE)
        assert api.runs[run_id]["runtime_config"]["parameters"] == {"source_uri": "gs://b/d"}


def test_multi_user_kfp_refuses_a_call_without_a_token_or_outside_the_granted_namespace(token_file, tmp_path,
                                                                                        monkeypatch):
    monkeypatch.delenv(TOKEN_PATH_ENV, raising=False)
    with KfpApiStandIn() as api:
        with pytest.raises(ApiException) as refused:
            submit(api.url, TRAINING_YAML, {"source_uri": "gs://b/d"}, namespace=NAMESPACE)
        assert refused.value.status == 401
        with pytest.raises(ApiException) as refused:
            submit(api.url, TRAINING_YAML, {"source_uri": "gs://b/d"}, namespace="someone-else",
                   token_path=token_file)
        assert refused.value.status == 403
        other = tmp_path / "other-token"
        other.write_text("a token of no one")
        with pytest.raises(ApiException) as refused:
            create_recurring_run(api.url, MONITOR_YAML, "0 0 * * * *", {}, namespace=NAMESPACE,
                                 token_path=str(other))
        assert refused.value.status == 401
        assert api.runs == {} and api.recurring_runs == {} and api.experiments == {}


def test_a_missing_token_file_is_named_before_the_server_is_asked(capsys, tmp_path):
    with KfpApiStandIn() as api:
        missing = tmp_path / "no-such-token"
        assert cli.main(["pipeline", "submit", "--host", api.url, "--param", "source_uri=gs://b/d",
                         "--namespace", NAMESPACE, "--token-path", str(missing)]) == 2
        assert api.requests == []
    assert f"no KFP API token at {missing}" in capsys.readouterr().err


@pytest.mark.parametrize(
    "pairs, message",
    [
        (["source_uri=x", "stepz=3"], "no parameter 'stepz'"),
        (["source_uri=x", "steps=three"], "steps takes a int, got 'three'"),
        (["steps=3"], "needs a value for source_uri"),
        (["source_uri"], "not of the form name=value"),
    ],
)
def test_bad_parameters_are_named(pairs, message):
    with pytest.raises(ValueError, match=message):
        parse_arguments(TRAINING_YAML, pairs)


def test_a_list_parameter_is_given_as_json():
    assert parse_arguments(PRODUCT_LINES_YAML, ["source_root=gs://b/mvtec", 'categories=["carpet", "metal_nut"]']) \
        == {"source_root": "gs://b/mvtec", "categories": ["carpet", "metal_nut"]}
    with pytest.raises(ValueError, match=r"categories takes a JSON list \(e.g. categories='\[\"a\", \"b\"\]'\), got 'carpet,metal_nut'"):
        parse_arguments(PRODUCT_LINES_YAML, ["source_root=gs://b/mvtec", "categories=carpet,metal_nut"])


def test_submit_cli_reports_bad_parameter_without_contacting_the_server(capsys):
    with KfpApiStandIn() as api:
        assert cli.main(["pipeline", "submit", "--host", api.url, "--param", "steps=300"]) == 2
        assert api.requests == []
    assert "needs a value for source_uri" in capsys.readouterr().err


def test_monitor_is_scheduled_as_a_recurring_run_with_its_own_tasks_never_cached(token_file):
    with KfpApiStandIn() as api:
        job_id = create_recurring_run(api.url, MONITOR_YAML, "0 0 * * * *",
                                      {"sample_uri": "gs://b/samples", "min_new_images": 200},
                                      namespace=NAMESPACE, token_path=token_file)
        job = api.recurring_runs[job_id]
        assert job["trigger"]["cron_schedule"]["cron"] == "0 0 * * * *"
        assert job["max_concurrency"] in (1, "1")
        assert job["runtime_config"]["parameters"] == {"sample_uri": "gs://b/samples", "min_new_images": 200}
        spec = job["pipeline_spec"]["pipeline_spec"]  # beside the platform spec of the training sub-pipeline
        assert spec["pipelineInfo"]["name"] == "defectkit-monitor"
        tasks = spec["root"]["dag"]["tasks"]
        assert {"collect-window", "decide-retraining"} <= set(tasks)
        assert all(not task.get("cachingOptions", {}).get("enableCache") for task in tasks.values()), \
            {name: task.get("cachingOptions") for name, task in tasks.items()}
    with pytest.raises(ValueError, match="6 fields"):
        create_recurring_run("http://127.0.0.1:9", MONITOR_YAML, "0 * * * *", {})


def test_schedule_cli_creates_a_recurring_monitor_with_typed_parameters(capsys, token_file):
    with KfpApiStandIn() as api:
        auth = ["--namespace", NAMESPACE, "--token-path", token_file]
        params = [arg for pair in [*MONITOR_REQUIRED, "min_new_images=200", "cooldown_s=7200"]
                  for arg in ("--param", pair)]
        assert cli.main(["pipeline", "schedule", "--host", api.url, "--cron", "0 0 * * * *", *params, *auth]) == 0
        job = api.recurring_runs[capsys.readouterr().out.strip().splitlines()[-1]]
        assert job["display_name"] == "defectkit-monitor" and job["trigger"]["cron_schedule"]["cron"] == "0 0 * * * *"
        assert api.experiments[job["experiment_id"]]["namespace"] == NAMESPACE
        parameters = job["runtime_config"]["parameters"]
        assert parameters["min_new_images"] == 200 and parameters["cooldown_s"] == 7200.0
        assert parameters["sample_uri"] == "gs://b/samples"

        # A missing required argument or a 5-field cron is refused before the server is asked anything.
        before = len(api.requests)
        assert cli.main(["pipeline", "schedule", "--host", api.url, "--cron", "0 0 * * * *", "--param",
                         MONITOR_REQUIRED[0], *auth]) == 2
        assert "needs a value for" in capsys.readouterr().err
        params = [arg for pair in MONITOR_REQUIRED for arg in ("--param", pair)]
        assert cli.main(["pipeline", "schedule", "--host", api.url, "--cron", "0 * * * *", *params, *auth]) == 2
        assert "6 fields" in capsys.readouterr().err and len(api.requests) == before


def test_follow_run_prints_each_state_until_the_run_ends(token_file):
    with KfpApiStandIn() as api:
        run_id = submit(api.url, TRAINING_YAML, {"source_uri": "gs://b/d"}, run_name="nightly",
                        namespace=NAMESPACE, token_path=token_file)
        out = io.StringIO()
        assert follow_run(api.url, run_id, namespace=NAMESPACE, token_path=token_file, poll_s=0, out=out) == "SUCCEEDED"
        assert out.getvalue().splitlines() == [f"run {run_id} (nightly): {state}"
                                               for state in ("PENDING", "RUNNING", "SUCCEEDED")]


def test_follow_run_gives_up_after_its_timeout_naming_the_state(token_file):
    with KfpApiStandIn() as api:
        run_id = submit(api.url, TRAINING_YAML, {"source_uri": "gs://b/d"}, namespace=NAMESPACE,
                        token_path=token_file)
        with pytest.raises(TimeoutError, match=f"run {run_id} is still PENDING"):
            follow_run(api.url, run_id, namespace=NAMESPACE, token_path=token_file, timeout_s=0, out=io.StringIO())
