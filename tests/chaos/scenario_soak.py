"""Scenario 7: soak. One model server with sampling on, a fixed request rate for a long time; does anything grow?

The server (``defectkit serve``, every image sampled to a local directory)
gets 20 requests/s, open loop, for 2 minutes (``short``) or 16 minutes (the
full run: one minute of warm-up, then 15 measured). Every few seconds the
server's resident memory and threads (``/proc/PID/status``) and open files
(``/proc/PID/fd``) are read, for the server process and for its process tree
(the sample writer is a child). After the warm-up the first and the last
window (30 s short, 60 s full) are compared:

- memory: median RSS of the last window under 5% above the first's (process and tree);
- open files and threads: the last window's median count no higher than the first's;
- p99 latency of the last window within 20% of the first window's. Other work
  on a shared machine moves latency more than that within minutes, so a fresh
  server of the same model and options, started near the end and given the
  same load over the same last window, is the second reference: the goal is met
  when the soaked server's p99 is within 20% of either. A server slowed by
  its own history misses both;
- every request answered 2xx, and no sample lost (each one stored whole, or
  dropped and counted on ``/metrics``).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from tests.chaos import stack
from tests.chaos.harness import Outcome, Scenario
from tests.chaos.scenario_sampling import (
    Answer,
    LatencySummary,
    SteadyLoad,
    drain,
    is_ready,
    oip_body,
    port_of,
    start_sampling_server,
    stored_samples,
    summarize,
)
from tests.servers import ServerProcess

log = logging.getLogger(__name__)

NAME = "soak"
RATE = 20.0
RSS_GROWTH = 0.05
P99_RATIO = 1.2


@dataclass(frozen=True)
class Timing:
    warm_up_s: float
    measured_s: float  # after the warm-up
    window_s: float  # the first and the last window compared
    probe_every_s: float
    fresh_lead_s: float  # the fresh server starts this long before the end, to be warm for the last window


# The fresh server starts once the first window is over (short) or 3 minutes before the end (full): time
# to start and warm up under load before the last window.
SHORT = Timing(warm_up_s=20, measured_s=100, window_s=30, probe_every_s=2, fresh_lead_s=70)
FULL = Timing(warm_up_s=60, measured_s=900, window_s=60, probe_every_s=5, fresh_lead_s=180)
FRESH_WARM_UP_S = 10  # the least load the fresh server must have had before the last window counts


@dataclass(frozen=True)
class Probe:
    """One reading of the server: when (perf_counter), its RSS in bytes, threads and open files; and the same
    summed over its process tree (the server and its children, e.g. the sample writer)."""

    at: float
    rss: int
    threads: int
    open_files: int
    tree_rss: int
    tree_threads: int
    tree_open_files: int


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as status:
        return dict(line.rstrip("\n").split(":\t", 1) for line in status if ":\t" in line)


def _children(pid: int) -> list[int]:
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as children:
                found.extend(int(child) for child in children.read().split())
        except FileNotFoundError:
            continue  # the thread ended while being listed
    return found


def _reading(pid: int) -> tuple[int, int, int]:
    status = _status(pid)
    return (int(status["VmRSS"].split()[0]) * 1024, int(status["Threads"].strip()),
            len(os.listdir(f"/proc/{pid}/fd")))


def probe(pid: int) -> Probe:
    rss, threads, files = _reading(pid)
    tree = [(rss, threads, files)]
    pending = _children(pid)
    while pending:
        child = pending.pop()
        try:
            tree.append(_reading(child))
            pending.extend(_children(child))
        except (FileNotFoundError, ProcessLookupError):
            continue  # a child that ended between listing and reading
    return Probe(time.perf_counter(), rss, threads, files, sum(t[0] for t in tree), sum(t[1] for t in tree),
                 sum(t[2] for t in tree))


def _in(probes: list[Probe], since: float, until: float) -> list[Probe]:
    return [p for p in probes if since <= p.at < until]


class _FreshServer:
    """The reference for the last window: the same model and options, started in the background near the end
    (so that the readings of the soaked server go on meanwhile), then given the same load."""

    def __init__(self, work_dir: Path, model: Path, bodies: list[tuple[bytes, dict[str, str]]],
                 lead_s: float) -> None:
        self.server: ServerProcess | None = None
        self.load: SteadyLoad | None = None
        self.error: BaseException | None = None
        self._args = (work_dir, model, bodies, lead_s)
        self._thread = threading.Thread(target=self._start, name="fresh-server", daemon=True)
        self._stopped = threading.Event()

    @property
    def started(self) -> bool:
        return self._thread.ident is not None

    def start(self) -> None:
        self._thread.start()

    def _start(self) -> None:
        work_dir, model, bodies, lead_s = self._args
        try:
            self.server = start_sampling_server(work_dir, model, "fresh", str(work_dir / "fresh-samples"))
            if not self._stopped.is_set():
                self.load = SteadyLoad(port_of(self.server), bodies, RATE, max_requests=int(RATE * (lead_s + 5)))
                self.load.__enter__()
        except Exception as exc:  # noqa: BLE001 - reported as the missing reference
            self.error = exc

    def stop(self) -> list[Answer]:
        self._stopped.set()
        if self.started:
            self._thread.join()  # bounded by the start's own timeout; then the server is known and stopped
        answers = self.load.stop() if self.load is not None else []
        if self.server is not None:
            self.server.stop()
        return answers


def run(work_dir: Path, short: bool) -> list[Outcome]:
    timing = SHORT if short else FULL
    (model,) = stack.models(work_dir / "models", count=1)
    bodies = [oip_body(image) for image in stack.images(work_dir / "images", count=20)]
    root = work_dir / "samples"
    probes: list[Probe] = []
    loads: dict[str, float] = {}
    fresh = _FreshServer(work_dir, model, bodies, timing.fresh_lead_s)
    server = start_sampling_server(work_dir, model, "soak", str(root))
    try:
        total_s = timing.warm_up_s + timing.measured_s
        load = SteadyLoad(port_of(server), bodies, RATE, max_requests=int(RATE * (total_s + 5)))
        with load:
            first = (load.started + timing.warm_up_s, load.started + timing.warm_up_s + timing.window_s)
            end = load.started + total_s
            last = (end - timing.window_s, end)
            while time.perf_counter() < end:
                probes.append(probe(server.pid))
                now = time.perf_counter()
                if now >= end - timing.fresh_lead_s and not fresh.started:
                    fresh.start()
                for name, (_, until) in (("first", first), ("last", last)):
                    if name not in loads and now >= until:
                        loads[name] = round(os.getloadavg()[0], 2)
                time.sleep(min(timing.probe_every_s, max(0.0, end - time.perf_counter())))
            loads.setdefault("last", round(os.getloadavg()[0], 2))
            names = thread_names(server.pid)
            answers = load.stop()
        fresh_answers = fresh.stop()
        ready = is_ready(server)
        counts = drain(server.url)
        first_latency, last_latency = summarize(load, [first]), summarize(load, [last])
        fresh_latency = summarize(fresh.load, [last]) if fresh.load is not None else None
    finally:
        fresh.stop()
        server.stop()
    if fresh.error is not None:
        log.warning("the fresh reference server did not start: %s", fresh.error)
    stored = stored_samples(str(root))
    return [_outcome(timing, answers, fresh_answers, probes, first, last, first_latency, last_latency, names,
                     fresh_latency, counts, stored, ready, loads,
                     fresh.load.started if fresh.load is not None else None)]


def _growth(probes: list[Probe], first: tuple[float, float], last: tuple[float, float]) -> dict:
    before, after = _in(probes, *first), _in(probes, *last)
    if not before or not after:
        raise RuntimeError(f"no readings of the server in the first or the last window ({len(probes)} in all)")

    def median(attribute: str, window: list[Probe]) -> float:
        return statistics.median(getattr(p, attribute) for p in window)

    def steady(attribute: str, window: list[Probe]) -> float:
        # A leak raises the count for good; a file the sample writer has open while a reading is taken
        # raises one reading. The median of each window tells the two apart.
        return statistics.median(getattr(p, attribute) for p in window)

    return {
        "rss_mib": [round(median("rss", before) / 2**20, 1), round(median("rss", after) / 2**20, 1)],
        "rss_growth": median("rss", after) / median("rss", before) - 1,
        "tree_rss_mib": [round(median("tree_rss", before) / 2**20, 1), round(median("tree_rss", after) / 2**20, 1)],
        "tree_rss_growth": median("tree_rss", after) / median("tree_rss", before) - 1,
        "threads": [steady("threads", before), steady("threads", after)],
        "tree_threads": [steady("tree_threads", before), steady("tree_threads", after)],
        "open_files": [steady("open_files", before), steady("open_files", after)],
        "tree_open_files": [steady("tree_open_files", before), steady("tree_open_files", after)],
        "readings": len(probes),
        # When the thread count changed (seconds from the first reading): a leak climbs to the end, a pool
        # that starts its threads lazily stops at its size.
        "thread_changes": [[round(p.at - probes[0].at), p.threads] for i, p in enumerate(probes)
                           if i == 0 or p.threads != probes[i - 1].threads],
    }


def thread_names(pid: int) -> dict[str, int]:
    """The server's threads by name (/proc/PID/task/*/comm), for the record."""
    names: Counter = Counter()
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/comm") as comm:
                names[comm.read().strip()] += 1
        except FileNotFoundError:
            continue  # the thread ended while being listed
    return dict(names)


