"""The stack file: which router, stable and canary processes serve from a work directory.

    <work>/serving/stack.json    router, stable and canary processes: PIDs, ports, models
    <work>/serving/router.json   the router's routing state (survives a router restart)
    <work>/serving/*.log         each process's output

``stack_status`` reports the processes it lists and ``stop_stack`` ends them.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

from defectkit.delivery.backend import CANARY, STABLE, BackendError
from defectkit.delivery.local.processes import ServerInfo, alive, stop_process
from defectkit.files import write_json_atomic

log = logging.getLogger(__name__)

STACK_DIR = "serving"
STACK_FILE = "stack.json"
ROUTER_STATE_FILE = "router.json"
STACK_FORMAT = "defectkit.stack/v1"
ROUTER = "router"


def stack_dir(work_dir: Path) -> Path:
    return Path(work_dir) / STACK_DIR


@dataclass
class Stack:
    router: ServerInfo | None = None
    stable: ServerInfo | None = None
    canary: ServerInfo | None = None
    candidate: str | None = None  # the model last deployed as a candidate
    format: str = STACK_FORMAT

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> Stack:
        if record.get("format") != STACK_FORMAT:
            raise ValueError(f"stack file format {record.get('format')!r} is not {STACK_FORMAT!r}")
        servers = {role: ServerInfo.from_json(record[role]) if record.get(role) else None
                   for role in (ROUTER, STABLE, CANARY)}
        return cls(**servers, candidate=record.get("candidate"))


@contextlib.contextmanager
def locked(work_dir: Path) -> Iterator[None]:
    """One writer of the stack at a time (a delivery, a stop)."""
    directory = stack_dir(work_dir)
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def read_stack(work_dir: Path) -> Stack | None:
    path = stack_dir(work_dir) / STACK_FILE
    try:
        return Stack.from_json(json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, TypeError, ValueError) as exc:
        raise BackendError(f"stack file {path} is unreadable ({exc}); stop the processes it lists by hand and "
                           f"remove it") from exc


def write_stack(work_dir: Path, stack: Stack) -> None:
    write_json_atomic(stack_dir(work_dir) / STACK_FILE, stack.to_json())


def stack_status(work_dir: Path) -> dict[str, Any] | None:
    """Each process of the stack with whether it runs; None when no stack was started in ``work_dir``."""
    stack = read_stack(work_dir)
    if stack is None:
        return None
    return {role: None if info is None else {**asdict(info), "running": alive(info)}
            for role, info in ((ROUTER, stack.router), (STABLE, stack.stable), (CANARY, stack.canary))}


def stop_stack(work_dir: Path, timeout_s: float = 15.0) -> bool:
    """Stop the local serving stack of ``work_dir`` (router first, then the model servers); False if none ran."""
    with locked(work_dir):
        stack = read_stack(work_dir)
        if stack is None:
            return False
        stopped = [stop_process(info, timeout_s) for info in (stack.router, stack.canary, stack.stable)]
        (stack_dir(work_dir) / STACK_FILE).unlink(missing_ok=True)
        (stack_dir(work_dir) / ROUTER_STATE_FILE).unlink(missing_ok=True)
    log.info("local serving stack in %s stopped", stack_dir(work_dir))
    return any(stopped)
