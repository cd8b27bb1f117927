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

One delivery per service at a time: a store that can (``StateStore``) is *held* by the
process that drives the delivery (:meth:`StateStore.hold`, an advisory lock the kernel
releases when that process dies, SIGKILL included), so a second delivery started at the
same moment is refused at once instead of finding no state and starting its own; and a
save compares the stored state with the one this store last read or wrote, so a writer that
does not hold the delivery still cannot overwrite another's progress unnoticed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Iterator
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
    traffic at high canary weights). ``evidence`` is the offline evaluation the candidate
    was judged by (:func:`defectkit.delivery.record.evidence_of`), shown in the decision record;
    ``shadow`` the verdict of the shadow replay (:func:`defectkit.delivery.shadow.judge`);
    ``approval`` the requests to the approval gate and its answer (:mod:`defectkit.delivery.approval`). Times are Unix seconds (wall clock, so they survive a
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
    evidence: dict[str, Any] | None = None
    shadow: dict[str, Any] | None = None
    approval: dict[str, Any] | None = None
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


class RolloutInProgress(ValueError):
    """Another delivery to the same service is unfinished, or running right now (the request conflicts with it)."""


def _try_lock(fd: int) -> bool:
    """An exclusive flock on ``fd`` if it is free now; False when another open file holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            return False
        raise
    return True


@contextlib.contextmanager
def delivery_lock(path: Path, what: str) -> Iterator[None]:
    """Hold the exclusive lock at ``path`` (a file, or a directory) for the block, or raise RolloutInProgress
    at once.

    ``what`` names the thing locked in the message (e.g. "the local service of runs"). The lock
    is an ``flock``, which the kernel drops with its holder's last file descriptor, so a killed
    delivery leaves nothing to clean up and its resumption is not refused. A lock file is never
    removed (removing it would let two processes lock two different files); it records who holds
    it, for the message.
    """
    path = Path(path)
    directory = path.is_dir()
    if not directory:
        path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDONLY if directory else os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if not _try_lock(fd):
            holder = "" if directory else os.pread(fd, 200, 0).decode(errors="replace").strip()
            raise RolloutInProgress(f"a delivery to {what} is running right now ({holder or 'another process'} "
                                    f"holds {path}); one delivery per service at a time: wait for it to finish, "
                                    f"then deliver again")
        if not directory:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()}, since {iso(time.time())}".encode(), 0)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


class RolloutStore(Protocol):
    """Where a delivery's state lives; ``where`` names it in messages."""

    @property
    def where(self) -> str: ...

    def load(self) -> RolloutState | None:
        """The stored state; None when no delivery was recorded."""

    def save(self, state: RolloutState) -> None:
        """Store ``state``; raises StateConflict when someone else wrote it since this store last read or wrote."""


_UNREAD = "unread"


class StateStore:
    """The state file of a delivery.

    The lock that :meth:`hold` takes is on the file's directory (the file itself is replaced
    on every save, so a lock on it would not last), which therefore holds one delivery.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        # sha256 of the file as this store last read or wrote it; None: there was none; _UNREAD: never looked.
        self._seen: str | None = _UNREAD
        self._holding = False

    @property
    def where(self) -> str:
        return str(self.path)

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Exclusive for the whole delivery: a second holder (another process, or another store here) is refused
        with RolloutInProgress."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with delivery_lock(self.path.parent, f"the delivery recorded in {self.path}"):
            self._holding = True
            try:
                yield
            finally:
                self._holding = False

    def _read(self) -> bytes | None:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return None

    def load(self) -> RolloutState | None:
        """The persisted state; None when no delivery was started here."""
        data = self._read()
        self._seen = None if data is None else hashlib.sha256(data).hexdigest()
        if data is None:
            return None
        try:
            return RolloutState.from_json(json.loads(data))
        except (json.JSONDecodeError, TypeError, ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"rollout state {self.path} is unreadable ({exc}); inspect it, then move it away to "
                             f"start a new delivery") from exc

    def save(self, state: RolloutState) -> None:
        """Replace the state file, unless another writer changed it since this store last read or wrote it, or
        another process holds the delivery (:meth:`hold`)."""
        state.updated_at = time.time()
        if self._holding:
            self._compare_and_write(state)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            if not _try_lock(fd):
                raise StateConflict(f"{self.path} is held by another process driving a delivery to this service; "
                                    "this one did not write it")
            try:
                self._compare_and_write(state)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def _compare_and_write(self, state: RolloutState) -> None:
        current = self._read()
        found = None if current is None else hashlib.sha256(current).hexdigest()
        if self._seen != _UNREAD and found != self._seen:
            raise StateConflict(f"{self.path} was {'created' if self._seen is None else 'changed'} by another "
                                f"process since this one {'found none' if self._seen is None else 'read it'}: "
                                "another delivery to this service is running (or ran meanwhile)")
        write_json_atomic(self.path, state.to_json())
        written = self._read()
        self._seen = None if written is None else hashlib.sha256(written).hexdigest()


StoreOrPath = RolloutStore | Path | str


def as_store(where: StoreOrPath) -> RolloutStore:
    """``where`` itself if it is a store, else the state file at that path."""
    return StateStore(Path(where)) if isinstance(where, (str, Path)) else where
