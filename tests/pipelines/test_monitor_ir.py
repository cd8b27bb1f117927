"""What the compiled monitor pipeline (pipelines/monitor.yaml) tells a Kubeflow backend: which tasks may be
served from cache, where the window's end comes from, and that retraining runs inside the monitor's run."""

from datetime import datetime, timezone

import pytest
import yaml
from kfp import dsl

from defectkit.monitor import run_window
from defectkit_kfp.pipelines.run import MONITOR_YAML, TRAINING_YAML, pipeline_parameters, with_run_times


@pytest.fixture(scope="module")
def spec() -> dict:
    return next(yaml.safe_load_all(MONITOR_YAML.read_text()))


def _caches(task: dict) -> bool:
    # The IR leaves enableCache out when it is false: `cachingOptions: {}`.
    return bool(task.get("cachingOptions", {}).get("enableCache", False))


@pytest.mark.parametrize("name", ["collect-window", "decide-retraining"])
def test_time_and_state_dependent_tasks_are_never_served_from_cache(spec, name):
    task = spec["root"]["dag"]["tasks"][name]
    assert "cachingOptions" in task and not _caches(task), task.get("cachingOptions")


def test_tasks_of_only_their_inputs_may_be_cached(spec):
    tasks = spec["root"]["dag"]["tasks"]
    assert _caches(tasks["validate-window"]) and _caches(tasks["detect-drift"])


def test_the_window_ends_at_the_scheduled_time_the_backend_substitutes(spec):
    inputs = spec["root"]["dag"]["tasks"]["collect-window"]["inputs"]["parameters"]
    assert inputs["scheduled_time"] == {"runtimeValue": {"constant": dsl.PIPELINE_JOB_SCHEDULE_TIME_UTC_PLACEHOLDER}}
    assert inputs["window_end"] == {"componentInputParameter": "window_end"}
    assert pipeline_parameters(MONITOR_YAML)["window_end"]["defaultValue"] == ""


def test_retraining_is_the_training_pipeline_inside_the_monitor_run_on_the_merged_data(spec):
    retraining = spec["root"]["dag"]["tasks"]["defectkit-retraining"]
    assert retraining["dependentTasks"] == ["decide-retraining"]
    inputs = retraining["inputs"]["parameters"]
    assert inputs["retrain"] == {"taskOutputParameter": {"outputParameterKey": "retrain",
                                                         "producerTask": "decide-retraining"}}
    assert inputs["source_uri"] == {"taskOutputParameter": {"outputParameterKey": "retraining_data",
                                                            "producerTask": "decide-retraining"}}
    [gate] = spec["components"][retraining["componentRef"]["name"]]["dag"]["tasks"].values()
    assert gate["triggerPolicy"]["condition"] == "inputs.parameter_values['pipelinechannel--retrain'] == true"
    [training] = spec["components"][gate["componentRef"]["name"]]["dag"]["tasks"].values()
    assert training["componentRef"]["name"] == "comp-defectkit-training"
    assert training["inputs"]["parameters"]["source_uri"] == {"componentInputParameter": "pipelinechannel--source_uri"}
    # No task of the monitor's own calls the KFP API: nothing takes a host, token or namespace.
    assert not set(pipeline_parameters(MONITOR_YAML)) & {"kfp_host", "local_work_dir", "training_arguments"}


def test_retraining_defaults_are_the_training_pipeline_defaults():
    monitor, training = pipeline_parameters(MONITOR_YAML), pipeline_parameters(TRAINING_YAML)
    forwarded = {name for name in monitor if monitor[name]["description"].startswith("Retraining:")}
    assert len(forwarded) > 10 and forwarded <= set(training)
    assert {name: monitor[name]["defaultValue"] for name in forwarded} == \
        {name: training[name]["defaultValue"] for name in forwarded}


def test_local_runs_get_the_creation_time_the_backend_would_substitute():
    created = datetime(2026, 1, 9, 13, 0, 0, 250000, tzinfo=timezone.utc)
    local = next(yaml.safe_load_all(with_run_times(MONITOR_YAML.read_text(), created)))
    stamp = local["root"]["dag"]["tasks"]["collect-window"]["inputs"]["parameters"]["scheduled_time"]
    assert stamp == {"runtimeValue": {"constant": "2026-01-09T13:00:00.250000Z"}}
    assert run_window(60.0, stamp["runtimeValue"]["constant"]) == (created.timestamp() - 60.0, created.timestamp())
    assert "{{$.pipeline_job_schedule_time_utc}}" not in with_run_times(MONITOR_YAML.read_text(), created)
    with pytest.raises(ValueError, match="must carry its time zone"):
        with_run_times("", datetime(2026, 1, 9))
