"""Judging a trained model: metrics, decision threshold, gates and the blessing.

GPU-safe (torch, numpy and defectkit's GPU-safe modules only). The metric
functions are plain numpy. ``evaluate`` scores the candidate, and the champion
when one is given, on the same frozen test split in the same run; the
threshold is chosen on the validation split, never on test; where that split
holds good images only (training on good images with synthetic anomalies), the
threshold is set by the false alarms it allows on them. The judged model
carries the drift reference of its training data (``model/reference/``), so
drift checks compare production with what the model learned from without
reading the training set again.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import math
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from defectkit import models, notify, preprocess, reference
from defectkit.data import GOOD, Manifest
from defectkit.golden import read_golden, write_golden
from defectkit.reference import Reference, embedding_names
from defectkit.significance import PairedComparison, delong_test, paired_bootstrap_f1

log = logging.getLogger(__name__)

THRESHOLD_POLICIES = ("max_f1", "target_fpr")
MAX_ROC_POINTS = 200
METRICS_FILE = "metrics.json"
REPORT_FILE = "report.md"
MODEL_SUBDIR = "model"
REFERENCE_MAX_ROWS = 20000


# --------------------------------------------------------------------------- metrics


def _binary_inputs(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels)
    scores = np.asarray(scores, dtype=np.float64)
    if labels.ndim != 1 or scores.shape != labels.shape:
        raise ValueError(f"labels and scores must be 1-D arrays of the same length, "
                         f"got shapes {labels.shape} and {scores.shape}")
    unexpected = set(np.unique(labels).tolist()) - {0, 1}
    if unexpected:
        raise ValueError(f"labels must be 0 (good) or 1 (defect), found {sorted(unexpected)}")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores contain NaN or infinity; the model output is broken")
    return labels.astype(np.int64), scores


def _require_both_classes(labels: np.ndarray, what: str) -> None:
    positives = int(labels.sum())
    if positives == 0 or positives == labels.size:
        only = "defect" if positives else "good"
        raise ValueError(f"{what} is undefined with only one class present ({labels.size} images, all {only}); "
                         f"the split needs both good and defect images")


def roc_auc(labels, scores) -> float:
    """Area under the ROC curve, as the Mann-Whitney U statistic with tied scores given average ranks."""
    labels, scores = _binary_inputs(labels, scores)
    _require_both_classes(labels, "ROC AUC")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    # Average rank per run of equal scores: ranks are 1-based positions in sorted order.
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], sorted_scores.size]
    run_rank = (starts + ends + 1) / 2.0
    ranks = np.empty(scores.size, dtype=np.float64)
    ranks[order] = np.repeat(run_rank, ends - starts)
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    u = ranks[labels == 1].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def _counts_at_thresholds(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """True and false positives when predicting defect for score >= each distinct score, highest first."""
    order = np.argsort(scores, kind="mergesort")[::-1]
    sorted_scores = scores[order]
    sorted_labels = labels[order]
    last_of_run = np.r_[np.flatnonzero(np.diff(sorted_scores)), sorted_scores.size - 1]
    tps = np.cumsum(sorted_labels)[last_of_run]
    fps = 1 + last_of_run - tps
    return tps, fps, sorted_scores[last_of_run]


def roc_curve(labels, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) as sklearn.metrics.roc_curve with drop_intermediate=True.

    The first threshold is +inf (nothing predicted defect), so the curve starts at (0, 0).
    """
    labels, scores = _binary_inputs(labels, scores)
    _require_both_classes(labels, "the ROC curve")
    tps, fps, thresholds = _counts_at_thresholds(labels, scores)
    if fps.size > 2:
        # Points collinear with their neighbours never change the curve; drop them.
        corners = np.flatnonzero(np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True])
        tps, fps, thresholds = tps[corners], fps[corners], thresholds[corners]
    tps = np.r_[0, tps]
    fps = np.r_[0, fps]
    thresholds = np.r_[np.inf, thresholds]
    return fps / fps[-1], tps / tps[-1], thresholds


