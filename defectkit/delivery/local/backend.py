"""The delivery Backend over the local stack: the router's split, the servers behind it, their figures.

Servers are never stopped while the router still sends them requests: traffic moves
first, then in-flight requests drain, then the process gets SIGTERM.

A stable server that died is started again, with the model it served, by the next call
that needs the stack (as Kubernetes restarts a predictor pod); until then the router sends
stable's share to a canary that already takes traffic. A canary that died is not restarted:
it fails the analysis in progress, and the delivery rolls it back.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from defectkit.delivery.backend import (
    CANARY,
    EMPTY,
    PROBE_BATCH,
    STABLE,
    BackendError,
    ProbeAnswer,
    VariantMetrics,
    infer_request,
    probe_answers,
    validate_percent,
)
from defectkit.delivery.local.processes import (
    SERVE_COMMAND,
    ServerInfo,
    alive,
    free_port,
    log_tail,
    port_free,
    spawn,
    start_model_server,
    stop_process,
    wait_ready,
)
from defectkit.delivery.local.router import CONFIG_PATH as ROUTER_CONFIG_PATH
from defectkit.delivery.local.router import HEALTH_PATH as ROUTER_HEALTH_PATH
from defectkit.delivery.local.scrape import Scraper
from defectkit.delivery.local.stack import (
    ROUTER,
    ROUTER_STATE_FILE,
    Stack,
    locked,
    read_stack,
    stack_dir,
    write_stack,
)
from defectkit.serving.contract import SCORE_OUTPUT

log = logging.getLogger(__name__)

ROUTER_COMMAND = (sys.executable, "-m", "defectkit.delivery.local.router")


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
        with locked(self.work_dir):
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
                write_stack(self.work_dir, stack)
            if stack.canary is not None and not alive(stack.canary):
                log.warning("the canary server (pid %d) is not running any more; it gets no traffic",
                            stack.canary.pid)
                stack.canary = None
            if not alive(stack.router):
                stack.router = self._start_router(stack)
                write_stack(self.work_dir, stack)
            config = self._router_config(stack)
            expected_canary = stack.canary.url if stack.canary else None
            if config["stable"] != stack.stable.url or config["canary"] != expected_canary:
                weight = config["weight"] if expected_canary and config["canary"] == expected_canary else 0
                self._put_config(stack, stable=stack.stable.url, canary=expected_canary, weight=weight)
            write_stack(self.work_dir, stack)
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
        if not port and stack.router is not None and port_free(options.host, stack.router.port):
            port = stack.router.port  # the address clients were given stays the same
        port = port or free_port(options.host)
        command = [*options.router_command, "--port", str(port), "--host", options.host,
                   "--state", str(stack_dir(self.work_dir) / ROUTER_STATE_FILE), "--stable", stack.stable.url]
        info = spawn(ROUTER, command, port=port, host=options.host, model=None, args=(),
                      log_path=stack_dir(self.work_dir) / f"router-{port}.log")
        wait_ready(info, ROUTER_HEALTH_PATH, options.start_timeout_s)
        return info

    def _watch(self, stack: Stack) -> None:
        if self._scraper is None:
            self._scraper = Scraper(self.options.scrape_interval_s)
        self._scraper.watch({STABLE: stack.stable, CANARY: stack.canary})

    def _stack(self, *, lock_held: bool = False) -> Stack:
        """The running stack, with its stable server started again if it died; ``lock_held`` when the caller
        holds the stack's lock already (it is not re-entrant)."""
        stack = read_stack(self.work_dir)
        if stack is not None and alive(stack.router) and stack.stable is not None and not alive(stack.stable):
            stack = self._restart_stable(lock_held)
        if stack is None or not alive(stack.router) or not alive(stack.stable):
            raise BackendError(f"the local serving stack in {stack_dir(self.work_dir)} is not running (router or "
                               f"stable server down); start it with a delivery (defectkit rollout start --backend local)")
        if self._scraper is None:
            self._watch(stack)
        return stack

    def _restart_stable(self, lock_held: bool) -> Stack | None:
        """Start the stable server again with the model it served and point the router at it; the routing
        split is kept."""
        with contextlib.nullcontext() if lock_held else locked(self.work_dir):
            stack = read_stack(self.work_dir)
            if stack is None or stack.stable is None or alive(stack.stable) or not alive(stack.router):
                return stack  # another process restarted it, or there is nothing to route to
            dead = stack.stable
            log.warning("the stable server (pid %d, %s) is not running; starting it again with %s", dead.pid,
                        dead.url, dead.model)
            stack.stable = self._start_server(STABLE, dead.model)
            write_stack(self.work_dir, stack)
            config = self._router_config(stack)
            canary = config["canary"] if stack.canary is not None and config["canary"] == stack.canary.url else None
            self._put_config(stack, stable=stack.stable.url, canary=canary, weight=config["weight"] if canary else 0)
            log.warning("stable server restarted (pid %d) on %s", stack.stable.pid, stack.stable.url)
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
        with locked(self.work_dir):
            stack = self._stack(lock_held=True)
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
            write_stack(self.work_dir, stack)
            self._put_config(stack, stable=stack.stable.url, canary=canary.url, weight=0)
        self._watch(stack)

    def _remove_canary(self, stack: Stack) -> None:
        canary = stack.canary
        self._put_config(stack, stable=stack.stable.url, canary=None, weight=0)
        self._drain(stack, canary)
        stop_process(canary, self.options.stop_timeout_s)
        stack.canary = None
        write_stack(self.work_dir, stack)

    def set_traffic(self, canary_percent: int) -> None:
        validate_percent(canary_percent)
        stack = self._stack()
        if stack.canary is None:
            if canary_percent == 0:
                return
            raise BackendError("the local stack has no canary server; deploy a candidate first")
        if not alive(stack.canary):
            raise BackendError(f"the canary server (pid {stack.canary.pid}) is not running; its log "
                               f"{stack.canary.log} ends:\n{log_tail(stack.canary)}")
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
        with locked(self.work_dir):
            stack = self._stack(lock_held=True)
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
            write_stack(self.work_dir, stack)
            self._watch(stack)
            self._drain(stack, old)
            stop_process(old, self.options.stop_timeout_s)
        log.info("promoted %s: it serves all traffic at %s", new.model, stack.router.url)

    def rollback(self) -> None:
        """All traffic to the stable server, then the canary server drains and stops."""
        with locked(self.work_dir):
            stack = read_stack(self.work_dir)
            if stack is None or not alive(stack.router) or stack.stable is None:
                # Nothing routes requests, so no traffic can be stranded; a leftover canary is stopped.
                log.warning("the local stack in %s is not routing; nothing to roll back", stack_dir(self.work_dir))
                if stack is not None and stack.canary is not None:
                    stop_process(stack.canary, self.options.stop_timeout_s)
                    stack.canary = None
                    write_stack(self.work_dir, stack)
                return
            if not alive(stack.stable):
                # Traffic goes back to stable, so stable must answer it.
                stack = self._restart_stable(lock_held=True)
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
        if stack.canary is not None and not alive(stack.canary):
            # The candidate's own failure, not missing figures: the analysis fails.
            raise BackendError(f"the canary server (pid {stack.canary.pid}) is not running; see its log "
                               f"{stack.canary.log}")
        scraper = self._scraper
        result = {STABLE: scraper.window(stack.stable, window_s)}
        result[CANARY] = scraper.window(stack.canary, window_s) if stack.canary is not None else EMPTY
        return result

    def probe(self, images: list[bytes]) -> ProbeAnswer:
        import httpx

        stack = self._stack()
        if stack.canary is None:
            raise BackendError("the local stack has no canary server to probe; deploy a candidate first")
        url = f"{stack.canary.url}/v2/models/{self.options.model_name}/infer"
        batches = [images[start:start + PROBE_BATCH] for start in range(0, len(images), PROBE_BATCH)]
        bodies = []
        for batch in batches:
            try:
                response = self._http.post(url, json=infer_request(batch, (SCORE_OUTPUT,)))
            except httpx.HTTPError as exc:
                raise BackendError(f"probe {url} failed: {exc}") from exc
            if response.status_code != 200:
                raise BackendError(f"probe {url} failed: HTTP {response.status_code}: {response.text[:300]}")
            bodies.append(response.json())
        return probe_answers(bodies, [len(batch) for batch in batches], url)
