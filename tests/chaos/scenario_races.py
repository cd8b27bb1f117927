"""Scenarios 8a and 8b: the same thing asked twice at the same moment.

``delivery_race``: two ``defectkit rollout start`` processes deliver two candidates to one
local service (one work directory: router, stable and canary servers) at the same instant,
under steady load. Each process imports everything first and then waits for a shared start
time, so both reach the delivery within a millisecond or so of each other. Exactly one may
deliver; the other must be refused at once (exit 4, a message naming the running delivery)
without touching traffic. Rounds alternate between both processes using the service's
default state file and each using a state file of its own (the service is still one).

``monitor_race``: two monitor runs act on the same window at the same instant
(:func:`defectkit.monitor.act`, as the decide_retraining step calls it), with the cooldown
off so that each would retrain if it were alone. At most one retraining may start per
window, and none may be lost: exactly one run says retrain, writes the merged data and is
remembered as the last retraining. The state lives on local disk and on an S3 server
(moto) in turn.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.chaos.harness import Outcome, Scenario
from tests.chaos.stack import environ

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
RATE = 20.0
START_LEAD_S = 4.0  # both processes are started this long before the shared start time, to import first
INFER = "/v2/models/defectkit/infer"
EXIT_PROMOTED, EXIT_ROLLED_BACK, EXIT_REFUSED = 0, 3, 4

# Imports what a delivery needs, waits for the shared start time, then runs `defectkit <argv>`.
LAUNCH_ROLLOUT = """
import sys, time
import defectkit.delivery.local.backend, defectkit.delivery.rollout, defectkit.registry  # imported before the start
from defectkit.cli import main
start_at = float(sys.argv[1])
time.sleep(max(0.0, start_at - time.time()))
sys.exit(main(sys.argv[2:]))
"""

# Waits for the shared start time, acts on the window as the decide_retraining step does, prints the record.
LAUNCH_MONITOR = """
import json, sys, time
from pathlib import Path
from defectkit import monitor
job = json.loads(sys.argv[1])
policy = monitor.MonitorPolicy(min_new_images=1, cooldown_s=0.0, window_s=job["until"] - job["since"])
time.sleep(max(0.0, job["start_at"] - time.time()))
record = monitor.act(drifted=True, drifted_features=["brightness"], new_images=job["new_images"],
                     window=(job["since"], job["until"]), window_dir=Path(job["window_dir"]),
                     state_uri=job["state_uri"], policy=policy, base_dataset_uri=job["base"],
                     retraining_data_uri=job["retraining"], run=job["run"], defect_class="stain")
print(json.dumps({"retrain": record["retrain"], "run": record["run"], "data": record["retraining_data"],
                  "reasons": record["reasons"]}))
