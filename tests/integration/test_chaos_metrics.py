"""Missing canary metrics are told apart from bad ones: what Prometheus and the local scraper raise when the
figures cannot be read, and the verdict on such a window. Real sockets on 127.0.0.1."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from defectkit.delivery.analysis import INCONCLUSIVE, MetricsUnavailable, unavailable
from defectkit.delivery.backend import BackendError
from defectkit.delivery.kserve import prometheus as prom
from defectkit.delivery.local.processes import ServerInfo
from defectkit.delivery.local.scrape import Scraper
from defectkit.retry import RetryPolicy
from tests.servers import free_port

FAST = RetryPolicy(attempts=2, initial_delay_s=0.01, max_delay_s=0.02)


class Answering:
    """An HTTP server on 127.0.0.1 that answers every GET with ``status`` and ``body``; counts the requests."""

    def __init__(self, status: int, body: bytes) -> None:
        self.requests = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.requests += 1
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> Answering:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()


def test_an_unreachable_prometheus_means_missing_metrics_and_an_inconclusive_window():
    client = prom.PrometheusClient(f"http://127.0.0.1:{free_port()}", retry_policy=FAST)
    with pytest.raises(prom.PrometheusUnavailable, match="unreachable") as raised:
        client.query("up")
    assert isinstance(raised.value, MetricsUnavailable) and isinstance(raised.value, BackendError)
    verdict = unavailable(raised.value)
    assert verdict.verdict == INCONCLUSIVE and not verdict.passed
    assert verdict.skipped_reason.startswith("metrics unavailable: Prometheus at http://127.0.0.1:")
    assert verdict.explain().startswith("inconclusive: metrics unavailable")


def test_a_prometheus_that_keeps_answering_503_is_unavailable_after_its_retries():
    with Answering(503, b"service unavailable") as server:
        client = prom.PrometheusClient(server.url, retry_policy=FAST)
        with pytest.raises(prom.PrometheusUnavailable, match="HTTP 503 to 2 attempts"):
            client.query("up")
    assert server.requests == 2


def test_a_query_prometheus_rejects_is_an_error_to_fix_not_missing_data():
    body = b'{"status": "error", "errorType": "bad_data", "error": "parse error"}'
    with Answering(400, body) as server:
        with pytest.raises(prom.PrometheusError, match="bad_data: parse error") as raised:
            prom.PrometheusClient(server.url, retry_policy=FAST).query("sum(")
    assert isinstance(raised.value, BackendError) and not isinstance(raised.value, MetricsUnavailable)


def test_a_server_the_local_scraper_cannot_reach_gives_missing_metrics():
    port = free_port()
    info = ServerInfo(role="canary", pid=1, create_time=0.0, port=port, url=f"http://127.0.0.1:{port}", log="-")
    scraper = Scraper(interval_s=10.0, timeout_s=1.0)
    try:
        with pytest.raises(MetricsUnavailable, match="cannot scrape the canary server's metrics"):
            scraper.window(info, 5.0)
    finally:
        scraper.close()
