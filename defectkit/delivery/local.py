"""The local serving stack, the embedded default backend: model servers on 127.0.0.1 behind a weighted router.

    <work>/serving/stack.json    router, stable and canary processes: PIDs, ports, models
    <work>/serving/router.json   the router's routing state (survives a router restart)
    <work>/serving/*.log         each process's output

The processes run detached (a session of their own), so the stack keeps serving, at the
split it had, when the delivery that started it stops or is killed; ``stop_stack`` (the
``defectkit serve --stop`` command) ends it. A PID is trusted only together with the
process start time recorded beside it, so a reused PID is never signalled.

Metrics come from each server's ``/metrics``, scraped every ``scrape_interval_s`` by a
background thread; the figures of a window are the differences between the newest scrape
and the last one taken at least ``window_s`` before it, as Prometheus' ``increase`` does.
Latency quantiles are interpolated within histogram buckets as ``histogram_quantile`` does,
and scores are sampled from the score histogram as the KServe backend samples them.

Servers are never stopped while the router still sends them requests: traffic moves
first, then in-flight requests drain, then the process gets SIGTERM.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

from defectkit.delivery.backend import CANARY, EMPTY, STABLE, BackendError, VariantMetrics
from defectkit.files import write_json_atomic

log = logging.getLogger(__name__)

STACK_DIR = "serving"
STACK_FILE = "stack.json"
ROUTER_STATE_FILE = "router.json"
STACK_FORMAT = "defectkit.stack/v1"
ROUTER = "router"
SERVE_COMMAND = (sys.executable, "-m", "defectkit", "serve")
ROUTER_COMMAND = (sys.executable, "-m", "defectkit.delivery.router")
READY_PATH = "/v2/health/ready"
ROUTER_HEALTH_PATH = "/router/health"
ROUTER_CONFIG_PATH = "/router/config"
HISTORY_S = 900.0
PROBE_BATCH = 16
REQUESTS_METRIC = "defectkit_requests"
LATENCY_METRIC = "defectkit_request_latency_seconds"
SCORE_METRIC = "defectkit_score"


def stack_dir(work_dir: Path) -> Path:
    return Path(work_dir) / STACK_DIR


# --------------------------------------------------------------------------- processes


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


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def _spawn(role: str, command: Sequence[str], *, port: int, host: str, log_path: Path, model: str | None,
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


def _log_tail(info: ServerInfo, size: int = 2000) -> str:
    try:
        with open(info.log, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - size))
            return f.read().decode(errors="replace")
    except OSError:
        return "(no log)"


def _wait_ready(info: ServerInfo, path: str, timeout_s: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        if not alive(info):
            raise BackendError(f"{info.role} server (pid {info.pid}) exited while starting; its log {info.log} "
                               f"ends:\n{_log_tail(info)}")
        try:
            if httpx.get(info.url + path, timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            stop_process(info)
            raise BackendError(f"{info.role} server (pid {info.pid}) not ready at {info.url}{path} within "
                               f"{timeout_s:g} s; its log {info.log} ends:\n{_log_tail(info)}")
        time.sleep(0.1)


def start_model_server(role: str, model: str, *, log_dir: Path, args: Sequence[str] = (), host: str = "127.0.0.1",
                       name: str = "defectkit", command: Sequence[str] = SERVE_COMMAND,
                       timeout_s: float = 180.0) -> ServerInfo:
    """A ``defectkit serve`` process for ``model`` on a free port, returned once it is ready."""
    port = free_port(host)
    full = [*command, "--model", model, "--port", str(port), "--host", host, "--name", name, *args]
    info = _spawn(role, full, port=port, host=host, model=model, args=tuple(args),
                  log_path=Path(log_dir) / f"{role}-{port}.log")
    _wait_ready(info, READY_PATH, timeout_s)
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


# --------------------------------------------------------------------------- the stack file


@contextlib.contextmanager
def _locked(work_dir: Path) -> Iterator[None]:
    """One writer of the stack at a time (a delivery, ``serve --stop``)."""
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


def _write_stack(work_dir: Path, stack: Stack) -> None:
    write_json_atomic(stack_dir(work_dir) / STACK_FILE, stack.to_json())


def stack_status(work_dir: Path) -> dict[str, Any] | None:
    """Each process of the stack with whether it runs; None when no stack was started in ``work_dir``."""
    stack = read_stack(work_dir)
    if stack is None:
        return None
    return {role: None if info is None else {**asdict(info), "running": alive(info)}
            for role, info in ((ROUTER, stack.router), (STABLE, stack.stable), (CANARY, stack.canary))}


def stop_stack(work_dir: Path, timeout_s: float = 15.0) -> bool:
    """Stop the local serving stack of ``work_dir`` (router first, then the model servers); False if none ran.

    The command behind ``defectkit serve --stop``.
    """
    with _locked(work_dir):
        stack = read_stack(work_dir)
        if stack is None:
            return False
        stopped = [stop_process(info, timeout_s) for info in (stack.router, stack.canary, stack.stable)]
        (stack_dir(work_dir) / STACK_FILE).unlink(missing_ok=True)
        (stack_dir(work_dir) / ROUTER_STATE_FILE).unlink(missing_ok=True)
    log.info("local serving stack in %s stopped", stack_dir(work_dir))
    return any(stopped)


# --------------------------------------------------------------------------- metrics


Buckets = tuple[tuple[float, float], ...]  # (le, cumulative count), ascending


@dataclass(frozen=True)
class Snapshot:
    """Cumulative counters of one server at one moment."""

    t: float
    requests: float
    errors: float
    latency: Buckets
    scores: Buckets


def parse_metrics(text: str, t: float) -> Snapshot:
    """The defectkit_* counters of a /metrics page, summed over model versions (one server is one variant)."""
    from prometheus_client.parser import text_string_to_metric_families

    requests = errors = 0.0
    latency: dict[float, float] = {}
    scores: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == REQUESTS_METRIC:
            for sample in family.samples:
                if sample.name == REQUESTS_METRIC + "_total":
                    requests += sample.value
                    if sample.labels.get("status", "").startswith("5"):
                        errors += sample.value
        elif family.name in (LATENCY_METRIC, SCORE_METRIC):
            buckets = latency if family.name == LATENCY_METRIC else scores
            for sample in family.samples:
                if sample.name == family.name + "_bucket":
                    le = float(sample.labels["le"])
                    buckets[le] = buckets.get(le, 0.0) + sample.value
    return Snapshot(t, requests, errors, tuple(sorted(latency.items())), tuple(sorted(scores.items())))


def _bucket_increase(now: Buckets, base: Buckets) -> list[tuple[float, float]]:
    before = dict(base)
    return [(le, max(count - before.get(le, 0.0), 0.0)) for le, count in now]


def histogram_quantile(q: float, cumulative: Sequence[tuple[float, float]]) -> float | None:
    """Prometheus' histogram_quantile over (le, cumulative count) pairs; None when the histogram is empty."""
    buckets = sorted(cumulative)
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for index, (le, count) in enumerate(buckets):
        if count >= rank:
            if math.isinf(le):
                return buckets[index - 1][0] if index > 0 else None
            if count == below:
                return le
            return lower + (le - lower) * (rank - below) / (count - below)
        lower, below = le, count
    return buckets[-1][0]


