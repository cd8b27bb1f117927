"""The weighted router of the local serving stack: one address in front of a stable and a canary model server.

    python -m defectkit.delivery.local.router --port P --state FILE [--stable URL] [--host 127.0.0.1]

``POST /v2/models/<name>/infer`` goes to the canary for ``weight`` percent of requests and
to the stable server for the rest, by smooth weighted round robin (the nginx algorithm):
deterministic, so any run of 100 consecutive requests holds exactly ``weight`` canary
requests, and the observed split tracks the weight from the first requests on, where a
random draw would wander by several points over a few hundred. Every other path goes to
the stable server. Answers carry ``x-defectkit-variant: stable|canary``.

The admin endpoint ``/router/config`` (GET, PUT ``{"stable": URL, "canary": URL|null,
"weight": N}``) changes the routing in one step; a PUT is written to the state file before
it is answered, so a restarted router comes back with the same split. GET also reports
requests in flight per upstream URL, which the stack waits on before stopping a server.

A request the canary refuses at connect time (it never reached the canary) is sent to the
stable server instead; one the stable server refuses goes to the canary when the canary
already takes a share of traffic (never to a canary at 0%, which is still being probed),
so that a dead server costs clients only the requests it held when it died. A request is
redirected once at most. Nothing else is retried, since inference requests reach the model.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from defectkit.delivery.backend import CANARY, STABLE, validate_percent

log = logging.getLogger(__name__)

VARIANT_HEADER = "x-defectkit-variant"
CONFIG_PATH = "/router/config"
HEALTH_PATH = "/router/health"
INFER_PATHS = ("/v2/models/{model_name}/infer", "/v2/models/{model_name}/versions/{model_version}/infer")
# Request and response headers that describe the body, which the router passes along unchanged.
_PASSED_REQUEST_HEADERS = ("content-type", "inference-header-content-length", "accept")
_PASSED_RESPONSE_HEADERS = ("content-type", "inference-header-content-length", "retry-after")


@dataclass(frozen=True)
class RouterConfig:
    stable: str | None = None
    canary: str | None = None
    weight: int = 0

    def __post_init__(self) -> None:
        validate_percent(self.weight)
        for name in (STABLE, CANARY):
            url = getattr(self, name)
            if url is not None and not (isinstance(url, str) and url.startswith(("http://", "https://"))):
                raise ValueError(f"{name} upstream {url!r} must be an http:// URL or null")
        if self.weight and self.canary is None:
            raise ValueError(f"canary weight {self.weight} needs a canary upstream")
        if self.weight < 100 and self.stable is None:
            raise ValueError(f"canary weight {self.weight} leaves {100 - self.weight}% to a stable upstream; "
                             "set one (or send 100% to the canary)")

    @classmethod
    def from_json(cls, record: Any) -> RouterConfig:
        if not isinstance(record, dict) or set(record) - {STABLE, CANARY, "weight"}:
            raise ValueError(f"router config {record!r} must be an object with stable, canary and weight")
        return cls(stable=record.get(STABLE), canary=record.get(CANARY), weight=record.get("weight", 0))


class SmoothWeightedRoundRobin:
    """nginx's smooth weighted round robin: each pick adds every weight to its credit, takes the
    largest credit and charges it the total. Picks interleave evenly and follow the weights exactly."""

    def __init__(self, weights: dict[str, int]) -> None:
        self.weights = {name: w for name, w in weights.items() if w > 0}
        if not self.weights:
            raise ValueError(f"weights {weights} give nothing a positive share")
        self._total = sum(self.weights.values())
        self._credit = dict.fromkeys(self.weights, 0)

    def pick(self) -> str:
        for name, weight in self.weights.items():
            self._credit[name] += weight
        chosen = max(self._credit, key=self._credit.__getitem__)
        self._credit[chosen] -= self._total
        return chosen


def read_config(path: Path) -> RouterConfig | None:
    try:
        return RouterConfig.from_json(json.loads(Path(path).read_text()))
    except FileNotFoundError:
        return None


class Router:
    """Routing state shared by the requests of one router process (one event loop, so no locks)."""

    def __init__(self, config: RouterConfig, state_path: Path | None) -> None:
        self.state_path = state_path
        self.inflight: Counter[str] = Counter()
        self.routed: Counter[str] = Counter()
        self.redirected = 0
        self._apply(config)

    def _apply(self, config: RouterConfig) -> None:
        self.config = config
        weights = {CANARY: config.weight, STABLE: 100 - config.weight}
        self._picker = SmoothWeightedRoundRobin(weights)

    def update(self, config: RouterConfig) -> None:
        if self.state_path is not None:
            from defectkit.files import write_json_atomic

            write_json_atomic(self.state_path, asdict(config))
        self._apply(config)
        log.info("routing: stable %s, canary %s at %d%%", config.stable, config.canary, config.weight)

    def pick(self) -> tuple[str, str]:
        variant = self._picker.pick()
        return variant, getattr(self.config, variant)

    def fallback(self, variant: str) -> tuple[str, str] | None:
        """Where a request the ``variant`` server refused goes instead: stable for the canary, the canary for
        stable while it takes a share of traffic; None when there is no such server."""
        config = self.config
        if variant == CANARY and config.stable is not None:
            return STABLE, config.stable
        if variant == STABLE and config.canary is not None and config.weight > 0:
            return CANARY, config.canary
        return None

    def describe(self) -> dict[str, Any]:
        return {**asdict(self.config), "inflight": dict(self.inflight), "routed": dict(self.routed),
                "redirected": self.redirected}


def build_app(router: Router, *, timeout_s: float = 60.0):
    """The Starlette application of ``router``."""
    import httpx
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    client = httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=5.0),
                               # Idle connections are dropped before the model server's keep-alive timeout
                               # (uvicorn: 5 s) can close them under a request being sent.
                               limits=httpx.Limits(max_connections=256, max_keepalive_connections=64,
                                                   keepalive_expiry=2.0))

    async def forward(request: Request, variant: str, upstream: str) -> Response:
        body = await request.body()
        headers = {k: v for k, v in request.headers.items() if k in _PASSED_REQUEST_HEADERS}
        path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        reconnected = redirected = False
        while True:
            router.inflight[upstream] += 1
            try:
                answer = await client.request(request.method, upstream + path, content=body, headers=headers)
            except httpx.ConnectError as exc:
                # Refused before it reached the model: the other server can take it without a double answer.
                other = router.fallback(variant) if not redirected else None
                if other is not None:
                    log.warning("%s %s refused the connection (%s); sending the request to %s", variant, upstream,
                                exc, other[0])
                    router.redirected += 1
                    redirected = True
                    variant, upstream = other
                    continue
                return _error(502, f"the {variant} model server {upstream} is unreachable: {exc}", variant)
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
                # The connection broke under the request: a pooled keep-alive connection the server closed as it
                # was reused, or a server that died (closed: RemoteProtocolError; reset: ReadError; gone before
                # the body was written: WriteError). Inference has no side effects, so the request is sent once
                # more on a fresh connection, which a dead server refuses: then the fallback above takes it.
                if not reconnected:
                    reconnected = True
                    log.info("%s model server %s dropped a pooled connection (%s); sending again", variant,
                             upstream, exc)
                    continue
                return _error(502, f"the {variant} model server {upstream} failed: {type(exc).__name__}: {exc}",
                              variant)
            except httpx.TimeoutException:
                return _error(504, f"the {variant} model server {upstream} did not answer within {timeout_s:g} s",
                              variant)
            except httpx.HTTPError as exc:
                return _error(502, f"the {variant} model server {upstream} failed: {type(exc).__name__}: {exc}",
                              variant)
            finally:
                router.inflight[upstream] -= 1
            router.routed[variant] += 1
            passed = {k: v for k, v in answer.headers.items() if k in _PASSED_RESPONSE_HEADERS}
            return Response(answer.content, status_code=answer.status_code,
                            headers={**passed, VARIANT_HEADER: variant})

    def _error(status: int, message: str, variant: str) -> Response:
        return JSONResponse({"error": message}, status_code=status, headers={VARIANT_HEADER: variant})

    async def infer(request: Request) -> Response:
        variant, upstream = router.pick()
        return await forward(request, variant, upstream)

    async def passthrough(request: Request) -> Response:
        if router.config.stable is None:
            return _error(503, "no stable model server is configured", STABLE)
        return await forward(request, STABLE, router.config.stable)

    async def config(request: Request) -> Response:
        if request.method == "PUT":
            try:
                router.update(RouterConfig.from_json(json.loads(await request.body())))
            except (ValueError, TypeError) as exc:
                return JSONResponse({"error": str(exc)}, status_code=400)
        return JSONResponse(router.describe())

    async def health(request: Request) -> Response:
        return JSONResponse({"ok": True})

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await client.aclose()

    routes = [Route(path, infer, methods=["POST"]) for path in INFER_PATHS]
    routes += [Route(CONFIG_PATH, config, methods=["GET", "PUT"]), Route(HEALTH_PATH, health, methods=["GET"]),
               Route("/{path:path}", passthrough, methods=["GET", "POST", "HEAD"])]
    return Starlette(routes=routes, lifespan=lifespan)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m defectkit.delivery.local.router", description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    parser.add_argument("--state", type=Path, help="routing state file: read at start, rewritten on every change")
    parser.add_argument("--stable", help="stable model server URL, when the state file has none yet")
    parser.add_argument("--timeout-s", type=float, default=60.0, help="upstream answer timeout (default %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    import uvicorn

    config = (read_config(args.state) if args.state else None) or RouterConfig(stable=args.stable)
    router = Router(config, args.state)
    if args.state is not None:
        router.update(config)
    server = uvicorn.Server(uvicorn.Config(build_app(router, timeout_s=args.timeout_s), host=args.host,
                                           port=args.port, log_config=None, access_log=False,
                                           timeout_graceful_shutdown=10))
    server.run()
    return 0 if server.started else 2


if __name__ == "__main__":
    raise SystemExit(main())
