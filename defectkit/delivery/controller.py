"""The delivery controller: deploy -> probe -> step traffic -> analyse -> promote | roll back.

This module is the state machine alone; :mod:`defectkit.delivery.rollout` configures a
delivery (backend, registry, golden set) and runs it.

Phases, each persisted in a store (:mod:`defectkit.delivery.state`) before the next begins:

1. ``deploying``: the candidate starts beside the stable version at 0% traffic.
2. ``probing``: the candidate scores the golden images (a few test-set files with the scores
   offline evaluation gave them); any score off by more than the policy allows for the
   precisions of both (``CanaryPolicy.probe_tolerance_for``: bf16 on a GPU rounds) means
   serving and evaluation disagree, and the candidate is rolled back before any traffic.
3. ``stepping`` / ``analysing``: traffic moves through the policy's steps; each is held
   for ``interval_s`` and the window is then analysed (:mod:`defectkit.delivery.analysis`).
   A pass moves to the next step; a failure counts towards ``failure_threshold``, and the
   step is held for another interval; an inconclusive window (too little traffic, or figures that could not be read) holds it
   too, up to ``max_inconclusive`` times in a row.
4. ``promoting`` -> ``promoted``: the candidate gets all traffic and ``on_promote`` runs
   (the registry moves alias ``champion``); or ``rolling_back`` -> ``rolled_back``: all
   traffic back to the stable version, ``on_rollback`` runs, ``champion`` stays.

Resuming (``Controller.run`` on a store holding an unfinished delivery of the same
candidate) continues from the persisted phase, with these rules:

- ``deploying``, ``probing``, ``promoting``, ``rolling_back``: the phase is repeated (every
  backend call is idempotent).
- ``stepping`` (a traffic change was requested, maybe not made): the change is made again
  whatever the backend reports, then confirmed.
- ``analysing`` (the outcome of the analysis in progress is unknown): recorded and actual
  traffic are made to agree first (the recorded weight is restored if they differ). Then
  the candidate's health is judged at once: the golden probe again (where there is a
  golden set) and an analysis of the interval just past, which covers the traffic that
  flowed while the controller was down. A candidate that fails the probe or cannot be
  reached is rolled back; a failed analysis counts towards the failure threshold as
  usual; otherwise the step goes on.

- ``failed`` with a traffic change pending (``target_weight`` set: a promotion or a
  rollback broke off): that change is made again, then the delivery finishes.

Any unexpected error rolls the candidate back (phase ``failed`` if even that fails), so a
delivery never ends with traffic stranded on a candidate nobody watches; the exception is
a promotion that broke off, which is finished by running the delivery again rather than
undone, since every analysis had passed (and KServe cannot send traffic back from a
revision once it had all of it).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from defectkit.delivery import analysis, approval, record, shadow
from defectkit.delivery.analysis import CanaryPolicy
from defectkit.delivery.approval import ApprovalGate
from defectkit.delivery.backend import (
    CANARY,
    EMPTY,
    STABLE,
    Backend,
    BackendError,
    VariantMetrics,
    metrics_by_variant,
)
from defectkit.delivery.state import (
    ANALYSING,
    DEPLOYING,
    FAILED,
    PROBING,
    PROMOTED,
    PROMOTING,
    ROLLED_BACK,
    ROLLING_BACK,
    STEPPING,
    RolloutInProgress,
    RolloutState,
    RolloutStore,
    StateConflict,
    StoreOrPath,
    as_store,
    iso,
)
from defectkit.delivery.shadow import ShadowReplay
from defectkit.golden import Golden

log = logging.getLogger(__name__)

# The command that rolls back an unfinished delivery, named in the messages that leave one behind.
RESTORE_COMMAND = "defectkit rollout restore"

Hook = Callable[[RolloutState], None]


def held(store: RolloutStore) -> contextlib.AbstractContextManager[None]:
    """The store's delivery lock (:meth:`defectkit.delivery.state.StateStore.hold`), where it has one."""
    hold = getattr(store, "hold", None)
    return hold() if hold is not None else contextlib.nullcontext()


# --------------------------------------------------------------------------- the state machine