def _ratio(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else 0.0


def binary_metrics(labels, scores, threshold: float) -> dict:
    """Precision, recall, F1, accuracy, FPR and the confusion counts when defect means score >= threshold."""
    labels, scores = _binary_inputs(labels, scores)
    predicted = scores >= threshold
    actual = labels == 1
    tp = int(np.sum(predicted & actual))
    fp = int(np.sum(predicted & ~actual))
    tn = int(np.sum(~predicted & ~actual))
    fn = int(np.sum(~predicted & actual))
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    return {
        "precision": precision,
        "recall": recall,
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "accuracy": _ratio(tp + tn, labels.size),
        "fpr": _ratio(fp, fp + tn),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }


def recall_by_class(class_names, labels, scores, threshold: float) -> dict[str, float]:
    """Recall of each defect type: the share of its images scored >= threshold."""
    labels, scores = _binary_inputs(labels, scores)
    class_names = np.asarray(class_names, dtype=object)
    if class_names.shape != labels.shape:
        raise ValueError(f"class_names has {class_names.size} entries but there are {labels.size} labels")
    result = {}
    for name in sorted(set(class_names[labels == 1].tolist())):
        members = class_names == name
        result[name] = float(np.mean(scores[members] >= threshold))
    return result


def auroc_by_class(class_names, labels, scores) -> dict[str, float]:
    """ROC AUC of each defect type: its images against all good images, the others left out.

    A type whose AUROC is far below the overall one is a defect the model barely
    separates from good parts, whichever threshold is chosen.
    """
    labels, scores = _binary_inputs(labels, scores)
    class_names = np.asarray(class_names, dtype=object)
    if class_names.shape != labels.shape:
        raise ValueError(f"class_names has {class_names.size} entries but there are {labels.size} labels")
    good = labels == 0
    result = {}
    for name in sorted(set(class_names[labels == 1].tolist())):
        members = good | ((class_names == name) & (labels == 1))
        result[name] = roc_auc(labels[members], scores[members])
    return result


# --------------------------------------------------------------------------- threshold


NO_DEFECTS_IN_VAL = "validation split has no defect images"


def _percent(fraction: float) -> str:
    return f"{100 * fraction:g}%"


@dataclass(frozen=True)
class ThresholdPolicy:
    """How the decision threshold is chosen on validation scores.

    ``max_f1`` maximises F1 and needs good and defect images; ``target_fpr``
    catches as many defects as possible while flagging at most ``target_fpr`` of
    the good parts, and needs good images only. ``requested`` and ``reason`` are
    set only on a policy applied in place of another (see :func:`applicable_policy`):
    what was asked for, and why it could not be applied.
    """

    kind: str = "max_f1"
    target_fpr: float = 0.05
    requested: str | None = None
    reason: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in THRESHOLD_POLICIES:
            raise ValueError(f"threshold policy kind {self.kind!r} is unknown; use one of {THRESHOLD_POLICIES}")
        if not 0.0 <= self.target_fpr < 1.0:
            raise ValueError(f"target_fpr={self.target_fpr!r} must be in [0, 1)")
        if (self.requested is None) != (self.reason is None):
            raise ValueError(f"a fallback policy needs both requested and reason, got requested={self.requested!r} "
                             f"and reason={self.reason!r}")
        if self.requested is not None and (self.requested not in THRESHOLD_POLICIES or self.requested == self.kind):
            raise ValueError(f"requested={self.requested!r} must be a policy kind other than {self.kind!r}, "
                             f"one of {THRESHOLD_POLICIES}")

    @property
    def is_fallback(self) -> bool:
        return self.requested is not None

    def to_json(self) -> dict:
        # The fallback fields only when set, so that a policy applied as asked reads as it always did.
        record = asdict(self)
        return record if self.is_fallback else {"kind": self.kind, "target_fpr": self.target_fpr}

    @classmethod
    def from_json(cls, record: dict) -> ThresholdPolicy:
        return cls(**record)

    def in_words(self) -> str:
        """What the threshold is chosen to do, e.g. "to flag at most 5% of good parts"."""
        if self.kind == "max_f1":
            words = "to maximise F1"
        else:
            words = f"to flag at most {_percent(self.target_fpr)} of good parts"
        if self.is_fallback:
            words += f" ({self.kind} fallback, {self.requested} was requested: {self.reason})"
        return words


def applicable_policy(policy: ThresholdPolicy, val_labels) -> ThresholdPolicy:
    """The policy that can be applied to a validation split with these labels: ``policy`` itself, or, for
    ``max_f1`` on a split of good images only, ``target_fpr`` at the policy's own ``target_fpr``, marked as
    a fallback so that the metrics say which policy set the threshold and why.

    Good-only training leaves no defect image to put in validation, and F1 cannot be measured without any;
    the false alarms on good parts still can.
    """
    labels = np.asarray(val_labels)
    if labels.size == 0:
        raise ValueError("the validation split is empty, so no threshold can be chosen; carve one from train "
                         "(a val_fraction above 0 when validating the dataset)")
    n_defect = int(np.sum(labels == 1))
    if n_defect == labels.size:
        raise ValueError(f"the validation split has no good images ({labels.size} images, all defect); every "
                         f"threshold policy needs good images to measure false alarms on")
    if policy.kind == "max_f1" and n_defect == 0:
        fallback = ThresholdPolicy("target_fpr", policy.target_fpr, requested=policy.kind, reason=NO_DEFECTS_IN_VAL)
        log.warning("threshold policy max_f1 needs defect images but the validation split has %d good images only: "
                    "falling back to target_fpr=%g, a threshold that flags at most %s of them", labels.size,
                    policy.target_fpr, _percent(policy.target_fpr))
        return fallback
    return policy


def choose_threshold(labels, scores, policy: ThresholdPolicy) -> float:
    """The threshold the policy picks on these (validation) scores; defect means score >= threshold.

    The threshold sits halfway between the lowest score called defect and the
    next lower score, so it keeps the chosen split of these scores while
    leaving a margin on both sides for unseen ones. ``max_f1`` needs good and
    defect images; ``target_fpr`` needs good images only (see :func:`applicable_policy`).
    """
    labels, scores = _binary_inputs(labels, scores)
    if labels.size == 0:
        raise ValueError(f"threshold policy {policy.kind!r} got no scores to choose on: the validation split is empty")
    n_pos = int(labels.sum())
    if n_pos == labels.size:
        raise ValueError(f"threshold policy {policy.kind!r} needs good images to measure false alarms on, but the "
                         f"{labels.size} validation images are all defect")
    if policy.kind == "max_f1" and n_pos == 0:
        raise ValueError(f"threshold policy 'max_f1' needs defect images, but the {labels.size} validation images "
                         f"are all good; use target_fpr, which needs good images only (applicable_policy falls "
                         f"back to it)")
    tps, fps, cut_scores = _counts_at_thresholds(labels, scores)
    n_neg = labels.size - n_pos
    if policy.kind == "max_f1":
        f1 = 2 * tps / (tps + fps + n_pos)
        best = int(np.argmax(f1))  # the first maximum: the highest threshold among equals
    else:
        allowed = np.flatnonzero(fps / n_neg <= policy.target_fpr)
        if allowed.size == 0:
            # Even the top score is a good part: only a threshold above every score meets the target.
            return float(np.nextafter(cut_scores[0], np.inf))
        best = int(allowed[-1])
    if best + 1 < cut_scores.size:
        return float((cut_scores[best] + cut_scores[best + 1]) / 2.0)
    return float(cut_scores[best])


# --------------------------------------------------------------------------- gates


# metrics keys of the paired tests, by the metric they compare.
COMPARISONS = {"image_auroc": "auroc_comparison", "f1": "f1_comparison"}


@dataclass(frozen=True)
class Gates:
    """Absolute gates always apply; the drop gates compare against the champion on the same test set.

    The drop gates are non-inferiority tests: the candidate passes when, at ``confidence``,
    it is at most the allowed drop worse than the champion (the upper bound of the paired
    interval of champion - candidate: DeLong's for AUROC, a paired bootstrap for F1). On a
    test set of a few hundred images one image moves F1 by about 0.01, so a comparison of
    point estimates would decide on noise; the default margins are what such a test set can
    resolve. Without a paired test (too few images of a class) the point estimates decide.
    """

    min_auroc: float = 0.9
    min_recall: float = 0.0
    max_fpr: float = 1.0
    max_auroc_drop: float = 0.03
    max_f1_drop: float = 0.05
    confidence: float = 0.95  # of the paired intervals the drop gates read

    def __post_init__(self) -> None:
        for name in ("min_auroc", "min_recall", "max_fpr", "max_auroc_drop", "max_f1_drop"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
                raise ValueError(f"gate {name}={value!r} must be a number in [0, 1]")
        if not (isinstance(self.confidence, (int, float)) and 0.5 <= self.confidence < 1.0):
            raise ValueError(f"gate confidence={self.confidence!r} must be a number in [0.5, 1)")


@dataclass(frozen=True)
class Blessing:
    approved: bool
    reasons: tuple[str, ...]  # one per gate
    failed: tuple[str, ...] = ()  # the reasons of the gates that failed


# Metrics are floats computed from counts; compare with a little slack so that
# a candidate identical to its champion is never rejected by rounding.
_EPS = 1e-9


def bless(metrics: dict, gates: Gates, champion_metrics: dict | None = None) -> Blessing:
    """Approve or reject test ``metrics`` against the gates, with one readable reason per gate."""
    reasons: list[str] = []
    failed: list[str] = []

    def check(ok: bool, text: str) -> None:
        reasons.append(text)
        if not ok:
            failed.append(text)

    auroc, recall, fpr = metrics["image_auroc"], metrics["recall"], metrics["fpr"]
    ok = auroc >= gates.min_auroc - _EPS
    check(ok, f"image AUROC {auroc:.3f} {'>=' if ok else '<'} {gates.min_auroc:.3f}")
    ok = recall >= gates.min_recall - _EPS
    check(ok, f"recall {recall:.3f} {'>=' if ok else '<'} {gates.min_recall:.3f}")
    ok = fpr <= gates.max_fpr + _EPS
    check(ok, f"FPR {fpr:.3f} {'<=' if ok else '>'} {gates.max_fpr:.3f}")
    if champion_metrics is None:
        reasons.append("first model: no champion, absolute gates only")
    else:
        for label, key, allowed in (("image AUROC", "image_auroc", gates.max_auroc_drop),
                                    ("F1", "f1", gates.max_f1_drop)):
            mine, theirs = metrics[key], champion_metrics[key]
            drop = theirs - mine
            if abs(drop) < 0.0005:  # equal at the precision shown
                comparison = "matches"
            else:
                comparison = f"is {abs(drop):.3f} {'below' if drop > 0 else 'above'}"
            paired = metrics.get(COMPARISONS[key])
            if paired is None:
                check(drop <= allowed + _EPS, f"{label} {mine:.3f} {comparison} champion {theirs:.3f} (allowed "
                                              f"drop {allowed:.3f}; point estimates, no paired test)")
                continue
            test = PairedComparison(**paired)
            ok = test.within(allowed)
            check(ok, f"{label} {mine:.3f} {comparison} champion {theirs:.3f}: drop {test.confidence:.0%} CI "
                      f"[{test.ci_low:+.3f}, {test.ci_high:+.3f}] ({test.method}, p = {test.p_value:.2g}), "
                      f"{'within' if ok else 'beyond'} the allowed drop {allowed:.3f}")
    return Blessing(not failed, tuple(reasons), tuple(failed))



# --------------------------------------------------------------------------- evaluate


@dataclass(frozen=True)
class Evaluation:
    metrics: dict
    champion_metrics: dict | None
    blessing: Blessing
    confusion_matrix: list  # [[tn, fp], [fn, tp]]: rows actual good/defect, columns predicted good/defect
    roc_curve: dict = field(compare=False)  # {"fpr": [...], "tpr": [...], "thresholds": [...]}, <= 200 points
    test_scores: np.ndarray = field(compare=False, repr=False)
    model_dir: Path  # the judged model: out_dir/model
    export: dict | None = field(default=None, compare=False)  # its ONNX export's record (judge writes one)


def _images_for(model: models.DefectModel, split: preprocess.Split, shard_spec: preprocess.PreprocessSpec,
                dataset_dir: Path | None, model_dir: Path) -> np.ndarray:
    """A split's pixels as the model expects them, re-decoding the raw images when its preprocessing differs."""
    spec = model.metadata.preprocess
    if spec == shard_spec:
        return split.images
    if dataset_dir is None:
        raise ValueError(f"model {model_dir} expects preprocessing {spec.to_json()} but the shards were made with "
                         f"{shard_spec.to_json()}; pass dataset_dir (the dataset artifact) so its raw images can "
                         f"be decoded at the model's own spec")
    log.info("re-decoding %d raw images from %s at %d px for %s", len(split.paths), dataset_dir,
             spec.image_size, model_dir)
    return np.stack([preprocess.to_model_input((Path(dataset_dir) / path).read_bytes(), spec, name=path)
                     for path in split.paths]) if split.paths else np.zeros((0, spec.image_size,
                                                                              spec.image_size, 3), np.uint8)


def _scores_for(model: models.DefectModel, split: preprocess.Split, shard_spec: preprocess.PreprocessSpec,
                dataset_dir: Path | None, model_dir: Path) -> np.ndarray:
    return model.scores(_images_for(model, split, shard_spec, dataset_dir, model_dir))


def _has_both_classes(labels: np.ndarray) -> bool:
    return 0 < int(np.sum(labels)) < labels.size


def _judge(model: models.DefectModel, model_dir: Path, val: preprocess.Split, test: preprocess.Split,
           shard_spec: preprocess.PreprocessSpec, dataset_dir: Path | None,
           policy: ThresholdPolicy) -> tuple[dict, np.ndarray]:
    """Threshold from validation, metrics on test; ``policy`` is one :func:`applicable_policy` gave for ``val``."""
    val_scores = _scores_for(model, val, shard_spec, dataset_dir, model_dir)
    test_scores = _scores_for(model, test, shard_spec, dataset_dir, model_dir)
    threshold = choose_threshold(val.labels, val_scores, policy)
    metrics = {
        "image_auroc": roc_auc(test.labels, test_scores),
        **binary_metrics(test.labels, test_scores, threshold),
        "threshold": threshold,
        "threshold_policy": policy.to_json(),
        # None (null in JSON, "n/a" in the report) where validation holds good images only: undefined, not 0.5.
        "val_auroc": roc_auc(val.labels, val_scores) if _has_both_classes(np.asarray(val.labels)) else None,
        "recall_by_defect_type": recall_by_class(test.class_names, test.labels, test_scores, threshold),
        "auroc_by_defect_type": auroc_by_class(test.class_names, test.labels, test_scores),
        "n_test": int(test.labels.size),
        "n_val": int(val.labels.size),
        "architecture": model.metadata.architecture,
        "image_size": model.metadata.preprocess.image_size,
        "weights_sha256": model.metadata.weights_sha256,
    }
    return metrics, test_scores


_DELTA_KEYS = ("image_auroc", "precision", "recall", "f1", "accuracy", "fpr")


def _paired_tests(labels: np.ndarray, champion_scores: np.ndarray, champion_threshold: float,
                  scores: np.ndarray, threshold: float, confidence: float) -> dict:
    """Both models scored the same frozen images: the differences of their AUROCs and F1s with their uncertainty."""
    tests = {}
    try:
        tests[COMPARISONS["image_auroc"]] = delong_test(labels, champion_scores, scores, confidence).to_json()
    except ValueError as exc:  # fewer than two images of a class leave the variance undefined
        log.warning("no paired AUROC test: %s", exc)
    tests[COMPARISONS["f1"]] = paired_bootstrap_f1(labels, champion_scores >= champion_threshold, scores >= threshold,
                                                   confidence=confidence).to_json()
    return tests


def _downsampled_roc(labels: np.ndarray, scores: np.ndarray) -> dict:
    fpr, tpr, thresholds = roc_curve(labels, scores)
    if fpr.size > MAX_ROC_POINTS:
        keep = np.unique(np.linspace(0, fpr.size - 1, MAX_ROC_POINTS).round().astype(int))
        fpr, tpr, thresholds = fpr[keep], tpr[keep], thresholds[keep]
    # JSON (and KFP metrics) cannot hold infinity: just above the top score means the same, nothing flagged.
    thresholds = thresholds.copy()
    thresholds[0] = np.nextafter(float(scores.max()), np.inf)
    return {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "thresholds": thresholds.tolist()}


def evaluate(model_dir: Path, preprocessed_dir: Path, out_dir: Path, *, policy: ThresholdPolicy = ThresholdPolicy(),
             gates: Gates = Gates(), champion_dir: Path | None = None, dataset_dir: Path | None = None,
             device: str = "auto") -> Evaluation:
    """Score the candidate (and champion) on the preprocessed test split and decide whether to bless it.

    Writes ``out_dir/model/`` (the candidate with its threshold and test
    metrics, and ``reference/``: see :func:`write_reference`),
    ``out_dir/metrics.json`` and ``out_dir/report.md``. The threshold policy
    recorded there is the one applied (:func:`applicable_policy`), which is
    ``policy`` unless it could not be applied to the validation split.
    """
    model_dir, preprocessed_dir, out_dir = Path(model_dir), Path(preprocessed_dir), Path(out_dir)
    torch_device = models.resolve_device(device)
    shard_spec = preprocess.read_spec(preprocessed_dir)
    val = preprocess.load_split(preprocessed_dir, "val")
    test = preprocess.load_split(preprocessed_dir, "test")
    _require_both_classes(np.asarray(test.labels), f"evaluation on the test split of {preprocessed_dir}")
    # Once for both models, so that they are judged alike and a fallback is logged once.
    applied = applicable_policy(policy, val.labels)

    candidate = models.load_model(model_dir, torch_device)
    metrics, test_scores = _judge(candidate, model_dir, val, test, shard_spec, dataset_dir, applied)
    champion_metrics = None
    if champion_dir is not None:
        champion = models.load_model(Path(champion_dir), torch_device)
        champion_metrics, champion_scores = _judge(champion, Path(champion_dir), val, test, shard_spec, dataset_dir,
                                                   applied)
        metrics["deltas"] = {k: metrics[k] - champion_metrics[k] for k in _DELTA_KEYS}
        metrics.update(_paired_tests(test.labels, champion_scores, champion_metrics["threshold"], test_scores,
                                     metrics["threshold"], gates.confidence))
    blessing = bless(metrics, gates, champion_metrics)
    confusion = [[metrics["tn"], metrics["fp"]], [metrics["fn"], metrics["tp"]]]
    log.info("candidate %s: test AUROC %.4f F1 %.4f at threshold %.4f -> %s", model_dir, metrics["image_auroc"],
             metrics["f1"], metrics["threshold"], "approved" if blessing.approved else "rejected")
    for reason in blessing.reasons:
        log.info("  %s", reason)

    out_dir.mkdir(parents=True, exist_ok=True)
    judged_model_dir = _write_judged_model(model_dir, candidate.metadata, metrics, applied, out_dir / MODEL_SUBDIR)
    train = preprocess.load_split(preprocessed_dir, "train")
    write_reference(judged_model_dir / reference.MODEL_DIR, preprocessed_dir,
                    candidate.embeddings(_images_for(candidate, train, shard_spec, dataset_dir, model_dir)))
    record = {**metrics, "approved": blessing.approved, "reasons": list(blessing.reasons),
              "champion": champion_metrics, "confusion_matrix": confusion, "gates": asdict(gates)}
    (out_dir / METRICS_FILE).write_text(json.dumps(record, indent=1))
    (out_dir / REPORT_FILE).write_text(render_report(metrics, champion_metrics, blessing, confusion))
    return Evaluation(metrics, champion_metrics, blessing, confusion, _downsampled_roc(test.labels, test_scores),
                      test_scores, judged_model_dir)


def champion_in(champion_dir: Path) -> Path | None:
    """The champion model in ``champion_dir``, or None where it holds none (the first run: absolute gates only)."""
    return Path(champion_dir) if (Path(champion_dir) / models.METADATA_FILE).is_file() else None


def judge(model_dir: Path, preprocessed_dir: Path, dataset_dir: Path, champion_dir: Path, *, judged_model_dir: Path,
          golden_dir: Path, metrics_path: Path, report_path: Path, policy: ThresholdPolicy = ThresholdPolicy(),
          gates: Gates = Gates(), device: str = "auto", webhooks: str = "") -> Evaluation:
    """:func:`evaluate` the candidate against the champion in ``champion_dir`` (if it holds one) and write
    everything delivery needs where it is asked for (e.g. a KFP task's outputs).

    ``judged_model_dir`` gets the judged model, ``golden_dir`` its golden set (the scores
    a served candidate must reproduce before it gets traffic: see :mod:`defectkit.golden`),
    ``metrics_path`` and ``report_path`` the metrics JSON and the Markdown report. ``webhooks``
    (:func:`defectkit.notify.webhooks_from`) hear of a candidate the gates block.
    """
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch)
        result = evaluate(model_dir, preprocessed_dir, out, policy=policy, gates=gates,
                          champion_dir=champion_in(champion_dir), dataset_dir=dataset_dir, device=device)
        shutil.copytree(result.model_dir, judged_model_dir)
        shutil.copyfile(out / METRICS_FILE, metrics_path)
        shutil.copyfile(out / REPORT_FILE, report_path)
    build_golden(Path(dataset_dir), Path(judged_model_dir), Path(golden_dir), device=device)
    export = export_judged(Path(judged_model_dir), Path(golden_dir))
    if not result.blessing.approved:
        notify.notify(notify.webhooks_from(webhooks), notify.BLOCKED,
                      f"candidate blocked by the evaluation gates (test AUROC {result.metrics['image_auroc']:.3f})",
                      model=str(model_dir), weights=result.metrics["weights_sha256"][:12],
                      failed="; ".join(result.blessing.failed))
    return replace(result, model_dir=Path(judged_model_dir), export=export)


def export_judged(judged_model_dir: Path, golden_dir: Path) -> dict | None:
    """The ONNX export of the judged model, its parity checked on the golden set; None (logged) where ONNX
    is not installed (a bare GPU node: the training image has it)."""
    if importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxruntime") is None:
        log.warning("no ONNX export of %s: onnx and onnxruntime are not installed here", judged_model_dir)
        return None
    from defectkit.export import export_onnx

    spec = models.read_metadata(judged_model_dir).preprocess
    golden = read_golden(golden_dir)
    return export_onnx(judged_model_dir, np.stack([preprocess.to_model_input(data, spec, name=name)
                                                   for name, data in zip(golden.names, golden.images)]))


_TEST_METRIC_KEYS = ("image_auroc", "precision", "recall", "f1", "accuracy", "fpr", "tp", "fp", "tn", "fn",
                     "recall_by_defect_type", "auroc_by_defect_type", "n_test", *COMPARISONS.values())


def _write_judged_model(model_dir: Path, metadata: models.ModelMetadata, metrics: dict, policy: ThresholdPolicy,
                        target: Path) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    # Copied byte for byte, so weights_sha256 (and the lineage it proves) stays valid.
    shutil.copyfile(model_dir / models.WEIGHTS_FILE, target / models.WEIGHTS_FILE)
    judged = replace(metadata, threshold=metrics["threshold"], threshold_policy=policy.to_json(),
                     metrics={**metadata.metrics, "test": {k: metrics[k] for k in _TEST_METRIC_KEYS if k in metrics}})
    (target / models.METADATA_FILE).write_text(json.dumps(judged.to_json(), indent=1))
    return target


def write_reference(target: Path, preprocessed_dir: Path, train_embeddings: np.ndarray) -> Path:
    """The drift reference of the training data: its rows of features.csv and a Reference of its embeddings.

    Only the train split: validation and test images picked the threshold and
    judged the model, the model itself learned from train.
    """
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    source = Path(preprocessed_dir) / preprocess.FEATURES_FILE
    with source.open(newline="") as inp, (target / preprocess.FEATURES_FILE).open("w", newline="") as out:
        rows = csv.DictReader(inp)
        writer = csv.DictWriter(out, rows.fieldnames)
        writer.writeheader()
        kept = 0
        for row in rows:
            if row["split"] == "train":
                writer.writerow(row)
                kept += 1
    if kept == 0:
        raise ValueError(f"{source} has no train rows; a drift reference needs the training images' features")
    if train_embeddings.shape[0] != kept:
        raise ValueError(f"{train_embeddings.shape[0]} train embeddings for {kept} train rows of {source}; "
                         f"both must come from the same preprocessed directory")
    embeddings = Reference.from_array(train_embeddings, embedding_names(train_embeddings.shape[1]),
                                      max_rows=REFERENCE_MAX_ROWS)
    embeddings.save(target / reference.EMBEDDINGS_FILE)
    log.info("drift reference: %d train images, %d embedding dimensions in %s", kept,
             train_embeddings.shape[1], target)
    return target


# --------------------------------------------------------------------------- report


def _fmt(value: float) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def threshold_in_words(metrics: dict) -> str:
    """One sentence on how the threshold was chosen, e.g. "Threshold 0.4100 chosen on 88 validation images
    to maximise F1." """
    policy = ThresholdPolicy.from_json(metrics["threshold_policy"])
    return (f"Threshold {metrics['threshold']:.4f} chosen on {metrics['n_val']} validation images "
            f"{policy.in_words()}.")


def _per_defect_type_rows(metrics: dict, champion_metrics: dict | None) -> list[str]:
    recall = metrics["recall_by_defect_type"]
    auroc = metrics.get("auroc_by_defect_type") or {}  # absent from metrics written before it was measured
    names = sorted(set(recall) | set(auroc))
    if champion_metrics is None:
        rows = ["| defect type | recall | AUROC |", "|---|---|---|"]
        rows += [f"| {name} | {_fmt(recall.get(name))} | {_fmt(auroc.get(name))} |" for name in names]
        return rows
    their_recall = champion_metrics.get("recall_by_defect_type") or {}
    their_auroc = champion_metrics.get("auroc_by_defect_type") or {}
    rows = ["| defect type | recall | champion recall | AUROC | champion AUROC |", "|---|---|---|---|---|"]
    rows += [f"| {name} | {_fmt(recall.get(name))} | {_fmt(their_recall.get(name))} | {_fmt(auroc.get(name))} | "
             f"{_fmt(their_auroc.get(name))} |" for name in names]
    return rows


def render_report(metrics: dict, champion_metrics: dict | None, blessing: Blessing, confusion: list) -> str:
    """The evaluation as Markdown: verdict, how the threshold was chosen, metrics vs champion, recall and AUROC
    per defect type, confusion matrix."""
    verdict = "APPROVED" if blessing.approved else "REJECTED"
    lines = [f"# Model evaluation: {verdict}", "",
             f"Architecture `{metrics['architecture']}` at {metrics['image_size']} px, "
             f"weights sha256 `{metrics['weights_sha256'][:12]}`; {metrics['n_test']} test images.", "",
             f"{threshold_in_words(metrics)} Validation AUROC: {_fmt(metrics.get('val_auroc'))}.", "",
             "## Verdict", ""]
    lines += [f"- {reason}" for reason in blessing.reasons]
    lines += ["", "## Test metrics", ""]
    if champion_metrics is None:
        lines += ["| metric | candidate |", "|---|---|"]
        lines += [f"| {k} | {_fmt(metrics[k])} |" for k in _DELTA_KEYS]
        lines += [f"| threshold | {_fmt(metrics['threshold'])} |"]
    else:
        lines += ["| metric | candidate | champion | delta |", "|---|---|---|---|"]
        lines += [f"| {k} | {_fmt(metrics[k])} | {_fmt(champion_metrics[k])} | {metrics['deltas'][k]:+.4f} |"
                  for k in _DELTA_KEYS]
        lines += [f"| threshold | {_fmt(metrics['threshold'])} | {_fmt(champion_metrics['threshold'])} | |"]
        tests = [PairedComparison(**metrics[key]) for key in COMPARISONS.values() if key in metrics]
        if tests:
            lines += ["", "## Is the candidate really better?", "",
                      "Paired tests on the same test images (champion minus candidate: positive when the candidate "
                      "is worse); the drop gates pass when the interval's upper bound is within the allowed drop:", ""]
            lines += [f"- {test.explain()}" for test in tests]
    lines += ["", "## Per defect type (test)", "",
              "Recall at the threshold; AUROC of the type's images against the good ones.", ""]
    lines += _per_defect_type_rows(metrics, champion_metrics)
    (tn, fp), (fn, tp) = confusion
    lines += ["", "## Confusion matrix (test)", "",
              "| actual \\ predicted | good | defect |", "|---|---|---|",
              f"| {GOOD} | {tn} | {fp} |", f"| defect | {fn} | {tp} |", ""]
    return "\n".join(lines)


def build_golden(dataset_dir: Path, model_dir: Path, out_dir: Path, *, count: int = 8, device: str = "cpu") -> Path:
    """Copy ``count`` test images of the dataset artifact (good and defective alike) to ``out_dir`` with the
    model's offline scores for them: the golden set a served candidate must reproduce."""
    if count < 1:
        raise ValueError(f"golden image count {count} must be at least 1")
    dataset_dir = Path(dataset_dir)
    entries = sorted(Manifest.read(dataset_dir).split("test"), key=lambda e: e.path)
    if not entries:
        raise ValueError(f"{dataset_dir} has no test images to take golden images from")
    good = [e for e in entries if e.class_name == GOOD]
    defects = [e for e in entries if e.class_name != GOOD]
    # Both kinds, so that a candidate that calls everything good (or defective) is caught too.
    chosen = [e for pair in zip(good, defects) for e in pair] + good[len(defects):] + defects[len(good):]
    chosen = chosen[:count]
    model = models.load_model(Path(model_dir), device)
    files = [(dataset_dir / e.path).read_bytes() for e in chosen]
    scores = model.scores(np.stack([preprocess.to_model_input(data, model.metadata.preprocess, name=e.path)
                                    for data, e in zip(files, chosen)]))
    return write_golden(out_dir, [(e.path, e.class_name, data, score)
                                  for e, data, score in zip(chosen, files, scores.tolist())],
                        model.metadata.weights_sha256, model.precision)