"""


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), **(extra or {})}


# --------------------------------------------------------------------------- 8a: two deliveries at once


def _rollout_argv(svc: Path, model: Path, state: Path | None, record: Path) -> list[str]:
    argv = ["rollout", "start", "--backend", "local", "--work", str(svc), "--model", str(model),
            "--record-dir", str(record), "--steps", "50,100", "--interval-s", "1.5", "--min-requests", "5",
            "--max-p99-latency-s", "5", "--serve-arg=--threads=1", "--scrape-interval-s", "0.25"]
    return argv + (["--state", str(state)] if state is not None else [])


def run_delivery_race(work_dir: Path, short: bool) -> list[Outcome]:
    from defectkit.delivery.local import LocalBackend, StackOptions, read_stack, stop_stack
    from defectkit.delivery.rollout import DELIVERY_DIR, STATE_FILE
    from defectkit.delivery.state import PROMOTED, ROLLED_BACK, StateStore
    from defectkit.delivery.traffic import LoadGenerator
    from defectkit.models import read_metadata
    from defectkit.serving.predictor import model_version
    from tests.chaos.stack import images, models

    rounds = 3 if short else 6
    model_dirs = models(work_dir / "models", 3)
    versions = {str(m): model_version(read_metadata(m)) for m in model_dirs}
    svc = work_dir / "svc"
    backend = LocalBackend(svc, StackOptions(server_args=("--threads", "1"), start_timeout_s=600.0))
    results: list[dict[str, Any]] = []
    try:
        backend.ensure_stack(str(model_dirs[0]))
        router = read_stack(svc).router.url
        with LoadGenerator(router + INFER, images(work_dir / "images", 20), RATE) as load:
            for number in range(rounds):
                round_dir = work_dir / "rounds" / f"{number:02d}"
                round_dir.mkdir(parents=True)
                stable = read_stack(svc).stable.model
                candidates = [m for m in model_dirs if str(m) != stable]
                own_state = number % 2 == 1
                start_at = time.time() + START_LEAD_S
                processes = []
                for k, model in enumerate(candidates):
                    state = round_dir / f"state-{k}.json" if own_state else None
                    argv = _rollout_argv(svc, model, state, round_dir / f"record-{k}")
                    with open(round_dir / f"delivery-{k}.log", "wb") as out:
                        processes.append(subprocess.Popen([sys.executable, "-c", LAUNCH_ROLLOUT, str(start_at), *argv],
                                                          stdout=out, stderr=subprocess.STDOUT, env=_env()))
                codes = []
                for process in processes:
                    try:
                        codes.append(process.wait(600))
                    except subprocess.TimeoutExpired:
                        process.kill()
                        codes.append(process.wait(30))
                ended = time.time()
                time.sleep(1.0)
                stack = read_stack(svc)
                logs = [(round_dir / f"delivery-{k}.log").read_text(errors="replace") for k in range(2)]
                # The delivery that runs must finish: promoted, or rolled back (a loaded machine can fail its analysis).
                winners = [k for k, code in enumerate(codes) if code in (EXIT_PROMOTED, EXIT_ROLLED_BACK)]
                refused = [k for k, code in enumerate(codes) if code == EXIT_REFUSED]
                clear = all("REFUSED:" in logs[k] and "running right now" in logs[k] for k in refused)
                checks: dict[str, bool] = {}
                if len(winners) == 1:
                    winner = candidates[winners[0]]
                    state_path = (round_dir / f"state-{winners[0]}.json" if own_state
                                  else svc / DELIVERY_DIR / STATE_FILE)
                    state = StateStore(state_path).load()
                    promoted = codes[winners[0]] == EXIT_PROMOTED
                    serving = str(winner) if promoted else stable
                    time.sleep(2.0)  # the answers to requests sent just after the end
                    after = [r for r in load.results if ended + 0.3 <= r[0] < ended + 1.0 and r[2] == 200]
                    checks = {
                        "state_phase": state is not None and state.phase == (PROMOTED if promoted else ROLLED_BACK),
                        "state_candidate": state is not None and state.candidate == str(winner),
                        "no_canary": stack.canary is None,
                        "stable_model": stack.stable.model == serving,
                        "traffic": backend.traffic() == (100 if promoted else 0),
                        "answers_after": bool(after),
                        "answers_from_serving": {r[4] for r in after} <= {versions[serving]},
                    }
                consistent = bool(checks) and all(checks.values())
                loser_canary = [r for r in load.results if r[0] >= start_at and r[3] == "canary"
                                and refused and r[4] == versions[str(candidates[refused[0]])]]
                results.append({"round": number, "own_state_files": own_state, "exit_codes": codes,
                                "winners": len(winners), "refused": len(refused), "refusal_clear": clear,
                                "consistent": consistent, "failed_checks": [k for k, v in checks.items() if not v],
                                "loser_answers_as_canary": len(loser_canary),
                                "refusal": next((line for k in refused for line in logs[k].splitlines()
                                                 if "REFUSED:" in line), None),
                                "unexpected_exits": {k: logs[k][-600:] for k, code in enumerate(codes)
                                                     if code not in (EXIT_PROMOTED, EXIT_ROLLED_BACK, EXIT_REFUSED)}})
                log.warning("delivery_race round %d: %s", number, results[-1])
        requests = [r for r in load.results]
    finally:
        backend.close()
        stop_stack(svc)
    good_rounds = sum(1 for r in results if r["winners"] == 1 and r["refused"] == 1 and r["refusal_clear"]
                      and r["consistent"] and r["loser_answers_as_canary"] == 0)
    inconsistent = sum(1 for r in results if not r["consistent"])
    ok = sum(1 for r in requests if 200 <= r[2] < 300)
    (work_dir / "rounds.json").write_text(json.dumps(results, indent=1))
    return [
        Outcome("delivery_race", "two `rollout start` to one service at the same instant", len(results),
                good_rounds, inconsistent, None, "each round: one delivered to the end, the other refused "
                "(exit 4, clear message) untouched; stack consistent", good_rounds == len(results) and bool(results), {"rounds": results}),
        Outcome("delivery_race", "client requests during the racing deliveries", len(requests), ok,
                sum(1 for r in requests if r[2] == 0), None, "100% answered 2xx", ok == len(requests) > 0, {}),
    ]


# --------------------------------------------------------------------------- 8b: two monitor runs at once


def _window_dataset(work_dir: Path) -> tuple[Path, Path, int]:
    """(base dataset root, window dataset, images in the window) from real generated images."""
    from defectkit import sampling, storage
    from defectkit.preprocess import PreprocessSpec
    from defectkit.synthetic import generate_sample

    base = work_dir / "base"
    generate_sample(base, count=26, size=32, seed=0)
    production = work_dir / "production"
    generate_sample(production, count=26, size=32, seed=1)
    files = sorted(p.read_bytes() for p in production.rglob("*.jpg"))[:12]
    at = time.time()
    sampling.write_shards(storage.Store(str(work_dir / "samples")),
                          [(data, 0.3 if i % 2 else 0.8, "good" if i % 2 else "defect", "v1", at + i / 1000)
                           for i, data in enumerate(files)])
    window = sampling.window_to_dataset(work_dir / "samples", at - 1, at + 60, work_dir / "window",
                                        spec=PreprocessSpec(image_size=32))
    return base, work_dir / "window", window.images


def _monitor_rounds(work_dir: Path, label: str, state_uri: str, rounds: int, env: dict[str, str],
                    base: Path, window_dir: Path, new_images: int, read_marker: Any) -> list[dict[str, Any]]:
    results = []
    retraining = work_dir / f"retraining-{label}"
    first_until = 1767963600.0  # a fixed past window end, one window per round after it
    for number in range(rounds):
        since, until = first_until + (number - 1) * 600.0, first_until + number * 600.0
        start_at = time.time() + 2.5
        processes = []
        for side in ("a", "b"):
            job = {"start_at": start_at, "since": since, "until": until, "new_images": new_images,
                   "window_dir": str(window_dir), "state_uri": state_uri, "base": str(base),
                   "retraining": str(retraining), "run": f"{label}-{number}-{side}"}
            processes.append(subprocess.Popen([sys.executable, "-c", LAUNCH_MONITOR, json.dumps(job)],
                                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env))
        records, errors = [], []
        for process in processes:
            try:
                out, err = process.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                process.kill()
                out, err = process.communicate()
            if process.returncode == 0:
                records.append(json.loads(out.decode().strip().splitlines()[-1]))
            else:
                errors.append(err.decode(errors="replace")[-1500:])
        retrained = [r for r in records if r["retrain"]]
        marker = read_marker(state_uri)
        folders = sorted(p.name for p in retraining.iterdir()) if retraining.is_dir() else []
        loser_reason = next((reason for r in records if not r["retrain"] for reason in r["reasons"]
                             if "already retrain" in reason), None)
        results.append({"round": number, "state": label, "retrainings": len(retrained), "errors": errors,
                        "marker_run": None if marker is None else marker["run"],
                        "winner": retrained[0]["run"] if retrained else None,
                        "data_folder_exists": bool(retrained) and Path(retrained[0]["data"]).is_dir(),
                        "folders": len(folders), "loser_reason": loser_reason,
                        "loser_reasons": None if loser_reason else [r["reasons"] for r in records if not r["retrain"]]})
        log.warning("monitor_race %s round %d: %s", label, number, results[-1])
    return results


def run_monitor_race(work_dir: Path, short: bool) -> list[Outcome]:
    from defectkit import monitor
    from tests.servers import start_s3_server

    base, window_dir, new_images = _window_dataset(work_dir)
    outcomes = []
    local_rounds, s3_rounds = (4, 3) if short else (10, 6)
    results = _monitor_rounds(work_dir, "local", str(work_dir / "state"), local_rounds, _env(), base, window_dir,
                              new_images, monitor.read_last_retrain)
    server = start_s3_server(work_dir / "moto.log")
    s3_env = {"AWS_ENDPOINT_URL": server.url, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
              "AWS_DEFAULT_REGION": "us-east-1"}
    try:
        with environ(s3_env, unset=("AWS_PROFILE", "AWS_SESSION_TOKEN")):
            import boto3

            boto3.client("s3").create_bucket(Bucket="chaos-monitor")
            results += _monitor_rounds(work_dir, "s3", "s3://chaos-monitor/state", s3_rounds, _env(), base,
                                       window_dir, new_images, monitor.read_last_retrain)
    finally:
        server.stop()
    for label in ("local", "s3"):
        mine = [r for r in results if r["state"] == label]
        good = [r for r in mine if r["retrainings"] == 1 and not r["errors"] and r["marker_run"] == r["winner"]
                and r["data_folder_exists"] and r["loser_reason"]]
        doubled = sum(max(0, r["retrainings"] - 1) for r in mine)
        missing = sum(1 for r in mine if r["retrainings"] == 0)
        outcomes.append(Outcome(
            "monitor_race", f"two monitor runs act on the same window at once ({label} state)", len(mine),
            len(good), missing, None, "each window: exactly one retraining, the other run says why",
            len(good) == len(mine) > 0, {"rounds": mine, "extra_retrainings": doubled}))
    return outcomes


SCENARIOS = (Scenario("delivery_race", run_delivery_race), Scenario("monitor_race", run_monitor_race))
