"""Bad input at scale: thousands of mutated real images at the model server and through dataset validation.

``bad_input_server`` posts every file of the corpus (:mod:`tests.chaos.mutate`) to a
``defectkit serve`` process as an Open Inference Protocol request, a few at a time.
No answer may be a 5xx; a refused file gets a 400 whose message names the reason;
a file that still decodes may be scored. The untouched images among the bad ones
must be scored as usual. Afterwards the server must be ready and its resident
memory within :data:`RSS_GROWTH_LIMIT_MIB` of what it held after warming up.

``bad_input_validation`` writes the same corpus as an MVTec-layout dataset (with
masks and stray files) and validates it: every file must come out either accepted
(copied byte for byte into the dataset) or quarantined with a reason, and the
counts must add up.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import requests

from defectkit import image
from defectkit.data import GOOD, MASK_DIR, sha256_bytes
from defectkit.delivery.backend import infer_request
from defectkit.serving.contract import SCORE_OUTPUT
from defectkit.validation import dataset
from tests.chaos import mutate, stack
from tests.chaos.harness import Outcome, Scenario

log = logging.getLogger(__name__)

SEED = 0
SHORT_COUNT = 1_000
FULL_COUNT = 10_000
CONCURRENCY = 8  # requests in flight at once: enough to keep both decode threads busy, bounded
REQUEST_TIMEOUT_S = 60.0  # a pixel bomb takes seconds to decode on a loaded 2-core machine
WARM_UP_REQUESTS = 100
RSS_GROWTH_LIMIT_MIB = 100  # resident memory after the run over the baseline after warm-up
RSS_SAMPLE_S = 0.2
CLEAR_REJECTION = re.compile(r"^the image was rejected \((?P<reason>[a-z_]+)\): (?P<detail>.{10,})", re.S)
DEFECT_TYPES = ("crack", "scratch", "hole")
MIB = 1 << 20


def _count(short: bool) -> int:
    return SHORT_COUNT if short else FULL_COUNT


# ---------------------------------------------------------------------------------------------- model server


@dataclass
class _Answer:
    status: int | None  # None: no HTTP answer at all (connection reset, timeout)
    error: str = ""  # the error message of a non-2xx answer, or what went wrong on the client's side
    scored: bool = False  # a 2xx carrying one finite score in [0, 1]
    seconds: float = 0.0


def _answer(session: requests.Session, url: str, data: bytes) -> _Answer:
    started = time.monotonic()
    try:
        response = session.post(url, json=infer_request([data]), timeout=REQUEST_TIMEOUT_S)
    except requests.RequestException as exc:
        return _Answer(None, f"{type(exc).__name__}: {exc}", seconds=time.monotonic() - started)
    seconds = time.monotonic() - started
    try:
        body = response.json()
    except ValueError:
        return _Answer(response.status_code, f"not JSON: {response.text[:200]!r}", seconds=seconds)
    if not isinstance(body, dict):
        return _Answer(response.status_code, f"not a JSON object: {response.text[:200]!r}", seconds=seconds)
    if response.ok:
        outputs = {o.get("name"): o for o in body.get("outputs") or [] if isinstance(o, dict)}
        scores = outputs.get(SCORE_OUTPUT, {}).get("data")
        scored = (isinstance(scores, list) and len(scores) == 1 and isinstance(scores[0], (int, float))
                  and 0.0 <= scores[0] <= 1.0)
        return _Answer(response.status_code, "", scored, seconds)
    return _Answer(response.status_code, str(body.get("error", "")), seconds=seconds)


class _RssSampler:
    """Peak resident memory of a process tree, sampled in the background."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        total = 0
        for proc in (self.process, *self.process.children(recursive=True)):
            try:
                total += proc.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.wait(RSS_SAMPLE_S):
            try:
                self.peak = max(self.peak, self.rss())
            except psutil.NoSuchProcess:
                return

    def __enter__(self) -> _RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _bounded(pool: ThreadPoolExecutor, post, items: Iterable[mutate.Mutant]) -> Iterator[tuple[mutate.Mutant, _Answer]]:
    """(item, answer) for each item, with CONCURRENCY requests in flight and the corpus generated as it goes."""
    in_flight: dict[Future, mutate.Mutant] = {}
    for item in items:
        if len(in_flight) >= CONCURRENCY:
            done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
            for future in done:
                yield in_flight.pop(future), future.result()
        in_flight[pool.submit(post, item.data)] = item
    for future in list(in_flight):
        yield in_flight.pop(future), future.result()


