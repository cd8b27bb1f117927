"""examples/quickstart.ipynb, executed on a real kernel: against the multi-user KFP API stand-in on 127.0.0.1 and
through kfp.local on this machine."""

from pathlib import Path

import nbformat
from nbclient import NotebookClient

from defectkit_kfp.pipelines.run import TOKEN_PATH_ENV
from tests.kfp_api import NAMESPACE, TOKEN, KfpApiStandIn

NOTEBOOK = Path(__file__).resolve().parents[2] / "examples" / "quickstart.ipynb"


def _output_text(notebook) -> str:
    return "".join(output.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                   for output in cell.get("outputs", []))


def test_quickstart_submits_follows_schedules_and_trains_locally(tmp_path, monkeypatch):
    token = tmp_path / "token"
    token.write_text(TOKEN)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    with KfpApiStandIn() as api:
        # The kernel inherits this environment: the notebook reads its parameters from it.
        for name, value in {"KFP_HOST": api.url, "KFP_NAMESPACE": NAMESPACE, TOKEN_PATH_ENV: str(token),
                            "KFP_POLL_S": "0", "DEFECTKIT_DATA_URI": "gs://bucket/surfaces",
                            "DEFECTKIT_WORK_DIR": str(tmp_path / "work")}.items():
            monkeypatch.setenv(name, value)
        NotebookClient(notebook, timeout=600, kernel_name="python3",
                       resources={"metadata": {"path": str(tmp_path)}}).execute()
        [run] = api.runs.values()
        [recurring] = api.recurring_runs.values()
        experiment = api.experiments[run["experiment_id"]]
    assert experiment["namespace"] == NAMESPACE and recurring["experiment_id"] == run["experiment_id"]
    assert run["display_name"] == "quickstart"
    assert run["runtime_config"]["parameters"] == {"source_uri": "gs://bucket/surfaces", "steps": 500}
    text = _output_text(notebook)
    assert f"run {run['run_id']} (quickstart): SUCCEEDED" in text and "ended SUCCEEDED" in text
    assert f"monitor scheduled: recurring run {recurring['recurring_run_id']}" in text
    assert "image AUROC" in text
    assert next((tmp_path / "work" / "run").rglob("evaluate-model/verdict")).is_file()