def window_metrics(now: Snapshot, base: Snapshot) -> VariantMetrics:
    """What a server answered between two snapshots."""
    from defectkit.delivery.prometheus import scores_from_buckets

    # A counter lower than before means the server restarted; as Prometheus does, count from zero.
    reset = now.requests < base.requests
    if reset:
        base = Snapshot(base.t, 0.0, 0.0, (), ())
    latency = _bucket_increase(now.latency, base.latency)
    return VariantMetrics(
        requests=now.requests - base.requests,
        errors=max(now.errors - base.errors, 0.0),
        p50_latency_s=histogram_quantile(0.5, latency),
        p99_latency_s=histogram_quantile(0.99, latency),
        scores=tuple(scores_from_buckets(_bucket_increase(now.scores, base.scores))),
    )


class Scraper:
    """Scrapes the stable and canary servers in a background thread and keeps their recent snapshots."""

    def __init__(self, interval_s: float, timeout_s: float = 5.0) -> None:
        import httpx

        self.interval_s = interval_s
        self._client = httpx.Client(timeout=timeout_s)
        self._targets: dict[str, ServerInfo] = {}
        self._history: dict[tuple[int, float], deque[Snapshot]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def watch(self, targets: dict[str, ServerInfo | None]) -> None:
        with self._lock:
            self._targets = {role: info for role, info in targets.items() if info is not None}
            keep = {(info.pid, info.create_time) for info in self._targets.values()}
            self._history = {key: snaps for key, snaps in self._history.items() if key in keep}
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="scraper", daemon=True)
            self._thread.start()

    def scrape(self, info: ServerInfo) -> Snapshot:
        import httpx

        try:
            response = self._client.get(info.url + "/metrics")
            response.raise_for_status()
        except httpx.HTTPError as exc:
            raise BackendError(f"cannot scrape the {info.role} server's metrics at {info.url}/metrics: {exc}") from exc
        snapshot = parse_metrics(response.text, time.monotonic())
        with self._lock:
            history = self._history.setdefault((info.pid, info.create_time),
                                               deque(maxlen=int(HISTORY_S / self.interval_s) + 2))
            history.append(snapshot)
        return snapshot

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            with self._lock:
                targets = list(self._targets.values())
            for info in targets:
                try:
                    self.scrape(info)
                except BackendError as exc:
                    log.debug("%s", exc)

    def window(self, info: ServerInfo, window_s: float) -> VariantMetrics:
        """The server's figures over the last ``window_s`` (shorter when it has been scraped for less time)."""
        now = self.scrape(info)
        with self._lock:
            history = list(self._history.get((info.pid, info.create_time), ()))
        older = [s for s in history if s.t <= now.t - window_s]
        base = older[-1] if older else history[0]
        return window_metrics(now, base)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval_s + 5)
        self._client.close()


