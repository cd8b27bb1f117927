"""Drift detection: KS and PSI against scipy and hand computations, real image shifts, and the component."""

import json
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy.stats import false_discovery_control, ks_2samp

from defectkit import drift
from defectkit.drift import DriftThresholds, Reference
from defectkit.preprocess import FEATURE_NAMES, image_features
from defectkit.reference import embedding_names
from defectkit.synthetic import generate_sample
from tests.shifts import blurred, brighter, new_texture

log = logging.getLogger(__name__)

IMAGE_SIZE = 64
REFERENCE_IMAGES = 400
CURRENT_IMAGES = 60
FALSE_ALARM_TRIALS = 40


# --------------------------------------------------------------------------- KS against scipy


def random_column(rng: np.random.Generator, kind: int) -> tuple[np.ndarray, np.ndarray]:
    """A reference and a current sample of one of several shapes, shifted or not; float32 like our data."""
    n1 = int(rng.choice([1, 2, 5, 40, 300, 2000, 12000]) + rng.integers(0, 50))
    n2 = int(rng.choice([1, 3, 30, 64, 65, 500, 4000]) + rng.integers(0, 50))
    shift = rng.choice([0.0, 0.0, 0.05, 0.2, 1.0])
    if kind == 0:  # continuous
        ref, cur = rng.standard_normal(n1), rng.standard_normal(n2) + shift
    elif kind == 1:  # discrete: heavy ties inside and across the samples
        ref, cur = rng.integers(0, 5, n1), rng.integers(0, int(rng.integers(3, 7)), n2)
    elif kind == 2:  # rounded: ties at many values
        ref, cur = np.round(rng.standard_normal(n1), 1), np.round(rng.standard_normal(n2) * (1 + shift), 1)
    elif kind == 3:  # skewed, scale change
        ref, cur = rng.exponential(size=n1), rng.exponential(size=n2) * (1 + shift)
    else:  # a constant current column, sometimes inside the reference's support
        ref, cur = rng.integers(0, 3, n1), np.full(n2, float(rng.integers(0, 4)))
    return np.asarray(ref, np.float32), np.asarray(cur, np.float32)


def test_ks_equals_scipy_on_random_columns_with_ties():
    rng = np.random.default_rng(7)
    ours, theirs, auto = [], [], []
    for i in range(240):
        ref, cur = random_column(rng, i % 5)
        statistic, pvalue = drift.ks_test(Reference.from_array(ref[:, None], ["x"], max_rows=10**6), cur[:, None])
        expected = ks_2samp(ref, cur, method="asymp")
        assert statistic[0] == expected.statistic, (i, ref.size, cur.size)
        assert pvalue[0] == pytest.approx(expected.pvalue, rel=1e-9, abs=1e-300), (i, ref.size, cur.size)
        ours.append(pvalue[0])
        theirs.append(expected.pvalue)
        if max(ref.size, cur.size) > 10000:  # where scipy's default method is the asymptotic one too
            auto.append((pvalue[0], ks_2samp(ref, cur).pvalue))
    ours, theirs = np.array(ours), np.array(theirs)
    assert len(auto) >= 20 and all(a == pytest.approx(b, rel=1e-9, abs=1e-300) for a, b in auto)
    scipy_adjusted = {"none": theirs, "bonferroni": np.minimum(theirs * theirs.size, 1.0),
                      "bh": false_discovery_control(theirs, method="bh")}
    for correction, expected in scipy_adjusted.items():
        adjusted = drift.adjust_pvalues(ours, correction)
        for alpha in (0.001, 0.01, 0.05, 0.1):
            assert np.array_equal(adjusted < alpha, expected < alpha), (correction, alpha)
    verdicts = drift.adjust_pvalues(ours, "bh") < 0.05
    assert 0.2 < verdicts.mean() < 0.8  # both outcomes are well represented


def test_ks_on_many_columns_at_once_matches_scipy_per_column():
    rng = np.random.default_rng(3)
    reference = rng.standard_normal((20000, 48)).astype(np.float32)
    current = rng.standard_normal((3000, 48)).astype(np.float32)
    current[:, :16] += np.linspace(0.0, 0.3, 16, dtype=np.float32)  # includes moderate shifts: the Smirnov branch
    current[:, 40:] = np.round(current[:, 40:], 1)  # ties between the samples
    statistic, pvalue = drift.ks_test(Reference.from_array(reference, [f"c{i}" for i in range(48)], max_rows=10**6),
                                      current)
    for k in range(48):
        expected = ks_2samp(reference[:, k], current[:, k])
        assert statistic[k] == expected.statistic
        assert pvalue[k] == pytest.approx(expected.pvalue, rel=1e-9, abs=1e-300)


