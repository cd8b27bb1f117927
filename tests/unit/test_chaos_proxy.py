"""The chaos suite's fault-injecting proxy, in front of a small real HTTP server on 127.0.0.1."""

from __future__ import annotations

import http.client
import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.chaos.proxy import FaultPlan, FaultProxy, ProxyControl


class _Echo(BaseHTTPRequestHandler):
    """Answers GET with a fixed body and stores PUT bodies, so a test can see what reached the upstream."""

    protocol_version = "HTTP/1.1"
    stored: dict[str, bytes] = {}

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        body = self.stored.get(self.path, b"x" * 1000)
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_PUT(self) -> None:
        self.stored[self.path] = self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture(params=["s3"])
def proxy(request) -> Iterator[FaultProxy]:
    _Echo.stored = {}
    upstream = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    started = FaultProxy(f"http://127.0.0.1:{upstream.server_address[1]}", request.param).start()
    try:
        yield started
    finally:
        started.stop()
        upstream.shutdown()
        upstream.server_close()


def _request(proxy: FaultProxy, method: str, path: str, body: bytes | None = None, timeout: float = 5.0):
    host, port = proxy.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        connection.request(method, path, body=body)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def test_without_a_plan_requests_pass_through(proxy):
    assert _request(proxy, "PUT", "/b/k", b"data")[0] == 200
    assert _request(proxy, "GET", "/b/k")[::2] == (200, b"data")
    assert proxy.counts() == {"requests": 2, "forwarded": 2, "injected": {}}


def test_429_names_its_wait_and_nothing_reaches_the_upstream(proxy):
    proxy.set_plan(FaultPlan(kinds=("429",), probability=1.0, retry_after_s=3))
    status, headers, body = _request(proxy, "PUT", "/b/k", b"data")
    assert (status, headers["Retry-After"]) == (429, "3") and b"SlowDown" in body
    assert _Echo.stored == {} and proxy.counts()["injected"] == {"429": 1}


@pytest.mark.parametrize("proxy", ["plain"], indirect=True)
def test_a_plain_http_upstream_gets_plain_errors_on_the_paths_the_plan_names(proxy):
    proxy.set_plan(FaultPlan(kinds=("503",), probability=1.0, path_pattern=r"^/metrics"))
    status, headers, body = _request(proxy, "GET", "/metrics")
    assert status == 503 and headers["Content-Type"].startswith("text/plain") and b"injected" in body
    assert _request(proxy, "GET", "/v2/health/ready")[0] == 200
    assert proxy.counts() == {"requests": 2, "forwarded": 1, "injected": {"503": 1}}


def test_an_unknown_flavour_is_named():
    with pytest.raises(ValueError, match="'azure'"):
        FaultProxy("http://127.0.0.1:1", "azure")


def test_reset_after_forwarding_lands_the_write_and_loses_the_answer(proxy):
    proxy.set_plan(FaultPlan(kinds=("reset",), probability=1.0, phases=("after",)))
    with pytest.raises((ConnectionError, http.client.RemoteDisconnected)):
        _request(proxy, "PUT", "/b/k", b"landed")
    assert _Echo.stored == {"/b/k": b"landed"}
    assert proxy.counts()["injected"] == {"reset/after": 1}


def test_mid_body_reset_cuts_the_answer_short(proxy):
    proxy.set_plan(FaultPlan(kinds=("reset",), probability=1.0, phases=("mid-body",)))
    with pytest.raises((http.client.IncompleteRead, ConnectionError)):
        _request(proxy, "GET", "/b/big")


def test_hold_lasts_until_the_client_gives_up(proxy):
    proxy.set_plan(FaultPlan(kinds=("hold",), probability=1.0, phases=("before",), hold_max_s=30))
    with pytest.raises(socket.timeout):
        _request(proxy, "GET", "/b/k", timeout=0.5)
    proxy.set_plan(FaultPlan())
    assert _request(proxy, "GET", "/b/k")[0] == 200, "the proxy still serves after a hold"


def test_a_seeded_plan_draws_the_same_faults_and_honours_its_limit(proxy):
    def faults(plan: FaultPlan) -> list[int]:
        proxy.set_plan(plan)
        return [_request(proxy, "GET", f"/b/{i}")[0] for i in range(30)]

    plan = FaultPlan(kinds=("503",), probability=0.3, seed=7)
    first = faults(plan)
    assert 0 < first.count(503) < 30 and faults(plan) == first
    assert faults(FaultPlan(kinds=("503",), probability=1.0, max_faults=2)).count(503) == 2
    assert faults(FaultPlan(kinds=("503",), probability=1.0, path_pattern="^/other/")).count(503) == 0


def test_control_api_sets_plans_and_reports(proxy):
    control = ProxyControl(proxy.url)
    control.set_plan(FaultPlan(kinds=("503",), probability=1.0, max_faults=1))
    assert _request(proxy, "GET", "/b/k")[0] == 503
    assert control.counts()["injected"] == {"503": 1}
    log = control.request_log(clear=True)
    assert [(e["path"], e["fault"], e["status"]) for e in log] == [("/b/k", "503", 503)]
    assert control.request_log() == []
    assert json.loads(json.dumps(control.counts()))["requests"] >= 1


def test_plans_refuse_unknown_kinds_and_phases():
    with pytest.raises(ValueError, match="unknown fault kinds"):
        FaultPlan(kinds=("teapot",), probability=0.1)
    with pytest.raises(ValueError, match="unknown phases"):
        FaultPlan(kinds=("reset",), probability=0.1, phases=("during",))