def _judge(item: mutate.Mutant, answer: _Answer) -> str:
    """'' when the answer is what a server owes this file, else what is wrong with it."""
    if answer.status is None:
        return f"no answer: {answer.error}"
    if answer.status >= 500:
        return f"{answer.status}: {answer.error[:200]}"
    if 200 <= answer.status < 300:
        if not answer.scored:
            return f"{answer.status} without one score in [0, 1]"
        if item.expect_bytes and mutate.ACCEPTED not in item.expect_bytes:
            return f"{answer.status} for a file that must be refused ({', '.join(item.expect_bytes)})"
        return ""
    if answer.status != 400:
        return f"{answer.status} (a refused image is a 400): {answer.error[:200]}"
    match = CLEAR_REJECTION.match(answer.error)
    if match is None or match["reason"] not in image.REASONS:
        return f"400 without a clear reason: {answer.error[:200]!r}"
    if item.expect_bytes and match["reason"] not in item.expect_bytes:
        return f"refused as {match['reason']}, expected {', '.join(item.expect_bytes)}"
    return ""


def _ready(url: str) -> bool:
    try:
        return requests.get(url + "/v2/health/ready", timeout=5).status_code == 200
    except requests.RequestException:
        return False


def run_server(work_dir: Path, short: bool) -> list[Outcome]:
    return serve_corpus(work_dir, _count(short))


