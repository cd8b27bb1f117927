"""``python -m tests.chaos [--short] [--only NAME,...] [--json FILE]``: run the scenarios, print the table."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import pkgutil
import signal
import sys
import tempfile
from pathlib import Path

import tests.chaos
from tests.chaos.harness import Outcome, Scenario, run_scenario, table, write_json


def scenarios() -> list[Scenario]:
    found: list[Scenario] = []
    for module in sorted(pkgutil.iter_modules(tests.chaos.__path__), key=lambda m: m.name):
        if module.name.startswith("scenario_"):
            found.extend(importlib.import_module(f"tests.chaos.{module.name}").SCENARIOS)
    return found


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__)
    parser.add_argument("--short", action="store_true", help="CI's form: fewer operations, shorter soak")
    parser.add_argument("--only", default="", help="comma-separated scenario names")
    parser.add_argument("--json", type=Path, help="also write the outcomes as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    # A runner stopped with SIGTERM (a CI timeout) unwinds like Ctrl-C: each scenario's cleanup stops its servers.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    chosen = scenarios()
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {s.name for s in chosen}
        if unknown:
            parser.error(f"no scenario named {', '.join(sorted(unknown))}; "
                         f"choose from {', '.join(s.name for s in chosen)}")
        chosen = [s for s in chosen if s.name in wanted]
    outcomes: list[Outcome] = []
    for scenario in chosen:
        with tempfile.TemporaryDirectory(prefix=f"chaos-{scenario.name}-") as work:
            found, seconds = run_scenario(scenario, Path(work), args.short)
        outcomes.extend(found)
        print(f"{scenario.name}: {sum(o.met for o in found)}/{len(found)} met in {seconds:.0f} s",
              file=sys.stderr, flush=True)
    print(table(outcomes))
    for o in outcomes:
        if not o.met:  # why, in the log a CI run leaves behind
            print(f"\n{o.scenario} / {o.fault}: {json.dumps(o.details, default=str)[:3000]}")
    if args.json:
        write_json(outcomes, args.json)
    return 0 if all(o.met for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
