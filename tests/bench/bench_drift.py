"""Benchmark: defectkit.drift.detect against evidently's DataDriftPreset (K-S) on 512 embedding dimensions.

Same data for both, in the same run: a 100,000-row reference and 10,000
current rows of synthetic float32 embeddings, some dimensions shifted. The
fast path is the whole verdict (sort, exact KS against every reference value,
p-values, PSI, Benjamini-Hochberg, the rule), best of three; evidently's
``Report.run`` (computation only, no HTML) runs once, as it takes about a
minute. The verdicts are compared column by column: evidently's K-S p-values
put through the same correction must flag exactly the dimensions ours flags.
The reference summary is built once, beforehand, as it is in production. Run
from the project root::

    PYTHONPATH=. .venv/bin/python -c "import tests.bench.bench_drift as b; print(b.run())"
"""

from __future__ import annotations

import time

import numpy as np

from defectkit.drift import DriftThresholds, Reference, adjust_pvalues, detect
from defectkit.reference import embedding_names

REFERENCE_ROWS = 100_000
CURRENT_ROWS = 10_000
DIMENSIONS = 512
TARGET_RATIO = 200.0
TARGET_SECONDS_PER_CORE = 0.2
REPEATS = 3
# Fast path is single-threaded numpy: one core.
CORES_USED = 1


def _data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    reference = rng.standard_normal((REFERENCE_ROWS, DIMENSIONS), dtype=np.float32)
    current = rng.standard_normal((CURRENT_ROWS, DIMENSIONS), dtype=np.float32)
    current[:, :32] += np.linspace(0.5, 1.5, 32, dtype=np.float32)  # clear shifts
    current[:, 32:48] += np.float32(0.06)  # real but too small to matter: KS flags them, PSI does not
    current[:, 48:56] *= np.float32(1.6)  # spread
    return reference, current


def _evidently_pvalues(reference: np.ndarray, current: np.ndarray, names: tuple[str, ...]) -> tuple[np.ndarray, float]:
    import pandas as pd
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    columns = list(names)
    definition = DataDefinition(numerical_columns=columns)
    reference_data = Dataset.from_pandas(pd.DataFrame(reference, columns=columns), data_definition=definition)
    current_data = Dataset.from_pandas(pd.DataFrame(current, columns=columns), data_definition=definition)
    started = time.perf_counter()
    snapshot = Report([DataDriftPreset(method="ks")]).run(current_data, reference_data)
    scores = {m["config"]["column"]: m["value"] for m in snapshot.dict()["metrics"]
              if m["config"].get("type", "").endswith(":ValueDrift")}
    seconds = time.perf_counter() - started
    return np.array([scores[name] for name in columns], dtype=np.float64), seconds


def run() -> dict:
    reference_values, current = _data()
    names = embedding_names(DIMENSIONS)
    started = time.perf_counter()
    reference = Reference.from_array(reference_values, names, max_rows=REFERENCE_ROWS)
    build_seconds = time.perf_counter() - started
    thresholds = DriftThresholds()

    wall, cpu = [], []
    for _ in range(REPEATS):
        started, started_cpu = time.perf_counter(), time.process_time()
        result = detect(reference, current, thresholds)
        wall.append(time.perf_counter() - started)
        cpu.append(time.process_time() - started_cpu)
    fast_seconds = min(wall)

    evidently_pvalues, evidently_seconds = _evidently_pvalues(reference_values, current, names)
    ours = np.array([c.pvalue for c in result.columns])
    ks_ours = np.array([c.adjusted_pvalue < thresholds.ks_alpha for c in result.columns])
    ks_evidently = adjust_pvalues(evidently_pvalues, thresholds.correction) < thresholds.ks_alpha
    raw_ours = ours < thresholds.ks_alpha
    raw_evidently = evidently_pvalues <= thresholds.ks_alpha  # evidently's own rule
    same = bool(np.array_equal(ks_ours, ks_evidently) and np.array_equal(raw_ours, raw_evidently))
    if not same:
        raise AssertionError(f"verdicts differ on dimensions {np.flatnonzero(ks_ours != ks_evidently).tolist()} "
                             f"(corrected) and {np.flatnonzero(raw_ours != raw_evidently).tolist()} (raw)")
    meaningful = evidently_pvalues > 1e-300
    return {
        "name": "drift",
        "value": round(fast_seconds, 4),
        "baseline": round(evidently_seconds, 2),
        "ratio": round(evidently_seconds / fast_seconds, 1),
        "target": TARGET_RATIO,
        "unit": "seconds for 10,000 x 512 against 100,000 reference rows (lower is better)",
        "seconds_per_core": round(fast_seconds * CORES_USED, 4),
        "seconds_per_core_target": TARGET_SECONDS_PER_CORE,
        "cpu_seconds": round(min(cpu), 4),
        "cores_used": CORES_USED,
        "reference_build_seconds": round(build_seconds, 2),
        "same_verdicts": same,
        "columns_compared": DIMENSIONS,
        "ks_drifted_columns": int(ks_ours.sum()),
        "raw_ks_drifted_columns": int(raw_ours.sum()),
        "drifted_columns": len(result.drifted_columns),
        "max_pvalue_relative_difference": float(np.max(np.abs(ours[meaningful] - evidently_pvalues[meaningful])
                                                       / evidently_pvalues[meaningful])),
    }


if __name__ == "__main__":
    import json

    print(json.dumps(run()))
