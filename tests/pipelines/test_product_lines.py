"""One model per product line: the committed product-lines pipeline through kfp.local's ParallelFor, and the plan."""

import json
import shutil

import pytest
import yaml

from defectkit import registry
from defectkit.data import Manifest
from defectkit.delivery.local.stack import read_stack, stop_stack
from defectkit.delivery.product_lines import Outcome, discover, plan, slug, summary_markdown, summary_metrics
from defectkit_kfp.pipelines.run import PRODUCT_LINES_YAML, run_local
from tests.conftest import TINY_IMAGE_SIZE
from tests.servers import start_mlflow_server

TINY = {"image_size": TINY_IMAGE_SIZE, "steps": 10, "batch_size": 16, "min_images_per_class": 2, "min_auroc": 0.0}


@pytest.fixture(scope="module")
def lines_root(sample_dir, tmp_path_factory):
    """Two product lines (one with a name that is no DNS label) and a folder that is not a dataset."""
    root = tmp_path_factory.mktemp("lines")
    shutil.copytree(sample_dir, root / "carpet")
    shutil.copytree(sample_dir, root / "metal_nut")
    (root / "notes").mkdir()
    (root / "notes" / "README.txt").write_text("not a product line")
    return root


def test_the_plan_names_each_line_by_its_category(lines_root):
    assert discover(str(lines_root)) == ["carpet", "metal_nut"]
    lines = plan(str(lines_root), [], registered_model="defectkit", service="inspect", work_dir="runs/")
    assert [line.to_json() for line in lines] == [
        {"category": "carpet", "source_uri": f"{lines_root}/carpet", "registered_model": "defectkit-carpet",
         "service": "inspect-carpet", "work_dir": "runs/carpet"},
        {"category": "metal_nut", "source_uri": f"{lines_root}/metal_nut", "registered_model": "defectkit-metal-nut",
         "service": "inspect-metal-nut", "work_dir": "runs/metal-nut"},
    ]
    chosen = plan(str(lines_root), ["metal_nut"], registered_model="m", service="s", work_dir="w")
    assert [line.category for line in chosen] == ["metal_nut"]


def test_the_plan_refuses_what_cannot_be_trained_or_served(lines_root, tmp_path):
    with pytest.raises(ValueError, match=r"categories \['notes'\] are not under .* it holds: carpet, metal_nut"):
        plan(str(lines_root), ["notes"], registered_model="m", service="s", work_dir="w")
    with pytest.raises(ValueError, match="no product lines under"):
        plan(str(tmp_path), [], registered_model="m", service="s", work_dir="w")
    shutil.copytree(lines_root / "metal_nut", tmp_path / "lines" / "Metal-Nut")
    shutil.copytree(lines_root / "metal_nut", tmp_path / "lines" / "metal_nut")
    with pytest.raises(ValueError, match="would share the model and service name 'metal-nut'"):
        plan(str(tmp_path / "lines"), [], registered_model="m", service="s", work_dir="w")
    with pytest.raises(ValueError, match="InferenceService name of product line 'carpet'"):
        plan(str(lines_root), [], registered_model="m", service="Inspect", work_dir="w")
    with pytest.raises(ValueError, match="no letter or digit"):
        slug("__")


def test_the_summary_has_one_row_per_line_by_name():
    outcomes = [Outcome("zipper", "m-zipper", "s-zipper", False, 0.81, 60, 1, "image AUROC 0.810 < 0.9"),
                Outcome("bottle", "m-bottle", "s-bottle", True, 0.99, 58, 0, "all gates passed | ok")]
    text = summary_markdown(outcomes)
    assert text.startswith("# Product lines: 1 of 2 product lines approved")
    rows = [line for line in text.splitlines() if line.startswith("| bottle") or line.startswith("| zipper")]
    assert rows[0].startswith("| bottle | approved | 0.990 | 58 | 0 | m-bottle | s-bottle | all gates passed \\| ok")
    assert rows[1].startswith("| zipper | not approved | 0.810 |")
    assert summary_metrics(outcomes) == {"image_auroc/zipper": 0.81, "image_auroc/bottle": 0.99, "approved_lines": 1,
                                         "lines": 2}


def test_the_pipeline_ships_one_model_per_line_in_a_parallel_for(lines_root, tmp_path):
    """Each line trained on its own data, judged, registered under its own name and served by its own stack."""
    server = start_mlflow_server(tmp_path)
    serving = tmp_path / "serving"
    lines = {"carpet": "defectkit-carpet", "metal-nut": "defectkit-metal-nut"}
    try:
        run = run_local(PRODUCT_LINES_YAML, {"source_root": str(lines_root), **TINY, "tracking_uri": server.url,
                                             "deploy_backend": "local", "serving_work_dir": str(serving),
                                             "canary_interval_s": 1.0, "canary_min_requests": 1},
                        tmp_path / "run")
        champions = {line: registry.version_for_alias(registry.RegistryConfig(server.url, model_name=model),
                                                      "champion") for line, model in lines.items()}
    finally:
        stacks = {line: read_stack(serving / line) for line in lines}
        stops = {line: stop_stack(serving / line) for line in lines}
        server.stop()
    root = run.pipeline_root
    sources = sorted(Manifest.read(p).source for p in root.rglob("validate-images/dataset"))
    assert sources == [f"{lines_root}/carpet", f"{lines_root}/metal_nut"]
    outcomes = [json.loads(p.read_text()) for p in root.rglob("evaluate-model/verdict")]
    assert run.outputs["approved"] == sum(o["approved"] for o in outcomes) == 2  # min_auroc 0: both pass
    summary = run.path("summary").read_text()
    assert summary.startswith("# Product lines: 2 of 2 product lines approved")
    for line, model in lines.items():
        assert f" | {model} | defectkit-{line} | " in summary
        assert champions[line].version == "1", f"{model} was registered and promoted on its own"
        assert stacks[line].stable.model == champions[line].uri, f"the {line} stack serves its own champion"
        assert stops[line], f"the {line} stack was running"


def test_the_compiled_loop_reads_item_fields_only_in_its_own_dag():
    """On a cluster, dict-item loop variables that cross a dsl.If or an ExitHandler of the same DAG are wired
    wrongly (kubeflow/pipelines#13273): here the loop's DAG hands the item's fields to the training
    sub-pipeline, and the gates and exit handler live inside that sub-pipeline's own DAGs."""
    spec = next(yaml.safe_load_all(PRODUCT_LINES_YAML.read_text()))
    loops = [name for name, c in spec["components"].items() if name.startswith("comp-for-loop")]
    assert len(loops) == 1
    declaring = {name for name, c in spec["components"].items()
                 if any("loop-item" in p for p in c.get("inputDefinitions", {}).get("parameters", {}))}
    assert declaring == set(loops) and "subvar" not in PRODUCT_LINES_YAML.read_text()
    selectors = {name for name, c in spec["components"].items() for task in c.get("dag", {}).get("tasks", {}).values()
                 for p in task.get("inputs", {}).get("parameters", {}).values() if "parameterExpressionSelector" in p}
    assert selectors == set(loops)
    loop = spec["components"][loops[0]]["dag"]["tasks"]
    assert set(loop) == {"defectkit-training", "record-product-line"}
    assert spec["root"]["dag"]["tasks"][loops[0].removeprefix("comp-")]["iteratorPolicy"] == {"parallelismLimit": 4}
