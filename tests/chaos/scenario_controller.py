"""Scenario 9: the delivery controller SIGKILLed at every state transition, then started again.

A canary delivery runs as ``defectkit rollout start`` in a process of its own, through the
local stack (router, stable and canary model servers) under steady load. The process is
SIGKILLed right after it persisted a chosen transition (each save of the state machine in
defectkit/delivery/controller.py: deploy, probe, each traffic change asked for and made,
each analysis, promotion and rollback asked for and made), or a moment later, while the
backend operation that follows is under way (a canary starting, a promotion or a rollback
draining). The kill comes from inside the process: its state store is wrapped so that the
save which persists the transition is followed by SIGKILL, so every transition is hit
exactly, including those the next save follows within microseconds, which no poller could
catch. The same command is then started again.

Per transition the scenario measures: whether the delivery resumed to promotion or rolled
back; the weight recorded in the state file against the weight the router reports and the
share of requests the candidate's model version answered while no controller ran, and
again once the delivery finished; and the time from the restart until the resumed
controller had taken over (its "resumed" event), and until it finished.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.chaos.harness import Outcome, Scenario

log = logging.getLogger(__name__)

NAME = "controller_kill"
ROOT = Path(__file__).resolve().parents[2]
RATE = 25.0  # requests per second through the router, the whole scenario long
DOWN_S = 2.0  # how long traffic flows with no controller before it is started again
SETTLE_S = 0.3  # requests sent this soon after a kill or a finish may have been routed before it
AFTER_S = 1.5  # the window after the delivery finished in which the final split is measured
STEPS = (20, 50, 100)
INTERVAL_S = 2.0
SERVER_ARGS = ("--serve-arg=--threads=1",)
BAD_CANDIDATE = ("--candidate-serve-arg=--fault-score-shift=1.0",)  # answers 2xx, scores shifted: a rollback
KILL_AT = "CHAOS_KILL_AT"
KILL_DELAY = "CHAOS_KILL_DELAY"

# Runs `defectkit <argv>`; with CHAOS_KILL_AT set, SIGKILLs itself right after (or CHAOS_KILL_DELAY s after) the
# state save whose transition() is that label. The save itself is the real one.
LAUNCH = """
import os, signal, sys, threading
from defectkit.cli import main

target = os.environ.get("CHAOS_KILL_AT")
if target:
    from defectkit.delivery import state as state_module
    from tests.chaos.scenario_controller import transition

    delay = float(os.environ.get("CHAOS_KILL_DELAY") or 0)
    save = state_module.StateStore.save

    def save_then_die(self, state):
        save(self, state)
        if transition(state) == target:
            if delay:
                threading.Timer(delay, os.kill, (os.getpid(), signal.SIGKILL)).start()
            else:
                os.kill(os.getpid(), signal.SIGKILL)

    state_module.StateStore.save = save_then_die
