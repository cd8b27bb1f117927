"""Building blocks of the HTTP stand-ins the tests run on 127.0.0.1, and a clock the tests move by hand."""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import requests

# (method, path, query, JSON body or None, request headers) -> (status, JSON payload)
Route = Callable[[str, str, dict, "dict | None", Mapping[str, str]], tuple[int, dict]]


class JsonServer:
    """A threaded HTTP server on 127.0.0.1 that answers every GET and POST with ``route``'s JSON."""

    def __init__(self, route: Route) -> None:
        class Handler(BaseHTTPRequestHandler):
            def _serve(self, method: str) -> None:
                parsed = urlparse(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                status, payload = route(method, parsed.path, parse_qs(parsed.query), body, self.headers)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):  # noqa: N802 - http.server's naming
                self._serve("GET")

            def do_POST(self):  # noqa: N802
                self._serve("POST")

            def log_message(self, *args) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class ManualClock:
    """``time.time`` and ``time.sleep`` for code under test: sleeping moves the clock, instantly."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class KnativeRouter:
    """Knative's part in a canary: sends ``rate`` requests a second to the revisions that the InferenceService's
    status (in the Kubernetes API stand-in ``kube``) lists, by their percents, as Knative routes by the traffic
    block of the Route it writes. ``answers`` holds (sent, revision, status; 0 when no answer came)."""

    def __init__(self, kube, namespace: str, service: str, urls: Mapping[str, str], bodies: list[bytes],
                 rate: float) -> None:
        self.kube, self.namespace, self.service, self.urls, self.bodies = kube, namespace, service, urls, bodies
        self.rate = rate
        self.answers: list[tuple[float, str, int]] = []
        self._stop = threading.Event()
        self._draw = random.Random(0)
        self._thread = threading.Thread(target=self._run, name="knative-router", daemon=True)

    def _split(self) -> dict[str, int]:
        traffic = self.kube.stored(self.namespace, self.service)["status"]["components"]["predictor"]["traffic"]
        split: dict[str, int] = {}
        for entry in traffic:
            split[entry["revisionName"]] = split.get(entry["revisionName"], 0) + entry["percent"]
        return split

    def _run(self) -> None:
        session = requests.Session()
        while not self._stop.is_set():
            split = self._split()
            revision = self._draw.choices(list(split), weights=list(split.values()))[0]
            sent = time.time()
            try:
                status = session.post(self.urls[revision], data=self._draw.choice(self.bodies),
                                      headers={"content-type": "application/json"}, timeout=30).status_code
            except requests.RequestException:
                status = 0
            self.answers.append((sent, revision, status))
            self._stop.wait(max(0.0, sent + 1 / self.rate - time.time()))

    def __enter__(self) -> KnativeRouter:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(60)
