"""The stack's processes: model servers and the router, started detached and stopped by PID.

A process runs in a session of its own, so it keeps serving when the delivery that
started it stops or is killed. A PID is trusted only together with the process start
time recorded beside it, so a reused PID is never signalled.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from defectkit.delivery.backend import BackendError

log = logging.getLogger(__name__)

SERVE_COMMAND = (sys.executable, "-m", "defectkit", "serve")
READY_PATH = "/v2/health/ready"


@dataclass(frozen=True)
class ServerInfo:
    """One process of the stack."""

    role: str
    pid: int
    create_time: float
    port: int
    url: str
    log: str
    model: str | None = None
    args: tuple[str, ...] = ()
    started_at: float = 0.0

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> ServerInfo:
        return cls(**{**record, "args": tuple(record.get("args") or ())})


_children: dict[int, subprocess.Popen] = {}


def alive(info: ServerInfo | None) -> bool:
    """Whether the process recorded in ``info`` (the same one: PID and start time) still runs."""
    if info is None:
        return False
    child = _children.get(info.pid)
    if child is not None and child.poll() is not None:
        return False
    import psutil

    try:
        process = psutil.Process(info.pid)
        return abs(process.create_time() - info.create_time) < 0.01 and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def spawn(role: str, command: Sequence[str], *, port: int, host: str, log_path: Path, model: str | None,
          args: Sequence[str]) -> ServerInfo:
    import psutil

    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log_file:
        # A session of its own: signals to the delivery's process group (Ctrl-C, a killed step) leave it running.
        process = subprocess.Popen(list(command), stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                                   start_new_session=True, close_fds=True)
    _children[process.pid] = process
    try:
        create_time = psutil.Process(process.pid).create_time()
    except psutil.Error:
        create_time = 0.0
    info = ServerInfo(role=role, pid=process.pid, create_time=create_time, port=port, url=f"http://{host}:{port}",
                      log=str(log_path), model=model, args=tuple(args), started_at=time.time())
    log.info("started %s (pid %d) on %s: %s", role, process.pid, info.url, " ".join(command))
    return info


def log_tail(info: ServerInfo, size: int = 2000) -> str:
    try:
        with open(info.log, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - size))
            return f.read().decode(errors="replace")
    except OSError:
        return "(no log)"


def wait_ready(info: ServerInfo, path: str, timeout_s: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        if not alive(info):
            raise BackendError(f"{info.role} server (pid {info.pid}) exited while starting; its log {info.log} "
                               f"ends:\n{log_tail(info)}")
        try:
            if httpx.get(info.url + path, timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            stop_process(info)
            raise BackendError(f"{info.role} server (pid {info.pid}) not ready at {info.url}{path} within "
                               f"{timeout_s:g} s; its log {info.log} ends:\n{log_tail(info)}")
        time.sleep(0.1)


def start_model_server(role: str, model: str, *, log_dir: Path, args: Sequence[str] = (), host: str = "127.0.0.1",
                       name: str = "defectkit", command: Sequence[str] = SERVE_COMMAND,
                       timeout_s: float = 180.0) -> ServerInfo:
    """A ``defectkit serve`` process for ``model`` on a free port, returned once it is ready."""
    port = free_port(host)
    full = [*command, "--model", model, "--port", str(port), "--host", host, "--served-name", name, *args]
    info = spawn(role, full, port=port, host=host, model=model, args=tuple(args),
                 log_path=Path(log_dir) / f"{role}-{port}.log")
    wait_ready(info, READY_PATH, timeout_s)
    return info


def stop_process(info: ServerInfo | None, timeout_s: float = 15.0) -> bool:
    """SIGTERM ``info``'s process group, SIGKILL after ``timeout_s``; False when it was not running."""
    if not alive(info):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.killpg(info.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while alive(info):
        if time.monotonic() > deadline:
            log.warning("%s (pid %d) ignored SIGTERM for %g s; killing it", info.role, info.pid, timeout_s)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(info.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    child = _children.pop(info.pid, None)
    if child is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout_s)
    log.info("stopped %s (pid %d) on %s", info.role, info.pid, info.url)
    return True
