"""Metrics missing during canary analysis: Prometheus stopped, or its scrape of the canary broken, mid-rollout.

The kserve delivery path with real metrics: the controller drives the Kubernetes API
stand-in (tests/kube_api.py, Knative mode) while a real Prometheus (Debian's ``prometheus``)
scrapes two real ``defectkit serve`` processes labelled as the service's two revisions, and
a router thread sends each request to the revision the stand-in's status gives it. Both
revisions serve the same good model, so with metrics the candidate passes every analysis:
whatever stops it here is the missing data.

Once the first analysis passed, one fault:

- ``prometheus down``: Prometheus is stopped (by PID) and stays down;
- ``scrape broken``: the canary's ``/metrics``, which Prometheus scrapes through a fault-injecting
  proxy (tests/chaos/proxy.py), answers 503 from then on, so each scrape fails (``up`` 0). Not a
  reconfiguration: Prometheus applies a reloaded target list only on its discovery manager's next
  5 s tick (``updatert: 5 * time.Second`` in discovery/manager.go), by which time the canary may
  have passed its step on complete figures;
- ``prometheus restarted`` (recovery): Prometheus is stopped for two analysis intervals, then
  started again on the same port with the same data.

Goals (the issue's): an analysis whose window lies wholly inside the fault is inconclusive,
never a pass; a candidate is never promoted on missing data; ``max_inconclusive`` such
analyses in a row roll it back; once metrics are back the delivery goes on (time to recover:
Prometheus ready again -> first passing analysis). Client requests are untouched by any of it.
"""

from __future__ import annotations

import concurrent.futures
import json
import shutil
import threading
import time
from dataclasses import replace, dataclass, field
from pathlib import Path

import yaml

from defectkit.delivery.analysis import INCONCLUSIVE, PASS, CanaryPolicy
from defectkit.delivery.backend import infer_request
from defectkit.delivery.controller import Controller
from defectkit.delivery.kserve.api import KubeApi
from defectkit.delivery.kserve.backend import KServeBackend
from defectkit.delivery.kserve.manifest import ServiceConfig
from defectkit.delivery.kserve.prometheus import PrometheusClient, query_window_s
from defectkit.delivery.kserve.state import ConfigMapStore
from defectkit.delivery.state import ANALYSING, PROMOTED, ROLLED_BACK, RolloutState
from defectkit.retry import RetryPolicy
from tests.chaos.harness import Outcome, Scenario
from tests.chaos.proxy import FaultPlan, FaultProxy
from tests.chaos.stack import INFER_PATH, images, models, start_model_server
from tests.kube_api import KubeApiStandIn
from tests.stand_ins import KnativeRouter
from tests.servers import PodTarget, ServerProcess, free_port, prometheus_config, start_server

NAME = "metrics_missing"
NAMESPACE, SERVICE = "ml", "defect"
STABLE_URI, CANDIDATE_URI = "gs://defectkit-models/defect/1", "gs://defectkit-models/defect/2"
REVISIONS = {"stable": f"{SERVICE}-predictor-00001", "candidate": f"{SERVICE}-predictor-00002"}
SCRAPE_INTERVAL_S = 1.0
RATE = 10.0  # requests a second, both revisions together


def policy(short: bool) -> CanaryPolicy:
    # failure_threshold above max_inconclusive: a rollback after max_inconclusive analyses can only come from
    # inconclusive verdicts, and one that needs failure_threshold shows missing data counted as failures.
    return CanaryPolicy(steps=(25, 50, 100), interval_s=3.0 if short else 5.0, failure_threshold=5, min_requests=5,
                        max_inconclusive=3, max_error_rate=0.01, max_p99_latency_s=1.0)


