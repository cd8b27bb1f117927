"""Scenario 5: the sampling storage fails under steady load: a filesystem that fills up, a GCS server that goes down.

A model server samples every image (rate 1.0) while a steady open-loop load
(25 requests/s, bounded in count and time) runs through a warm-up, then healthy
and faulted stretches in turn (3 faults of 5 s short, 4 of 30 s full), then a
last healthy stretch. The storage fault must not reach the request path: every
request is answered 2xx, p50 and p99 over the faulted stretches stay within
max(20%, 20 ms) of those over the healthy ones, the server stays up and ready,
the samples that could not be stored are counted on ``/metrics``
(``defectkit_samples_dropped_total{reason=...}``) during every fault, and
sampling resumes once the storage is back (time to recover: from the end of a
fault to the first sample stored after it; the table gives the longest).
Nothing is lost: every drawn sample is stored or counted as dropped, and every
stored shard reads back whole.

- ``disk_full``: samples go to a directory on a tmpfs of 32 MiB mounted for the
  run; each fault fills it to its last 128 KiB with a ballast file, so that the
  sampler's own shards fill it up, and ends when the ballast is deleted. Where mounting is not
  permitted, the directory is made read-only instead (as a user other than
  root), or replaced by a plain file (as root, whom permissions do not stop);
  the table's fault column says which.
- ``gcs_down``: samples go to ``gs://`` on the GCS emulator (storing on disk),
  which is stopped (SIGINT) and restarted on the same port with the same data.

The load generator and the ``/metrics`` readers here are shared with the soak
scenario.
"""

from __future__ import annotations

import errno
import http.client
import io
import json
import logging
import math
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from defectkit import storage
from defectkit.serving import metrics
from tests.chaos import stack
from tests.chaos.harness import Outcome, Scenario, failed_outcome
from tests.servers import ServerProcess, free_port, start_server

log = logging.getLogger(__name__)

NAME = "sampling_down"
RATE = 25.0  # requests/s: the issue asks for at least 20
MIN_RATE = 20.0
CLIENTS = 16
REQUEST_TIMEOUT_S = 10.0
# "The same latency": each of p50 and p99 during the fault within max(20%, 20 ms) of the baseline's.
LATENCY_RATIO = 1.2
LATENCY_SLACK_S = 0.020
TMPFS_MIB = 32
FREE_LEFT_BYTES = 128 * 1024  # what the ballast leaves, for the sampler's own shards to fill
GCS_BUCKET = "defectkit-chaos"
METRICS_POLL_S = 0.25
DRAIN_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Phases:
    """Warm-up, then ``cycles`` times healthy for ``healthy_s`` and faulted for ``fault_s``, then healthy again.

    Healthy and faulted stretches alternate so that the load of whatever else runs on the machine, which
    drifts over tens of seconds, weighs on the baseline and on the fault alike.
    """

    warm_up_s: float
    healthy_s: float
    fault_s: float
    cycles: int
    recover_timeout_s: float


SHORT = Phases(warm_up_s=3, healthy_s=4, fault_s=5, cycles=3, recover_timeout_s=20)
# Long enough for the queue to the writer (256 samples, 10 s at 25 images/s) to fill while storage is down.
FULL = Phases(warm_up_s=5, healthy_s=20, fault_s=30, cycles=4, recover_timeout_s=60)


# --------------------------------------------------------------------------- load


def oip_body(image: bytes) -> tuple[bytes, dict[str, str]]:
    """A one-image inference request in the binary data extension, as tritonclient sends it."""
    header = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                     "parameters": {"binary_data_size": len(image) + 4}}]}).encode()
    body = header + len(image).to_bytes(4, "little") + image
    return body, {"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"}


@dataclass(frozen=True)
class Answer:
    """One request: when it was due (perf_counter), how long from then to its answer, and the HTTP status
    (0 where no answer came: connection refused or reset, timeout)."""

    due: float
    latency_s: float
    status: int


