"""Registry faults: the MLflow tracking server SIGKILLed during register and promote, and two promotions at once.

``registry``: a real ``mlflow server`` (sqlite store, ``--artifacts-destination``)
sits behind a small TCP relay that watches the requests of the step under test
and SIGKILLs the server's process group at a chosen request: before the server
sees it (``before``), half-way through its body (``mid``), or once the server
has answered it, dropping the answer (``after``: the change is committed but
the client never hears so). The server is then restarted on the same port and
store. Most cases restart at once, so defectkit's call must succeed through
its retries; the ``stays down`` cases restart only after the step has failed,
whose message must name the server and say what to do, and the re-run step
must succeed. A watcher reads the aliases straight from the server all along
and downloads every version an alias points at, checking the weights' sha256
against ``model.json``.

``promotion_race``: two threads promote two different versions at the same
moment, many times over; each round must end as some serial order of the
promotions that reported success (champion, previous-champion and the
``canary`` record agreeing), and a promotion that was refused must say so.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import re
import signal
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from defectkit import registry
from defectkit.delivery.rollout import CANARY_TAG, registry_hooks
from defectkit.delivery.state import PROMOTED, RolloutState
from tests.chaos import stack
from tests.chaos.harness import Outcome, Scenario
from tests.servers import ServerProcess, free_port, start_mlflow_server

log = logging.getLogger(__name__)

MODEL_NAME = "chaos-registry"
# MLflow's client retries every request (POST included) on connection errors with waits of
# factor * 2**n seconds; factor 1 instead of 2 keeps each kill case about 15 s shorter.
CLIENT_RETRY_ENV = {"MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
# A server that stays down: two quick retries, so the step fails in seconds rather than minutes.
STAYS_DOWN_ENV = {"MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2"}
STEP_TIMEOUT_S = 240.0


# --------------------------------------------------------------------------- the MLflow server


@dataclass
class MlflowServer:
    """``mlflow server`` on a fixed port and store, so that a restart finds everything it had."""

    root: Path
    port: int
    process: ServerProcess | None = None
    starts: list[float] = field(default_factory=list)  # launch-to-healthy seconds of every start

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> float:
        """Start it and wait until healthy; returns the monotonic time it was launched."""
        launched = time.monotonic()
        self.process = start_mlflow_server(self.root, port=self.port, log_name=f"server-{len(self.starts)}.log",
                                           timeout=300)
        self.starts.append(time.monotonic() - launched)
        return launched

    def kill(self) -> None:
        """SIGKILL the server and its workers (its own process group), as a crashed pod dies."""
        process = self.process
        if process is None or process.process.poll() is not None:
            return
        os.killpg(process.pid, signal.SIGKILL)
        process.process.wait(30)

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


# --------------------------------------------------------------------------- the killing relay


_METHODS = (b"GET ", b"POST ", b"PUT ", b"DELETE ", b"PATCH ")


@dataclass(frozen=True)
class KillPoint:
    """Kill the server at the first request whose request line matches ``request`` and body ``body``."""

    name: str
    request: bytes  # regex on the request line, e.g. rb"^POST /api/2.0/mlflow/model-versions/create "
    mode: str  # before | mid | after
    body: bytes = b""
    stays_down: bool = False  # restart only once the step has failed
    mid_bytes: int = 1 << 20

    def matches(self, request: bytes) -> bool:
        first_line = request.split(b"\r\n", 1)[0]
        return bool(re.search(self.request, first_line)) and (not self.body or re.search(self.body, request) is not None)


class KillingRelay:
    """A TCP relay to the server that SIGKILLs it at an armed :class:`KillPoint`.

    Requests on one connection never overlap (HTTP/1.1 without pipelining), so a
    chunk that starts with a method begins a new request.
    """

    def __init__(self, backend_port: int, kill: Callable[[], None]) -> None:
        self.backend_port = backend_port
        self._kill = kill
        self._lock = threading.Lock()
        self._point: KillPoint | None = None
        self.fired = threading.Event()
        self.fired_at = 0.0
        self.first_ok_after_kill: float | None = None
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, name="relay-accept", daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def arm(self, point: KillPoint) -> None:
        with self._lock:
            self._point = point
            self.fired.clear()
            self.first_ok_after_kill = None

    def disarm(self) -> None:
        with self._lock:
            self._point = None

    def close(self) -> None:
        self._closed = True
        self._listener.close()

    def _fire(self) -> bool:
        with self._lock:
            if self._point is None or self.fired.is_set():
                return False
            self._point = None
            self._kill()
            self.fired_at = time.monotonic()
            self.fired.set()
            return True

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            backend = socket.create_connection(("127.0.0.1", self.backend_port), timeout=5)
        except OSError:
            client.close()  # the server is down: the client sees the connection close, as at a dead pod
            return
        backend.settimeout(None)
        answer_then_kill = threading.Event()
        threading.Thread(target=self._answers, args=(backend, client, answer_then_kill), daemon=True).start()
        request = b""
        mid_left: int | None = None
        try:
            while data := client.recv(1 << 16):
                if data.startswith(_METHODS):
                    request = b""
                request = (request + data)[:1 << 16]
                point = self._point
                if point is not None and mid_left is None and not answer_then_kill.is_set() and point.matches(request):
                    if point.mode == "before":
                        self._fire()
                        return
                    if point.mode == "after":
                        answer_then_kill.set()
                    else:
                        mid_left = point.mid_bytes
                if mid_left is not None:
                    if len(data) >= mid_left:
                        backend.sendall(data[:mid_left])
                        self._fire()
                        return
                    mid_left -= len(data)
                backend.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (client, backend):
                _close(sock)

    def _answers(self, backend: socket.socket, client: socket.socket, kill_first: threading.Event) -> None:
        try:
            while data := backend.recv(1 << 16):
                if kill_first.is_set() and self._fire():
                    return  # committed on the server, never heard by the client
                if self.fired.is_set() and self.first_ok_after_kill is None and data.startswith(b"HTTP/1.1 2"):
                    self.first_ok_after_kill = time.monotonic()
                client.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (client, backend):
                _close(sock)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


# --------------------------------------------------------------------------- reading the registry directly


class RegistryReader:
    """Reads the registry over MLflow's REST API with no retries, and checks a version's files completely."""

    def __init__(self, url: str, model_name: str) -> None:
        self.url = url
        self.model_name = model_name
        self._verified: dict[str, bool] = {}

    def _get(self, path: str, **query: str) -> bytes:
        with urllib.request.urlopen(f"{self.url}{path}?{urllib.parse.urlencode(query)}", timeout=10) as response:
            return response.read()

    def aliases(self) -> dict[str, str]:
        model = json.loads(self._get("/api/2.0/mlflow/registered-models/get", name=self.model_name))
        return {a["alias"]: str(a["version"]) for a in model["registered_model"].get("aliases", [])}

    def version(self, version: str) -> dict:
        return json.loads(self._get("/api/2.0/mlflow/model-versions/get", name=self.model_name,
                                    version=version))["model_version"]

    def versions(self) -> list[dict]:
        found = json.loads(self._get("/api/2.0/mlflow/model-versions/search", filter=f"name='{self.model_name}'",
                                     max_results="1000"))
        return found.get("model_versions", [])

    def lock_exists(self) -> bool:
        try:
            self._get("/api/2.0/mlflow/registered-models/get", name=registry.promotion_lock_name(self.model_name))
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return False
            raise
        return True

    def complete(self, version: str) -> bool:
        """Whether the version's weights match its model.json's sha256 and its lineage tag.

        Raises OSError or HTTPException when the server cannot be read (down, cut
        off mid-download): that says nothing about the version.
        """
        if version in self._verified:
            return self._verified[version]
        record = self.version(version)
        source = record["source"]
        if not source.startswith("mlflow-artifacts:/"):
            raise ValueError(f"version {version} has source {source!r}; expected the server's proxied store")
        base = "/api/2.0/mlflow-artifacts/artifacts/" + source[len("mlflow-artifacts:/"):].strip("/")
        try:
            model_json = json.loads(self._get(f"{base}/model.json"))
            weights = self._get(f"{base}/model.safetensors")
        except urllib.error.HTTPError as exc:
            if exc.code != 404:
                raise
            self._verified[version] = False
            return False
        tags = {t["key"]: t["value"] for t in record.get("tags", [])}
        sha256 = hashlib.sha256(weights).hexdigest()
        ok = sha256 == model_json.get("weights_sha256") == tags.get(registry.WEIGHTS_SHA256)
        self._verified[version] = ok
        return ok


class Watcher:
    """Polls the aliases while faults are injected; records every alias seen at an incomplete version."""

    def __init__(self, reader: RegistryReader, check: Callable[[dict[str, str]], str | None] | None = None) -> None:
        self.reader = reader
        self.check = check
        self.violations: list[str] = []
        self.reads = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="alias-watcher", daemon=True)

    def __enter__(self) -> Watcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            try:
                self.observe()
            except (OSError, ValueError, http.client.HTTPException):
                continue  # the server is down or was cut off mid-read

    def observe(self) -> None:
        aliases = self.reader.aliases()
        self.reads += 1
        for alias, version in aliases.items():
            if not self.reader.complete(version):
                self.violations.append(f"{alias} -> version {version}, whose artifacts are incomplete")
        problem = self.check(aliases) if self.check else None
        if problem:
            self.violations.append(problem)


# --------------------------------------------------------------------------- one kill case


@dataclass
class StepResult:
    value: object = None
    error: BaseException | None = None
    seconds: float = 0.0


def _in_thread(step: Callable[[], object]) -> tuple[threading.Thread, StepResult]:
    result = StepResult()

    def run() -> None:
        started = time.monotonic()
        try:
            result.value = step()
        except BaseException as exc:  # noqa: BLE001 - the case judges the error
            result.error = exc
        result.seconds = time.monotonic() - started

    thread = threading.Thread(target=run, name="registry-step", daemon=True)
    thread.start()
    return thread, result


def clear_failure(error: BaseException, server_url: str) -> str | None:
    """None when ``error`` names the server and says what to do; else why it is unclear."""
    text = str(error)
    missing = [what for what, ok in (("the server's URL", server_url in text),
                                     ("what to do (restart / re-run)", bool(re.search(r"re-?run|restart", text))))
               if not ok]
    return f"{type(error).__name__} without {' and '.join(missing)}: {text[:300]}" if missing else None


@dataclass
class CaseResult:
    name: str
    ok: bool
    lost: int
    recover_s: float | None
    notes: list[str]
    ended: str = ""


def run_case(server: MlflowServer, relay: KillingRelay, point: KillPoint, step: Callable[[], object],
             check_after: Callable[[object], list[str]], watcher_check=None) -> CaseResult:
    """Arm ``point``, run ``step`` through the relay, kill, restart, and judge what the registry holds."""
    notes: list[str] = []
    ended = "failed clearly with the server down; the re-run succeeded" if point.stays_down \
        else "succeeded through the client's retries"
    reader = RegistryReader(server.url, MODEL_NAME)
    with Watcher(reader, watcher_check) as watcher, stack.environ(CLIENT_RETRY_ENV):
        relay.arm(point)
        with stack.environ(STAYS_DOWN_ENV if point.stays_down else {}):
            thread, result = _in_thread(step)
            while not relay.fired.wait(0.1):
                if not thread.is_alive():
                    break
            if not relay.fired.is_set():
                relay.disarm()
                return CaseResult(point.name, False, 0, None,
                                  [f"kill point never reached; the step ended with {result.error or 'success'}"])
            if point.stays_down:
                thread.join(STEP_TIMEOUT_S)
        restarted = server.start()
        if point.stays_down:
            if result.error is None:
                notes.append("the step succeeded with the server down")
            else:
                unclear = clear_failure(result.error, relay.url)
                if unclear:
                    notes.append(unclear)
                # The step is run again, as a pipeline's retry would.
                thread, result = _in_thread(step)
        thread.join(STEP_TIMEOUT_S)
        if not thread.is_alive() and result.error is not None and not point.stays_down:
            # MLflow's retries ran out before the server was back: a clear failure, then the pipeline's retry.
            unclear = clear_failure(result.error, relay.url)
            if unclear:
                notes.append(unclear)
            ended = "failed clearly while the server restarted; the re-run succeeded"
            thread, result = _in_thread(step)
            thread.join(STEP_TIMEOUT_S)
        if thread.is_alive():
            notes.append(f"the step did not finish within {STEP_TIMEOUT_S:.0f} s of the restart")
        elif result.error is not None:
            notes.append(f"the step failed after the restart: {type(result.error).__name__}: {result.error}")
        watcher.observe()  # once more with the server surely up
    recover = None if relay.first_ok_after_kill is None else max(0.0, relay.first_ok_after_kill - restarted)
    lost = len(watcher.violations)
    notes += watcher.violations[:5]
    if result.error is None and not thread.is_alive():
        after = check_after(result.value)
        lost += sum(1 for n in after if n.startswith("lost:"))
        notes += after
    ok = not notes
    log.info("case %s: ok=%s recover=%s notes=%s", point.name, ok, recover, notes)
    return CaseResult(point.name, ok, lost, recover, notes, ended)


# --------------------------------------------------------------------------- register and promote under kills


API = rb"/api/2\.0/mlflow"
ARTIFACTS = rb"/api/2\.0/mlflow-artifacts/artifacts/"
REGISTER_POINTS = (
    KillPoint("register: create run", rb"^POST " + API + rb"/runs/create ", "after"),
    KillPoint("register: log params", rb"^POST " + API + rb"/runs/log-batch ", "before"),
    KillPoint("register: weights upload half-way", rb"^PUT " + ARTIFACTS + rb"\S*model\.safetensors ", "mid"),
    KillPoint("register: model.json uploaded", rb"^PUT " + ARTIFACTS + rb"\S*model\.json ", "after"),
    KillPoint("register: run finished", rb"^POST " + API + rb"/runs/update ", "after"),
    KillPoint("register: create version", rb"^POST " + API + rb"/model-versions/create ", "before"),
    KillPoint("register: version created", rb"^POST " + API + rb"/model-versions/create ", "after"),
    KillPoint("register: challenger alias", rb"^POST " + API + rb"/registered-models/alias ", "after"),
    KillPoint("register: create version, stays down", rb"^POST " + API + rb"/model-versions/create ", "after",
              stays_down=True),
)
PROMOTE_POINTS = (
    KillPoint("promote: lock taken", rb"^POST " + API + rb"/registered-models/create ", "after"),
    KillPoint("promote: read champion", rb"^GET " + API + rb"/registered-models/get\?name=chaos-registry ",
              "before"),
    KillPoint("promote: previous-champion set", rb"^POST " + API + rb"/registered-models/alias ", "after",
              body=rb'"alias":\s*"previous-champion"'),
    KillPoint("promote: champion moving", rb"^POST " + API + rb"/registered-models/alias ", "before",
              body=rb'"alias":\s*"champion"'),
    KillPoint("promote: champion moved", rb"^POST " + API + rb"/registered-models/alias ", "after",
              body=rb'"alias":\s*"champion"'),
    KillPoint("promote: canary record", rb"^POST " + API + rb"/model-versions/set-tag ", "after"),
    KillPoint("promote: lock released", rb"^DELETE " + API + rb"/registered-models/delete ", "after"),
    KillPoint("promote: champion moving, stays down", rb"^POST " + API + rb"/registered-models/alias ", "before",
              body=rb'"alias":\s*"champion"', stays_down=True),
)
SHORT_POINTS = ("register: weights upload half-way", "register: version created",
                "promote: previous-champion set", "promote: champion moving, stays down")


def _promote_step(tracking_uri: str, version: str) -> Callable[[], object]:
    """The delivery's promote hook: champion -> version, then the version's canary record."""
    promoted, _ = registry_hooks(tracking_uri, MODEL_NAME, version)
    state = RolloutState(candidate=f"models:/{MODEL_NAME}/{version}", backend="local", policy={},
                         candidate_version=version)

    def step() -> object:
        promoted(state)
        return version

    return step


def run_registry(work_dir: Path, short: bool) -> list[Outcome]:
    models = stack.models(work_dir / "models", count=2)
    server = MlflowServer(work_dir / "mlflow", free_port())
    server.root.mkdir(parents=True)
    server.start()
    relay = KillingRelay(server.port, server.kill)
    config = registry.RegistryConfig(tracking_uri=relay.url, model_name=MODEL_NAME)
    reader = RegistryReader(server.url, MODEL_NAME)
    try:
        register_results = []
        for i, point in enumerate(p for p in REGISTER_POINTS if not short or p.name in SHORT_POINTS):
            model = models[i % len(models)]
            before = {v["version"] for v in reader.versions()}

            def check_register(value: object, before: set[str] = before) -> list[str]:
                return _check_register(reader, value, before)

            register_results.append(run_case(server, relay, point, lambda m=model: registry.register(config, m),
                                              check_register))
        # Promotions start from a known champion: the first registered version.
        with stack.environ(CLIENT_RETRY_ENV):
            registry.promote(config, "1")
        promote_results = []
        for i, point in enumerate(p for p in PROMOTE_POINTS if not short or p.name in SHORT_POINTS):
            with stack.environ(CLIENT_RETRY_ENV):
                old = registry.champion(config).version
                new = registry.register(config, models[i % len(models)]).version
            watch = _promotion_invariant(reader, old, new)
            promote_results.append(run_case(server, relay, point, _promote_step(relay.url, new),
                                            lambda value, o=old, n=new: _check_promote(reader, o, n), watch))
    finally:
        relay.close()
        server.stop()
    return [
        _outcome("SIGKILL of the MLflow server during register, restarted", register_results, server),
        _outcome("SIGKILL of the MLflow server during promote, restarted", promote_results, server),
    ]


def _check_register(reader: RegistryReader, value: object, before: set[str]) -> list[str]:
    notes = []
    assert isinstance(value, registry.ModelVersionRef), value
    aliases = reader.aliases()
    if aliases.get(registry.CHALLENGER) != value.version:
        notes.append(f"challenger -> {aliases.get(registry.CHALLENGER)}, register returned version {value.version}")
    try:
        if not reader.complete(value.version):
            notes.append(f"lost: registered version {value.version} has incomplete artifacts")
    except urllib.error.HTTPError as exc:
        notes.append(f"lost: registered version {value.version} cannot be read: {exc}")
    created = [v for v in reader.versions() if v["version"] not in before]
    same_run = [v["version"] for v in created if v.get("run_id") == value.run_id]
    if len(same_run) > 1:
        notes.append(f"versions {same_run} all registered from run {value.run_id}: a create was repeated")
    return notes


def _promotion_invariant(reader: RegistryReader, old: str, new: str) -> Callable[[dict[str, str]], str | None]:
    """What must hold at every moment of a promotion of ``new`` over ``old``."""

    def check(aliases: dict[str, str]) -> str | None:
        champion = aliases.get(registry.CHAMPION)
        if champion not in (old, new):
            return f"champion -> {champion} while promoting {new} over {old}"
        tags = {t["key"]: t["value"] for t in reader.version(new).get("tags", [])}
        if tags.get(CANARY_TAG) == PROMOTED and reader.aliases().get(registry.CHAMPION) != new:
            return f"version {new} is recorded as promoted but champion -> {champion}"
        return None

    return check


def _check_promote(reader: RegistryReader, old: str, new: str) -> list[str]:
    aliases = reader.aliases()
    notes = []
    if aliases.get(registry.CHAMPION) != new:
        notes.append(f"champion -> {aliases.get(registry.CHAMPION)} after promoting {new}")
    if aliases.get(registry.PREVIOUS_CHAMPION) != old:
        notes.append(f"lost: previous-champion -> {aliases.get(registry.PREVIOUS_CHAMPION)}, the champion "
                     f"replaced was {old}")
    tags = {t["key"]: t["value"] for t in reader.version(new).get("tags", [])}
    if tags.get(CANARY_TAG) != PROMOTED:
        notes.append(f"version {new} is champion but its canary record is {tags.get(CANARY_TAG)!r}")
    if reader.lock_exists():
        notes.append("the promotion lock was left behind")
    return notes


def _outcome(fault: str, results: list[CaseResult], server: MlflowServer) -> Outcome:
    recoveries = [r.recover_s for r in results if r.recover_s is not None]
    lost = sum(r.lost for r in results)
    succeeded = sum(r.ok for r in results)
    return Outcome(
        "registry", fault, len(results), succeeded, lost, max(recoveries) if recoveries else None,
        "each step succeeds on retry or fails naming the server; no alias at an incomplete version; nothing lost",
        met=bool(results) and succeeded == len(results) and lost == 0,
        details={"cases": {r.name: {"ok": r.ok, "ended": r.ended, "recover_s": r.recover_s, "notes": r.notes}
                           for r in results},
                 "server_start_s": [round(s, 1) for s in server.starts],
                 "recover": "restart of the server to the step's first 2xx answer"},
    )


# --------------------------------------------------------------------------- two promotions at once


def run_promotion_race(work_dir: Path, short: bool) -> list[Outcome]:
    rounds = 20 if short else 100
    started = time.monotonic()
    models = stack.models(work_dir / "models", count=4)
    server = MlflowServer(work_dir / "mlflow", free_port())
    server.root.mkdir(parents=True)
    server.start()
    config = registry.RegistryConfig(tracking_uri=server.url, model_name=MODEL_NAME)
    reader = RegistryReader(server.url, MODEL_NAME)
    consistent = lost = refused = both = 0
    problems: list[str] = []
    round_seconds: list[float] = [0.0]
    setup_s = 0.0
    try:
        versions = [registry.register(config, m).version for m in models]
        registry.promote(config, versions[0])
        setup_s = time.monotonic() - started
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=server.url, registry_uri=server.url)
        for round_ in range(rounds):
            champion_before = reader.aliases()[registry.CHAMPION]
            others = [v for v in versions if v != champion_before]
            pair = (others[round_ % 3], others[(round_ + 1) % 3])
            for version in pair:
                client.delete_model_version_tag(MODEL_NAME, version, CANARY_TAG)
            barrier = threading.Barrier(2)
            round_started = time.monotonic()
            results: dict[str, StepResult] = {}
            threads = []
            for version in pair:
                step = _promote_step(server.url, version)

                def start_together(step: Callable[[], object] = step) -> object:
                    barrier.wait()
                    return step()

                thread, results[version] = _in_thread(start_together)
                threads.append(thread)
            for thread in threads:
                thread.join(STEP_TIMEOUT_S)
            round_seconds.append(time.monotonic() - round_started)
            verdict = _judge_race(reader, champion_before, pair, results, server.url)
            if verdict.refused:
                refused += 1
            if verdict.both:
                both += 1
            lost += verdict.lost
            if verdict.problems:
                problems.append(f"round {round_}: " + "; ".join(verdict.problems))
            else:
                consistent += 1
    finally:
        server.stop()
    return [Outcome(
        "promotion_race", "two versions promoted to champion at the same moment", rounds, consistent, lost, None,
        "every round ends as a serial order of the promotions that succeeded; refusals say so; nothing lost",
        met=consistent == rounds and lost == 0,
        details={"both_promoted_in_turn": both, "one_refused": refused, "problems": problems[:10],
                 "server_start_s": [round(s, 1) for s in server.starts], "setup_s": round(setup_s, 1),
                 "round_s_max": round(max(round_seconds), 2),
                 "design": "challenger stays on the newest registered version, so champion may equal challenger"},
    )]


@dataclass
class RaceVerdict:
    problems: list[str]
    lost: int = 0
    refused: bool = False
    both: bool = False


def _judge_race(reader: RegistryReader, before: str, pair: tuple[str, str], results: dict[str, StepResult],
                server_url: str) -> RaceVerdict:
    verdict = RaceVerdict([])
    succeeded = [v for v in pair if results[v].error is None and results[v].seconds > 0]
    for version in pair:
        error = results[version].error
        if error is not None:
            if not isinstance(error, registry.PromotionInProgress):
                verdict.problems.append(f"promoting {version} failed: {type(error).__name__}: {error}")
            elif clear_failure(error, server_url):
                verdict.problems.append(f"refusal of {version} is unclear: {error}")
            verdict.refused = True
    aliases = reader.aliases()
    champion, previous = aliases.get(registry.CHAMPION), aliases.get(registry.PREVIOUS_CHAMPION)
    promoted = {v for v in pair
                if {t["key"]: t["value"] for t in reader.version(v).get("tags", [])}.get(CANARY_TAG) == PROMOTED}
    if len(succeeded) == 2:
        verdict.both = True
        # Serial order: the second promotion replaced the first.
        expected = {(pair[0], pair[1]), (pair[1], pair[0])}
        if (champion, previous) not in expected:
            verdict.problems.append(f"both promotions of {pair} succeeded over {before} but champion -> {champion}, "
                                    f"previous-champion -> {previous}")
    elif len(succeeded) == 1:
        (winner,) = succeeded
        if (champion, previous) != (winner, before):
            verdict.problems.append(f"only {winner} was promoted over {before} but champion -> {champion}, "
                                    f"previous-champion -> {previous}")
    else:
        verdict.problems.append(f"neither of {pair} was promoted")
    if promoted != set(succeeded):
        verdict.problems.append(f"canary record says promoted for {sorted(promoted)}, promotions that succeeded: "
                                f"{sorted(succeeded)}")
    # A promotion that reported success but is neither champion nor the champion it replaced is lost history.
    verdict.lost = sum(1 for v in succeeded if v not in (champion, previous))
    if champion is not None and not reader.complete(champion):
        verdict.problems.append(f"champion -> {champion}, whose artifacts are incomplete")
    return verdict


SCENARIOS = (Scenario("registry", run_registry), Scenario("promotion_race", run_promotion_race))