@dataclass
class Prometheus:
    """A real Prometheus on a fixed port, so that it can be stopped and started again where clients expect it."""

    directory: Path
    targets: dict[str, PodTarget]
    port: int = field(default_factory=free_port)
    process: ServerProcess | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def write_config(self) -> None:
        config = prometheus_config(list(self.targets.values()), SCRAPE_INTERVAL_S)
        (self.directory / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.write_config()
        self.process = start_server(
            ["prometheus", f"--config.file={self.directory / 'prometheus.yml'}",
             f"--storage.tsdb.path={self.directory / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}"],
            url=self.url, health_path="/-/ready", log_path=self.directory / f"prometheus-{time.time():.0f}.log",
            timeout=120)

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None


def first_event(state: RolloutState, name: str) -> float | None:
    return next((e["t"] for e in state.timeline if e["event"] == name), None)


def break_scrape(gate: FaultProxy, prometheus: Prometheus, revision: str) -> float:
    """Make every scrape through ``gate`` fail; returns when Prometheus holds a failed scrape of ``revision``.

    From that moment an analysis's query sees the failure (the controller stamps an analysis before it
    queries), so the fault is timed from there, not from the first 503: between the two the newest figures
    are complete and a pass is right."""
    gate.set_plan(FaultPlan(kinds=("503",), probability=1.0, path_pattern=r"^/metrics"))
    client = PrometheusClient(prometheus.url, scrape_interval_s=SCRAPE_INTERVAL_S)
    deadline = time.monotonic() + 30 * SCRAPE_INTERVAL_S
    while client.value(f'min(up{{serving_knative_dev_revision="{revision}"}})') != 0.0:
        if time.monotonic() > deadline:
            raise TimeoutError(f"Prometheus recorded no failed scrape of {revision} behind the fault proxy")
        time.sleep(0.02)
    return time.time()


def deliver_with_fault(fault: str, prometheus: Prometheus, gate: FaultProxy, urls: dict[str, str],
                       bodies: list[bytes], pol: CanaryPolicy) -> Outcome:
    window_s = query_window_s(SCRAPE_INTERVAL_S, pol.interval_s)
    fault_start = fault_end = None
    with KubeApiStandIn(status_delay_s=0.05) as kube:
        api = KubeApi(kube.url, retry_policy=RetryPolicy(attempts=3, initial_delay_s=0.01, max_delay_s=0.05))
        client = PrometheusClient(prometheus.url, scrape_interval_s=SCRAPE_INTERVAL_S,
                                  retry_policy=RetryPolicy(attempts=2, initial_delay_s=0.1))
        backend = KServeBackend(api, NAMESPACE, SERVICE, client, poll_interval_s=0.2, traffic_timeout_s=30.0,
                                ready_timeout_s=30.0, candidate_uri=CANDIDATE_URI)
        backend.ensure_exists(ServiceConfig(name=SERVICE, namespace=NAMESPACE, image="ghcr.io/defectkit/serve:0.1.0",
                                            storage_uri=STABLE_URI))
        store = ConfigMapStore(api, NAMESPACE, SERVICE)
        controller = Controller(backend, pol, store, candidate=CANDIDATE_URI, backend_name="kserve")
        final: list[RolloutState] = []
        errors: list[BaseException] = []

        def deliver() -> None:
            try:
                final.append(controller.run())
            except BaseException as exc:  # noqa: BLE001 - reported in the outcome
                errors.append(exc)

        thread = threading.Thread(target=deliver, name=f"delivery-{fault}", daemon=True)
        with KnativeRouter(kube, NAMESPACE, SERVICE, urls, bodies, RATE) as router:
            thread.start()
            deadline = time.monotonic() + 120
            while True:  # the first analysis passed: the candidate holds the second step
                state = store.load()
                if state is not None and state.phase == ANALYSING and state.weight == pol.steps[1]:
                    break
                if not thread.is_alive() or time.monotonic() > deadline:
                    raise RuntimeError(f"the delivery never passed its first analysis with metrics: "
                                       f"{state.phase if state else None}: {state.reason if state else ''}")
                time.sleep(0.05)
            fault_start = time.time()
            if fault == "prometheus down":
                prometheus.stop()
            elif fault == "scrape broken":
                fault_start = break_scrape(gate, prometheus, REVISIONS["candidate"])
            else:
                prometheus.stop()
                time.sleep(2 * pol.interval_s)
                prometheus.start()
                fault_end = time.time()
            thread.join(timeout=60 + (pol.max_inconclusive + pol.failure_threshold + 4) * pol.interval_s)
            time.sleep(0.5)
        if thread.is_alive():
            raise TimeoutError(f"the delivery under {fault!r} did not finish")
        if errors:
            raise errors[0]
        if kube.internal_errors:
            raise RuntimeError(f"the Kubernetes API stand-in reported {kube.internal_errors}")
    state = final[0]

    # Analyses whose whole window lies inside the fault judged nothing but missing data; those whose window only
    # began before it had part of their figures missing, which must not pass a candidate either.
    missing = [a for a in state.analyses
               if a["t"] - window_s >= fault_start and (fault_end is None or a["t"] <= fault_end)]
    during = [a for a in state.analyses if a["t"] > fault_start and (fault_end is None or a["t"] <= fault_end)]
    passed_on_missing = [a for a in during if a["verdict"] == PASS]
    inconclusive = [a for a in during if a["verdict"] == INCONCLUSIVE]
    client_failures = [a for a in router.answers if not 200 <= a[2] < 300]
    details = {"phase": state.phase, "reason": state.reason, "window_s": window_s,
               "verdicts": [(round(a["t"] - fault_start, 1), a["weight"], a["verdict"]) for a in state.analyses],
               "explanations_while_missing": sorted({a["explanation"][:160] for a in missing}),
               "client_requests": len(router.answers), "client_failures": len(client_failures)}
    if fault_end is None:
        back = first_event(state, "traffic back on the stable version")
        recover = None if back is None else back - fault_start
        rolled_back_on_limit = (state.phase == ROLLED_BACK and len(inconclusive) == pol.max_inconclusive
                                and "inconclusive" in (state.reason or ""))
        met = (bool(missing) and not passed_on_missing and len(inconclusive) == len(during)
               and state.phase != PROMOTED and rolled_back_on_limit and not client_failures)
        goal = (f"every analysis without metrics inconclusive; never promoted; rolled back after "
                f"{pol.max_inconclusive} inconclusive; no client failures")
        details["fault_to_rollback_s"] = recover
    else:
        passes_after = [a for a in state.analyses if a["t"] > fault_end and a["verdict"] == PASS]
        recover = passes_after[0]["t"] - fault_end if passes_after else None
        met = (bool(missing) and not passed_on_missing and len(inconclusive) == len(during)
               and state.phase == PROMOTED and bool(passes_after) and not client_failures)
        goal = ("analyses while Prometheus is down inconclusive; promoted once metrics are back; no client "
                "failures")
    return Outcome(NAME, f"{fault} at {pol.steps[1]}%", attempted=len(during), succeeded=len(inconclusive),
                   lost=len(client_failures), recover_s=recover, goal=goal, met=met, details=details)


def run(work_dir: Path, short: bool) -> list[Outcome]:
    if shutil.which("prometheus") is None:
        raise RuntimeError("no `prometheus` binary on PATH (Debian: apt-get install prometheus)")
    model = models(work_dir / "models", count=1)[0]
    bodies = [json.dumps(infer_request([image])).encode() for image in images(work_dir / "images", count=20)]
    pol = policy(short)
    servers: dict[str, ServerProcess] = {}
    prometheus: Prometheus | None = None
    gate: FaultProxy | None = None
    outcomes: list[Outcome] = []
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:  # each start takes seconds: both at once
            futures = {name: pool.submit(start_model_server, work_dir, model, name, "--threads", "1")
                       for name in ("stable", "candidate")}
        for name, future in futures.items():
            if future.exception() is None:
                servers[name] = future.result()
        for future in futures.values():
            if future.exception() is not None:
                raise future.exception()
        gate = FaultProxy(servers["candidate"].url, "plain").start()  # Prometheus scrapes the canary through it
        scraped = {"stable": servers["stable"].url, "candidate": gate.url}
        targets = {name: PodTarget(address=scraped[name].removeprefix("http://"), namespace=NAMESPACE,
                                   pod=f"{REVISIONS[name]}-deployment-0",
                                   labels={"serving.kserve.io/inferenceservice": SERVICE, "component": "predictor",
                                           "serving.knative.dev/revision": REVISIONS[name]})
                   for name, server in servers.items()}
        prometheus = Prometheus(work_dir / "prometheus", targets)
        urls = {REVISIONS[name]: server.url + INFER_PATH for name, server in servers.items()}
        for fault in ("prometheus down", "scrape broken", "prometheus restarted"):
            if prometheus.process is None:
                prometheus.start()
            # An outage of two intervals plus a restart spans up to five windows: a limit of three would roll
            # back before the metrics are back, which is right, but not what this case measures.
            limit = replace(pol, max_inconclusive=6) if fault == "prometheus restarted" else pol
            outcomes.append(deliver_with_fault(fault, prometheus, gate, urls, bodies, limit))
            gate.set_plan(FaultPlan())
    finally:
        if gate is not None:
            gate.stop()
        if prometheus is not None:
            prometheus.stop()
        for server in servers.values():
            server.stop()
    return outcomes


SCENARIOS = (Scenario(NAME, run),)