def _outcome(timing: Timing, answers, fresh_answers, probes: list[Probe], first, last,
             first_latency: LatencySummary, last_latency: LatencySummary, names: dict[str, int],
             fresh_latency: LatencySummary | None,
             counts, stored, ready: bool, loads: dict, fresh_started: float | None) -> Outcome:
    growth = _growth(probes, first, last)
    attempted = len(answers)
    succeeded = sum(1 for a in answers if 200 <= a.status < 300)
    lost = abs(counts.written - stored.samples) + max(0, counts.unaccounted) + len(stored.unreadable)
    vs_first = last_latency.p99_s <= P99_RATIO * first_latency.p99_s
    fresh_in_time = fresh_started is not None and fresh_started <= last[0] - FRESH_WARM_UP_S
    vs_fresh = fresh_in_time and fresh_latency is not None and last_latency.p99_s <= P99_RATIO * fresh_latency.p99_s
    checks = {
        "every request answered 2xx": attempted > 0 and succeeded == attempted,
        f"rate held >= {RATE * 0.9:g}/s in both windows": min(first_latency.rate, last_latency.rate) >= RATE * 0.9,
        "RSS growth < 5% (server)": growth["rss_growth"] < RSS_GROWTH,
        "RSS growth < 5% (server and children)": growth["tree_rss_growth"] < RSS_GROWTH,
        "no growth in threads": growth["threads"][1] <= growth["threads"][0]
        and growth["tree_threads"][1] <= growth["tree_threads"][0],
        "no growth in open files": growth["open_files"][1] <= growth["open_files"][0]
        and growth["tree_open_files"][1] <= growth["tree_open_files"][0],
        "p99 of the last window within 20% of the first's, or of a fresh server's": vs_first or vs_fresh,
        "fresh server answered 2xx": all(200 <= a.status < 300 for a in fresh_answers),
        "server ready afterwards": ready,
        "no sample lost": lost == 0 and not stored.stray and counts.pending == 0,
    }
    minutes = (timing.warm_up_s + timing.measured_s) / 60
    return Outcome(
        NAME, f"none: {RATE:g} req/s for {minutes:g} min, sampling on", attempted, succeeded, lost, None,
        f"after {timing.warm_up_s:g} s warm-up, last {timing.window_s:g} s vs first: RSS < +5%, threads and "
        f"open files not up, p99 within 20% (of first or of a fresh server); all 2xx; nothing lost",
        all(checks.values()),
        {"checks": checks, **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in growth.items()},
         "first_window": first_latency.as_dict(), "last_window": last_latency.as_dict(),
         "fresh_server_last_window": fresh_latency.as_dict() if fresh_latency is not None else None,
         "fresh_server_loaded_before_last_window_s": (None if fresh_started is None
                                                      else round(last[0] - fresh_started, 1)),
         "p99_last_over_first": round(last_latency.p99_s / first_latency.p99_s, 3),
         "p99_last_over_fresh": (round(last_latency.p99_s / fresh_latency.p99_s, 3)
                                 if fresh_latency is not None else None),
         "load_average_at_window_end": loads,
         "thread_names_at_end": names,
         "statuses": dict(Counter(str(a.status) for a in answers)),
         "samples": {"drawn": counts.drawn, "written": counts.written, "dropped_queue_full": counts.queue_full,
                     "dropped_write_failed": counts.write_failed, "stored_readable": stored.samples,
                     "shards": stored.shards, "unreadable_shards": stored.unreadable[:5],
                     "stray_files": stored.stray[:5]}})


SCENARIOS = (Scenario(NAME, run),)