def test_pvalues_equal_scipy_kstwo_in_every_branch():
    from scipy.stats import kstwo

    # scipy takes up to 0.1 s a value for large n: a coarse grid, but one that visits every branch.
    for n in (2, 52, 140, 141, 500, 9091, 100000, 100001, 2_000_000):
        x = np.clip(np.concatenate([np.linspace(0, 1, 41), np.linspace(0, 8 / math.sqrt(n), 25),
                                    [0.5 / n, 1 / n, 1.5 / n, 1 - 1 / n, 0.4999, 0.5, (1.4 / n) ** (2 / 3)]]), 0, 1)
        np.testing.assert_allclose(drift._kstwo_sf(x, float(n)), kstwo.sf(x, n), rtol=1e-9, atol=1e-300)


# --------------------------------------------------------------------------- PSI, corrections, reference


def test_psi_matches_a_hand_computation():
    reference = Reference.from_array(np.arange(100, dtype=np.float32)[:, None], ["v"], bins=4)
    # Edges at the reference quartiles 24.75, 49.5, 74.25: 25 reference values in each bin.
    np.testing.assert_allclose(reference.edges[0], [24.75, 49.5, 74.25])
    np.testing.assert_allclose(reference.proportions[0], [0.25] * 4)
    current = np.array([10.0] * 50 + [60.0] * 25 + [90.0] * 25, np.float32)[:, None]  # shares 0.5, 0, 0.25, 0.25
    eps = drift.PSI_EPSILON
    expected = (0.5 - 0.25) * math.log(0.5 / 0.25) + (eps - 0.25) * math.log(eps / 0.25)
    assert drift.psi(reference, current)[0] == pytest.approx(expected, rel=1e-12)
    assert drift.psi(reference, np.arange(100, dtype=np.float32)[:, None])[0] == 0.0


def test_psi_of_a_constant_reference_column_is_finite_and_flags_a_move():
    reference = Reference.from_array(np.full((50, 1), 3.0, np.float32), ["constant"])
    assert drift.psi(reference, np.full((40, 1), 3.0, np.float32))[0] == 0.0
    assert 5.0 < drift.psi(reference, np.full((40, 1), 4.0, np.float32))[0] < math.inf


def test_corrections_by_hand_and_against_scipy():
    p = np.array([0.01, 0.04, 0.03, 0.5])
    np.testing.assert_allclose(drift.adjust_pvalues(p, "bh"), [0.04, 0.16 / 3, 0.16 / 3, 0.5])
    np.testing.assert_allclose(drift.adjust_pvalues(p, "bonferroni"), [0.04, 0.16, 0.12, 1.0])
    np.testing.assert_array_equal(drift.adjust_pvalues(p, "none"), p)
    random = np.random.default_rng(0).uniform(0, 0.2, 300) ** 2
    np.testing.assert_allclose(drift.adjust_pvalues(random, "bh"), false_discovery_control(random), rtol=1e-12)
    with pytest.raises(ValueError, match="holm"):
        drift.adjust_pvalues(p, "holm")


