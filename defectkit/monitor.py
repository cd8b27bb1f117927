"""Drift-triggered retraining: the decision, its record, and the data it retrains on.

**The decision** (:func:`decide`) is pure: retrain only when the production
window passed validation, drifted, holds at least ``min_new_images`` new
images, and the last retraining is at least ``cooldown_s`` ago. Each rule
gives one readable reason.

**The data** (:func:`merge_for_retraining`): sampled production images have
no ground truth. They are added with the label the served model gave them,
under ``train/`` only, so the test split, and with it the comparison with the
champion, stays the same:

- images labelled ``good`` go to ``train/good``;
- images labelled ``defect`` go to ``train/<defect_class>`` when a defect
  class is named, and are left out otherwise: their defect type is unknown,
  and a wrong good/defect label teaches the model the opposite of the truth.

A ``labeler`` (e.g. the result of a human review) overrides the model's
label per sample; returning None leaves a sample out.

**The window** (:func:`run_window`) ends at the monitor run's scheduled
time, so that a recurring run checks the window it was scheduled for, and
a retried or late run checks the same one.

**Training** is not started here: the monitor pipeline runs the training
pipeline as a sub-pipeline on the merged data when the decision says so.

**One retraining at a time** (:func:`claim_retraining`): two monitor runs can
check the same window at once (a retried run beside a late one, two schedules
on one service). Each reads the same last retraining, so both would decide to
retrain. A retraining is therefore claimed before anything is written: the claim
is created, create-only, under a name derived from the last retraining it
follows, so of the runs that read the same last retraining exactly one creates
it. A run that finds the claim taken treats the claimant as the last retraining
and decides again (the cooldown then usually holds it back, and it never
retrains on a window the claimant retrains on). A retried run finds its own
claim and goes on with it, under the first attempt's time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from defectkit import decision_record as records
from defectkit import notify, storage
from defectkit.data import GOOD
from defectkit.decision_record import iso
from defectkit.sampling import SAMPLES_FILE, Sample

log = logging.getLogger(__name__)

MARKER_FILE = "last_retrain.json"
CLAIMS_DIR = "retrain-claims"
PRODUCTION_PREFIX = "prod-"
Labeler = Callable[[Sample], "str | None"]
# How KFP run-time placeholders start: one left in a value was not substituted by the runner.
_PLACEHOLDER_PREFIX = "{{$."


@dataclass(frozen=True)
class MonitorPolicy:
    """When drift leads to retraining: enough new data, and not again within the cooldown."""

    min_new_images: int = 100
    cooldown_s: float = 86400.0
    window_s: float = 86400.0

    def __post_init__(self) -> None:
        if isinstance(self.min_new_images, bool) or not isinstance(self.min_new_images, int) \
                or self.min_new_images < 0:
            raise ValueError(f"min_new_images={self.min_new_images!r} must be a non-negative integer")
        for name in ("cooldown_s", "window_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name}={value!r} must be a non-negative number of seconds")
        if self.window_s == 0:
            raise ValueError("window_s must be positive: the window is the production data that is checked")


@dataclass(frozen=True)
class Decision:
    retrain: bool
    reasons: tuple[str, ...]


def parse_rfc3339(text: str) -> float:
    """UNIX seconds of an RFC 3339 time such as ``2026-01-09T13:00:00Z`` (what the KFP backend substitutes for
    its time placeholders); fractions of a second are kept."""
    try:
        at = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"time {text!r} is not RFC 3339; give e.g. 2026-01-09T13:00:00Z") from None
    if at.tzinfo is None:
        raise ValueError(f"time {text!r} has no UTC offset; give e.g. 2026-01-09T13:00:00Z")
    return at.timestamp()


def run_window(window_s: float, scheduled_time: str, window_end: str = "") -> tuple[float, float]:
    """(since, until) of the production window a monitor run checks: ``window_s`` seconds ending at ``window_end``
    when it is given, else at the run's ``scheduled_time``.

    On Kubeflow ``scheduled_time`` is ``dsl.PIPELINE_JOB_SCHEDULE_TIME_UTC_PLACEHOLDER``, which the backend
    substitutes with the time the recurring run was scheduled for, and with the creation time for a run that
    was not scheduled (``defectkit_kfp.pipelines.run.run_local`` does the same for kfp.local).
    """
    if not (math.isfinite(window_s) and window_s > 0):
        raise ValueError(f"window_s={window_s!r} must be a positive number of seconds")
    if window_end.strip():
        until = parse_rfc3339(window_end)
    elif scheduled_time.startswith(_PLACEHOLDER_PREFIX):
        raise ValueError(f"the run's scheduled time {scheduled_time} was not substituted: run the pipeline on "
                         f"Kubeflow or through defectkit_kfp.pipelines.run.run_local, or give window_end")
    else:
        until = parse_rfc3339(scheduled_time)
    return until - window_s, until


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds:.0f} s"


def decide(drifted: bool, new_images: int, last_retrain_at: float | None, now: float,
           policy: MonitorPolicy = MonitorPolicy(), *, window_valid: bool = True) -> Decision:
    """Retrain when the window is valid AND the data drifted AND there are enough new images AND the cooldown
    has passed."""
    reasons = ["the production window passed validation" if window_valid else
               "the production window failed validation: it is not retrained on (see its validation report)"]
    reasons.append("production data drifted from the training reference" if drifted
                   else "no drift from the training reference")
    enough = new_images >= policy.min_new_images
    reasons.append(f"{new_images} new images {'>=' if enough else '<'} the minimum of {policy.min_new_images}")
    if last_retrain_at is None:
        cooled = True
        reasons.append("no earlier retraining: no cooldown applies")
    else:
        # A retraining stamped after `now` (another pod's clock runs ahead, or it retrained while this run
        # started) happened just now: a zero cooldown must still not hold this run back.
        since = max(0.0, now - last_retrain_at)
        cooled = since >= policy.cooldown_s
        reasons.append(f"last retraining {_duration(since)} ago, {'at least' if cooled else 'within'} the "
                       f"cooldown of {_duration(policy.cooldown_s)}")
    return Decision(bool(window_valid) and bool(drifted) and enough and cooled, tuple(reasons))


# --------------------------------------------------------------------------- last retrain marker


def read_last_retrain(state_uri: str | Path) -> dict | None:
    """The marker written by :func:`write_last_retrain` under ``state_uri``, or None before the first retraining."""
    data = storage.Store(str(state_uri)).read_if_exists(MARKER_FILE)
    return None if data is None else json.loads(data)


def write_last_retrain(state_uri: str | Path, at: float, run: str) -> None:
    storage.Store(str(state_uri)).write(MARKER_FILE, json.dumps({"at": at, "run": run}).encode())


@dataclass(frozen=True)
class Claim:
    """The claim on the retraining that follows one last retraining: who made it, when, for which window."""

    at: float
    run: str
    window: tuple[float, float]
    name: str

    @property
    def as_last_retrain(self) -> dict:
        """The claim in the shape of the last-retraining marker, which the claimant writes once it has merged."""
        return {"at": self.at, "run": self.run}


def claim_name(last_retrain: dict | None) -> str:
    """Where the claim on the retraining after ``last_retrain`` (None: the first one) is created."""
    if last_retrain is None:
        return f"{CLAIMS_DIR}/first.json"
    key = json.dumps({"at": float(last_retrain["at"]), "run": str(last_retrain["run"])}, sort_keys=True)
    return f"{CLAIMS_DIR}/after-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def _window_name(retraining: dict) -> str:
    """Where the window a retraining was made on is kept, beside the claims."""
    return claim_name(retraining).replace("/after-", "/window-of-")


def window_of(state_uri: str | Path, retraining: dict | None) -> tuple[float, float] | None:
    """The window ``retraining`` (a last-retraining marker) was made on; None when unknown."""
    if retraining is None:
        return None
    data = storage.Store(str(state_uri)).read_if_exists(_window_name(retraining))
    return None if data is None else tuple(json.loads(data)["window"])


def claim_retraining(state_uri: str | Path, last_retrain: dict | None, window: tuple[float, float], at: float,
                     run: str) -> tuple[bool, Claim]:
    """Claim the retraining after ``last_retrain`` for ``run``: (True, the claim) when ``run`` holds it (it made
    it now, or an earlier attempt of the same run did), else (False, the other run's claim).

    The claim is created create-only (``Store.write(overwrite=False)``: a hard link locally, a generation-0
    precondition on gs://, If-None-Match on s3://), so of two runs that race for it exactly one creates it. (An object store that ignores the
    precondition, such as the GCS emulator, cannot give that guarantee.)
    """
    name = claim_name(last_retrain)
    record = {"at": at, "run": run, "window": [window[0], window[1]], "after": last_retrain}
    data = json.dumps(record).encode()
    store = storage.Store(str(state_uri))
    try:
        store.write(name, data, overwrite=False)
        created = True
    except FileExistsError:
        created = False
    if not created:
        record = json.loads(store.read(name))
    claim = Claim(at=float(record["at"]), run=str(record["run"]), window=(float(record["window"][0]),
                                                                        float(record["window"][1])), name=name)
    if claim.run == run:
        # Kept so that a later run on the same window (with no cooldown to stop it) knows it was retrained on.
        store.write(_window_name(claim.as_last_retrain), json.dumps({"window": list(claim.window)}).encode())
    return claim.run == run, claim


# --------------------------------------------------------------------------- decision record


def decision_record(*, window: tuple[float, float], drift: Mapping[str, Any], new_images: int,
                    last_retrain: dict | None, now: float, policy: MonitorPolicy, decision: Decision,
                    run: str | None = None, validation: str = "", retraining_data: str | None = None) -> dict:
    """Everything one monitor run saw and decided, as JSON-ready data."""
    return {
        "format": "defectkit.monitor-decision/v1",
        "time": iso(now),
        "window": {"since": iso(window[0]), "until": iso(window[1])},
        "validation": {"passed": not validation, "problems": validation},
        "drift": {"drifted": bool(drift.get("drifted")), "drifted_features": list(drift.get("drifted_features", ()))},
        "new_images": new_images,
        "cooldown": {"last_retrain": last_retrain, "cooldown_s": policy.cooldown_s,
                     "elapsed_s": None if last_retrain is None else now - float(last_retrain["at"])},
        "policy": asdict(policy),
        "retrain": decision.retrain,
        "reasons": list(decision.reasons),
        "run": run,
        "retraining_data": retraining_data,
    }


def render_record(record: Mapping[str, Any]) -> str:
    verdict = "RETRAIN" if record["retrain"] else "no retraining"
    features = record["drift"]["drifted_features"]
    shown = ", ".join(features[:10]) + (f" and {len(features) - 10} more" if len(features) > 10 else "")
    lines = [f"# Drift monitor: {verdict}", "",
             f"Window {record['window']['since']} to {record['window']['until']}; "
             f"{record['new_images']} new production images.", "",
             f"- drift: {'yes' if record['drift']['drifted'] else 'no'}"
             + (f" ({shown})" if features else ""),
             f"- last retraining: {record['cooldown']['last_retrain'] or 'never'}", "",
             "## Why", ""]
    lines += [f"- {reason}" for reason in record["reasons"]]
    if record.get("validation", {}).get("problems"):
        lines += ["", "## Window validation", "", "```", record["validation"]["problems"], "```"]
    if record.get("run"):
        lines += ["", f"Retrained in run `{record['run']}`"]
    if record.get("retraining_data"):
        lines += [f"Retraining data: `{record['retraining_data']}`"]
    return "\n".join(lines) + "\n"


def write_record(record: Mapping[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """Write the record as JSON and Markdown into ``out_dir``; returns both paths."""
    return records.write(record, render_record(record), out_dir)


# --------------------------------------------------------------------------- retraining data


@dataclass(frozen=True)
class MergeResult:
    root: str
    added: dict[str, int]  # class -> production images added under train/
    skipped: int


def merge_for_retraining(base_root: str | Path, window_dir: Path, out_root: str | Path, *,
                         defect_class: str | None = None, labeler: Labeler | None = None) -> MergeResult:
    """Copy the base dataset (raw layout) to ``out_root`` and add the window's images under train/ (module docstring).

    ``window_dir`` is what :func:`defectkit.sampling.window_to_dataset` wrote.
    """
    if defect_class == GOOD:
        raise ValueError(f"defect_class must name a defect type, not {GOOD!r}")
    base, out = storage.Store(str(base_root)), storage.Store(str(out_root))
    names = base.list()
    if not names:
        raise ValueError(f"base dataset {base_root} is empty; give the training data's root")
    for name in names:
        out.write(name, base.read(name))
    window_dir = Path(window_dir)
    added: dict[str, int] = {}
    skipped = 0
    for line in (window_dir / SAMPLES_FILE).read_text().splitlines():
        sample = Sample.from_json(json.loads(line))
        if labeler is not None:
            label = labeler(sample)
        else:
            label = GOOD if sample.label == GOOD else defect_class
        if label is None:
            skipped += 1
            continue
        name = Path(sample.image).name
        out.write(f"train/{label}/{PRODUCTION_PREFIX}{name}", (window_dir / sample.image).read_bytes())
        added[label] = added.get(label, 0) + 1
    log.info("retraining data %s: %d base files, production images added %s, %d left out", out_root, len(names),
             added or "none", skipped)
    return MergeResult(str(out_root), added, skipped)


# --------------------------------------------------------------------------- acting on the decision


def act(*, drifted: bool, drifted_features: list[str], new_images: int, window: tuple[float, float],
        window_dir: Path, state_uri: str, policy: MonitorPolicy, base_dataset_uri: str, retraining_data_uri: str,
        run: str, defect_class: str | None = None, now: float | None = None,
        validation_problems: str = "", webhooks: str = "") -> dict[str, Any]:
    """Decide on retraining and, when it is due, merge the window into the training data for it.

    The merged data goes to a folder of its own under ``retraining_data_uri``
    (``retrain-YYYYmmdd-HHMMSS``, UTC; the record's ``retraining_data``), so that a recurring monitor never
    mixes two windows. ``run`` names the run that retrains on it (the monitor run, whose training
    sub-pipeline reads that folder); it is remembered for the cooldown.
    ``validation_problems`` is the window's validation failure message (empty: it passed).
    ``webhooks`` (:func:`defectkit.notify.webhooks_from`) hear of drift found and of a retraining started.
    Returns the decision record.
    """
    now = time.time() if now is None else now
    last = read_last_retrain(state_uri)
    taken: list[str] = []  # claims other runs hold, followed to the last retraining
    while True:
        decision = decide(drifted, new_images, None if last is None else float(last["at"]), now, policy,
                          window_valid=not validation_problems)
        if not decision.retrain:
            break
        if last is not None and last["run"] != run and window_of(state_uri, last) == tuple(window):
            decision = Decision(False, decision.reasons + (f"monitor run {last['run']} already retrained on this "
                                                           f"window (at {iso(float(last['at']))})",))
            break
        mine, claim = claim_retraining(state_uri, last, window, now, run)
        if mine:
            now = claim.at  # a retried run goes on with its first attempt's retraining (same time, same folder)
            break
        taken.append(f"monitor run {claim.run} claimed the retraining after "
                     f"{'none' if last is None else last['run']} at {iso(claim.at)} (window until "
                     f"{iso(claim.window[1])}): it is the last retraining")
        if claim.window == tuple(window):
            decision = Decision(False, decision.reasons + (f"monitor run {claim.run} already retrains on this "
                                                           f"window (claimed at {iso(claim.at)})",))
            break
        last = claim.as_last_retrain
    if taken:
        decision = Decision(decision.retrain, decision.reasons + tuple(taken))
    data_uri = None
    if decision.retrain:
        data_uri = retraining_data_folder(retraining_data_uri, now)
        merge_for_retraining(base_dataset_uri, Path(window_dir), data_uri, defect_class=defect_class)
        write_last_retrain(state_uri, now, run)
    record = decision_record(window=window, drift={"drifted": drifted, "drifted_features": list(drifted_features)},
                             new_images=new_images, last_retrain=last, now=now, policy=policy, decision=decision,
                             run=run if decision.retrain else None, validation=validation_problems,
                             retraining_data=data_uri)
    _announce(notify.webhooks_from(webhooks), drifted, drifted_features, window, decision, run, data_uri)
    return record


def _announce(webhooks: tuple[notify.Webhook, ...], drifted: bool, drifted_features: list[str],
              window: tuple[float, float], decision: Decision, run: str, data_uri: str | None) -> None:
    if not webhooks:
        return
    span = f"{iso(window[0])} to {iso(window[1])}"
    if drifted:
        notify.notify(webhooks, notify.DRIFT, f"drift in production images ({', '.join(drifted_features) or 'embeddings'})",
                      window=span, features=", ".join(drifted_features), retraining="yes" if decision.retrain else "no",
                      reasons="; ".join(decision.reasons))
    if decision.retrain:
        notify.notify(webhooks, notify.RETRAINING, f"retraining started by monitor run {run}", window=span,
                      run=run, data=data_uri)


def retraining_data_folder(root: str, now: float) -> str:
    """Where one retraining's merged data goes: a folder named by the time, under ``root``."""
    return f"{str(root).rstrip('/')}/retrain-{datetime.fromtimestamp(now, timezone.utc):%Y%m%d-%H%M%S}"