def serve_corpus(work_dir: Path, count: int, warm_up: int = WARM_UP_REQUESTS) -> list[Outcome]:
    """Start a model server, post ``count`` files of the corpus to it, and measure how it took them."""
    originals = mutate.originals(work_dir / "originals")
    intact = [o.data for o in originals]
    model = stack.models(work_dir / "models", count=1)[0]
    server = stack.start_model_server(work_dir, model, "bad-input-server")
    try:
        url = server.url + stack.INFER_PATH
        local = threading.local()

        def post(data: bytes) -> _Answer:
            if not hasattr(local, "session"):
                local.session = requests.Session()
            return _answer(local.session, url, data)

        with ThreadPoolExecutor(CONCURRENCY) as pool, _RssSampler(server.pid) as memory:
            warm = list(pool.map(post, (intact[i % len(intact)] for i in range(warm_up))))
            if not all(a.scored for a in warm):
                raise RuntimeError(f"the server does not score well-formed images before any fault: "
                                   f"{Counter(a.status for a in warm)}")
            time.sleep(1.0)
            baseline = memory.rss()
            started = time.monotonic()
            problems: list[tuple[mutate.Mutant, str]] = []
            statuses: Counter[str] = Counter()
            by_kind: dict[str, Counter[str]] = {}
            intact_sent = intact_scored = no_answer = 0
            latencies: list[float] = []
            for item, answer in _bounded(pool, post, mutate.corpus(originals, count, SEED)):
                statuses[str(answer.status)] += 1
                latencies.append(answer.seconds)
                by_kind.setdefault(item.kind, Counter())[str(answer.status)] += 1
                no_answer += answer.status is None
                if item.expect_bytes == (mutate.ACCEPTED,):
                    intact_sent += 1
                    intact_scored += answer.scored
                problem = _judge(item, answer)
                if problem:
                    problems.append((item, problem))
            seconds = time.monotonic() - started
            after_warm = list(pool.map(post, (intact[i % len(intact)] for i in range(warm_up))))
            time.sleep(1.0)
            after = memory.rss()
            peak = memory.peak
        alive = server.process.poll() is None
        ready = alive and _ready(server.url)
    finally:
        server.stop()
    tracebacks = server.log_path.read_text(errors="replace").count("Traceback")
    attempted = sum(statuses.values())
    growth_mib = (after - baseline) / MIB
    fivexx = sum(n for status, n in statuses.items() if status != "None" and int(status) >= 500)
    latencies.sort()
    details = {
        "statuses": dict(statuses), "by_kind": {k: dict(v) for k, v in sorted(by_kind.items())},
        "problems": [f"{m.index} {m.kind} from {m.source}: {p}" for m, p in problems[:20]],
        "problem_count": len(problems), "seconds": round(seconds, 1),
        "requests_per_s": round(attempted / seconds, 1) if seconds else None,
        "p50_s": round(latencies[len(latencies) // 2], 4) if latencies else None,
        "max_s": round(latencies[-1], 3) if latencies else None,
        "rss_baseline_mib": round(baseline / MIB, 1), "rss_after_mib": round(after / MIB, 1),
        "rss_peak_mib": round(peak / MIB, 1), "rss_growth_mib": round(growth_mib, 1),
        "ready_after": ready, "tracebacks_in_log": tracebacks,
        "well_formed_after_run_scored": sum(a.scored for a in after_warm),
    }
    mutated_met = (not problems and fivexx == 0 and no_answer == 0 and ready and tracebacks == 0
                   and growth_mib < RSS_GROWTH_LIMIT_MIB)
    well_formed_sent = intact_sent + len(after_warm)
    well_formed_scored = intact_scored + sum(a.scored for a in after_warm)
    return [
        Outcome("bad_input_server", f"{attempted} mutated images ({len(by_kind)} kinds)", attempted,
                attempted - len(problems), no_answer, None,
                f"no 5xx; 4xx names the reason; ready after; RSS growth < {RSS_GROWTH_LIMIT_MIB} MiB "
                f"(measured {growth_mib:.0f})", mutated_met, details),
        Outcome("bad_input_server", "well-formed images among and after the bad ones", well_formed_sent,
                well_formed_scored, well_formed_sent - well_formed_scored, None, "100% answered 2xx with a score",
                well_formed_scored == well_formed_sent and well_formed_sent > 0,
                {"among": intact_sent, "after": len(after_warm)}),
    ]


# ---------------------------------------------------------------------------------------------- validation


@dataclass
class _Written:
    """The dataset as written: relative path -> bytes' sha256, and what each image must come out as."""

    files: dict[str, str] = field(default_factory=dict)
    expect: dict[str, tuple[str, ...]] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)

    def write(self, root: Path, rel: str, data: bytes, kind: str, expect: tuple[str, ...] = ()) -> None:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        self.files[rel] = sha256_bytes(data)
        self.kinds[rel] = kind
        if expect:
            self.expect[rel] = expect


def _write_dataset(root: Path, originals: list[mutate.Original], count: int) -> _Written:
    """The corpus in MVTec layout: a third in test, half of each split good; a real mask beside every tenth test
    defect image, and a few files that fit nowhere (a mask without an image, a stray note)."""
    written = _Written()
    masks = [o.data for o in originals if o.name.endswith("_mask.png")]
    for item in mutate.corpus(originals, count, SEED):
        split = "test" if item.index % 3 == 0 else "train"
        class_name = GOOD if item.index % 4 < 2 else DEFECT_TYPES[(item.index // 4) % len(DEFECT_TYPES)]
        rel = f"{split}/{class_name}/{item.name}"
        written.write(root, rel, item.data, item.kind, item.expect)
        stem = item.name.rpartition(".")[0]
        if split == "test" and class_name != GOOD and item.index % 10 < 4 and masks:
            # A 64 px mask: it fits the synthetic images and not the 96 px photographs (quarantined, image kept).
            written.write(root, f"{MASK_DIR}/{class_name}/{stem}_mask.png", masks[item.index % len(masks)], "mask")
        if item.index % 500 == 7:
            written.write(root, f"{MASK_DIR}/{class_name}/{stem}-orphan_mask.png", masks[0], "orphan_mask",
                          (dataset.UNEXPECTED_LOCATION,))
            written.write(root, f"train/notes-{item.index}.txt", b"stray note\n", "stray",
                          (dataset.UNEXPECTED_LOCATION,))
    return written


def run_validation(work_dir: Path, short: bool) -> list[Outcome]:
    return validate_corpus(work_dir, _count(short))


def validate_corpus(work_dir: Path, count: int) -> list[Outcome]:
    """Write ``count`` files of the corpus as a dataset, validate it, and account for every file."""
    originals = mutate.originals(work_dir / "originals")
    source, out_dir, quarantine_dir = work_dir / "source", work_dir / "dataset", work_dir / "quarantine"
    written = _write_dataset(source, originals, count)
    started = time.monotonic()
    # Lenient thresholds: the verdict on the dataset is not what is measured here, the accounting of every file is.
    config = dataset.ValidationConfig(max_quarantine_fraction=1.0, min_images_per_class=0)
    report = dataset.validate_dataset(str(source), out_dir, config, quarantine_dir=quarantine_dir,
                                      raise_on_failure=False)
    seconds = time.monotonic() - started

    outcome: dict[str, str] = {}
    duplicates: list[str] = []
    for entry in report.manifest.entries:
        for rel in (entry.path, entry.mask):
            if rel is not None:
                duplicates += [rel] if rel in outcome else []
                outcome[rel] = mutate.ACCEPTED
    unclear: list[str] = []
    for q in report.quarantined:
        duplicates += [q.path] if q.path in outcome else []
        outcome[q.path] = q.reason
        if q.reason not in dataset.REASONS or len(q.detail) < 10:
            unclear.append(f"{q.path}: {q.reason!r} {q.detail!r}")

    unaccounted = sorted(set(written.files) - set(outcome))
    invented = sorted(set(outcome) - set(written.files))
    damaged: list[str] = []  # copies that differ from the source: half-written or altered
    for rel, digest in written.files.items():
        where = out_dir if outcome.get(rel) == mutate.ACCEPTED else quarantine_dir / dataset.QUARANTINE_FILES_DIR
        copy = where / rel
        if rel in outcome and (not copy.is_file() or sha256_bytes(copy.read_bytes()) != digest):
            damaged.append(rel)
    listed = {q["path"] for q in json.loads((quarantine_dir / dataset.QUARANTINE_FILE).read_text())}
    unlisted = sorted({q.path for q in report.quarantined} ^ listed)
    wrong = [f"{rel} ({written.kinds[rel]}): {outcome.get(rel)}, expected {' or '.join(expect)}"
             for rel, expect in sorted(written.expect.items()) if outcome.get(rel) not in expect]

    files = len(written.files)
    accepted = sum(1 for v in outcome.values() if v == mutate.ACCEPTED)
    quarantined = len(report.quarantined)
    adds_up = accepted + quarantined == files == report.total_files and not duplicates
    bad = set(unaccounted) | set(damaged) | {u.split(":")[0] for u in unclear}
    by_kind: dict[str, Counter[str]] = {}
    for rel, kind in written.kinds.items():
        by_kind.setdefault(kind, Counter())[outcome.get(rel, "missing")] += 1
    details = {
        "files": files, "accepted": accepted, "quarantined": quarantined, "report_total_files": report.total_files,
        "reasons": dict(Counter(q.reason for q in report.quarantined)), "seconds": round(seconds, 1),
        "by_kind": {k: dict(v) for k, v in sorted(by_kind.items())},
        "unaccounted": unaccounted[:20], "invented": invented[:20], "duplicates": duplicates[:20],
        "damaged": damaged[:20], "unclear": unclear[:20], "not_in_quarantine_json": unlisted[:20],
        "unexpected_outcome": wrong[:20], "unexpected_outcome_count": len(wrong),
    }
    return [
        Outcome("bad_input_validation", f"{files} files of a mutated dataset", files, files - len(bad),
                len(unaccounted) + len(damaged), None,
                "each file accepted or quarantined with a reason; accepted + quarantined == files",
                not bad and not invented and not unlisted and adds_up, details),
        Outcome("bad_input_validation", "files whose fate is certain (intact, empty, huge, other format...)",
                len(written.expect), len(written.expect) - len(wrong), 0, None, "100% get the expected outcome",
                not wrong and bool(written.expect), {"examples": wrong[:20]}),
    ]


SCENARIOS = (Scenario("bad_input_server", run_server), Scenario("bad_input_validation", run_validation))
