"""`defectkit pipeline submit|schedule` against an HTTP stand-in of the KFP API on 127.0.0.1."""

import pytest
import yaml

from defectkit import cli
from defectkit_kfp.pipelines.run import (
    PIPELINE_DIR,
    TRAINING_YAML,
    create_recurring_run,
    parse_arguments,
    retraining_starter,
)
from tests.kfp_api import KfpApiStandIn


def test_submit_creates_experiment_and_run_with_typed_parameters(capsys):
    with KfpApiStandIn() as api:
        code = cli.main(
            ["pipeline", "submit", "--host", api.url, "--param", "source_uri=gs://bucket/data", "--param", "epochs=3",
             "--param", "learning_rate=0.01", "--run-name", "nightly", "--experiment", "surfaces"]
        )
        assert code == 0
        run_id = capsys.readouterr().out.strip().splitlines()[-1]
        run = api.runs[run_id]
        assert [e["display_name"] for e in api.experiments.values()] == ["surfaces"]
        assert run["display_name"] == "nightly"
        assert run["runtime_config"]["parameters"] == {"source_uri": "gs://bucket/data", "epochs": 3, "learning_rate": 0.01}
        committed = next(yaml.safe_load_all(TRAINING_YAML.read_text()))
        assert run["pipeline_spec"]["pipeline_spec"]["pipelineInfo"] == committed["pipelineInfo"]
        assert run["pipeline_spec"]["platform_spec"]["platforms"]["kubernetes"]

        # A second submission reuses the experiment.
        assert cli.main(["pipeline", "submit", "--host", api.url, "--param", "source_uri=gs://b/d", "--experiment", "surfaces"]) == 0
        assert len(api.experiments) == 1 and len(api.runs) == 2


@pytest.mark.parametrize(
    "pairs, message",
    [
        (["source_uri=x", "epochz=3"], "no parameter 'epochz'"),
        (["source_uri=x", "epochs=three"], "epochs takes a int, got 'three'"),
        (["epochs=3"], "needs a value for source_uri"),
        (["source_uri"], "not of the form name=value"),
    ],
)
def test_bad_parameters_are_named(pairs, message):
    with pytest.raises(ValueError, match=message):
        parse_arguments(TRAINING_YAML, pairs)


def test_submit_cli_reports_bad_parameter_without_contacting_the_server(capsys):
    with KfpApiStandIn() as api:
        assert cli.main(["pipeline", "submit", "--host", api.url, "--param", "epochs=3"]) == 2
        assert api.requests == []
    assert "needs a value for source_uri" in capsys.readouterr().err


def test_monitor_is_scheduled_as_a_recurring_run():
    with KfpApiStandIn() as api:
        job_id = create_recurring_run(api.url, PIPELINE_DIR / "monitor.yaml", "0 0 * * * *",
                                      {"sample_uri": "gs://b/samples", "min_new_images": 200})
        job = api.recurring_runs[job_id]
        assert job["trigger"]["cron_schedule"]["cron"] == "0 0 * * * *"
        assert job["max_concurrency"] in (1, "1")
        assert job["runtime_config"]["parameters"] == {"sample_uri": "gs://b/samples", "min_new_images": 200}
        assert job["pipeline_spec"]["pipelineInfo"]["name"] == "defectkit-monitor"
    with pytest.raises(ValueError, match="6 fields"):
        create_recurring_run("http://127.0.0.1:9", PIPELINE_DIR / "monitor.yaml", "0 * * * *", {})


def test_monitor_starts_retraining_on_the_cluster(tmp_path):
    from defectkit import monitor

    (tmp_path / "window" / "images").mkdir(parents=True)
    (tmp_path / "window" / "samples.jsonl").write_text("")
    base = tmp_path / "base" / "train" / "good"
    base.mkdir(parents=True)
    (base / "a.jpg").write_bytes(b"x")
    with KfpApiStandIn() as api:
        record = monitor.act(
            drifted=True, drifted_features=["brightness"], new_images=500, window=(0.0, 10.0),
            window_dir=tmp_path / "window", state_uri=str(tmp_path / "state"),
            policy=monitor.MonitorPolicy(min_new_images=100, cooldown_s=3600), base_dataset_uri=str(tmp_path / "base"),
            retraining_data_uri=str(tmp_path / "merged"), training_arguments={"epochs": 20},
            start_run=retraining_starter(kfp_host=api.url),
            now=1000.0,
        )
        run = api.runs[record["run"]]
        merged = tmp_path / "merged" / "retrain-19700101-001640"  # now=1000.0, UTC
        assert record["retraining_data"] == str(merged)
        assert run["runtime_config"]["parameters"] == {"epochs": 20, "source_uri": str(merged)}
        assert (merged / "train" / "good" / "a.jpg").is_file()
        again = monitor.act(
            drifted=True, drifted_features=["brightness"], new_images=500, window=(0.0, 10.0),
            window_dir=tmp_path / "window", state_uri=str(tmp_path / "state"),
            policy=monitor.MonitorPolicy(min_new_images=100, cooldown_s=3600), base_dataset_uri=str(tmp_path / "base"),
            retraining_data_uri=str(tmp_path / "merged2"), training_arguments={},
            start_run=retraining_starter(kfp_host=api.url), now=1060.0,
        )
        assert again["run"] is None and len(api.runs) == 1, "the cooldown holds the second retraining back"


def test_schedule_cli_creates_a_recurring_monitor_with_typed_parameters(capsys):
    required = ["sample_uri=gs://b/samples", "model_uri=models:/defectkit@champion", "state_uri=gs://b/state",
                "base_dataset_uri=gs://b/data", "retraining_data_uri=gs://b/retraining"]
    with KfpApiStandIn() as api:
        params = [arg for pair in [*required, "min_new_images=200", "cooldown_s=7200"] for arg in ("--param", pair)]
        assert cli.main(["pipeline", "schedule", "--host", api.url, "--cron", "0 0 * * * *", *params]) == 0
        job = api.recurring_runs[capsys.readouterr().out.strip().splitlines()[-1]]
        assert job["display_name"] == "defectkit-monitor" and job["trigger"]["cron_schedule"]["cron"] == "0 0 * * * *"
        parameters = job["runtime_config"]["parameters"]
        assert parameters["min_new_images"] == 200 and parameters["cooldown_s"] == 7200.0
        assert parameters["sample_uri"] == "gs://b/samples"

        # A missing required argument or a 5-field cron is refused before the server is asked anything.
        before = len(api.requests)
        assert cli.main(["pipeline", "schedule", "--host", api.url, "--cron", "0 0 * * * *", "--param", required[0]]) == 2
        assert "needs a value for" in capsys.readouterr().err
        params = [arg for pair in required for arg in ("--param", pair)]
        assert cli.main(["pipeline", "schedule", "--host", api.url, "--cron", "0 * * * *", *params]) == 2
        assert "6 fields" in capsys.readouterr().err and len(api.requests) == before