class Controller:
    """Delivers ``candidate`` through ``backend`` under ``policy``, persisting every step in ``store`` (a
    RolloutStore, or the path of a state file).

    ``on_promote`` / ``on_rollback`` run once the traffic has moved (the registry's aliases
    and tags); they must be idempotent, as a resumed delivery may run them again.
    ``record_dir`` receives the decision record whenever the delivery stops; ``restore_command``
    is what messages name to roll back an unfinished delivery; ``evidence`` (the candidate's
    offline evaluation) is kept in the state for the record; ``shadow``, sampled production
    images replayed to the candidate after the golden probe, before any traffic; ``approval``, a
    URL that must answer 200 before the promotion (or the first traffic).
    """

    def __init__(self, backend: Backend, policy: CanaryPolicy, store: StoreOrPath, *, candidate: str,
                 candidate_version: str | None = None, stable: str | None = None, backend_name: str = "local",
                 golden: Golden | None = None, on_promote: Hook | None = None, on_rollback: Hook | None = None,
                 record_dir: Path | None = None, clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], None] = time.sleep, restore_command: str = RESTORE_COMMAND,
                 evidence: dict[str, Any] | None = None, shadow: ShadowReplay | None = None,
                 approval: ApprovalGate | None = None) -> None:
        self.backend = backend
        self.policy = policy
        self.store = as_store(store)
        self.candidate = candidate
        self.candidate_version = candidate_version
        self.stable = stable
        self.backend_name = backend_name
        self.golden = golden
        self.on_promote = on_promote
        self.on_rollback = on_rollback
        self.record_dir = None if record_dir is None else Path(record_dir)
        self._clock = clock
        self._sleep = sleep
        self.restore_command = restore_command
        self.evidence = evidence
        self.shadow = shadow
        self.approval = approval

    # ------------------------------------------------------------------ entry point

    def run(self) -> RolloutState:
        """Deliver the candidate, or resume its unfinished delivery; returns the final state.

        Raises RolloutInProgress, touching nothing, while another process drives a delivery in
        the same store, or while another candidate's delivery there is unfinished.
        """
        with held(self.store):
            return self._run()

    def _run(self) -> RolloutState:
        state, resuming = self._load_or_create()
        handlers = {DEPLOYING: self._deploy, PROBING: self._probe, STEPPING: self._step, ANALYSING: self._analyse,
                    PROMOTING: self._promote, ROLLING_BACK: self._roll_back}
        try:
            if resuming:
                self._resume(state)
            while not state.terminal:
                try:
                    handlers[state.phase](state)
                except BackendError as exc:
                    if state.phase in (ROLLING_BACK, PROMOTING):
                        raise
                    log.error("%s failed: %s", state.phase, exc)
                    self._begin_rollback(state, f"the backend failed during {state.phase}: {exc}", error=str(exc))
        except StateConflict:
            # Another process drives this delivery now; undoing its traffic from here would fight it.
            log.error("the state of the delivery of %s in %s was changed by another process; stopping without "
                      "touching traffic", self.candidate, self.store.where)
            raise
        except (KeyboardInterrupt, SystemExit):
            log.warning("delivery of %s interrupted in phase %s at %d%%; run it again to resume, or restore stable "
                        "traffic (%s)", self.candidate, state.phase, state.weight, self.restore_command)
            raise
        except Exception as exc:
            self._fail_safe(state, exc)
        finally:
            self._write_record(state)
        return state

    def _load_or_create(self) -> tuple[RolloutState, bool]:
        """(state, whether it is an unfinished delivery to resume)."""
        state = self.store.load()
        if state is not None and state.candidate == self.candidate:
            if state.phase == FAILED and state.target_weight is not None:
                # It failed half-way through a promotion or a rollback: that transition is finished now.
                state.phase = PROMOTING if state.target_weight == 100 else ROLLING_BACK
                state.error = None  # kept in the timeline's "delivery failed" event
                return state, True
            if state.phase == PROMOTED and self.stable is not None and self.stable != self.candidate:
                # The promotion recorded here was undone since (another model serves as stable now, delivered
                # with another state file): the record no longer describes the service, so deliver afresh.
                log.info("%s records %s as promoted, but %s serves as stable now: delivering %s again",
                         self.store.where, self.candidate, self.stable, self.candidate)
            else:
                if state.terminal:
                    log.info("delivery of %s already finished: %s (%s); a finished delivery is not repeated (a "
                             "retried step must not ship twice): to deliver it again, move %s away", self.candidate,
                             state.phase, state.reason, self.store.where)
                return state, not state.terminal
        if state is not None and (not state.terminal or state.target_weight is not None):
            raise RolloutInProgress(
                f"{self.store.where} holds an unfinished delivery of {state.candidate} (phase {state.phase}, "
                f"{state.weight}% traffic); resume it by delivering that model again, or roll it back with "
                f"{self.restore_command}, before delivering {self.candidate}")
        state = RolloutState(candidate=self.candidate, candidate_version=self.candidate_version, stable=self.stable,
                             backend=self.backend_name, policy=self.policy.to_json(), evidence=self.evidence)
        state.event("delivery started", steps=",".join(map(str, self.policy.analysed_steps)) + ",promote")
        try:
            self.store.save(state)
        except StateConflict as exc:
            # Another delivery recorded itself between our read and our write: it goes on, this one never began.
            raise RolloutInProgress(f"another delivery to this service started at the same moment as the delivery "
                                    f"of {self.candidate}: {exc}; nothing was changed for {self.candidate}: wait "
                                    f"for the other to finish, then deliver again") from exc
        log.info("delivering %s (stable %s) through steps %s, %g s each", self.candidate, self.stable,
                 list(self.policy.analysed_steps), self.policy.interval_s)
        return state, False

    def _resume(self, state: RolloutState) -> None:
        policy = CanaryPolicy.from_json(state.policy)
        if policy != self.policy:
            log.warning("resuming with the policy the delivery started with, not the one given now")
            self.policy = policy
        state.event("resumed after an interruption", interrupted_phase=state.phase)
        log.warning("resuming the delivery of %s from phase %s at %d%% (step %d)", state.candidate, state.phase,
                    state.weight, state.step_index)
        if state.phase == STEPPING and state.target_weight is not None:
            state.event("a traffic change was under way; making it again", actual=self.backend.traffic(),
                        target=state.target_weight)
        if state.phase == ANALYSING:
            actual = self.backend.traffic()
            if actual != state.weight:
                state.event("actual traffic differs from the recorded weight; restoring the recorded weight",
                            actual=actual)
                state.target_weight = state.weight
                self.store.save(state)
                self.backend.set_traffic(state.weight)
                state.target_weight = None
            if self.golden is not None and not self._golden_ok(state, "resumed mid-analysis: "):
                return
            # The interrupted analysis is judged now, over the interval just past.
            state.next_analysis_at = self._clock()
        self.store.save(state)

    # ------------------------------------------------------------------ phases

    def _deploy(self, state: RolloutState) -> None:
        log.info("deploying candidate %s", self.candidate)
        self.backend.deploy_candidate(self.candidate)
        state.phase = PROBING
        state.event("candidate deployed at 0% traffic")
        self.store.save(state)

    def _probe(self, state: RolloutState) -> None:
        if self.golden is None:
            state.probe = {"skipped": "no golden images given"}
            state.event("golden probe skipped: no golden images given")
        elif not self._golden_ok(state, ""):
            return
        if self.shadow is not None and not self._shadow_ok(state, self.shadow):
            return
        if not self._approved(state, approval.TRAFFIC):
            return
        state.phase, state.step_index = STEPPING, 0
        self.store.save(state)

    def _approved(self, state: RolloutState, stage: str) -> bool:
        """Whether the approval gate (if it guards ``stage``) said go; asks until it does or its timeout passes,
        then starts the rollback and returns False. The first request's time is kept in the state, so a resumed
        delivery keeps the same deadline."""
        gate = self.approval
        if gate is None or gate.before != stage:
            return True
        record = state.approval if state.approval and state.approval.get("stage") == stage else None
        if record is not None and record.get("approved_at"):
            return True
        if record is None:
            record = {"stage": stage, "gate": gate.to_json(), "requested_at": self._clock(), "asked": 0}
            state.approval = record
            state.event("approval requested", stage=stage, url=gate.where)
            self.store.save(state)
        payload = {"candidate": self.candidate, "version": self.candidate_version, "stable": self.stable,
                   "stage": stage, "weight": state.weight, "phase": state.phase, "analyses": len(state.analyses)}
        while True:
            ok, answer = gate.ask(payload)
            record["asked"] += 1
            record["last_answer"] = answer
            now = self._clock()
            if ok:
                record["approved_at"] = now
                state.event("approval given", stage=stage, answer=answer, asked=record["asked"])
                self.store.save(state)
                return True
            waited = now - record["requested_at"]
            if waited >= gate.timeout_s:
                record["timed_out_at"] = now
                self._begin_rollback(state, f"no approval of the {stage} from {gate.where} within "
                                            f"{gate.timeout_s:g} s ({record['asked']} requests, last answer "
                                            f"{answer})")
                return False
            self.store.save(state)
            self._sleep(min(gate.poll_interval_s, gate.timeout_s - waited))

    def _shadow_ok(self, state: RolloutState, replay: ShadowReplay) -> bool:
        """Replay the sampled production images to the candidate; on a failed verdict start the rollback and
        return False."""
        samples = replay.samples
        if replay.threshold is None:
            verdict = shadow.skipped(samples, replay.policy, "the candidate's threshold is unknown (give the judged "
                                                             "model directory)")
        elif why := shadow.too_few(samples, replay.policy):  # not worth a probe
            verdict = shadow.skipped(samples, replay.policy, why)
        else:
            try:
                answer = self.backend.probe(list(samples.images))
            except BackendError as exc:
                self._begin_rollback(state, f"the candidate could not be replayed the sampled production images: "
                                            f"{exc}", error=str(exc))
                return False
            verdict = shadow.judge(samples, answer.scores, replay.threshold, replay.policy)
            if replay.out_dir is not None:
                shadow.keep_disagreements(samples, verdict, replay.out_dir)
        state.shadow = verdict
        if not verdict["passed"]:
            self._begin_rollback(state, f"shadow replay failed: {verdict['reason']}")
            return False
        state.event(f"shadow replay {verdict['verdict']}", images=verdict["images"],
                    agreement=verdict.get("agreement"))
        return True

    def _golden_ok(self, state: RolloutState, context: str) -> bool:
        """Probe the golden images; on a mismatch start the rollback and return False."""
        golden = self.golden
        try:
            answer = self.backend.probe(list(golden.images))
        except BackendError as exc:
            self._begin_rollback(state, f"{context}the candidate could not be probed: {exc}", error=str(exc))
            return False
        scores = answer.scores
        tolerance = self.policy.probe_tolerance_for(golden.precision, answer.precision)
        diffs = [abs(a - b) for a, b in zip(scores, golden.scores)]
        worst = max(range(len(diffs)), key=diffs.__getitem__) if diffs else None
        state.probe = {"images": len(golden.images), "max_abs_diff": max(diffs, default=0.0),
                       "tolerance": tolerance, "golden_precision": golden.precision,
                       "served_precision": answer.precision,
                       "scores": [round(s, 6) for s in scores], "expected": list(golden.scores)}
        if len(scores) != len(golden.scores) or (worst is not None and diffs[worst] > tolerance):
            what = (f"{len(scores)} scores for {len(golden.scores)} images" if len(scores) != len(golden.scores)
                    else f"golden image {golden.names[worst]} scored {scores[worst]:.6f} by the candidate "
                         f"({answer.precision}) but {golden.scores[worst]:.6f} in offline evaluation "
                         f"({golden.precision}) (|diff| {diffs[worst]:.2g} > tolerance {tolerance:g})")
            self._begin_rollback(state, f"{context}golden probe failed: {what}; serving and evaluation disagree")
            return False
        state.event("golden probe passed", images=len(golden.images), max_abs_diff=state.probe["max_abs_diff"])
        return True

    def _step(self, state: RolloutState) -> None:
        steps = self.policy.analysed_steps
        if state.step_index >= len(steps):
            if not self._approved(state, approval.PROMOTION):
                return
            state.phase = PROMOTING
            state.event("every step passed; promoting")
            self.store.save(state)
            return
        target = steps[state.step_index]
        # Intent first: if we die inside set_traffic, a restart knows the split may already have changed.
        state.target_weight = target
        state.event("setting candidate traffic", target=target)
        self.store.save(state)
        self.backend.set_traffic(target)
        now = self._clock()
        state.weight, state.target_weight = target, None
        state.phase, state.inconclusive = ANALYSING, 0
        state.hold_started_at, state.next_analysis_at = now, now + self.policy.interval_s
        state.event("candidate traffic set", step=state.step_index + 1)
        self.store.save(state)
        log.info("step %d/%d: candidate at %d%% for %g s", state.step_index + 1, len(steps), target,
                 self.policy.interval_s)

    def _analyse(self, state: RolloutState) -> None:
        policy = self.policy
        wait = state.next_analysis_at - self._clock()
        if wait > 0:
            self._sleep(wait)
        now = self._clock()
        stable, canary, result, reference = self._judge(state)
        entry = {"t": now, "at": iso(now), "step": state.step_index + 1, "weight": state.weight,
                 "window_s": policy.interval_s, "verdict": result.verdict, "explanation": result.explain(),
                 "skipped_reason": result.skipped_reason, "checks": [c.to_json() for c in result.checks],
                 "canary": canary.summary(), "stable": stable.summary(), "stable_reference": reference}
        state.analyses.append(entry)
        log.info("analysis at %d%%: %s", state.weight, result.explain())
        if result.verdict == analysis.PASS:
            state.step_index += 1
            state.phase = STEPPING
            state.event("analysis passed", analysis=len(state.analyses))
        elif result.verdict == analysis.FAIL:
            state.failed_checks += 1
            state.event("analysis failed", analysis=len(state.analyses), failed_checks=state.failed_checks)
            if state.failed_checks >= policy.failure_threshold:
                failures = [a["explanation"] for a in state.analyses if a["verdict"] == analysis.FAIL]
                self._begin_rollback(state, f"{state.failed_checks} failed analyses reached the failure threshold "
                                            f"of {policy.failure_threshold}: " + " | ".join(failures))
                return
        else:
            state.inconclusive += 1
            state.event("analysis inconclusive", analysis=len(state.analyses), inconclusive=state.inconclusive)
            if state.inconclusive >= policy.max_inconclusive:
                self._begin_rollback(state, f"{state.inconclusive} inconclusive analyses in a row at "
                                            f"{state.weight}%: {result.skipped_reason}; the candidate cannot be "
                                            f"judged")
                return
        if state.phase == ANALYSING:
            # A fixed cadence; after a long stall (a slow backend, a suspended process) start a fresh interval.
            state.next_analysis_at = max(state.next_analysis_at + policy.interval_s, now + policy.interval_s / 2)
        self.store.save(state)

    def _judge(self, state: RolloutState) -> tuple[VariantMetrics, VariantMetrics, analysis.Analysis, bool]:
        """(stable, canary, analysis, whether a reference stable window was used) for the window just past."""
        policy = self.policy
        try:
            metrics = metrics_by_variant(self.backend.metrics(policy.interval_s))
        except analysis.MetricsUnavailable as exc:
            # Missing figures are evidence neither way: the step is held, and max_inconclusive rolls back.
            return EMPTY, EMPTY, analysis.unavailable(exc), False
        except BackendError as exc:
            check = analysis.Check("metrics", None, None, False, f"metrics unavailable: {exc}")
            return EMPTY, EMPTY, analysis.Analysis(False, (check,)), False
        stable, canary = metrics[STABLE], metrics[CANARY]
        reference = False
        if stable.requests >= policy.min_requests:
            state.reference_stable = stable.to_json()
        elif state.reference_stable is not None:
            # At high canary weights the stable version sees too little traffic; compare with its last good window.
            stable, reference = VariantMetrics.from_json(state.reference_stable), True
        return stable, canary, analysis.analyse(stable, canary, policy), reference

    def _promote(self, state: RolloutState) -> None:
        state.target_weight = 100
        self.store.save(state)
        self.backend.promote()
        # target_weight stays until the hook has run too: a failure in between is resumed as a promotion.
        state.weight = 100
        state.event("candidate promoted: it serves all traffic")
        self.store.save(state)
        if self.on_promote is not None:
            self.on_promote(state)
        state.target_weight = None
        passed = sum(1 for a in state.analyses if a["verdict"] == analysis.PASS)
        probe = "passed the golden probe" if state.probe and "max_abs_diff" in state.probe else \
            "had no golden probe"
        steps = ", ".join(f"{s}%" for s in self.policy.analysed_steps)
        state.phase = PROMOTED
        state.reason = (
            f"the candidate {probe} and passed {passed} analyses through steps {steps} with "
            f"{state.failed_checks} failed (threshold {self.policy.failure_threshold})"
            if self.policy.analysed_steps else f"the candidate {probe}; the policy has no analysed steps")
        state.event("delivery finished: promoted")
        self.store.save(state)
        log.info("PROMOTED %s: %s", self.candidate, state.reason)

    def _begin_rollback(self, state: RolloutState, reason: str, *, error: str | None = None) -> None:
        state.phase, state.reason = ROLLING_BACK, reason
        if error is not None:
            state.error = error
        state.event("rolling back", reason=reason)
        self.store.save(state)
        log.warning("rolling back %s: %s", self.candidate, reason)

    def _roll_back(self, state: RolloutState) -> None:
        roll_back(self.backend, self.store, state, self.on_rollback)

    def _fail_safe(self, state: RolloutState, exc: Exception) -> None:
        log.exception("delivery of %s failed in phase %s", self.candidate, state.phase)
        error = f"{type(exc).__name__}: {exc}"
        # A promotion is not undone half-way (KServe cannot send traffic back from a rolled-out revision):
        # it was decided on every analysis passing, and running the delivery again finishes it.
        if state.phase not in (ROLLING_BACK, PROMOTING, PROMOTED, ROLLED_BACK, FAILED):
            self._begin_rollback(state, f"the delivery failed in phase {state.phase}: {error}", error=error)
            try:
                self._roll_back(state)
                return
            except Exception as second:  # noqa: BLE001 - reported in the state; restore_stable can retry
                log.exception("rollback failed too")
                error = f"{error}; rollback failed: {type(second).__name__}: {second}"
        promoting = state.phase == PROMOTING
        state.phase, state.error = FAILED, error
        remedy = "run the delivery again to finish the promotion" if promoting else \
            f"restore stable traffic with {self.restore_command}"
        state.reason = f"{state.reason or 'the delivery failed'} (could not finish: {error}; {remedy})"
        state.event("delivery failed", error=error)
        self.store.save(state)

    def _write_record(self, state: RolloutState) -> None:
        if self.record_dir is not None:
            record.write_record(state, self.record_dir)


