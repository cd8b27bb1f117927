"""A fault-injecting HTTP proxy in front of a storage emulator (or any HTTP server, such as a model server's
``/metrics`` that Prometheus scrapes): ``python -m tests.chaos.proxy --upstream URL``.

Clients point at the proxy (``STORAGE_EMULATOR_HOST``, ``AWS_ENDPOINT_URL``); it
forwards each request to the emulator, or, as its plan draws with a seed,
answers it with one of these faults and counts what it injected:

- ``503``: Service Unavailable, nothing forwarded;
- ``429``: Too Many Requests with ``Retry-After``, nothing forwarded;
- ``hold``: no answer until the client gives up (its timeout), the request
  forwarded first or not (phase ``after`` / ``before``);
- ``reset``: the connection closed with SO_LINGER 0 (a TCP reset): before the
  request is forwarded, after it was (the write landed, its answer is lost),
  or halfway through the answer's body (``mid-body``);
- ``slow``: the answer forwarded late and trickled out, within the client's timeout.

A request's body is read whole before anything is forwarded, as a real store
commits an object only once its body is complete: a fault never lands a
prefix of a write. The control API under ``/__proxy__/`` (never faulted) sets
the plan (``POST /__proxy__/plan``), reads the counts (``GET /__proxy__/counts``)
and the request log (``GET /__proxy__/log``).

The GCS emulator ignores preconditions, so with ``enforce_create_preconditions``
the proxy answers 412 to a create (``ifGenerationMatch=0``) of an object that
exists upstream, as GCS does; requests are serialised per object name while it
checks, so that two creates of one name cannot both pass.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import random
import re
import select
import socket
import struct
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlparse

FAULT_KINDS = ("503", "429", "hold", "reset", "slow")
FLAVOURS = ("gcs", "s3", "plain")
PHASES = {"hold": ("before", "after"), "reset": ("before", "after", "mid-body")}
CONTROL_PREFIX = "/__proxy__/"
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization",
                         "te", "trailer", "trailers", "transfer-encoding", "upgrade", "expect", "content-length"})
_LOG_LIMIT = 20000


@dataclass(frozen=True)
class FaultPlan:
    """Which requests get which faults: each request matching ``path_pattern`` and ``methods`` gets a fault with
    probability ``probability`` (drawn from ``random.Random(seed)`` in arrival order), its kind drawn from ``kinds``;
    at most ``max_faults`` in all (None: no limit)."""

    kinds: tuple[str, ...] = ()
    probability: float = 0.0
    seed: int = 0
    path_pattern: str = ""
    methods: tuple[str, ...] = ()
    max_faults: int | None = None
    phases: tuple[str, ...] = ()  # of hold and reset: only these (none given: all of PHASES)
    retry_after_s: int = 1
    hold_max_s: float = 60.0
    slow_s: float = 0.4
    enforce_create_preconditions: bool = False

    def __post_init__(self) -> None:
        unknown = set(self.kinds) - set(FAULT_KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; choose from {FAULT_KINDS}")
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"probability {self.probability} must be between 0 and 1")
        unknown = set(self.phases) - {p for phases in PHASES.values() for p in phases}
        if unknown:
            raise ValueError(f"unknown phases {sorted(unknown)}; choose from {PHASES}")
        if self.probability > 0 and not self.kinds:
            raise ValueError("a positive probability needs at least one fault kind")

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> FaultPlan:
        record = dict(record)
        for name in ("kinds", "methods", "phases"):
            record[name] = tuple(record.get(name) or ())
        return cls(**record)


@dataclass
class _State:
    plan: FaultPlan = field(default_factory=FaultPlan)
    draw: random.Random = field(default_factory=lambda: random.Random(0))
    faults: int = 0
    requests: int = 0
    forwarded: int = 0
    injected: Counter = field(default_factory=Counter)
    log: list[dict[str, Any]] = field(default_factory=list)


class FaultProxy:
    """The proxy on 127.0.0.1:``port`` (0: any free port) forwarding to ``upstream``; ``flavour`` ("gcs", "s3" or
    "plain") picks the shape of its error bodies."""

    def __init__(self, upstream: str, flavour: str, port: int = 0) -> None:
        if flavour not in FLAVOURS:
            raise ValueError(f"flavour {flavour!r} must be one of {FLAVOURS}")
        parsed = urlparse(upstream)
        if parsed.scheme != "http" or not parsed.hostname or not parsed.port:
            raise ValueError(f"upstream {upstream!r} must be http://host:port")
        self.upstream = (parsed.hostname, parsed.port)
        self.flavour = flavour
        self._state = _State()
        self._lock = threading.Lock()
        self._name_locks: dict[str, threading.Lock] = {}
        self._server = ThreadingHTTPServer(("127.0.0.1", port), _handler(self))
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FaultProxy:
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self._server.serve_forever()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def set_plan(self, plan: FaultPlan) -> None:
        """Start ``plan`` afresh: its draw from its seed, its fault count from zero (the totals keep counting)."""
        with self._lock:
            self._state.plan = plan
            self._state.draw = random.Random(plan.seed)
            self._state.faults = 0

    def counts(self) -> dict[str, Any]:
        with self._lock:
            return {"requests": self._state.requests, "forwarded": self._state.forwarded,
                    "injected": {f"{kind}/{phase}" if phase else kind: n
                                 for (kind, phase), n in sorted(self._state.injected.items())}}

    def request_log(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._state.log)

    def clear_log(self) -> None:
        with self._lock:
            self._state.log.clear()

    # ---------------------------------------------------------------- per request

    def decide(self, method: str, path: str) -> tuple[str, str]:
        """The fault for this request, ("", "") for none; draws happen only for requests the plan matches."""
        with self._lock:
            state = self._state
            state.requests += 1
            plan = state.plan
            if plan.probability <= 0 or (plan.methods and method not in plan.methods):
                return "", ""
            if plan.path_pattern and not re.search(plan.path_pattern, path):
                return "", ""
            hit = state.draw.random() < plan.probability
            kind = state.draw.choice(plan.kinds)
            phases = [p for p in PHASES.get(kind, ()) if not plan.phases or p in plan.phases] or PHASES.get(kind, [""])
            phase = state.draw.choice(phases) if kind in PHASES else ""
            if not hit or (plan.max_faults is not None and state.faults >= plan.max_faults):
                return "", ""
            state.faults += 1
            state.injected[(kind, phase)] += 1
            return kind, phase

    def record(self, entry: dict[str, Any]) -> None:
        with self._lock:
            if len(self._state.log) < _LOG_LIMIT:
                self._state.log.append(entry)

    def forwarded(self) -> None:
        with self._lock:
            self._state.forwarded += 1

    def name_lock(self, name: str) -> threading.Lock:
        with self._lock:
            return self._name_locks.setdefault(name, threading.Lock())

    def forward(self, method: str, path: str, headers: list[tuple[str, str]], body: bytes
                ) -> tuple[int, str, list[tuple[str, str]], bytes]:
        connection = http.client.HTTPConnection(*self.upstream, timeout=120)
        try:
            connection.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            for name, value in headers:
                connection.putheader(name, value)
            if body or method in ("POST", "PUT", "PATCH"):
                connection.putheader("Content-Length", str(len(body)))
            connection.endheaders(body)
            response = connection.getresponse()
            data = response.read()
            self.forwarded()
            return response.status, response.reason, response.getheaders(), data
        finally:
            connection.close()

    def gcs_object_exists(self, bucket: str, name: str, headers: list[tuple[str, str]]) -> bool:
        host = [(k, v) for k, v in headers if k.lower() == "host"]
        status, _, _, _ = self.forward("GET", f"/storage/v1/b/{quote(bucket, safe='')}/o/{quote(name, safe='')}",
                                       host, b"")
        return status == 200

    def error_body(self, status: int, code: str) -> tuple[str, bytes]:
        message = f"injected by the fault proxy: {code}"
        if self.flavour == "gcs":
            return "application/json", json.dumps({"error": {"code": status, "message": message,
                                                             "errors": [{"reason": code, "message": message}]}}
                                                  ).encode()
        if self.flavour == "plain":
            return "text/plain; charset=utf-8", message.encode()
        return "application/xml", (f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
                                   f"<Message>{message}</Message><RequestId>fault-proxy</RequestId></Error>").encode()


def _handler(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
            pass

        def do_GET(self) -> None:
            self._serve()

        do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = do_GET

        def _read_body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                parts = []
                while True:
                    size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass  # trailers
                        return b"".join(parts)
                    parts.append(self.rfile.read(size))
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _serve(self) -> None:
            if self.path.startswith(CONTROL_PREFIX):
                self._control()
                return
            body = self._read_body()
            kind, phase = proxy.decide(self.command, self.path)
            query = parse_qs(urlparse(self.path).query)
            entry = {"method": self.command, "path": self.path, "object": self._object_name(query, body),
                     "fault": kind, "phase": phase,
                     "if_generation_match": (query.get("ifGenerationMatch") or [None])[0],
                     "if_none_match": self.headers.get("If-None-Match"), "status": None, "at": time.time()}
            proxy.record(entry)  # the status is filled in below, once known
            if kind in ("503", "429"):
                status = int(kind)
                code = {"gcs": {503: "backendError", 429: "rateLimitExceeded"},
                        "s3": {503: "ServiceUnavailable", 429: "SlowDown"},
                        "plain": {503: "Service Unavailable", 429: "Too Many Requests"}}[proxy.flavour][status]
                entry["status"] = status
                extra = [("Retry-After", str(proxy._state.plan.retry_after_s))] if status == 429 else []
                self._answer(status, *proxy.error_body(status, code), extra)
                return
            if kind in ("hold", "reset") and phase == "before":
                self._hold() if kind == "hold" else self._reset()
                return
            headers = [(k, v) for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP]
            refused = self._create_refused(query, headers, entry["object"])
            if refused is not None:
                entry["status"] = 412
                self._answer(412, *proxy.error_body(412, "conditionNotMet"), [])
                return
            try:
                status, reason, upstream_headers, data = proxy.forward(self.command, self.path, headers, body)
            except OSError as exc:
                self._answer(502, *proxy.error_body(502, f"upstream unreachable: {exc}"), [])
                return
            entry["status"] = status
            if kind == "hold":
                self._hold()
                return
            if kind == "reset" and (phase == "after" or not data or self.command == "HEAD"):
                self._reset()
                return
            if kind == "slow":
                time.sleep(proxy._state.plan.slow_s)
            self.send_response(status, reason)
            for name, value in upstream_headers:
                if name.lower() not in _HOP_BY_HOP and name.lower() not in ("server", "date"):
                    self.send_header(name, value)
            length = next((v for k, v in upstream_headers if k.lower() == "content-length"), None)
            self.send_header("Content-Length", length if self.command == "HEAD" and length else str(len(data)))
            self.end_headers()
            if self.command == "HEAD" or status in (204, 304):
                return
            if kind == "reset":  # mid-body: half the answer, then the reset
                self.wfile.write(data[:len(data) // 2])
                self._reset()
                return
            if kind == "slow":
                pieces = 4
                step = max(1, -(-len(data) // pieces))
                for start in range(0, len(data), step):
                    self.wfile.write(data[start:start + step])
                    time.sleep(proxy._state.plan.slow_s / pieces)
                return
            self.wfile.write(data)

        def _object_name(self, query: dict[str, list[str]], body: bytes) -> str:
            """The object a request names: in the path, the ``name`` parameter, or a multipart upload's metadata."""
            if proxy.flavour == "s3":
                return unquote(urlparse(self.path).path.lstrip("/").partition("/")[2])
            match = re.match(r"^/(?:download/)?storage/v1/b/[^/]+/o/([^/?]+)", self.path)
            if match:
                return unquote(match[1])
            if "name" in query:
                return query["name"][0]
            boundary = re.search(r'boundary="?([^";]+)"?', self.headers.get("Content-Type", ""))
            if boundary and body:
                first = body.split(b"--" + boundary[1].encode())[1]
                with contextlib.suppress(ValueError, IndexError):
                    return str(json.loads(first.split(b"\r\n\r\n", 1)[1]).get("name", ""))
            return ""

        def _create_refused(self, query: dict[str, list[str]], headers: list[tuple[str, str]], name: str
                            ) -> bool | None:
            """None when the request may go on; True when it is a create of an existing GCS object."""
            if not (proxy._state.plan.enforce_create_preconditions and proxy.flavour == "gcs"
                    and self.command == "POST" and query.get("ifGenerationMatch") == ["0"] and name):
                return None
            match = re.match(r"^/upload/storage/v1/b/([^/]+)/o", urlparse(self.path).path)
            if match is None:
                return None
            with proxy.name_lock(f"{match[1]}/{name}"):
                if proxy.gcs_object_exists(match[1], name, headers):
                    return True
            return None

        def _answer(self, status: int, content_type: str, data: bytes, extra: list[tuple[str, str]]) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            for name, value in extra:
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def _hold(self) -> None:
            """Say nothing until the client closes the connection (its timeout), or ``hold_max_s``."""
            deadline = time.monotonic() + proxy._state.plan.hold_max_s
            while time.monotonic() < deadline:
                readable, _, _ = select.select([self.connection], [], [], 0.1)
                if readable:
                    try:
                        if not self.connection.recv(1, socket.MSG_PEEK):
                            break
                    except OSError:
                        break
                    time.sleep(0.05)  # the client sent more (pipelining): keep holding
            self._reset()

        def _reset(self) -> None:
            try:
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
            self.close_connection = True
            try:
                self.connection.close()
            except OSError:
                pass

        def _control(self) -> None:
            route = self.path[len(CONTROL_PREFIX):].split("?", 1)[0]
            if self.command == "POST" and route == "plan":
                proxy.set_plan(FaultPlan.from_json(json.loads(self._read_body() or b"{}")))
                payload: Any = {"plan": asdict(proxy._state.plan)}
            elif route == "counts":
                payload = proxy.counts()
            elif route == "log":
                payload = proxy.request_log()
                if self.command == "DELETE":
                    proxy.clear_log()
            elif route == "health":
                payload = {"ok": True}
            else:
                self._answer(404, "application/json", b'{"error": "unknown control route"}', [])
                return
            self._answer(200, "application/json", json.dumps(payload).encode(), [])

        def finish(self) -> None:
            try:
                super().finish()
            except OSError:
                pass  # the connection was reset on purpose

    return Handler


class ProxyControl:
    """The control API of a proxy running in another process."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def _call(self, method: str, route: str, record: Any = None) -> Any:
        data = None if record is None else json.dumps(record).encode()
        request = urllib.request.Request(f"{self.url}{CONTROL_PREFIX}{route}", data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def set_plan(self, plan: FaultPlan) -> None:
        self._call("POST", "plan", asdict(plan))

    def counts(self) -> dict[str, Any]:
        return self._call("GET", "counts")

    def request_log(self, clear: bool = False) -> list[dict[str, Any]]:
        return self._call("DELETE" if clear else "GET", "log")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos.proxy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", required=True, help="http://127.0.0.1:PORT of the emulator")
    parser.add_argument("--flavour", choices=FLAVOURS, required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    FaultProxy(args.upstream, args.flavour, args.port).serve_forever()


if __name__ == "__main__":
    main()