def test_reference_subsamples_deterministically_and_round_trips(tmp_path):
    values = np.random.default_rng(1).standard_normal((500, 3))
    reference = Reference.from_array(values, ["a", "b", "c"], max_rows=100, seed=4)
    assert reference.n_rows == 100 and reference.values.dtype == np.float32
    assert np.all(np.diff(reference.values, axis=1) >= 0)
    np.testing.assert_array_equal(reference.values, Reference.from_array(values, ["a", "b", "c"], 100, 4).values)
    assert not np.array_equal(reference.values, Reference.from_array(values, ["a", "b", "c"], 100, 5).values)
    assert Reference.from_array(values, ["a", "b", "c"]).n_rows == 500

    path = tmp_path / "reference" / "embeddings.npz"
    reference.save(path)
    loaded = Reference.load(path)
    assert loaded.names == ("a", "b", "c")
    for name in ("values", "edges", "proportions"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(reference, name))
    with np.load(path, allow_pickle=False) as raw:  # plain arrays only
        assert sorted(raw.files) == ["edges", "format", "names", "proportions", "values"]
    np.savez(tmp_path / "other.npz", values=np.zeros(3))
    with pytest.raises(ValueError, match="format"):
        Reference.load(tmp_path / "other.npz")


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="unique"):
        Reference.from_array(np.zeros((5, 2)), ["a", "a"])
    with pytest.raises(ValueError, match=r"\['b'\]"):
        Reference.from_array(np.array([[0.0, np.nan]] * 3), ["a", "b"])
    reference = Reference.from_array(np.random.default_rng(0).standard_normal((100, 2)), ["a", "b"])
    with pytest.raises(ValueError, match="only 12 current rows.*at least 30"):
        drift.detect(reference, np.zeros((12, 2)), DriftThresholds())
    with pytest.raises(ValueError, match=r"\(rows, 2\)"):
        drift.detect(reference, np.zeros((40, 3)), DriftThresholds())
    with pytest.raises(ValueError, match="NaN"):
        drift.ks_test(reference, np.full((40, 2), np.inf))
    for bad in ({"ks_alpha": 0.0}, {"correction": "holm"}, {"psi": -1.0}, {"min_drifted_fraction": 1.5},
                {"min_rows": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            DriftThresholds(**bad)


def test_min_drifted_fraction_decides_the_dataset_verdict():
    rng = np.random.default_rng(5)
    reference = Reference.from_array(rng.standard_normal((2000, 10)), [f"f{i}" for i in range(10)])
    current = rng.standard_normal((500, 10))
    current[:, :2] += 2.0
    any_column = drift.detect(reference, current, DriftThresholds())
    assert any_column.drifted and any_column.drifted_columns == ("f0", "f1")
    assert any_column.column("f0").psi > 0.2 and any_column.column("f0").adjusted_pvalue < 0.05
    most = drift.detect(reference, current, DriftThresholds(min_drifted_fraction=0.5))
    assert not most.drifted and most.drifted_columns == ("f0", "f1")
    assert "min_drifted_fraction" in most.reason
    record = json.loads(json.dumps(most.to_json()))
    assert record["drifted"] is False and len(record["columns"]) == 10
    markdown = most.to_markdown()
    assert "| f0 | yes |" in markdown and "no drift" in markdown


# --------------------------------------------------------------------------- real images


def features_of(directory: Path, alter=None) -> np.ndarray:
    rows = []
    for path in sorted(directory.glob("t*/*/*.jpg")):
        with Image.open(path) as picture:
            picture = picture.convert("RGB")
            if alter is not None:
                picture = alter(picture)
            values = image_features(np.asarray(picture))
        rows.append([values[name] for name in FEATURE_NAMES])
    return np.array(rows)


def sample_features(root: Path, seed: int, count: int, alter=None) -> np.ndarray:
    out = root / f"sample-{seed}"
    if not out.exists():
        generate_sample(out, count=count, size=IMAGE_SIZE, seed=seed)
    return features_of(out, alter)


@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("drift-images")


@pytest.fixture(scope="module")
def image_reference(image_root) -> Reference:
    return Reference.from_array(sample_features(image_root, 0, REFERENCE_IMAGES), FEATURE_NAMES)


@pytest.mark.parametrize(("alter", "expected"), [
    (brighter, {"brightness", "r_mean", "g_mean", "b_mean"}),
    (blurred, {"sharpness"}),
    (new_texture, {"sharpness", "contrast"}),
])
def test_real_image_shifts_are_detected(image_root, image_reference, alter, expected):
    result = drift.detect(image_reference, sample_features(image_root, 1000, CURRENT_IMAGES, alter), DriftThresholds())
    assert result.drifted, result.reason
    assert expected <= set(result.drifted_columns), result.reason


def test_in_distribution_data_rarely_raises_a_false_alarm(image_root, image_reference):
    alarms = [seed for seed in range(1, FALSE_ALARM_TRIALS + 1)
              if drift.detect(image_reference, sample_features(image_root, seed, CURRENT_IMAGES),
                              DriftThresholds()).drifted]
    rate = len(alarms) / FALSE_ALARM_TRIALS
    log.info("false alarm rate %.3f over %d disjoint draws (alarms at seeds %s)", rate, FALSE_ALARM_TRIALS, alarms)
    assert rate <= 0.05, alarms


# --------------------------------------------------------------------------- evidently, tables, the component


def feature_table(values: np.ndarray) -> pd.DataFrame:
    table = pd.DataFrame(values, columns=list(FEATURE_NAMES))
    table.insert(0, "path", [f"test/good/{i:04d}.jpg" for i in range(len(table))])
    table.insert(1, "split", "test")
    table.insert(2, "class", "good")
    return table


def test_feature_drift_combines_evidently_and_the_verdict(image_root, tmp_path):
    reference = feature_table(sample_features(image_root, 0, REFERENCE_IMAGES))
    current = feature_table(sample_features(image_root, 1000, CURRENT_IMAGES, brighter))
    result = drift.detect_feature_drift(reference, current, DriftThresholds(), tmp_path / "report" / "drift.html")
    assert "<html" in (tmp_path / "report" / "drift.html").read_text().lower()
    assert list(result.evidently_scores) == list(FEATURE_NAMES)
    for name, score in result.evidently_scores.items():  # evidently's "ks" score is ks_2samp's p-value
        assert score == pytest.approx(ks_2samp(reference[name], current[name]).pvalue, rel=1e-6)
    assert result.result.drifted and "brightness" in result.result.drifted_columns
    assert result.to_json()["evidently"]["method"] == "ks"


def write_artifacts(root: Path, image_root: Path) -> tuple[Path, Path]:
    reference_dir, current_dir = root / "reference", root / "current"
    reference_dir.mkdir(parents=True)
    current_dir.mkdir(parents=True)
    feature_table(sample_features(image_root, 0, REFERENCE_IMAGES)).to_csv(reference_dir / drift.FEATURES_FILE,
                                                                          index=False)
    feature_table(sample_features(image_root, 1000, CURRENT_IMAGES, brighter)).to_csv(
        current_dir / drift.FEATURES_FILE, index=False)
    rng = np.random.default_rng(2)
    names = embedding_names(16)
    Reference.from_array(rng.standard_normal((800, 16)), names).save(reference_dir / drift.REFERENCE_EMBEDDINGS_FILE)
    np.save(current_dir / drift.CURRENT_EMBEDDINGS_FILE, rng.standard_normal((CURRENT_IMAGES, 16)).astype(np.float32))
    return reference_dir, current_dir


def test_artifact_drift_reads_the_documented_layout(image_root, tmp_path):
    reference_dir, current_dir = write_artifacts(tmp_path, image_root)
    result = drift.detect_artifact_drift(reference_dir, current_dir, DriftThresholds(), tmp_path / "report.html")
    assert result.drifted and "brightness" in result.drifted_features
    assert result.embeddings is not None and result.embeddings.n_current == CURRENT_IMAGES
    assert "Model embeddings" in result.to_markdown()
    (current_dir / drift.CURRENT_EMBEDDINGS_FILE).unlink()
    without = drift.detect_artifact_drift(reference_dir, current_dir, DriftThresholds(), tmp_path / "report.html")
    assert without.embeddings is None and "embeddings not checked" in without.notes[0]


def test_detect_drift_component_runs_in_a_pipeline(image_root, tmp_path, monkeypatch):
    from kfp import dsl, local
    from kfp.dsl import Artifact, Dataset

    from defectkit_kfp.components.detect_drift import detect_drift

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"))
    reference_dir, current_dir = write_artifacts(tmp_path / "data", image_root)

    @dsl.pipeline
    def monitor(reference_uri: str, current_uri: str) -> bool:
        reference = dsl.importer(artifact_uri=reference_uri, artifact_class=Artifact, reimport=False)
        current = dsl.importer(artifact_uri=current_uri, artifact_class=Dataset, reimport=False)
        return detect_drift(reference=reference.output, current=current.output).outputs["drifted"]

    task = monitor(reference_uri=str(reference_dir), current_uri=str(current_dir))
    assert task.output is True
    outputs = tmp_path / "root"
    scores = json.loads(next(outputs.rglob("detect-drift/scores")).read_text())
    assert "brightness" in scores["drifted_features"] and scores["embeddings"] is not None
    assert set(scores["features"]["evidently"]["scores"]) == set(FEATURE_NAMES)
    assert "Image features: DRIFTED" in next(outputs.rglob("detect-drift/summary")).read_text()
    assert "<html" in next(outputs.rglob("detect-drift/report")).read_text().lower()


# --------------------------------------------------------------------------- the reference a judged model carries


def test_a_judged_models_reference_is_copied_and_its_absence_named(tmp_path):
    from defectkit.reference import copy_model_reference

    model = tmp_path / "model"
    (model / "reference").mkdir(parents=True)
    (model / "reference" / "features.csv").write_text("path,brightness\na.png,0.5\n")
    Reference.from_array(np.arange(40.0).reshape(20, 2), ["e0", "e1"]).save(model / "reference" / "embeddings.npz")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "kept.txt").write_text("there before")
    assert copy_model_reference(model, tmp_path / "out") == tmp_path / "out"
    assert (tmp_path / "out" / "features.csv").read_text() == "path,brightness\na.png,0.5\n"
    assert Reference.load(tmp_path / "out" / "embeddings.npz").names == ("e0", "e1")
    assert (tmp_path / "out" / "kept.txt").read_text() == "there before"

    (tmp_path / "old").mkdir()
    with pytest.raises(ValueError, match=r"models:/defectkit@champion has no reference/ .*evaluate it"):
        copy_model_reference(tmp_path / "old", tmp_path / "nowhere", name="models:/defectkit@champion")
    assert not (tmp_path / "nowhere").exists()
