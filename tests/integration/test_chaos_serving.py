"""A model server of the local stack that dies: the router sends its requests to the other server, resends
a request whose connection broke, and the backend starts a dead stable server again. The router runs as its
own process; upstreams are small HTTP servers on 127.0.0.1 (the stack starts them through
``StackOptions.serve_command``, as it would start ``defectkit serve``). Every process is stopped by PID."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from defectkit.delivery.local import LocalBackend, StackOptions, read_stack, stop_stack
from defectkit.delivery.local.processes import alive
from defectkit.delivery.local.router import CONFIG_PATH, HEALTH_PATH, VARIANT_HEADER
from tests.servers import free_port, start_server

ROOT = Path(__file__).resolve().parents[2]
INFER = "/v2/models/defectkit/infer"

# A model server in miniature: ready at once, answers inference with the model it was given.
UPSTREAM = """
import argparse, json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
parser = argparse.ArgumentParser()
parser.add_argument("--model"); parser.add_argument("--port", type=int); parser.add_argument("--host")
parser.add_argument("--served-name")
args, _ = parser.parse_known_args()

class Handler(BaseHTTPRequestHandler):
    def answer(self, body):
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
    def do_GET(self):
        self.answer({"ready": True})
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.answer({"model_version": args.model})
    def log_message(self, *a):
        pass

ThreadingHTTPServer((args.host, args.port), Handler).serve_forever()
"""


class ResetsFirst:
    """Answers 200, except that it resets the connection under the first ``resets`` requests it reads."""

    def __init__(self, resets: int) -> None:
        self.seen = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.seen += 1
                if outer.seen <= resets:
                    # SO_LINGER 0: close() sends RST, as a killed process's socket does.
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.connection.close()
                    return
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> ResetsFirst:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def upstream_script(tmp_path) -> Path:
    path = tmp_path / "upstream.py"
    path.write_text(UPSTREAM)
    return path


@pytest.fixture
def live_upstream(tmp_path, upstream_script):
    port = free_port()
    server = start_server([sys.executable, str(upstream_script), "--model", "m-live", "--port", str(port), "--host",
                           "127.0.0.1"], url=f"http://127.0.0.1:{port}", health_path="/", log_path=tmp_path / "up.log")
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def router(tmp_path):
    port = free_port()
    server = start_server([sys.executable, "-m", "defectkit.delivery.local.router", "--port", str(port),
                           "--stable", f"http://127.0.0.1:{free_port()}"],
                          url=f"http://127.0.0.1:{port}", health_path=HEALTH_PATH, log_path=tmp_path / "router.log",
                          env={"PYTHONPATH": str(ROOT)})
    try:
        yield server.url
    finally:
        server.stop()


def configure(router: str, stable: str, canary: str | None, weight: int) -> None:
    response = httpx.put(router + CONFIG_PATH, json={"stable": stable, "canary": canary, "weight": weight})
    assert response.status_code == 200, response.text


def send(router: str, count: int) -> list[httpx.Response]:
    with httpx.Client(timeout=10) as client:
        return [client.post(router + INFER, content=b"{}", headers={"content-type": "application/json"})
                for _ in range(count)]


def test_a_dead_stable_servers_share_goes_to_a_canary_that_takes_traffic(router, live_upstream):
    dead = f"http://127.0.0.1:{free_port()}"
    configure(router, stable=dead, canary=live_upstream, weight=25)
    answers = send(router, 20)
    assert [a.status_code for a in answers] == [200] * 20
    assert {a.headers[VARIANT_HEADER] for a in answers} == {"canary"}
    assert httpx.get(router + CONFIG_PATH).json()["redirected"] == 15  # stable's 75% of 20


def test_a_canary_at_zero_percent_never_takes_a_dead_stable_servers_requests(router, live_upstream):
    dead = f"http://127.0.0.1:{free_port()}"
    configure(router, stable=dead, canary=live_upstream, weight=0)
    answers = send(router, 3)
    assert [a.status_code for a in answers] == [502] * 3
    assert "stable model server" in answers[0].json()["error"] and "unreachable" in answers[0].json()["error"]


def test_two_dead_servers_give_a_clear_502_without_ping_pong(router):
    configure(router, stable=f"http://127.0.0.1:{free_port()}", canary=f"http://127.0.0.1:{free_port()}", weight=50)
    answers = send(router, 4)
    assert [a.status_code for a in answers] == [502] * 4
    assert httpx.get(router + CONFIG_PATH).json()["redirected"] == 4  # each redirected once, then refused


def test_a_request_whose_connection_was_reset_is_sent_once_more(router):
    with ResetsFirst(resets=1) as upstream:
        configure(router, stable=upstream.url, canary=None, weight=0)
        assert [a.status_code for a in send(router, 2)] == [200, 200]
    assert upstream.seen == 3  # the reset one, its resend, the second request


def test_a_killed_stable_server_is_started_again_with_its_model(tmp_path, upstream_script):
    options = StackOptions(serve_command=(sys.executable, str(upstream_script)), start_timeout_s=60.0,
                           scrape_interval_s=5.0)
    backend = LocalBackend(tmp_path / "work", options)
    try:
        stack = backend.ensure_stack("model-a")
        os.killpg(stack.stable.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while alive(stack.stable) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert backend.traffic() == 0  # any call that needs the stack starts stable again
        restarted = read_stack(tmp_path / "work").stable
        assert restarted.pid != stack.stable.pid and alive(restarted) and restarted.model == "model-a"
        config = httpx.get(stack.router.url + CONFIG_PATH).json()
        assert (config["stable"], config["canary"], config["weight"]) == (restarted.url, None, 0)
        answer = httpx.post(stack.router.url + INFER, content=b"{}", headers={"content-type": "application/json"})
        assert answer.status_code == 200 and json.loads(answer.content)["model_version"] == "model-a"
    finally:
        backend.close()
        stop_stack(tmp_path / "work")
