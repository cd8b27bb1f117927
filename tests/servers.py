"""Real servers for tests: started on 127.0.0.1, waited for, stopped by PID."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import yaml


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


def start_s3_server(log_path: Path) -> ServerProcess:
    """The S3 test server (moto, with S3's atomic conditional writes: tests/s3_server.py) on 127.0.0.1."""
    port = free_port()
    return start_server([sys.executable, "-m", "tests.s3_server", "-H", "127.0.0.1", "-p", str(port)],
                        url=f"http://127.0.0.1:{port}", health_path="/moto-api/", log_path=log_path,
                        env={"PYTHONPATH": str(Path(__file__).resolve().parents[1])})


def start_mlflow_server(root: Path, *, port: int | None = None, default_artifact_root: str | None = None,
                        log_name: str = "server.log", timeout: float = 120.0) -> ServerProcess:
    """An MLflow tracking server on 127.0.0.1 over sqlite in ``root``: it serves the artifacts it keeps in
    ``root/artifacts``, or clients write them to ``default_artifact_root`` (an s3:// bucket) themselves."""
    port = port or free_port()
    artifacts = (["--default-artifact-root", default_artifact_root] if default_artifact_root
                 else ["--artifacts-destination", str(root / "artifacts")])
    return start_server(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         *artifacts, "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        url=f"http://127.0.0.1:{port}", health_path="/health", log_path=root / log_name,
        # Job execution (GenAI jobs) would start seven huey consumer processes: CPU a registry never uses.
        env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, timeout=timeout,
    )


@dataclass(frozen=True)
class PodTarget:
    """A server on 127.0.0.1 that Prometheus scrapes as if it ran in a Kubernetes pod with these labels."""

    address: str  # host:port
    namespace: str
    pod: str
    labels: Mapping[str, str]  # the pod's Kubernetes labels, e.g. {"serving.kserve.io/inferenceservice": "defect"}


def _pod_meta_labels(target: PodTarget) -> dict[str, str]:
    """The __meta_kubernetes_* labels Prometheus' Kubernetes pod discovery gives ``target``; it writes each pod
    label's name with every character outside [a-zA-Z0-9_] as "_"."""
    labels = {"__meta_kubernetes_namespace": target.namespace, "__meta_kubernetes_pod_name": target.pod}
    for name, value in target.labels.items():
        labels["__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", name)] = value
    return labels


def prometheus_config(targets: Sequence[PodTarget], scrape_interval_s: float) -> dict:
    """A prometheus.yml scraping ``targets`` every ``scrape_interval_s``, relabelled as on a cluster.

    Static targets carry the meta labels Kubernetes pod discovery would give them, and the
    relabelling is that of the ``kubernetes-pods`` job in Prometheus' example configuration
    (documentation/examples/prometheus-kubernetes.yml): pod labels mapped with
    ``labelmap: __meta_kubernetes_pod_label_(.+)``, plus ``namespace`` and ``pod``. Labels
    starting with ``__`` are dropped after relabelling, as on a cluster.
    """
    interval = f"{int(scrape_interval_s * 1000)}ms"
    return {
        "global": {"scrape_interval": interval, "scrape_timeout": interval},
        "scrape_configs": [{
            "job_name": "kubernetes-pods",
            "static_configs": [{"targets": [t.address], "labels": _pod_meta_labels(t)} for t in targets],
            "relabel_configs": [
                {"action": "labelmap", "regex": "__meta_kubernetes_pod_label_(.+)"},
                {"source_labels": ["__meta_kubernetes_namespace"], "action": "replace", "target_label": "namespace"},
                {"source_labels": ["__meta_kubernetes_pod_name"], "action": "replace", "target_label": "pod"},
            ],
        }],
    }


def start_prometheus(directory: Path, targets: Sequence[PodTarget], scrape_interval_s: float) -> ServerProcess:
    """The ``prometheus`` on PATH, on 127.0.0.1 with its data in ``directory``, scraping ``targets``."""
    config = directory / "prometheus.yml"
    config.write_text(yaml.safe_dump(prometheus_config(targets, scrape_interval_s), sort_keys=False))
    port = free_port()
    return start_server(
        ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={directory / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        url=f"http://127.0.0.1:{port}", health_path="/-/ready", log_path=directory / "prometheus.log",
    )
