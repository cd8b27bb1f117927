"""The rollout state, rewritten after every transition of a delivery, and the stores that keep it.

The state is what makes a delivery resumable. Its invariant: ``weight`` is the canary
traffic the backend actually has. A traffic change is therefore written twice: first
the intent (``target_weight``, phase ``stepping``), then, once the backend confirmed the
new split, the weight itself. A reader that finds ``target_weight`` set knows the actual
traffic is either ``weight`` or ``target_weight``, and reconciles with the backend.

A store is anything with ``load`` and ``save`` (:class:`RolloutStore`). The local backend
keeps a file (:class:`StateStore`): writes go to a temporary file in the same directory,
are fsynced, then renamed over the state file (``os.replace``, atomic on POSIX) and the
directory is fsynced, so a crash leaves either the old state or the new one. On a
cluster the state lives beside the InferenceService
(:class:`defectkit.delivery.kserve.state.ConfigMapStore`), where a retried step or the exit
handler, in another pod, finds it.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from defectkit.decision_record import iso
from defectkit.files import write_json_atomic

FORMAT = "defectkit.rollout/v1"

DEPLOYING = "deploying"
PROBING = "probing"
STEPPING = "stepping"
ANALYSING = "analysing"
PROMOTING = "promoting"
PROMOTED = "promoted"
ROLLING_BACK = "rolling_back"
ROLLED_BACK = "rolled_back"
FAILED = "failed"
PHASES = (DEPLOYING, PROBING, STEPPING, ANALYSING, PROMOTING, PROMOTED, ROLLING_BACK, ROLLED_BACK, FAILED)
TERMINAL = frozenset({PROMOTED, ROLLED_BACK, FAILED})


@dataclass
class RolloutState:
    """Where one delivery of ``candidate`` stands.

    ``step_index`` points into the policy's analysed steps (-1 before the first);
    ``weight`` is the confirmed canary percent and ``target_weight`` a requested one not yet
    confirmed. ``analyses`` holds every analysis with its figures, ``timeline`` every
    transition, ``probe`` the golden-image probe's result and ``reference_stable`` the last
    stable window with enough requests to compare against (the stable version gets little
    traffic at high canary weights). Times are Unix seconds (wall clock, so they survive a
    restart).
    """

    candidate: str
    backend: str
    policy: dict[str, Any]
    candidate_version: str | None = None
    stable: str | None = None
    phase: str = DEPLOYING
    step_index: int = -1
    weight: int = 0
    target_weight: int | None = None
    failed_checks: int = 0
    inconclusive: int = 0
    hold_started_at: float | None = None
    next_analysis_at: float | None = None
    reference_stable: dict[str, Any] | None = None
    probe: dict[str, Any] | None = None
    analyses: list[dict[str, Any]] = field(default_factory=list)
    timeline: list[dict[str, Any]] = field(default_factory=list)
    reason: str | None = None
    error: str | None = None
    started_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    format: str = FORMAT

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ValueError(f"rollout phase {self.phase!r} is not one of {', '.join(PHASES)}")
        if self.format != FORMAT:
            raise ValueError(f"rollout state format {self.format!r} is not {FORMAT!r}; written by another defectkit?")

    @property
    def terminal(self) -> bool:
        return self.phase in TERMINAL

    def event(self, what: str, **details: Any) -> None:
        """Append to the timeline: what happened, the phase and the confirmed weight at that moment."""
        now = time.time()
        self.updated_at = now
        self.timeline.append({"t": now, "at": iso(now), "phase": self.phase, "weight": self.weight,
                              "event": what, **details})

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> RolloutState:
        unknown = set(record) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown rollout state keys {sorted(unknown)}; written by a newer defectkit?")
        return cls(**record)


class StateConflict(RuntimeError):
    """Another writer changed the stored state since this one read it: two processes drive one delivery."""


class RolloutStore(Protocol):
    """Where a delivery's state lives; ``where`` names it in messages."""

    @property
    def where(self) -> str: ...

    def load(self) -> RolloutState | None:
        """The stored state; None when no delivery was recorded."""

    def save(self, state: RolloutState) -> None:
        """Store ``state``; raises StateConflict when someone else wrote it since this store last read or wrote."""


class StateStore:
    """The state file of a delivery."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @property
    def where(self) -> str:
        return str(self.path)

    def load(self) -> RolloutState | None:
        """The persisted state; None when no delivery was started here."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        try:
            return RolloutState.from_json(json.loads(text))
        except (json.JSONDecodeError, TypeError, ValueError) as exc:
            raise ValueError(f"rollout state {self.path} is unreadable ({exc}); inspect it, then move it away to "
                             f"start a new delivery") from exc

    def save(self, state: RolloutState) -> None:
        state.updated_at = time.time()
        write_json_atomic(self.path, state.to_json())


StoreOrPath = RolloutStore | Path | str


def as_store(where: StoreOrPath) -> RolloutStore:
    """``where`` itself if it is a store, else the state file at that path."""
    return StateStore(Path(where)) if isinstance(where, (str, Path)) else where