class SteadyLoad:
    """Open-loop load: request k is due at start + k/rate and sent by the next free client thread.

    Latency counts from the due time, so a server that stalls is not hidden by clients waiting on it.
    ``max_requests`` bounds the count whatever happens to ``stop``.
    """

    def __init__(self, port: int, bodies: list[tuple[bytes, dict[str, str]]], rate: float, *,
                 max_requests: int, clients: int = CLIENTS) -> None:
        self._port = port
        self._bodies = bodies
        self.rate = rate
        self._max_requests = max_requests
        self._clients = clients
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._next = 0
        self._answers: list[Answer] = []
        self._threads: list[threading.Thread] = []
        self.started = 0.0

    def __enter__(self) -> SteadyLoad:
        self.started = time.perf_counter()
        self._threads = [threading.Thread(target=self._client, name=f"load-{k}", daemon=True)
                         for k in range(self._clients)]
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def stop(self) -> list[Answer]:
        self._stop.set()
        for thread in self._threads:
            thread.join(REQUEST_TIMEOUT_S + 5)
        return self.answers()

    def answers(self, since: float = float("-inf"), until: float = float("inf")) -> list[Answer]:
        """The answers to requests due at ``since <= due < until`` (perf_counter times)."""
        with self._lock:
            return sorted((a for a in self._answers if since <= a.due < until), key=lambda a: a.due)

    def _client(self) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self._port, timeout=REQUEST_TIMEOUT_S)
        try:
            while not self._stop.is_set():
                with self._lock:
                    k = self._next
                    self._next += 1
                if k >= self._max_requests:
                    return
                due = self.started + k / self.rate
                wait = due - time.perf_counter()
                if wait > 0 and self._stop.wait(wait):
                    return
                body, headers = self._bodies[k % len(self._bodies)]
                try:
                    connection.request("POST", stack.INFER_PATH, body, headers)
                    response = connection.getresponse()
                    response.read()
                    status = response.status
                except (OSError, http.client.HTTPException):
                    status = 0
                    connection.close()
                    connection = http.client.HTTPConnection("127.0.0.1", self._port, timeout=REQUEST_TIMEOUT_S)
                answer = Answer(due, time.perf_counter() - due, status)
                with self._lock:
                    self._answers.append(answer)
        finally:
            connection.close()


@dataclass(frozen=True)
class LatencySummary:
    requests: int
    ok: int
    rate: float
    p50_s: float
    p99_s: float

    def as_dict(self) -> dict:
        return {"requests": self.requests, "ok": self.ok, "rate_per_s": round(self.rate, 2),
                "p50_ms": round(1000 * self.p50_s, 2), "p99_ms": round(1000 * self.p99_s, 2)}


def summarize(load: SteadyLoad, windows: list[tuple[float, float]]) -> LatencySummary:
    """Latency percentiles over the 2xx answers to requests due in the ``windows`` ([since, until) each); the
    rate is the answers that came back within them per second, below the set rate when the server falls behind."""
    answers = [a for since, until in windows for a in load.answers(since, until)]
    ok = [a.latency_s for a in answers if 200 <= a.status < 300]
    p50, p99 = (float(np.percentile(ok, 50)), float(np.percentile(ok, 99))) if ok else (math.inf, math.inf)
    returned = sum(1 for a in load.answers() for since, until in windows if since <= a.due + a.latency_s < until)
    seconds = sum(until - since for since, until in windows)
    return LatencySummary(len(answers), len(ok), returned / seconds if seconds > 0 else 0.0, p50, p99)


def within_bound(during: float, before: float, ratio: float = LATENCY_RATIO, slack_s: float = LATENCY_SLACK_S) -> bool:
    """``during`` within max(``ratio``, ``slack_s`` more) of ``before``."""
    return during <= max(ratio * before, before + slack_s)


# --------------------------------------------------------------------------- the server and its metrics


def start_sampling_server(work: Path, model: Path, label: str, sample_uri: str,
                          env: dict[str, str] | None = None) -> ServerProcess:
    """``defectkit serve`` on 127.0.0.1 sampling every image to ``sample_uri``; stop it with ``.stop()``."""
    port = free_port()
    return start_server(
        [sys.executable, "-m", "defectkit", "serve", "--model", str(model), "--port", str(port),
         "--served-name", stack.SERVED_NAME, "--sample-rate", "1.0", "--sample-uri", sample_uri],
        url=f"http://127.0.0.1:{port}", health_path="/v2/health/ready", log_path=work / f"{label}.log",
        env={"PYTHONPATH": str(stack.ROOT), **(env or {})}, timeout=300,
    )


