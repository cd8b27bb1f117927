"""Metrics against sklearn, threshold policies, gates, and evaluate() on a real tiny preprocessed sample."""

from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from defectkit import models
from defectkit.delivery import record as delivery_record
from defectkit.drift import Reference
from defectkit.evaluation import (
    MAX_ROC_POINTS,
    NO_DEFECTS_IN_VAL,
    Blessing,
    Gates,
    ThresholdPolicy,
    applicable_policy,
    auroc_by_class,
    binary_metrics,
    bless,
    champion_in,
    choose_threshold,
    evaluate,
    judge,
    recall_by_class,
    render_report,
    roc_auc,
    roc_curve,
)
from defectkit.golden import read_golden
from defectkit.preprocess import PreprocessSpec, load_split, preprocess_dataset, read_info, read_spec
from defectkit.significance import PairedComparison
from defectkit.validation.dataset import ValidationConfig, validate_dataset
from tests.conftest import TINY_IMAGE_SIZE
from tests.unit.layouts import thin_train_defects


def _random_case(seed: int, n: int = 300, ties: bool = False) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.4).astype(np.uint8)
    scores = rng.normal(labels * 1.2, 1.0).astype(np.float32)
    if ties:
        scores = np.round(scores, 1)  # many exactly equal scores across both classes
    return labels, scores


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("ties", [False, True])
def test_roc_auc_and_curve_equal_sklearn(seed, ties):
    labels, scores = _random_case(seed, ties=ties)
    assert roc_auc(labels, scores) == pytest.approx(skm.roc_auc_score(labels, scores), abs=1e-12)
    fpr, tpr, thresholds = roc_curve(labels, scores)
    sk_fpr, sk_tpr, sk_thresholds = skm.roc_curve(labels, scores)
    np.testing.assert_array_equal(fpr, sk_fpr)
    np.testing.assert_array_equal(tpr, sk_tpr)
    np.testing.assert_array_equal(thresholds, sk_thresholds)