sys.exit(main(sys.argv[1:]))
"""


def transition(state: Any) -> str:
    """The transition a persisted state records: its last event, phase and weight (and a pending target)."""
    event = state.timeline[-1]["event"] if state.timeline else "none"
    target = "" if state.target_weight is None else f"->{state.target_weight}%"
    return f"{event} [{state.phase} {state.weight}%{target}]"


@dataclass(frozen=True)
class Case:
    label: str  # the transition after which the controller is killed
    bad: bool = False  # the candidate's scores are shifted: its delivery must roll back
    delay_s: float = 0.0  # kill this long after the save, while the next backend operation runs
    short: bool = False  # part of CI's short run


def _cases() -> list[Case]:
    first, second = STEPS[0], STEPS[1]
    good = [
        Case("delivery started [deploying 0%]"),
        Case("delivery started [deploying 0%]", delay_s=1.0),  # the canary server is starting
        Case("candidate deployed at 0% traffic [probing 0%]"),
        Case("golden probe skipped: no golden images given [stepping 0%]"),
        Case(f"setting candidate traffic [stepping 0%->{first}%]", short=True),
        Case(f"candidate traffic set [analysing {first}%]"),
        Case(f"candidate traffic set [analysing {first}%]", delay_s=1.0, short=True),  # mid-interval
        Case(f"analysis passed [stepping {first}%]"),
        Case(f"setting candidate traffic [stepping {first}%->{second}%]"),
        Case(f"candidate traffic set [analysing {second}%]"),
        Case(f"analysis passed [stepping {second}%]"),
        Case(f"every step passed; promoting [promoting {second}%]"),
        Case(f"every step passed; promoting [promoting {second}%->100%]"),
        Case(f"every step passed; promoting [promoting {second}%->100%]", delay_s=0.05, short=True),  # draining
        Case("candidate promoted: it serves all traffic [promoting 100%->100%]"),
    ]
    bad = [
        Case(f"analysis failed [analysing {first}%]", bad=True),
        Case(f"rolling back [rolling_back {first}%]", bad=True),
        Case(f"rolling back [rolling_back {first}%->0%]", bad=True),
        Case(f"rolling back [rolling_back {first}%->0%]", bad=True, delay_s=0.05, short=True),  # draining
        Case("traffic back on the stable version [rolling_back 0%->0%]", bad=True),
    ]
    return good + bad


def _argv(svc: Path, model: Path, case_dir: Path, bad: bool) -> list[str]:
    return ["rollout", "start", "--backend", "local", "--work", str(svc), "--model", str(model),
            "--state", str(case_dir / "state.json"), "--record-dir", str(case_dir / "record"),
            "--steps", ",".join(map(str, STEPS)), "--interval-s", str(INTERVAL_S), "--failure-threshold", "2",
            "--min-requests", "5", "--max-p99-latency-s", "5", "--scrape-interval-s", "0.25",
            *SERVER_ARGS, *(BAD_CANDIDATE if bad else ())]


def _controller(argv: list[str], log_path: Path, kill_at: str | None = None, delay_s: float = 0.0
                ) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop(KILL_AT, None)
    if kill_at:
        env.update({KILL_AT: kill_at, KILL_DELAY: str(delay_s)})
    with open(log_path, "ab") as out:
        return subprocess.Popen([sys.executable, "-c", LAUNCH, *argv], stdout=out, stderr=subprocess.STDOUT,
                                env=env)


def _wait(process: subprocess.Popen, timeout_s: float) -> int:
    try:
        return process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(30)
        raise TimeoutError(f"the controller (pid {process.pid}) ran past {timeout_s:g} s") from None


def _share(results: list[tuple], start: float, end: float, version: str) -> tuple[float | None, int]:
    """(share of the 2xx answers sent in [start, end) that ``version`` gave, how many answers)."""
    answered = [r for r in results if start <= r[0] < end and 200 <= r[2] < 300]
    if not answered:
        return None, 0
    return sum(1 for r in answered if r[4] == version) / len(answered), len(answered)


def _matches(share: float | None, count: int, weights: set[int]) -> bool:
    """Whether ``share`` of ``count`` answers is one of ``weights`` (percent). The router's smooth weighted round
    robin is exact over any 100 consecutive requests; the bound allows for requests overtaking each other."""
    if share is None:
        return False
    return any(abs(share - w / 100) <= 0.05 + 3 / count for w in weights)


def _router_share(svc: Path, candidate: Path) -> int | None:
    """The percent of requests the router sends to the server serving ``candidate``, from its own config."""
    import httpx

    from defectkit.delivery.local import read_stack

    stack = read_stack(svc)
    if stack is None or stack.router is None:
        return None
    config = httpx.get(stack.router.url + "/router/config", timeout=10).json()
    urls = {info.url for info in (stack.stable, stack.canary) if info is not None and info.model == str(candidate)}
    if config["canary"] in urls:
        return int(config["weight"])
    if config["stable"] in urls:
        return 100 - int(config["weight"])
    return 0


def _settled(load: Any, until: float, timeout_s: float = 60.0) -> None:
    """Wait until the answers to requests sent before ``until`` are in (requests sent after it are answered)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not any(r[0] > until + 1.0 for r in load.results):
        time.sleep(0.2)
    time.sleep(1.0)