def port_of(server: ServerProcess) -> int:
    return int(server.url.rsplit(":", 1)[1])


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample on ``url``/metrics, keyed by (series name, sorted labels)."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


@dataclass(frozen=True)
class SamplingCounts:
    """The server's sampling counters on ``/metrics``, summed over model versions."""

    drawn: int
    written: int
    queue_full: int
    write_failed: int
    pending: int

    @property
    def dropped(self) -> int:
        return self.queue_full + self.write_failed

    @property
    def unaccounted(self) -> int:
        """Drawn samples neither stored, nor counted as dropped, nor still on their way: lost silently."""
        return self.drawn - self.written - self.dropped - self.pending


def sampling_counts(url: str) -> SamplingCounts:
    values = scrape(url)

    def total(series: str, **labels: str) -> int:
        wanted = set(labels.items())
        return int(sum(v for (name, keys), v in values.items() if name == series and wanted <= set(keys)))

    dropped = metrics.counter_series(metrics.SAMPLES_DROPPED_METRIC)
    if not any(name == metrics.counter_series(metrics.SAMPLES_DRAWN_METRIC) for name, _ in values):
        raise RuntimeError(f"{url}/metrics has no {metrics.SAMPLES_DRAWN_METRIC} series: is sampling on?")
    return SamplingCounts(
        drawn=total(metrics.counter_series(metrics.SAMPLES_DRAWN_METRIC)),
        written=total(metrics.counter_series(metrics.SAMPLES_WRITTEN_METRIC)),
        queue_full=total(dropped, reason=metrics.DROPPED_QUEUE_FULL),
        write_failed=total(dropped, reason=metrics.DROPPED_WRITE_FAILED),
        pending=total(metrics.SAMPLES_PENDING_METRIC),
    )


def is_ready(server: ServerProcess) -> bool:
    try:
        with urllib.request.urlopen(server.url + "/v2/health/ready", timeout=5) as response:
            return response.status == 200 and server.process.poll() is None
    except OSError:
        return False


def drain(url: str, timeout_s: float = DRAIN_TIMEOUT_S) -> SamplingCounts:
    """The counts once nothing is pending (or after ``timeout_s``): the load must have stopped."""
    deadline = time.monotonic() + timeout_s
    counts = sampling_counts(url)
    while counts.pending and time.monotonic() < deadline:
        time.sleep(METRICS_POLL_S)
        counts = sampling_counts(url)
    return counts


@dataclass(frozen=True)
class StoredSamples:
    """What a reader finds under a sampling root: whole shards and their samples, and anything else."""

    shards: int
    samples: int
    unreadable: list[str] = field(default_factory=list)  # shards that do not read back whole
    stray: list[str] = field(default_factory=list)  # files that are not shards, e.g. temporary files left over


def stored_samples(uri: str) -> StoredSamples:
    """Read back every shard under ``uri``: each must be a whole tar whose sidecars all name an image inside it."""
    store = storage.Store(uri)
    try:
        names = store.list()
    except FileNotFoundError:
        return StoredSamples(0, 0)
    shards = samples = 0
    unreadable, stray = [], []
    for name in names:
        if not name.endswith(".tar"):
            stray.append(name)
            continue
        try:
            with tarfile.open(fileobj=io.BytesIO(store.read(name))) as shard:
                members = {m.name: m for m in shard.getmembers() if m.isfile()}
                sidecars = [json.loads(shard.extractfile(m).read()) for key, m in members.items()
                            if key.endswith(".json")]
                # A shard cut short reads as a tar error, or as sidecars without their images.
                if not sidecars or any(s["image"] not in members for s in sidecars):
                    raise ValueError("a sidecar names no image of the shard")
                for sidecar in sidecars:
                    shard.extractfile(members[sidecar["image"]]).read()
        except (tarfile.TarError, ValueError, KeyError, EOFError) as exc:
            unreadable.append(f"{name}: {exc}")
            continue
        shards += 1
        samples += len(sidecars)
    return StoredSamples(shards, samples, unreadable, stray)


# --------------------------------------------------------------------------- one fault under load


@dataclass
class FaultRun:
    """What the faults under load measured: latency while healthy and while faulted, the sampling counts
    before and after the faults, and per fault the drops counted and the time sampling took to resume."""

    healthy: LatencySummary
    faulted: LatencySummary
    answers: list[Answer]
    before_faults: SamplingCounts
    final: SamplingCounts
    dropped_per_fault: list[int]
    recover_s: list[float | None]
    ready_after: bool