def roll_back(backend: Backend, store: RolloutStore, state: RolloutState, on_rollback: Hook | None) -> None:
    """All traffic to the stable version, recorded as intent first and confirmed after."""
    state.target_weight = 0
    store.save(state)
    backend.rollback()
    # target_weight stays until the hook has run too: a failure in between is resumed as a rollback.
    state.weight = 0
    state.event("traffic back on the stable version")
    store.save(state)
    if on_rollback is not None:
        on_rollback(state)
    state.target_weight = None
    state.phase = ROLLED_BACK
    state.event("delivery finished: rolled back")
    store.save(state)
    log.warning("ROLLED BACK %s: %s", state.candidate, state.reason)


def restore_stable(backend: Backend, store: StoreOrPath, *, reason: str = "restored by request",
                   on_rollback: Hook | None = None, record_dir: Path | None = None) -> bool:
    """Roll back an unfinished (or failed) delivery recorded in ``store``; True if traffic was moved back.

    For the pipeline's exit handler: after a run that died mid-rollout, the candidate must
    not keep its traffic share. A finished delivery (promoted or rolled back), or none at
    all, is left alone.
    """
    store = as_store(store)
    with held(store):
        return _restore_stable(backend, store, reason, on_rollback, record_dir)


def _restore_stable(backend: Backend, store: RolloutStore, reason: str, on_rollback: Hook | None,
                    record_dir: Path | None) -> bool:
    state = store.load()
    if state is None:
        log.info("no delivery recorded in %s; nothing to restore", store.where)
        return False
    if state.phase in (PROMOTED, ROLLED_BACK):
        log.info("the delivery of %s finished (%s); nothing to restore", state.candidate, state.phase)
        return False
    if state.phase == PROMOTING or (state.phase == FAILED and state.target_weight == 100):
        log.warning("the delivery of %s passed every analysis and was being promoted; not undoing that: run the "
                    "delivery again to finish the promotion", state.candidate)
        return False
    state.phase, state.reason = ROLLING_BACK, f"{reason} (the delivery stopped in phase {state.phase} at " \
                                              f"{state.weight}% traffic)"
    state.event("restoring stable traffic", reason=reason)
    store.save(state)
    roll_back(backend, store, state, on_rollback)
    if record_dir is not None:
        record.write_record(state, record_dir)
    return True