def _stray_processes(svc: Path, known: set[int]) -> list[int]:
    """PIDs of model servers of this scenario (their models live beside ``svc``) that the stack file of ``svc``
    does not list: started by a controller that was killed before it recorded them."""
    import psutil

    stray = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or ())
        if process.info["pid"] not in known and str(svc.parent) in cmdline and " serve " in f" {cmdline} " \
                and "--model" in cmdline:
            stray.append(process.info["pid"])
    return stray


def _stop_pids(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.killpg(pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            continue
    deadline = time.monotonic() + 10
    import psutil

    while time.monotonic() < deadline and any(psutil.pid_exists(p) and
                                              psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids):
        time.sleep(0.1)
    for pid in pids:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _stack_pids(svc: Path) -> set[int]:
    from defectkit.delivery.local import read_stack

    stack = read_stack(svc)
    if stack is None:
        return set()
    return {info.pid for info in (stack.router, stack.stable, stack.canary) if info is not None}


def run(work_dir: Path, short: bool) -> list[Outcome]:
    from defectkit.delivery.local import LocalBackend, StackOptions, read_stack, stop_stack
    from defectkit.delivery.state import PROMOTED, ROLLED_BACK, StateStore
    from defectkit.delivery.traffic import LoadGenerator
    from defectkit.models import read_metadata
    from defectkit.serving.predictor import model_version
    from tests.chaos.stack import INFER_PATH, images, models

    model_dirs = models(work_dir / "models", 3)
    versions = {str(m): model_version(read_metadata(m)) for m in model_dirs}
    svc = work_dir / "svc"
    cases = [c for c in _cases() if c.short or not short]
    outcomes: list[Outcome] = []
    strays_total: list[int] = []
    backend = LocalBackend(svc, StackOptions(server_args=("--threads", "1"), start_timeout_s=600.0))
    try:
        backend.ensure_stack(str(model_dirs[0]))
        router = read_stack(svc).router.url
        with LoadGenerator(router + INFER_PATH, images(work_dir / "images", 20), RATE) as load:
            for number, case in enumerate(cases):
                stable = read_stack(svc).stable.model
                candidate = next(m for m in model_dirs[number % 3:] + model_dirs[:number % 3] if str(m) != stable)
                outcome, strays = _one_case(case, number, svc, candidate, stable, versions, load, backend,
                                            StateStore, PROMOTED, ROLLED_BACK, work_dir)
                strays_total += strays
                outcomes.append(outcome)
                log.warning("%s: %s", NAME, outcome.fault)
    finally:
        backend.close()
        known = _stack_pids(svc)
        stop_stack(svc)
        _stop_pids(_stray_processes(svc, known) + [p for p in strays_total])
    return outcomes


def _one_case(case: Case, number: int, svc: Path, candidate: Path, stable: str, versions: dict[str, str],
              load: Any, backend: Any, store_type: Any, promoted: str, rolled_back: str,
              work_dir: Path) -> tuple[Outcome, list[int]]:
    from defectkit.delivery.local import read_stack

    case_dir = work_dir / "cases" / f"{number:02d}"
    case_dir.mkdir(parents=True)
    argv = _argv(svc, candidate, case_dir, case.bad)
    version = versions[str(candidate)]
    started = time.time()
    details: dict[str, Any] = {"transition": case.label, "delay_s": case.delay_s, "candidate": candidate.name,
                               "bad_candidate": case.bad}
    rc = _wait(_controller(argv, case_dir / "controller.log", case.label, case.delay_s), 600)
    killed_at = time.time()
    details["first_exit"] = rc
    store = store_type(case_dir / "state.json")
    state = store.load()
    killed = rc == -signal.SIGKILL
    details["killed_at_transition"] = None if state is None else transition(state)
    recorded = None if state is None else (state.weight, state.target_weight)
    router_weight = _router_share(svc, candidate)
    reported_weight = backend.traffic()
    # Traffic flows with nobody in charge; the split must be the one recorded (or the pending target).
    time.sleep(DOWN_S)
    strays = _stray_processes(svc, _stack_pids(svc))
    restarted = time.time()
    rc2 = _wait(_controller(argv, case_dir / "resume.log"), 600)
    finished = time.time()
    final = store.load()
    time.sleep(AFTER_S)
    after_end = time.time()
    final_router = _router_share(svc, candidate)
    final_reported = backend.traffic()
    stack = read_stack(svc)
    _settled(load, after_end)
    down_share, down_count = _share(load.results, killed_at + SETTLE_S, restarted, version)
    after_share, after_count = _share(load.results, finished + SETTLE_S, after_end, version)

    resumed = [e["t"] for e in final.timeline if e["event"] == "resumed after an interruption"] if final else []
    recover_s = (resumed[0] - restarted) if resumed else None
    allowed = {recorded[0]} | ({recorded[1]} if recorded and recorded[1] is not None else set()) if recorded else {0}
    in_case = [r for r in load.results if started <= r[0] < after_end]
    ok_answers = sum(1 for r in in_case if 200 <= r[2] < 300)
    expected_final = {rolled_back} if case.bad else {promoted, rolled_back}
    final_weight = final.weight if final else None
    stack_consistent = stack is not None and stack.canary is None and (
        stack.stable.model == str(candidate) if final and final.phase == promoted else stack.stable.model == stable)
    checks = {
        "killed at the transition": killed and details["killed_at_transition"] == case.label,
        "router weight is the recorded one (or the pending target)": router_weight in allowed,
        "served split while down is the recorded one": _matches(down_share, down_count, allowed),
        "resumed to the end": final is not None and final.phase in expected_final and rc2 in (0, 3),
        "controller took over after the restart": bool(resumed),
        "final recorded weight is the router's": final_weight == final_router,
        "served split after the end is the recorded one": _matches(after_share, after_count,
                                                                     {final_weight if final_weight is not None
                                                                      else -1}),
        "stack has no canary left and the right stable": stack_consistent,
        "every request answered 2xx": ok_answers == len(in_case),
    }
    details.update({
        "recorded_weight": None if recorded is None else recorded[0],
        "recorded_target": None if recorded is None else recorded[1],
        "router_weight_while_down": router_weight,
        "served_share_while_down": None if down_share is None else round(100 * down_share, 1),
        "answers_while_down": down_count, "final_phase": None if final is None else final.phase,
        "final_recorded_weight": final_weight, "final_router_weight": final_router,
        "served_share_after": None if after_share is None else round(100 * after_share, 1),
        "answers_after": after_count, "resume_exit": rc2, "finish_s": round(finished - restarted, 2),
        "stray_servers_after_kill": len(strays), "failed_checks": [k for k, v in checks.items() if not v],
        # What LocalBackend.traffic() says, beside what the router does: the controller reconciles with it.
        "backend_traffic_while_down": reported_weight, "backend_traffic_after": final_reported,
        "non_2xx": {str(code): sum(1 for r in in_case if r[2] == code)
                    for code in sorted({r[2] for r in in_case if not 200 <= r[2] < 300})},
    })
    outcome_word = {promoted: "promoted", rolled_back: "rolled back"}.get(details["final_phase"],
                                                                         str(details["final_phase"]))
    delay = f" +{case.delay_s:g} s" if case.delay_s else ""
    target = "" if details["recorded_target"] is None else f"->{details['recorded_target']}"
    fault = (f"SIGKILL after `{case.label}`{delay}{' (bad candidate)' if case.bad else ''}: recorded "
             f"{details['recorded_weight']}{target}%, router {router_weight}%, served "
             f"{details['served_share_while_down']}% of {down_count} while down; {outcome_word}, final recorded "
             f"{final_weight}% / router {final_router}% / served {details['served_share_after']}%")
    lost = 0 if checks["final recorded weight is the router's"] and checks["resumed to the end"] else 1
    goal = "resumes or rolls back; recorded weight = router = served split; all 2xx"
    (work_dir / "cases" / f"{number:02d}" / "outcome.json").write_text(json.dumps(details, indent=1, default=str))
    return Outcome(NAME, fault, len(in_case), ok_answers, lost, recover_s, goal, all(checks.values()), details), \
        strays


SCENARIOS = (Scenario(NAME, run),)