def under_load(server: ServerProcess, bodies: list[tuple[bytes, dict[str, str]]], phases: Phases,
               begin_fault: Callable[[], None], end_fault: Callable[[], None],
               during_fault: Callable[[], None] | None = None) -> FaultRun:
    """Run the steady load through warm-up and the healthy and faulted stretches of ``phases``.

    ``during_fault`` is polled while a fault lasts. After each fault the next healthy stretch lasts at least
    until a sample is stored again (up to ``recover_timeout_s``), so that the time to recover is measured.
    """
    total_s = (phases.warm_up_s + phases.cycles * (phases.healthy_s + phases.fault_s + phases.recover_timeout_s)
               + phases.healthy_s)
    load = SteadyLoad(port_of(server), bodies, RATE, max_requests=int(RATE * (total_s + 5)))
    healthy: list[tuple[float, float]] = []
    faulted: list[tuple[float, float]] = []
    dropped_per_fault: list[int] = []
    recover_s: list[float | None] = []
    with load:
        since = load.started + phases.warm_up_s
        _sleep_until(since)
        before_faults = None
        for _ in range(phases.cycles + 1):
            _sleep_until(since + phases.healthy_s)
            healthy.append((since, time.perf_counter()))
            if len(faulted) == phases.cycles:
                break
            at_start = sampling_counts(server.url)
            before_faults = before_faults or at_start
            fault_start = time.perf_counter()
            begin_fault()
            while time.perf_counter() < fault_start + phases.fault_s:
                if during_fault is not None:
                    during_fault()
                time.sleep(METRICS_POLL_S)
            at_end = sampling_counts(server.url)
            end_fault()
            since = time.perf_counter()
            faulted.append((fault_start, since))
            recovered, counts = None, at_end
            while time.perf_counter() < since + phases.recover_timeout_s:
                counts = sampling_counts(server.url)
                if counts.written > at_end.written:
                    recovered = time.perf_counter() - since
                    break
                time.sleep(METRICS_POLL_S)
            recover_s.append(recovered)
            # A write begun during the fault may fail after it: drops count up to the first sample stored again.
            dropped_per_fault.append(counts.dropped - at_start.dropped)
        answers = load.stop()
    return FaultRun(
        healthy=summarize(load, healthy), faulted=summarize(load, faulted), answers=answers,
        before_faults=before_faults or sampling_counts(server.url), final=drain(server.url),
        dropped_per_fault=dropped_per_fault, recover_s=recover_s, ready_after=is_ready(server),
    )


def _sleep_until(moment: float) -> None:
    delay = moment - time.perf_counter()
    if delay > 0:
        time.sleep(delay)


def outcome(fault: str, run: FaultRun, stored: StoredSamples, extra_checks: dict[str, bool],
            details: dict) -> Outcome:
    """The table row: requests answered 2xx out of those sent; lost = samples neither readable nor counted;
    time to recover = the longest any fault took to see a sample stored again."""
    attempted = len(run.answers)
    succeeded = sum(1 for a in run.answers if 200 <= a.status < 300)
    # Stored samples the counters do not account for, or counted as stored but not readable, are lost; so are
    # drawn samples neither stored, dropped with a count, nor pending; and every shard that is not whole.
    lost = abs(run.final.written - stored.samples) + max(0, run.final.unaccounted) + len(stored.unreadable)
    resumed = all(r is not None for r in run.recover_s)
    checks = {
        "every request answered 2xx": succeeded == attempted and attempted > 0,
        f"rate held >= {MIN_RATE:g}/s healthy and faulted": min(run.healthy.rate, run.faulted.rate) >= MIN_RATE,
        "p50 faulted within max(20%, 20 ms) of healthy": within_bound(run.faulted.p50_s, run.healthy.p50_s),
        "p99 faulted within max(20%, 20 ms) of healthy": within_bound(run.faulted.p99_s, run.healthy.p99_s),
        "samples stored before the faults": run.before_faults.written > 0,
        "drops counted on /metrics during every fault": bool(run.dropped_per_fault) and min(run.dropped_per_fault) > 0,
        "sampling resumed after every fault": resumed,
        "server up and ready afterwards": run.ready_after,
        "nothing lost, no stray files": lost == 0 and not stored.stray and run.final.pending == 0,
        **extra_checks,
    }
    return Outcome(
        NAME, fault, attempted, succeeded, lost, max(run.recover_s) if resumed and run.recover_s else None,
        "all 2xx; p50/p99 faulted within max(20%, 20 ms) of healthy; drops counted; resumes; nothing lost",
        all(checks.values()),
        {"checks": checks, "healthy": run.healthy.as_dict(), "faulted": run.faulted.as_dict(),
         "recover_s": [None if r is None else round(r, 2) for r in run.recover_s],
         "dropped_per_fault": run.dropped_per_fault,
         "statuses": {str(status): sum(1 for a in run.answers if a.status == status)
                      for status in sorted({a.status for a in run.answers})},
         "samples": {"drawn": run.final.drawn, "written": run.final.written,
                     "dropped_queue_full": run.final.queue_full, "dropped_write_failed": run.final.write_failed,
                     "pending_at_end": run.final.pending, "stored_readable": stored.samples,
                     "shards": stored.shards, "unreadable_shards": stored.unreadable[:5],
                     "stray_files": stored.stray[:5]},
         **details})


