"""Model server faults: the canary's or the stable model server SIGKILLed mid-rollout under load.

The local stack (router, stable and canary ``defectkit serve`` processes on 127.0.0.1) serves
a LoadGenerator at ``RATE`` requests a second while a Controller steps a candidate through
its canary; once it holds a step, one server gets SIGKILL. What the design does:

- canary killed: the router sends each request it picks for the canary to stable instead
  (the connection is refused, so the request never reached a model); the next analysis
  fails (the backend sees the canary process gone) and ``failure_threshold`` failures roll
  the candidate back, which takes the dead server out of the router's configuration.
- stable killed: the router sends stable's share to the canary (it already takes traffic),
  and the next backend call starts stable again with the model it served and points the
  router at it; the delivery goes on from the recorded step.

Measured per kill: the requests in flight at the kill instant (sent before it, answered
after it) against the client-visible failures (every failure must be one of them); how
long after the kill clients still got failures (bound: the slowest answer just before the kill,
plus ``SWITCH_SLACK_S``); how
long until the router's configuration no longer names the dead server (bound stated per
fault, from the policy and a server start time measured in the same run); and that the
recorded canary weight equals the router's at the end.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from defectkit.delivery.analysis import CanaryPolicy
from defectkit.delivery.backend import CANARY, STABLE
from defectkit.delivery.controller import Controller
from defectkit.delivery.local import LocalBackend, StackOptions, read_stack, stop_stack
from defectkit.delivery.local.processes import alive
from defectkit.delivery.local.router import CONFIG_PATH
from defectkit.delivery.state import ANALYSING, PROMOTED, ROLLED_BACK, RolloutState, StateStore
from defectkit.delivery.traffic import LoadGenerator
from tests.chaos.harness import Outcome, Scenario
from tests.chaos.stack import INFER_PATH, images, models

NAME = "server_kill"
RATE = 25.0  # requests a second through the router; the issue asks for at least 20
SERVER_ARGS = ("--threads", "1")
SCRAPE_INTERVAL_S = 0.25
# In-flight requests fail (or are sent again) the moment the process dies and the router's connections to it
# break; a request the router picks later is refused at connect and redirected at once. So the last failure
# reaches its client at most one request's latency after the kill: the bound is the slowest answer of the
# BASELINE_S before the kill (measured in the same run: the machine is shared) plus one second.
SWITCH_SLACK_S = 1.0
BASELINE_S = 10.0
SLACK_S = 3.0  # added to every bound derived from the policy: the machine is shared with other workers


def policy(short: bool) -> CanaryPolicy:
    return CanaryPolicy(steps=(25, 50, 100), interval_s=2.0 if short else 3.0, failure_threshold=2, min_requests=8,
                        max_p99_latency_s=1.0, max_error_rate=0.01)


@dataclass
class RouterWatch:
    """Polls the router's configuration every 0.1 s: (time, stable URL, canary URL, weight, redirected)."""

    url: str
    seen: list[tuple[float, str | None, str | None, int, int]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._thread = threading.Thread(target=self._run, name="router-watch", daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=2.0) as client:
            while not self._stop.wait(0.1):
                try:
                    config = client.get(self.url + CONFIG_PATH).json()
                except httpx.HTTPError:
                    continue
                self.seen.append((time.time(), config["stable"], config["canary"], config["weight"],
                                  config["redirected"]))

    def __enter__(self) -> RouterWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)

    def off(self, dead_url: str, since: float) -> float | None:
        """Seconds from ``since`` until the configuration stopped naming ``dead_url``; None if it never did."""
        for t, stable, canary, _, _ in self.seen:
            if t >= since and dead_url not in (stable, canary):
                return t - since
        return None


def wait_for(store: StateStore, weight: int, thread: threading.Thread, timeout_s: float = 180.0) -> RolloutState:
    deadline = time.monotonic() + timeout_s
    while True:
        state = store.load()
        if state is not None and state.phase == ANALYSING and state.weight == weight:
            return state
        if not thread.is_alive():
            raise RuntimeError(f"the delivery ended before holding {weight}%: {state.phase if state else None}, "
                               f"{state.reason if state else ''}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the delivery did not reach {weight}% within {timeout_s:g} s")
        time.sleep(0.05)


def start_seconds(state: RolloutState) -> float:
    """How long starting the candidate's server took in this run: the yardstick for restart bounds."""
    started = next(e["t"] for e in state.timeline if e["event"] == "delivery started")
    deployed = next(e["t"] for e in state.timeline if e["event"] == "candidate deployed at 0% traffic")
    return deployed - started


