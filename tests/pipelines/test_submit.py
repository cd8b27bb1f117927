"""`defectkit submit` against an HTTP stand-in of the KFP API on 127.0.0.1."""

import pytest
import yaml

from defectkit import cli
from pipelines.run import TRAINING_YAML, parse_arguments
from tests.kfp_api import KfpApiStandIn


def test_submit_creates_experiment_and_run_with_typed_parameters(capsys):
    with KfpApiStandIn() as api:
        code = cli.main(
            ["submit", "--host", api.url, "--param", "source_uri=gs://bucket/data", "--param", "epochs=3",
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
        assert cli.main(["submit", "--host", api.url, "--param", "source_uri=gs://b/d", "--experiment", "surfaces"]) == 0
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
        assert cli.main(["submit", "--host", api.url, "--param", "epochs=3"]) == 2
        assert api.requests == []
    assert "needs a value for source_uri" in capsys.readouterr().err