# --------------------------------------------------------------------------- (a) the disk fills up


def _mount_tmpfs(path: Path, mib: int) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mib}m,mode=0755", "tmpfs", str(path)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        log.warning("cannot mount a tmpfs at %s (%s); the sample directory is made unwritable instead",
                    path, result.stderr.strip())
    return result.returncode == 0


def _unmount(path: Path) -> None:
    result = subprocess.run(["umount", str(path)], capture_output=True, text=True)
    if result.returncode != 0:
        log.warning("could not unmount %s: %s", path, result.stderr.strip())


def free_bytes(path: Path) -> int:
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


def fill(ballast: Path, leave_bytes: int) -> int:
    """Write ``ballast`` until the filesystem has ``leave_bytes`` left (or none); the bytes written."""
    size = max(0, free_bytes(ballast.parent) - leave_bytes)
    chunk = b"\0" * (1 << 20)
    written = 0
    with ballast.open("wb") as out:
        try:
            while written < size:
                written += out.write(chunk[:min(len(chunk), size - written)])
            out.flush()
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
    return written


class _Unwritable:
    """The fallback fault where no filesystem can be mounted: the sample directory refuses every write."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.moved = root.with_name(root.name + ".away")
        self.as_root = os.geteuid() == 0
        self.active = False

    @property
    def description(self) -> str:
        return ("sample directory replaced by a file (no mount permitted)" if self.as_root
                else "sample directory made read-only (no mount permitted)")

    def begin(self) -> None:
        self.active = True
        if self.as_root:  # root writes through any permission bits
            self.root.rename(self.moved)
            self.root.write_text("not a directory: the sample store is gone")
        else:
            for directory in [self.root, *(p for p in self.root.rglob("*") if p.is_dir())]:
                directory.chmod(0o555)

    def end(self) -> None:
        if self.as_root:
            self.root.unlink()
            self.moved.rename(self.root)
        else:
            for directory in [self.root, *(p for p in self.root.rglob("*") if p.is_dir())]:
                directory.chmod(0o755)
        self.active = False


def disk_full(work: Path, model: Path, bodies: list[tuple[bytes, dict[str, str]]], phases: Phases) -> Outcome:
    mount = work / "sample-fs"
    mounted = _mount_tmpfs(mount, TMPFS_MIB)
    root = mount / "samples"
    root.mkdir(parents=True, exist_ok=True)
    ballast = mount / "ballast"
    unwritable = None if mounted else _Unwritable(root)
    free_min: list[int] = []  # per fault: the least free space seen

    def begin() -> None:
        if unwritable is not None:
            unwritable.begin()
        else:
            fill(ballast, FREE_LEFT_BYTES)
            free_min.append(free_bytes(mount))

    def end() -> None:
        if unwritable is not None:
            unwritable.end()
        else:
            ballast.unlink()

    def watch() -> None:
        if mounted:
            free_min[-1] = min(free_min[-1], free_bytes(mount))

    server = None
    try:
        server = start_sampling_server(work, model, "disk-full", str(root))
        run = under_load(server, bodies, phases, begin, end, watch)
        stored = stored_samples(str(root))
    finally:
        if server is not None:
            server.stop()
        if unwritable is not None and unwritable.active:
            unwritable.end()
        if mounted:
            _unmount(mount)
    fault = (f"disk full: tmpfs of {TMPFS_MIB} MiB filled, {phases.cycles} x {phases.fault_s:g} s" if mounted
             else f"{unwritable.description}, {phases.cycles} x {phases.fault_s:g} s")
    extra = {}
    if mounted:
        # The sampler's own shards must have taken the last bytes the ballast left: the disk was really full.
        extra["the filesystem filled up in every fault (< 32 KiB free)"] = (
            len(free_min) == phases.cycles and max(free_min) < 32 * 1024)
    return outcome(fault, run, stored, extra, {"fault_kind": "tmpfs" if mounted else "unwritable directory",
                                               "free_bytes_min": free_min})


# --------------------------------------------------------------------------- (b) GCS goes down


def start_gcs_emulator(work: Path, port: int, label: str) -> ServerProcess:
    """gcp-storage-emulator on 127.0.0.1:``port``, storing on disk under work/gcs so a restart keeps the objects."""
    return start_server(
        [sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1", "--port", str(port),
         "--default-bucket", GCS_BUCKET, "--quiet"],
        url=f"http://127.0.0.1:{port}", health_path="/", log_path=work / f"{label}.log",
        env={"STORAGE_BASE": str(work / "gcs")},
    )


def interrupt(server: ServerProcess) -> None:
    """Stop the emulator by PID with SIGINT: it finishes the request in hand and stops listening.

    Not SIGKILL first: the emulator rewrites its whole object index in place on every upload, and a kill in
    the middle of that leaves an index it cannot start from again, which real GCS never does. Only an
    emulator still up 10 s later is killed (a broken index then fails the restart, and the row).
    """
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGINT)
        try:
            server.process.wait(10)
        except subprocess.TimeoutExpired:
            # Its single-threaded HTTPServer stops only between connections (gcp_storage_emulator/server.py:
            # APIThread.join -> shutdown), and a client can hold one open past any upload in hand.
            server.process.kill()
            server.process.wait(10)


def gcs_down(work: Path, model: Path, bodies: list[tuple[bytes, dict[str, str]]], phases: Phases) -> Outcome:
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    emulator_url = f"http://127.0.0.1:{port}"
    uri = f"gs://{GCS_BUCKET}/production-samples"
    emulators: list[ServerProcess] = [start_gcs_emulator(work, port, "gcs-1")]
    server = None
    restart_s: list[float] = []

    def begin() -> None:
        interrupt(emulators[-1])

    def end() -> None:
        started = time.perf_counter()
        emulators.append(start_gcs_emulator(work, port, f"gcs-{len(emulators) + 1}"))
        restart_s.append(round(time.perf_counter() - started, 2))

    try:
        server = start_sampling_server(work, model, "gcs-down", uri, env={"STORAGE_EMULATOR_HOST": emulator_url})
        run = under_load(server, bodies, phases, begin, end)
        with stack.environ({"STORAGE_EMULATOR_HOST": emulator_url}):
            stored = stored_samples(uri)
    finally:
        if server is not None:
            server.stop()
        for emulator in emulators:
            emulator.stop()
    return outcome(f"GCS emulator stopped, restarted after {phases.fault_s:g} s, {phases.cycles} x", run, stored,
                   {}, {"emulator_restart_s": restart_s})


# --------------------------------------------------------------------------- the scenario


def run(work_dir: Path, short: bool) -> list[Outcome]:
    phases = SHORT if short else FULL
    (model,) = stack.models(work_dir / "models", count=1)
    bodies = [oip_body(image) for image in stack.images(work_dir / "images", count=20)]
    outcomes = []
    for part in (disk_full, gcs_down):
        try:
            outcomes.append(part(work_dir / part.__name__, model, bodies, phases))
        except Exception as exc:  # noqa: BLE001 - one part's failure is its row; the other part still runs
            log.exception("%s: %s failed", NAME, part.__name__)
            outcomes.append(failed_outcome(NAME, exc))
    return outcomes


SCENARIOS = (Scenario(NAME, run),)

