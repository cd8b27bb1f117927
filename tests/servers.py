"""Real servers for tests: started on 127.0.0.1, waited for, stopped by PID."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class ServerProcess:
    process: subprocess.Popen
    url: str
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self, timeout: float = 10.0) -> None:
        if self.process.poll() is not None:
            return
        # Own process group: the server's children (workers) go with it.
        os.killpg(self.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.pid, signal.SIGKILL)
            self.process.wait(timeout)


def start_server(cmd: list[str], *, url: str, health_path: str, log_path: Path, env: dict | None = None,
                 timeout: float = 60.0) -> ServerProcess:
    """Start ``cmd`` and wait until GET url+health_path answers 2xx."""
    log_file = log_path.open("wb")
    process = subprocess.Popen(
        cmd, stdout=log_file, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, start_new_session=True
    )
    server = ServerProcess(process, url, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{cmd[0]} exited with {process.returncode}: {log_path.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url + health_path, timeout=1) as response:
                if 200 <= response.status < 300:
                    return server
        except OSError:
            time.sleep(0.2)
    server.stop()
    raise TimeoutError(f"{cmd[0]} not healthy at {url}{health_path} after {timeout}s: {log_path.read_text()[-2000:]}")