def kill_during_delivery(work: Path, backend: LocalBackend, role: str, weight: int, candidate: Path,
                         stable_model: Path, bodies: list[bytes], pol: CanaryPolicy, label: str) -> Outcome:
    store = StateStore(work / f"{label}-state.json")
    controller = Controller(backend, pol, store, candidate=str(candidate), stable=str(stable_model))
    final: list[RolloutState] = []
    errors: list[BaseException] = []

    def deliver() -> None:
        try:
            final.append(controller.run())
        except BaseException as exc:  # noqa: BLE001 - reported in the outcome
            errors.append(exc)

    router = read_stack(backend.work_dir).router.url
    thread = threading.Thread(target=deliver, name=f"delivery-{label}", daemon=True)
    with RouterWatch(router) as watch, LoadGenerator(router + INFER_PATH, bodies, RATE) as load:
        thread.start()
        held = wait_for(store, weight, thread)
        time.sleep(0.4 * pol.interval_s)  # mid-window
        stack = read_stack(backend.work_dir)
        victim = stack.canary if role == CANARY else stack.stable
        kill_before = time.time()
        os.killpg(victim.pid, signal.SIGKILL)  # its own session: the process group is the server
        kill_after = time.time()
        thread.join(timeout=120 + 10 * pol.interval_s)
        time.sleep(1.0)  # traffic after the delivery ended is served too
    if thread.is_alive():
        raise TimeoutError(f"the delivery ({label}) did not finish within the time allowed")
    if errors:
        raise errors[0]
    state = final[0]
    actual = backend.traffic()
    stack = read_stack(backend.work_dir)

    results = load.results
    in_flight = [r for r in results if r[0] <= kill_after and r[1] >= kill_before]
    failures = [r for r in results if not 200 <= r[2] < 300]
    outside = [r for r in failures if r not in in_flight]
    switch_s = max((r[1] - kill_before for r in failures if r[1] >= kill_before), default=0.0)
    baseline = [r[1] - r[0] for r in results if kill_before - BASELINE_S <= r[1] < kill_before]
    switch_bound = max(baseline, default=0.0) + SWITCH_SLACK_S
    off_s = watch.off(victim.url, kill_before)
    redirected = (watch.seen[-1][4] - next(s[4] for s in watch.seen if s[0] >= kill_before)) if watch.seen else 0
    boot_s = start_seconds(held)

    if role == CANARY:
        # Next analysis (at most one interval) fails, so does the one after; the rollback follows at once.
        off_bound = (pol.failure_threshold + 1) * pol.interval_s + SLACK_S
        fault = f"SIGKILL canary at {weight}% ({RATE:g} req/s)"
        outcome_ok = state.phase == ROLLED_BACK and stack.canary is None
        goal = (f"rolled back; failures only among requests in flight at the kill; clients switched <= "
                f"{switch_bound:.1f} s; router off the dead canary <= {off_bound:.1f} s")
    else:
        # The next backend call (at most one interval away) starts stable again: one server start.
        off_bound = pol.interval_s + 2 * boot_s + SLACK_S
        fault = f"SIGKILL stable at {weight}% ({RATE:g} req/s)"
        outcome_ok = state.phase in (PROMOTED, ROLLED_BACK) and alive(stack.stable) and \
            stack.stable.pid != victim.pid
        goal = (f"stable restarted, delivery finished; failures only among requests in flight at the kill; "
                f"clients switched <= {switch_bound:.1f} s; router off the dead server <= {off_bound:.1f} s")
    consistent = state.weight == actual and state.target_weight is None
    met = (outcome_ok and consistent and not outside and len(failures) <= len(in_flight)
           and switch_s <= switch_bound and off_s is not None and off_s <= off_bound)
    return Outcome(
        NAME, fault, attempted=len(results), succeeded=len(results) - len(failures), lost=len(outside),
        recover_s=off_s, goal=goal, met=met,
        details={"phase": state.phase, "reason": state.reason, "recorded_weight": state.weight,
                 "actual_weight": actual, "in_flight_at_kill": len(in_flight), "failures": len(failures),
                 "failure_statuses": sorted({r[2] for r in failures}), "clients_switched_s": round(switch_s, 3),
                 "clients_switched_bound_s": round(switch_bound, 2),
                 "router_off_dead_server_s": None if off_s is None else round(off_s, 3),
                 "router_off_bound_s": round(off_bound, 2), "redirected_after_kill": redirected,
                 "server_start_s": round(boot_s, 2),
                 "verdicts": [(a["weight"], a["verdict"]) for a in state.analyses]},
    )


def run(work_dir: Path, short: bool) -> list[Outcome]:
    model_dirs = models(work_dir / "models", count=5)
    bodies = images(work_dir / "images", count=20)
    pol = policy(short)
    weights = (25,) if short else (25, 50)
    stack_work = work_dir / "stack"
    backend = LocalBackend(stack_work, StackOptions(server_args=SERVER_ARGS, scrape_interval_s=SCRAPE_INTERVAL_S))
    outcomes: list[Outcome] = []
    try:
        backend.ensure_stack(str(model_dirs[0]))
        next_model = 1
        for weight in weights:
            for role in (CANARY, STABLE):
                stable_model = Path(read_stack(stack_work).stable.model)
                candidate = model_dirs[next_model]
                outcomes.append(kill_during_delivery(work_dir, backend, role, weight, candidate, stable_model,
                                                     bodies, pol, f"{role}-{weight}"))
                if read_stack(stack_work).stable.model == str(candidate):
                    next_model += 1  # promoted: the next delivery needs another candidate
    finally:
        backend.close()
        stop_stack(stack_work)
    return outcomes


SCENARIOS = (Scenario(NAME, run),)