def test_roc_auc_extremes_and_single_class():
    labels = np.array([0, 0, 1, 1])
    assert roc_auc(labels, [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert roc_auc(labels, [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert roc_auc(labels, [0.5, 0.5, 0.5, 0.5]) == 0.5
    with pytest.raises(ValueError, match="only one class"):
        roc_auc([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="only one class"):
        roc_curve([0, 0], [0.1, 0.2])
    with pytest.raises(ValueError, match="labels must be 0"):
        roc_auc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        roc_auc([0, 1], [0.1, float("nan")])


@pytest.mark.parametrize("threshold", [-1.0, 0.0, 0.6, 1.5, 99.0])
def test_binary_metrics_equal_sklearn(threshold):
    labels, scores = _random_case(1)
    got = binary_metrics(labels, scores, threshold)
    predicted = (scores >= threshold).astype(int)
    tn, fp, fn, tp = skm.confusion_matrix(labels, predicted, labels=[0, 1]).ravel()
    assert (got["tp"], got["fp"], got["tn"], got["fn"]) == (tp, fp, tn, fn)
    assert got["precision"] == pytest.approx(skm.precision_score(labels, predicted, zero_division=0))
    assert got["recall"] == pytest.approx(skm.recall_score(labels, predicted, zero_division=0))
    assert got["f1"] == pytest.approx(skm.f1_score(labels, predicted, zero_division=0))
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(labels, predicted))
    assert got["fpr"] == pytest.approx(fp / (fp + tn))


def test_binary_metrics_zero_division_safe():
    got = binary_metrics([0, 0, 0], [0.1, 0.2, 0.3], 0.5)
    assert got == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "accuracy": 1.0, "fpr": 0.0,
                   "tp": 0, "fp": 0, "tn": 3, "fn": 0}


def test_recall_by_class_counts_only_defect_types():
    names = ["good", "good", "scratch", "scratch", "hole", "hole", "hole", "stain"]
    labels = [0, 0, 1, 1, 1, 1, 1, 1]
    scores = [0.9, 0.1, 0.8, 0.2, 0.7, 0.6, 0.1, 0.5]
    assert recall_by_class(names, labels, scores, 0.5) == {"hole": 2 / 3, "scratch": 0.5, "stain": 1.0}


@pytest.mark.parametrize("seed", range(4))
def test_auroc_by_class_equals_sklearn_on_each_type_against_the_good_images(seed):
    rng = np.random.default_rng(seed)
    names = rng.choice(["good", "good", "scratch", "hole", "stain"], size=200)
    labels = (names != "good").astype(np.uint8)
    # Types separated from good by different margins, with ties in half the cases.
    shift = {"good": 0.0, "scratch": 2.0, "hole": 0.5, "stain": -0.3}
    scores = rng.normal([shift[n] for n in names], 1.0)
    if seed % 2:
        scores = np.round(scores, 1)
    got = auroc_by_class(names, labels, scores)
    assert set(got) == {"scratch", "hole", "stain"}
    good = names == "good"
    for name, value in got.items():
        members = good | (names == name)
        assert value == pytest.approx(skm.roc_auc_score(labels[members], scores[members]), abs=1e-12), name
    assert got["scratch"] > got["hole"] > got["stain"]


def _candidate_thresholds(scores: np.ndarray) -> np.ndarray:
    unique = np.unique(scores)
    return np.r_[unique, unique[-1] + 1.0]


@pytest.mark.parametrize("seed", range(5))
def test_max_f1_threshold_maximises_f1(seed):
    labels, scores = _random_case(seed, n=120, ties=seed % 2 == 0)
    threshold = choose_threshold(labels, scores, ThresholdPolicy("max_f1"))
    best = max(binary_metrics(labels, scores, t)["f1"] for t in _candidate_thresholds(scores))
    assert binary_metrics(labels, scores, threshold)["f1"] == pytest.approx(best)


@pytest.mark.parametrize("target", [0.0, 0.05, 0.2])
@pytest.mark.parametrize("seed", range(4))
def test_target_fpr_threshold_keeps_fpr_and_maximises_recall(seed, target):
    labels, scores = _random_case(seed, n=200, ties=seed % 2 == 1)
    threshold = choose_threshold(labels, scores, ThresholdPolicy("target_fpr", target_fpr=target))
    chosen = binary_metrics(labels, scores, threshold)
    assert chosen["fpr"] <= target
    feasible = [binary_metrics(labels, scores, t) for t in _candidate_thresholds(scores)]
    assert chosen["recall"] == max(m["recall"] for m in feasible if m["fpr"] <= target)


def test_target_fpr_when_the_top_score_is_good():
    threshold = choose_threshold([0, 1, 0, 1], [0.9, 0.8, 0.1, 0.2], ThresholdPolicy("target_fpr", target_fpr=0.0))
    assert threshold > 0.9
    assert binary_metrics([0, 1, 0, 1], [0.9, 0.8, 0.1, 0.2], threshold)["fpr"] == 0.0


@pytest.mark.parametrize("target", [0.0, 0.05, 0.1, 0.3])
@pytest.mark.parametrize("seed", range(4))
def test_target_fpr_on_good_images_only_keeps_their_fpr_at_the_lowest_such_threshold(seed, target):
    rng = np.random.default_rng(seed)
    scores = rng.normal(0.0, 1.0, 87)
    if seed % 2:
        scores = np.round(scores, 1)  # ties: a run of equal scores is flagged or kept together
    labels = np.zeros(scores.size, np.uint8)
    threshold = choose_threshold(labels, scores, ThresholdPolicy("target_fpr", target_fpr=target))
    assert binary_metrics(labels, scores, threshold)["fpr"] <= target
    # It is the lowest that keeps the target: at the next lower score, one more good part (or run of equal
    # scores) is flagged, which is over it.
    below = scores[scores < threshold]
    assert below.size == 0 or binary_metrics(labels, scores, below.max())["fpr"] > target
    if below.size and threshold <= scores.max():
        above = scores[scores >= threshold].min()
        assert threshold == pytest.approx((above + below.max()) / 2)  # halfway, as with both classes


def test_max_f1_needs_defect_images_and_falls_back_to_target_fpr_on_good_only_validation():
    good_only = np.zeros(20, np.uint8)
    with pytest.raises(ValueError, match="'max_f1' needs defect images.*target_fpr"):
        choose_threshold(good_only, np.linspace(0, 1, 20), ThresholdPolicy("max_f1"))
    applied = applicable_policy(ThresholdPolicy("max_f1", target_fpr=0.1), good_only)
    assert applied == ThresholdPolicy("target_fpr", 0.1, requested="max_f1", reason=NO_DEFECTS_IN_VAL)
    assert applied.to_json() == {"kind": "target_fpr", "target_fpr": 0.1, "requested": "max_f1",
                                 "reason": "validation split has no defect images"}
    assert ThresholdPolicy.from_json(applied.to_json()) == applied
    assert applied.in_words() == ("to flag at most 10% of good parts (target_fpr fallback, max_f1 was requested: "
                                  "validation split has no defect images)")
    # Applied as asked wherever it can be: the record stays what it always was.
    both = np.array([0, 0, 1])
    assert applicable_policy(ThresholdPolicy("max_f1"), both) == ThresholdPolicy("max_f1")
    assert ThresholdPolicy("max_f1").to_json() == {"kind": "max_f1", "target_fpr": 0.05}
    target = ThresholdPolicy("target_fpr", target_fpr=0.025)
    assert applicable_policy(target, good_only) is target and target.in_words() == "to flag at most 2.5% of good parts"


@pytest.mark.parametrize("labels, match", [
    ([], "validation split is empty"),
    ([1, 1, 1], "no good images \\(3 images, all defect\\)"),
])
def test_no_policy_applies_without_good_validation_images(labels, match):
    for kind in ("max_f1", "target_fpr"):
        with pytest.raises(ValueError, match=match):
            applicable_policy(ThresholdPolicy(kind), np.array(labels, np.uint8))
    with pytest.raises(ValueError, match="'target_fpr' needs good images"):
        choose_threshold([1, 1], [0.2, 0.4], ThresholdPolicy("target_fpr"))


def test_threshold_lies_between_scores_on_separable_data():
    threshold = choose_threshold([0, 0, 1, 1], [0.1, 0.3, 0.7, 0.9], ThresholdPolicy())
    assert threshold == pytest.approx(0.5)


@pytest.mark.parametrize("kwargs, match", [
    ({"kind": "youden"}, "youden"),
    ({"kind": "target_fpr", "target_fpr": 1.5}, "1.5"),
    ({"target_fpr": -0.1}, "-0.1"),
    ({"kind": "target_fpr", "requested": "max_f1"}, "reason=None"),
    ({"kind": "target_fpr", "requested": "target_fpr", "reason": "why"}, "requested='target_fpr'"),
    ({"kind": "target_fpr", "requested": "youden", "reason": "why"}, "requested='youden'"),
])
def test_threshold_policy_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ThresholdPolicy(**kwargs)


def test_gates_validation():
    with pytest.raises(ValueError, match="min_auroc=1.2"):
        Gates(min_auroc=1.2)
    with pytest.raises(ValueError, match="max_f1_drop=-0.1"):
        Gates(max_f1_drop=-0.1)
    with pytest.raises(ValueError, match="confidence=1.0"):
        Gates(confidence=1.0)


_GOOD_RUN = {"image_auroc": 0.981, "recall": 0.95, "fpr": 0.03, "f1": 0.96}
# The point-estimate drop gates, as they apply where no paired test could be made.
_POINT = Gates(max_auroc_drop=0.0, max_f1_drop=0.02)


def test_first_model_uses_absolute_gates_only():
    blessing = bless(_GOOD_RUN, Gates())
    assert blessing == Blessing(True, ("image AUROC 0.981 >= 0.900", "recall 0.950 >= 0.000", "FPR 0.030 <= 1.000",
                                       "first model: no champion, absolute gates only"))
    rejected = bless({**_GOOD_RUN, "image_auroc": 0.85}, Gates())
    assert not rejected.approved
    assert "image AUROC 0.850 < 0.900" in rejected.reasons
    assert not bless(_GOOD_RUN, Gates(min_recall=0.97)).approved
    assert not bless(_GOOD_RUN, Gates(max_fpr=0.01)).approved


def test_without_a_paired_test_the_point_estimates_decide():
    candidate = {**_GOOD_RUN, "f1": 0.91}
    blessing = bless(candidate, _POINT, champion_metrics=_GOOD_RUN)
    assert not blessing.approved
    assert "F1 0.910 is 0.050 below champion 0.960 (allowed drop 0.020; point estimates, no paired test)" \
        in blessing.reasons
    assert "image AUROC 0.981 matches champion 0.981 (allowed drop 0.000; point estimates, no paired test)" \
        in blessing.reasons
    assert not any("first model" in reason for reason in blessing.reasons)
    assert not bless({**_GOOD_RUN, "image_auroc": 0.975}, _POINT, champion_metrics=_GOOD_RUN).approved
    better = bless({**_GOOD_RUN, "image_auroc": 0.99, "f1": 0.97}, _POINT, champion_metrics=_GOOD_RUN)
    assert better.approved
    assert any(r.startswith("F1 0.970 is 0.010 above champion 0.960") for r in better.reasons)
    assert bless(_GOOD_RUN, _POINT, champion_metrics=_GOOD_RUN).approved  # identical models never fail on rounding
    assert bless({**_GOOD_RUN, "f1": 0.95}, _POINT, champion_metrics=_GOOD_RUN).approved


def _comparison(metric: str, champion: float, challenger: float, ci_low: float, ci_high: float) -> dict:
    return PairedComparison(metric, champion, challenger, champion - challenger, (ci_high - ci_low) / 3.92,
                            ci_low, ci_high, 0.95, 0.4, 60, 80, "DeLong" if metric == "image AUROC" else
                            "paired bootstrap, 2000 resamples").to_json()


def test_the_drop_gates_read_the_upper_bound_of_the_paired_interval():
    # A point drop beyond the allowance that the test set cannot tell from noise is no reason to reject...
    noisy = {**_GOOD_RUN, "image_auroc": 0.975, "f1": 0.93,
             "auroc_comparison": _comparison("image AUROC", 0.981, 0.975, -0.012, 0.024),
             "f1_comparison": _comparison("F1", 0.96, 0.93, -0.01, 0.048)}
    blessing = bless(noisy, Gates(), champion_metrics=_GOOD_RUN)
    assert blessing.approved, blessing.reasons
    assert ("image AUROC 0.975 is 0.006 below champion 0.981: drop 95% CI [-0.012, +0.024] (DeLong, p = 0.4), "
            "within the allowed drop 0.030") in blessing.reasons
    # ...but an interval reaching past the allowance is, even where the point estimate is better.
    uncertain = {**noisy, "image_auroc": 0.985,
                 "auroc_comparison": _comparison("image AUROC", 0.981, 0.985, -0.05, 0.031)}
    rejected = bless(uncertain, Gates(), champion_metrics=_GOOD_RUN)
    assert not rejected.approved
    assert any(r.startswith("image AUROC 0.985 is 0.004 above champion 0.981: drop 95% CI [-0.050, +0.031]")
               and r.endswith("beyond the allowed drop 0.030") for r in rejected.reasons)
    assert bless(uncertain, Gates(max_auroc_drop=0.031), champion_metrics=_GOOD_RUN).approved


# ---------------------------------------------------------------- end to end on real files


def _model_for(preprocessed_dir: Path, out: Path, seed: int) -> Path:
    """A real model artifact for the classes and input size of ``preprocessed_dir``, with seeded weights.

    Evaluation judges whatever model it is given; an untrained one keeps these tests about judging,
    independent of how training works and fast.
    """
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        module = models.build_model("resnet18")
    metadata = models.ModelMetadata("resnet18", tuple(read_info(preprocessed_dir)["classes"]),
                                    read_spec(preprocessed_dir), metrics={"val_auroc": 0.5, "best_epoch": 1})
    return models.save_model(module, metadata, out)


@pytest.fixture(scope="module")
def candidate_dir(preprocessed_dir, tmp_path_factory) -> Path:
    return _model_for(preprocessed_dir, tmp_path_factory.mktemp("candidate"), seed=0)


@pytest.fixture(scope="module")
def champion_48px(dataset_dir, tmp_path_factory) -> tuple[Path, Path]:
    """A champion made for another image size: (model dir, its own preprocessed dir)."""
    preprocessed = tmp_path_factory.mktemp("preprocessed48")
    preprocess_dataset(dataset_dir, preprocessed, PreprocessSpec(image_size=48), workers=1)
    return _model_for(preprocessed, tmp_path_factory.mktemp("champion"), seed=1), preprocessed


def test_evaluate_writes_judged_model_metrics_and_report(candidate_dir, preprocessed_dir, tmp_path):
    result = evaluate(candidate_dir, preprocessed_dir, tmp_path / "eval", device="cpu",
                      policy=ThresholdPolicy("target_fpr", target_fpr=0.25), gates=Gates(min_auroc=0.0))
    test = load_split(preprocessed_dir, "test")
    m = result.metrics
    assert result.blessing.approved and result.champion_metrics is None
    assert "first model: no champion, absolute gates only" in result.blessing.reasons
    assert m["image_auroc"] == pytest.approx(skm.roc_auc_score(test.labels, result.test_scores))
    assert m["n_test"] == len(test.labels) == sum(map(sum, result.confusion_matrix))
    (tn, fp), (fn, tp) = result.confusion_matrix
    assert tp + fn == int(test.labels.sum()) and (tp, fp, tn, fn) == (m["tp"], m["fp"], m["tn"], m["fn"])
    assert set(m["recall_by_defect_type"]) == {"crack", "hole", "scratch", "stain"}
    names = np.asarray(test.class_names)
    for name, value in m["auroc_by_defect_type"].items():
        members = (names == "good") | (names == name)
        assert value == pytest.approx(skm.roc_auc_score(test.labels[members], result.test_scores[members])), name
    assert set(m["auroc_by_defect_type"]) == set(m["recall_by_defect_type"])
    assert m["val_auroc"] == pytest.approx(skm.roc_auc_score(load_split(preprocessed_dir, "val").labels,
                                                            judged_scores(candidate_dir, preprocessed_dir, "val")))
    assert len(result.roc_curve["fpr"]) <= MAX_ROC_POINTS
    assert all(np.isfinite(result.roc_curve["thresholds"]))

    judged = models.load_model(tmp_path / "eval" / "model")  # sha verified: the weights were copied unchanged
    original = models.read_metadata(candidate_dir)
    assert judged.metadata.weights_sha256 == original.weights_sha256
    assert judged.metadata.threshold == m["threshold"]
    assert judged.metadata.threshold_policy == {"kind": "target_fpr", "target_fpr": 0.25}
    assert judged.metadata.metrics["test"]["f1"] == m["f1"]
    assert judged.metadata.metrics["test"]["auroc_by_defect_type"] == m["auroc_by_defect_type"]
    assert judged.metadata.metrics["best_epoch"] == original.metrics["best_epoch"]
    scores, labels = judged.predict(test.images)
    np.testing.assert_allclose(scores, result.test_scores, rtol=1e-6)
    assert int(labels.sum()) == tp + fp

    reference = tmp_path / "eval" / "model" / "reference"
    train_split = load_split(preprocessed_dir, "train")
    with (reference / "features.csv").open(newline="") as rows:
        table = list(csv.DictReader(rows))
    assert [r["path"] for r in table] == list(train_split.paths) and {r["split"] for r in table} == {"train"}
    embedded = Reference.load(reference / "embeddings.npz")
    assert embedded.n_rows == len(train_split.paths) and embedded.names[0] == "embedding_000"
    np.testing.assert_allclose(np.sort(judged.embeddings(train_split.images), axis=0).T, embedded.values, rtol=1e-4,
                               atol=1e-5)

    record = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    for key in ("image_auroc", "precision", "recall", "f1", "threshold", "approved", "reasons"):
        assert key in record
    assert record["approved"] is True and record["champion"] is None
    report = (tmp_path / "eval" / "report.md").read_text()
    assert report.startswith("# Model evaluation: APPROVED")
    assert "| image_auroc |" in report and "| scratch |" in report and "Confusion matrix" in report
    assert f"chosen on {m['n_val']} validation images to flag at most 25% of good parts." in report
    assert "| defect type | recall | AUROC |" in report
    scratch = f"| scratch | {m['recall_by_defect_type']['scratch']:.4f} | {m['auroc_by_defect_type']['scratch']:.4f} |"
    assert scratch in report


def test_champion_at_another_image_size_is_scored_from_raw_files(candidate_dir, champion_48px, preprocessed_dir,
                                                                  dataset_dir, tmp_path):
    champion_dir, champion_preprocessed = champion_48px
    with pytest.raises(ValueError, match="dataset_dir"):
        evaluate(candidate_dir, preprocessed_dir, tmp_path / "no-raw", champion_dir=champion_dir, device="cpu")

    result = evaluate(candidate_dir, preprocessed_dir, tmp_path / "eval", champion_dir=champion_dir,
                      dataset_dir=dataset_dir, device="cpu", gates=Gates(min_auroc=0.0, max_auroc_drop=1.0,
                                                                            max_f1_drop=1.0))
    # Re-decoding the raw test images at 48 px must give exactly what the champion's own shards hold.
    own = evaluate(champion_dir, champion_preprocessed, tmp_path / "own", device="cpu")
    assert result.champion_metrics["image_auroc"] == own.metrics["image_auroc"]
    assert result.champion_metrics["threshold"] == own.metrics["threshold"]
    assert result.champion_metrics["image_size"] == 48 and result.metrics["image_size"] == 32
    assert result.blessing.approved
    assert any("below champion" in r or "above champion" in r for r in result.blessing.reasons)
    deltas = result.metrics["deltas"]
    assert deltas["f1"] == pytest.approx(result.metrics["f1"] - result.champion_metrics["f1"])
    record = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert record["champion"]["image_auroc"] == result.champion_metrics["image_auroc"]
    assert record["deltas"] == deltas
    comparison = record["auroc_comparison"]
    assert comparison["method"] == "DeLong" and comparison["difference"] == pytest.approx(-deltas["image_auroc"])
    assert comparison["ci_low"] <= comparison["difference"] <= comparison["ci_high"]
    f1_test = record["f1_comparison"]
    assert f1_test["difference"] == pytest.approx(-deltas["f1"]) and "bootstrap" in f1_test["method"]
    # The evidence travels with the judged model, for the delivery's decision record.
    judged = models.read_metadata(tmp_path / "eval" / "model").metrics["test"]
    assert judged["auroc_comparison"] == comparison and judged["f1_comparison"] == f1_test
    evidence = delivery_record.evidence_of(tmp_path / "eval" / "model")
    assert evidence["auroc_comparison"] == comparison and evidence["n_test"] == result.metrics["n_test"]
    assert delivery_record.evidence_of(candidate_dir) is None  # trained, not judged: no test figures
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "## Is the candidate really better?" in report and "DeLong" in report and "paired bootstrap" in report
    assert "| metric | candidate | champion | delta |" in report
    assert "| defect type | recall | champion recall | AUROC | champion AUROC |" in report
    hole = (f"| hole | {result.metrics['recall_by_defect_type']['hole']:.4f} | "
            f"{result.champion_metrics['recall_by_defect_type']['hole']:.4f} | "
            f"{result.metrics['auroc_by_defect_type']['hole']:.4f} | "
            f"{result.champion_metrics['auroc_by_defect_type']['hole']:.4f} |")
    assert hole in report


def test_candidate_identical_to_its_champion_is_approved(candidate_dir, preprocessed_dir, tmp_path):
    result = evaluate(candidate_dir, preprocessed_dir, tmp_path / "eval", champion_dir=candidate_dir, device="cpu",
                      gates=Gates(min_auroc=0.0))
    assert result.blessing.approved
    assert result.metrics["deltas"]["image_auroc"] == 0.0 and result.metrics["deltas"]["f1"] == 0.0
    for key in ("auroc_comparison", "f1_comparison"):
        comparison = result.metrics[key]
        assert (comparison["difference"], comparison["ci_high"], comparison["p_value"]) == (0.0, 0.0, 1.0)


def test_judge_writes_what_delivery_needs_and_finds_the_champion_only_where_there_is_one(
        candidate_dir, preprocessed_dir, dataset_dir, tmp_path):
    (tmp_path / "no-champion").mkdir()  # what a first run's empty champion artifact looks like
    assert champion_in(tmp_path / "no-champion") is None and champion_in(candidate_dir) == candidate_dir
    first = judge(candidate_dir, preprocessed_dir, dataset_dir, tmp_path / "no-champion",
                  judged_model_dir=tmp_path / "judged", golden_dir=tmp_path / "golden",
                  metrics_path=tmp_path / "metrics.json", report_path=tmp_path / "report.md",
                  gates=Gates(min_auroc=0.0), device="cpu")
    assert first.champion_metrics is None and first.model_dir == tmp_path / "judged"
    judged = models.load_model(tmp_path / "judged")
    assert judged.metadata.threshold == first.metrics["threshold"] and (tmp_path / "judged" / "reference").is_dir()
    golden = read_golden(tmp_path / "golden")
    assert golden.weights_sha256 == judged.metadata.weights_sha256 and len(golden.scores) == 8
    assert json.loads((tmp_path / "metrics.json").read_text())["champion"] is None
    assert (tmp_path / "report.md").read_text().startswith("# Model evaluation: APPROVED")

    against = judge(candidate_dir, preprocessed_dir, dataset_dir, candidate_dir,
                    judged_model_dir=tmp_path / "judged-again", golden_dir=tmp_path / "golden-again",
                    metrics_path=tmp_path / "metrics-again.json", report_path=tmp_path / "report-again.md",
                    gates=Gates(min_auroc=0.0), device="cpu")
    assert against.champion_metrics["image_auroc"] == against.metrics["image_auroc"]
    assert "| metric | candidate | champion | delta |" in (tmp_path / "report-again.md").read_text()


def test_a_blocked_candidate_is_announced_with_the_gates_it_failed(candidate_dir, preprocessed_dir, dataset_dir,
                                                                    tmp_path):
    from tests.unit.test_notify import Receiver

    receiver = Receiver()
    (tmp_path / "no-champion").mkdir()
    try:
        result = judge(candidate_dir, preprocessed_dir, dataset_dir, tmp_path / "no-champion",
                       judged_model_dir=tmp_path / "judged", golden_dir=tmp_path / "golden",
                       metrics_path=tmp_path / "metrics.json", report_path=tmp_path / "report.md",
                       gates=Gates(min_auroc=0.999), device="cpu", webhooks=f"slack+{receiver.url}")
    finally:
        receiver.server.close()
    assert not result.blessing.approved and len(result.blessing.failed) == 1
    (message,) = [b["body"] for b in receiver.bodies]
    assert message["text"].startswith(":no_entry: candidate blocked by the evaluation gates (test AUROC ")
    fields = {f["text"].split("\n", 1)[0]: f["text"].split("\n", 1)[1] for f in message["blocks"][1]["fields"]}
    assert fields["*failed*"] == result.blessing.failed[0] and "< 0.999" in fields["*failed*"]


def judged_scores(model_dir: Path, preprocessed_dir: Path, split: str) -> np.ndarray:
    return models.load_model(model_dir).scores(load_split(preprocessed_dir, split).images)


@pytest.fixture(scope="module")
def good_only_preprocessed_dir(sample_dir, tmp_path_factory) -> Path:
    """A product line without real defects in train (MVTec AD's layout): its validation split is all good."""
    source = tmp_path_factory.mktemp("good-only") / "source"
    shutil.copytree(sample_dir, source)
    thin_train_defects(source)
    dataset = tmp_path_factory.mktemp("good-only-dataset")
    validate_dataset(str(source), dataset, ValidationConfig(min_images_per_class=2, min_side=16))
    out = tmp_path_factory.mktemp("good-only-preprocessed")
    preprocess_dataset(dataset, out, PreprocessSpec(image_size=TINY_IMAGE_SIZE), workers=2)
    return out


def test_good_only_validation_falls_back_to_target_fpr_and_says_so(candidate_dir, good_only_preprocessed_dir,
                                                                    tmp_path, caplog):
    val = load_split(good_only_preprocessed_dir, "val")
    assert val.labels.size > 0 and not val.labels.any()
    caplog.set_level(logging.WARNING, logger="defectkit.evaluation")

    result = evaluate(candidate_dir, good_only_preprocessed_dir, tmp_path / "eval", champion_dir=candidate_dir,
                      device="cpu", gates=Gates(min_auroc=0.0))  # default policy: max_f1

    fallback = {"kind": "target_fpr", "target_fpr": 0.05, "requested": "max_f1",
                "reason": "validation split has no defect images"}
    m = result.metrics
    assert m["threshold_policy"] == fallback and result.champion_metrics["threshold_policy"] == fallback
    assert [r.message for r in caplog.records if "falling back" in r.message] == [
        f"threshold policy max_f1 needs defect images but the validation split has {val.labels.size} good images "
        f"only: falling back to target_fpr=0.05, a threshold that flags at most 5% of them"]  # once for both models
    val_scores = judged_scores(candidate_dir, good_only_preprocessed_dir, "val")
    assert binary_metrics(val.labels, val_scores, m["threshold"])["fpr"] <= 0.05
    assert m["val_auroc"] is None and m["n_val"] == val.labels.size
    test = load_split(good_only_preprocessed_dir, "test")
    assert set(m["auroc_by_defect_type"]) == {"crack", "hole", "scratch", "stain"}
    assert m["image_auroc"] == pytest.approx(skm.roc_auc_score(test.labels, result.test_scores))

    record = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert record["threshold_policy"] == fallback and record["val_auroc"] is None
    judged = models.read_metadata(tmp_path / "eval" / "model")
    assert ThresholdPolicy.from_json(judged.threshold_policy) == ThresholdPolicy("target_fpr", 0.05, "max_f1",
                                                                                  NO_DEFECTS_IN_VAL)
    report = (tmp_path / "eval" / "report.md").read_text()
    assert (f"Threshold {m['threshold']:.4f} chosen on {val.labels.size} validation images to flag at most 5% of "
            f"good parts (target_fpr fallback, max_f1 was requested: validation split has no defect images). "
            f"Validation AUROC: n/a.") in report
    assert "| defect type | recall | champion recall | AUROC | champion AUROC |" in report


def test_good_only_validation_with_target_fpr_is_no_fallback(candidate_dir, good_only_preprocessed_dir, tmp_path):
    result = evaluate(candidate_dir, good_only_preprocessed_dir, tmp_path / "eval", device="cpu",
                      policy=ThresholdPolicy("target_fpr", target_fpr=0.2), gates=Gates(min_auroc=0.0))
    assert result.metrics["threshold_policy"] == {"kind": "target_fpr", "target_fpr": 0.2}
    val = load_split(good_only_preprocessed_dir, "val")
    val_scores = judged_scores(candidate_dir, good_only_preprocessed_dir, "val")
    assert binary_metrics(val.labels, val_scores, result.metrics["threshold"])["fpr"] <= 0.2
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "to flag at most 20% of good parts. Validation AUROC: n/a." in report and "fallback" not in report


def test_report_reads_metrics_without_per_type_auroc():
    """Metrics recorded before per-type AUROC was measured (a champion's, say) still render."""
    metrics = {"architecture": "resnet18", "image_size": 32, "weights_sha256": "a" * 64, "n_test": 10, "n_val": 4,
               "threshold": 0.41, "threshold_policy": {"kind": "max_f1", "target_fpr": 0.05}, "val_auroc": 0.9,
               "recall_by_defect_type": {"hole": 0.5}, **dict.fromkeys(("image_auroc", "precision", "recall", "f1",
                                                                        "accuracy", "fpr"), 0.5)}
    report = render_report(metrics, None, Blessing(True, ("ok",)), [[4, 1], [2, 3]])
    assert "Threshold 0.4100 chosen on 4 validation images to maximise F1. Validation AUROC: 0.9000." in report
    assert "| hole | 0.5000 | n/a |" in report
