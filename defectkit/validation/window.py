"""Production-window validation: check a window of production samples before the drift monitor trusts it.

``validate_window`` checks a window of production samples (what
:func:`defectkit.sampling.window_to_dataset` wrote) the same way as a dataset:
the share of samples that no longer decode, and a suite over the answers and
image features (scores in [0, 1], known labels, a model version, features
present and in range).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from defectkit.preprocess import FEATURE_NAMES, FEATURES_FILE
from defectkit.sampling import LABELS, QUARANTINE_DIR, QUARANTINE_FILE, SAMPLES_FILE
from defectkit.validation.expectations import Check, CheckResult, examples, run_checks
from defectkit.validation.report import Quarantined, Report

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

# 8-bit image statistics lie in [0, 255]; saturation is a share; sharpness (a variance) has no upper bound.
_FEATURE_RANGES = {name: (0.0, 255.0) for name in FEATURE_NAMES} | {"saturation": (0.0, 1.0),
                                                                      "sharpness": (0.0, None)}
_REMEDIES = {
    "score_between": "The model server returned scores outside [0, 1]: check the served model and its version.",
    "label_in_set": f"Samples carry labels other than {', '.join(LABELS)}: they were not written by this model "
                    f"server version.",
    "model_version_not_null": "Samples without a model version cannot be traced to a model; check the server.",
    "score_not_null": "Samples without a numeric score were not written by this model server version.",
    "_in_range": "Feature values outside their range mean a preprocessing mismatch between server and monitor.",
    "_not_null": "Missing features mean the feature table does not match samples.jsonl; collect the window again.",
}


@dataclass(frozen=True)
class WindowValidationConfig:
    """How much of a production window may fail to decode before the monitor stops trusting it."""

    max_quarantine_fraction: float = 0.1

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_quarantine_fraction <= 1.0:
            raise ValueError(f"max_quarantine_fraction must be in [0, 1], got {self.max_quarantine_fraction!r}")


@dataclass(frozen=True)
class WindowReport(Report, json_format="defectkit.window-validation/v1", title="Production window validation",
                   unit="Images", remedies=_REMEDIES):
    """Validation of one window of production samples; ``passed`` gates retraining on it."""

    window: str
    images: int
    quarantined: tuple[Quarantined, ...]
    checks: tuple[CheckResult, ...]
    config: WindowValidationConfig = field(default_factory=WindowValidationConfig)

    @property
    def total(self) -> int:
        """Sampled images: the usable ones and those that do not decode."""
        return self.images + len(self.quarantined)

    def _failure_heading(self) -> str:
        return f"production window {self.window} failed validation:"

    def _quarantine_problem(self, reasons: str) -> str:
        return (f"- {len(self.quarantined)} of {self.total} sampled images do not "
                f"decode (fraction {self.quarantine_fraction:.3f}, above max_quarantine_fraction="
                f"{self.config.max_quarantine_fraction}: {reasons}); the clients or the camera may be "
                f"sending broken files. They are kept in {QUARANTINE_DIR}/ with their reasons.")

    def _json_subject(self) -> dict:
        return {"window": self.window, "images": self.images}

    def _summary(self) -> list[tuple[str, str]]:
        return [("Window", self.window), ("Images usable", str(self.images))]


def validate_window(window_dir: Path, since: float, until: float,
                    config: WindowValidationConfig = WindowValidationConfig()) -> WindowReport:
    """Check a window dataset (``sampling.window_to_dataset``'s output) of the samples taken from ``since`` to
    ``until`` (UNIX seconds, which name it in the report)."""
    window_dir = Path(window_dir)
    window = " to ".join(datetime.fromtimestamp(at, timezone.utc).isoformat() for at in (since, until))
    quarantine_file = window_dir / QUARANTINE_DIR / QUARANTINE_FILE
    quarantined = tuple(Quarantined(q["path"], q["reason"], q["detail"])
                        for q in json.loads(quarantine_file.read_text())) if quarantine_file.is_file() else ()
    frame = _window_frame(window_dir)
    checks = run_checks({"samples": frame}, lambda: _checks(frame), {"samples": ["path"]})
    report = WindowReport(window, len(frame), quarantined, tuple(checks), config)
    log.info("validated window %s: %d images, %d quarantined (%.1f%%, limit %.1f%%), %d of %d expectations passed",
             report.window, report.images, len(quarantined), 100 * report.quarantine_fraction,
             100 * config.max_quarantine_fraction, sum(c.success for c in checks), len(checks))
    if not report.passed:
        log.error("%s", report.failure_message())
    return report


def _window_frame(window_dir: Path) -> pd.DataFrame:
    """samples.jsonl joined with features.csv on the image path: one row per usable sample."""
    import pandas as pd

    lines = (window_dir / SAMPLES_FILE).read_text().splitlines()
    samples = pd.DataFrame([json.loads(line) for line in lines], columns=["image", "score", "label", "model_version",
                                                                        "time"]).rename(columns={"image": "path"})
    features = pd.read_csv(window_dir / FEATURES_FILE, dtype={"path": str})
    frame = samples.merge(features, on="path", how="left")
    # Numeric columns as float64 (empty frames have object columns); a value that is no number becomes null,
    # which the not-null checks name, rather than an exception here.
    for column in ("score", "time", *FEATURE_NAMES):
        frame[column] = pd.to_numeric(frame[column], errors="coerce").astype("float64")
    return frame


def _checks(frame: pd.DataFrame) -> list[Check]:
    import great_expectations as gx

    expect = gx.expectations
    n = len(frame)

    def failing(result: dict, column: str) -> str:
        def shown(value: object) -> object:
            return value.item() if hasattr(value, "item") else value  # numpy scalars as plain numbers

        rows = [f"{row['path']} ({column}={shown(row.get(column))!r})"
                for row in result.get("unexpected_index_list") or []]
        return f"{result.get('unexpected_count')} of {n} samples: " + examples(rows)

    def not_null(column: str) -> Check:
        return Check(f"{column}_not_null", "samples", lambda: expect.ExpectColumnValuesToNotBeNull(column=column),
                      lambda r, ok: f"all {n} samples have a {column}" if ok else f"{column} missing in "
                      + failing(r, column))

    def between(name: str, column: str, low: float, high: float | None) -> Check:
        bounds = f"[{low:g}, {'inf' if high is None else f'{high:g}'}]"
        observed = f" (observed {frame[column].min():.4g}..{frame[column].max():.4g})" if n else ""
        return Check(name, "samples",
                      lambda: expect.ExpectColumnValuesToBeBetween(column=column, min_value=low, max_value=high),
                      lambda r, ok: f"{column} within {bounds} for all {n} samples{observed}" if ok else
                      f"{column} outside {bounds} in " + failing(r, column))

    labels = ", ".join(f"{label} ({count})" for label, count in sorted(Counter(frame["label"]).items())) or "none"
    return [
        not_null("score"),
        between("score_between", "score", 0.0, 1.0),
        Check("label_in_set", "samples", lambda: expect.ExpectColumnValuesToBeInSet(column="label",
                                                                                     value_set=list(LABELS)),
               lambda r, ok: f"labels found: {labels}" if ok else f"label outside {', '.join(LABELS)} in "
               + failing(r, "label")),
        not_null("model_version"),
        *(not_null(name) for name in FEATURE_NAMES),
        *(between(f"{name}_in_range", name, *_FEATURE_RANGES[name]) for name in FEATURE_NAMES),
    ]