# --------------------------------------------------------------------------- the backend


@dataclass(frozen=True)
class StackOptions:
    """How the stack's processes are started.

    ``server_args`` go to every model server (e.g. ``("--threads", "1")``);
    ``candidate_args`` to candidate servers only (the fault injection options rehearse a
    bad candidate). ``router_port`` 0 picks a free port on first start, then keeps it.
    """

    host: str = "127.0.0.1"
    model_name: str = "defectkit"
    tracking_uri: str | None = None
    router_port: int = 0
    server_args: tuple[str, ...] = ()
    candidate_args: tuple[str, ...] = ()
    serve_command: tuple[str, ...] = SERVE_COMMAND
    router_command: tuple[str, ...] = ROUTER_COMMAND
    start_timeout_s: float = 180.0
    drain_timeout_s: float = 30.0
    scrape_interval_s: float = 1.0
    stop_timeout_s: float = 15.0


class LocalBackend:
    """The delivery Backend over the local stack of ``work_dir``."""

    def __init__(self, work_dir: Path, options: StackOptions = StackOptions()) -> None:
        import httpx

        self.work_dir = Path(work_dir).resolve()
        self.options = options
        self._http = httpx.Client(timeout=30.0)
        self._scraper: Scraper | None = None

    def __repr__(self) -> str:
        return f"LocalBackend({stack_dir(self.work_dir)})"

    # ------------------------------------------------------------------ stack lifecycle

    @property
    def url(self) -> str:
        """The router's address: where clients send inference requests."""
        stack = self._stack()
        return stack.router.url

    def stack(self) -> Stack | None:
        return read_stack(self.work_dir)

    def ensure_stack(self, stable_model: str | None, *, first_deployment: bool = False) -> Stack:
        """Start whatever of router and stable server is not running; the stable server serves the model the
        stack last had as stable, else ``stable_model``. Returns the running stack.

        ``first_deployment`` records ``stable_model`` as the candidate too, so that traffic()
        reports the 100% it gets when a first deployment starts the stack with it.
        """
        with _locked(self.work_dir):
            stack = read_stack(self.work_dir) or Stack()
            if not alive(stack.stable):
                model = stack.stable.model if stack.stable is not None else stable_model
                if model is None:
                    raise BackendError(f"no local serving stack runs in {stack_dir(self.work_dir)} and no stable "
                                       "model was given to start one with")
                if stack.stable is not None:
                    log.warning("the stable server (pid %d) is not running; starting it again", stack.stable.pid)
                stack.stable = self._start_server(STABLE, model)
                if first_deployment:
                    stack.candidate = model
                _write_stack(self.work_dir, stack)
            if stack.canary is not None and not alive(stack.canary):
                log.warning("the canary server (pid %d) is not running any more; it gets no traffic",
                            stack.canary.pid)
                stack.canary = None
            if not alive(stack.router):
                stack.router = self._start_router(stack)
                _write_stack(self.work_dir, stack)
            config = self._router_config(stack)
            expected_canary = stack.canary.url if stack.canary else None
            if config["stable"] != stack.stable.url or config["canary"] != expected_canary:
                weight = config["weight"] if expected_canary and config["canary"] == expected_canary else 0
                self._put_config(stack, stable=stack.stable.url, canary=expected_canary, weight=weight)
            _write_stack(self.work_dir, stack)
        self._watch(stack)
        log.info("local serving stack: router %s, stable %s (%s)%s", stack.router.url, stack.stable.url,
                 stack.stable.model, f", canary {stack.canary.url} ({stack.canary.model})" if stack.canary else "")
        return stack

    def _server_args(self, role: str) -> tuple[str, ...]:
        options = self.options
        args = list(options.server_args) + (list(options.candidate_args) if role == CANARY else [])
        if options.tracking_uri:
            args += ["--tracking-uri", options.tracking_uri]
        return tuple(args)

    def _start_server(self, role: str, model: str) -> ServerInfo:
        options = self.options
        return start_model_server(role, model, log_dir=stack_dir(self.work_dir), args=self._server_args(role),
                                  host=options.host, name=options.model_name, command=options.serve_command,
                                  timeout_s=options.start_timeout_s)

    def _start_router(self, stack: Stack) -> ServerInfo:
        options = self.options
        port = options.router_port
        if not port and stack.router is not None and _port_free(options.host, stack.router.port):
            port = stack.router.port  # the address clients were given stays the same
        port = port or free_port(options.host)
        command = [*options.router_command, "--port", str(port), "--host", options.host,
                   "--state", str(stack_dir(self.work_dir) / ROUTER_STATE_FILE), "--stable", stack.stable.url]
        info = _spawn(ROUTER, command, port=port, host=options.host, model=None, args=(),
                      log_path=stack_dir(self.work_dir) / f"router-{port}.log")
        _wait_ready(info, ROUTER_HEALTH_PATH, options.start_timeout_s)
        return info

    def _watch(self, stack: Stack) -> None:
        if self._scraper is None:
            self._scraper = Scraper(self.options.scrape_interval_s)
        self._scraper.watch({STABLE: stack.stable, CANARY: stack.canary})

    def _stack(self) -> Stack:
        stack = read_stack(self.work_dir)
        if stack is None or not alive(stack.router) or not alive(stack.stable):
            raise BackendError(f"the local serving stack in {stack_dir(self.work_dir)} is not running (router or "
                               f"stable server down); start it with a delivery (defectkit deploy --backend local)")
        if self._scraper is None:
            self._watch(stack)
        return stack

    def close(self) -> None:
        """Stop scraping; the stack keeps running."""
        if self._scraper is not None:
            self._scraper.close()
            self._scraper = None
        self._http.close()

    # ------------------------------------------------------------------ router

    def _router_config(self, stack: Stack) -> dict[str, Any]:
        import httpx

        try:
            response = self._http.get(stack.router.url + ROUTER_CONFIG_PATH)
            response.raise_for_status()
        except httpx.HTTPError as exc:
            raise BackendError(f"the router at {stack.router.url} does not answer: {exc}") from exc
        return response.json()

    def _put_config(self, stack: Stack, *, stable: str, canary: str | None, weight: int) -> None:
        import httpx

        body = {"stable": stable, "canary": canary, "weight": weight}
        try:
            response = self._http.put(stack.router.url + ROUTER_CONFIG_PATH, json=body)
        except httpx.HTTPError as exc:
            raise BackendError(f"the router at {stack.router.url} does not answer: {exc}") from exc
        if response.status_code != 200:
            raise BackendError(f"the router refused {body}: HTTP {response.status_code} {response.text[:300]}")
        applied = response.json()
        if (applied["stable"], applied["canary"], applied["weight"]) != (stable, canary, weight):
            raise BackendError(f"the router reports {applied} after being set to {body}")

    def _drain(self, stack: Stack, info: ServerInfo) -> None:
        """Wait until the router has no request in flight to ``info`` (it must no longer route new ones there)."""
        deadline = time.monotonic() + self.options.drain_timeout_s
        while self._router_config(stack)["inflight"].get(info.url, 0) > 0:
            if time.monotonic() > deadline:
                log.warning("%s server %s still has requests in flight after %g s; stopping it anyway", info.role,
                            info.url, self.options.drain_timeout_s)
                return
            time.sleep(0.05)

    # ------------------------------------------------------------------ Backend

    def deploy_candidate(self, model_uri: str) -> None:
        """Start a canary server for ``model_uri`` at 0%; a running canary of the same model is kept (a resumed
        delivery), any other is drained and stopped first."""
        with _locked(self.work_dir):
            stack = self._stack()
            if stack.stable.model == model_uri and stack.canary is None:
                raise BackendError(f"{model_uri} is already the stable model of the local stack; there is no "
                                   "candidate to canary")
            if stack.canary is not None:
                same = stack.canary.model == model_uri and stack.canary.args == self._server_args(CANARY)
                if same and alive(stack.canary):
                    config = self._router_config(stack)
                    if config["canary"] != stack.canary.url:
                        self._put_config(stack, stable=stack.stable.url, canary=stack.canary.url, weight=0)
                    log.info("candidate %s already runs as the canary (pid %d)", model_uri, stack.canary.pid)
                    self._watch(stack)
                    return
                self._remove_canary(stack)
            canary = self._start_server(CANARY, model_uri)
            stack.canary, stack.candidate = canary, model_uri
            _write_stack(self.work_dir, stack)
            self._put_config(stack, stable=stack.stable.url, canary=canary.url, weight=0)
        self._watch(stack)

    def _remove_canary(self, stack: Stack) -> None:
        canary = stack.canary
        self._put_config(stack, stable=stack.stable.url, canary=None, weight=0)
        self._drain(stack, canary)
        stop_process(canary, self.options.stop_timeout_s)
        stack.canary = None
        _write_stack(self.work_dir, stack)

    def set_traffic(self, canary_percent: int) -> None:
        if isinstance(canary_percent, bool) or not isinstance(canary_percent, int) or not 0 <= canary_percent <= 100:
            raise ValueError(f"canary percent {canary_percent!r} must be an integer from 0 to 100")
        stack = self._stack()
        if stack.canary is None:
            if canary_percent == 0:
                return
            raise BackendError("the local stack has no canary server; deploy a candidate first")
        if not alive(stack.canary):
            raise BackendError(f"the canary server (pid {stack.canary.pid}) is not running; its log "
                               f"{stack.canary.log} ends:\n{_log_tail(stack.canary)}")
        self._put_config(stack, stable=stack.stable.url, canary=stack.canary.url, weight=canary_percent)
        actual = self.traffic()
        if actual != canary_percent:
            raise BackendError(f"the router reports {actual}% to the canary after being set to {canary_percent}%")

    def traffic(self) -> int:
        """The candidate's share: the router's canary weight, 100 once it was promoted, 0 after a rollback."""
        stack = self._stack()
        config = self._router_config(stack)
        if stack.canary is not None and config["canary"] == stack.canary.url:
            return int(config["weight"])
        if stack.canary is None and stack.candidate is not None and stack.candidate == stack.stable.model \
                and config["stable"] == stack.stable.url:
            return 100
        return 0

    def promote(self) -> None:
        """The canary server becomes the stable one with all traffic; the old stable server drains and stops."""
        with _locked(self.work_dir):
            stack = self._stack()
            if stack.canary is None:
                if stack.candidate is not None and stack.candidate == stack.stable.model:
                    log.info("candidate %s is already the stable model", stack.candidate)
                    return
                raise BackendError("the local stack has no canary to promote")
            if not alive(stack.canary):
                raise BackendError(f"the canary server (pid {stack.canary.pid}) is not running; cannot promote it")
            old, new = stack.stable, replace(stack.canary, role=STABLE)
            # One routing change moves every new request to the candidate; then the old server drains.
            self._put_config(stack, stable=new.url, canary=None, weight=0)
            stack.stable, stack.canary = new, None
            _write_stack(self.work_dir, stack)
            self._watch(stack)
            self._drain(stack, old)
            stop_process(old, self.options.stop_timeout_s)
        log.info("promoted %s: it serves all traffic at %s", new.model, stack.router.url)

    def rollback(self) -> None:
        """All traffic to the stable server, then the canary server drains and stops."""
        with _locked(self.work_dir):
            stack = read_stack(self.work_dir)
            if stack is None or not alive(stack.router) or stack.stable is None:
                # Nothing routes requests, so no traffic can be stranded; a leftover canary is stopped.
                log.warning("the local stack in %s is not routing; nothing to roll back", stack_dir(self.work_dir))
                if stack is not None and stack.canary is not None:
                    stop_process(stack.canary, self.options.stop_timeout_s)
                    stack.canary = None
                    _write_stack(self.work_dir, stack)
                return
            if stack.canary is None:
                config = self._router_config(stack)
                if config["canary"] is not None or config["stable"] != stack.stable.url:
                    self._put_config(stack, stable=stack.stable.url, canary=None, weight=0)
                return
            self._remove_canary(stack)
            if alive(stack.stable):
                self._watch(stack)
        log.info("rolled back: %s serves all traffic at %s", stack.stable.model, stack.router.url)

    def metrics(self, window_s: float) -> dict[str, VariantMetrics]:
        stack = self._stack()
        scraper = self._scraper
        result = {STABLE: scraper.window(stack.stable, window_s)}
        result[CANARY] = scraper.window(stack.canary, window_s) if stack.canary is not None else EMPTY
        return result

    def probe(self, images: list[bytes]) -> list[float]:
        import httpx

        stack = self._stack()
        if stack.canary is None:
            raise BackendError("the local stack has no canary server to probe; deploy a candidate first")
        url = f"{stack.canary.url}/v2/models/{self.options.model_name}/infer"
        scores: list[float] = []
        for start in range(0, len(images), PROBE_BATCH):
            batch = images[start:start + PROBE_BATCH]
            body = {"inputs": [{"name": "image", "shape": [len(batch)], "datatype": "BYTES",
                                "data": [base64.b64encode(image).decode("ascii") for image in batch]}],
                    "outputs": [{"name": "score"}]}
            try:
                response = self._http.post(url, json=body)
            except httpx.HTTPError as exc:
                raise BackendError(f"probe {url} failed: {exc}") from exc
            if response.status_code != 200:
                raise BackendError(f"probe {url} failed: HTTP {response.status_code}: {response.text[:300]}")
            outputs = {o["name"]: o for o in response.json().get("outputs", [])}
            if "score" not in outputs or len(outputs["score"]["data"]) != len(batch):
                raise BackendError(f"probe {url} returned no score per image: {response.text[:300]}")
            scores += [float(s) for s in outputs["score"]["data"]]
        return scores
