"""Run every benchmark; print one JSON object per line.

Each ``bench_*.py`` module has ``run() -> dict`` with at least name, value,
baseline, ratio and target, measured side by side in the same process. A
benchmark that cannot run here (no GPU) says why in ``skipped``.
"""

from __future__ import annotations

import importlib
import json
import logging
import sys
from pathlib import Path

REQUIRED = ("name", "value", "baseline", "ratio", "target")


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    names = argv or sorted(p.stem.removeprefix("bench_") for p in Path(__file__).parent.glob("bench_*.py"))
    failed = 0
    for name in names:
        try:
            result = importlib.import_module(f"tests.bench.bench_{name}").run()
            missing = [k for k in REQUIRED if k not in result]
            if missing:
                raise KeyError(f"benchmark {name} did not report {missing}")
        except Exception as exc:  # noqa: BLE001 - report and go on with the others
            failed += 1
            result = {"name": name, "error": f"{type(exc).__name__}: {exc}"}
        # A benchmark with a goal of more than one figure (quality: AUROC and time) says itself whether it met it.
        if "met" not in result and result.get("ratio") is not None and result.get("target") is not None:
            result["met"] = result["ratio"] >= result["target"]
        print(json.dumps(result), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
