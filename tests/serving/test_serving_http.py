"""The gateway's HTTP endpoints: /metrics (Prometheus text), /healthz, /readyz, 404, quiet,
robust."""

from __future__ import annotations

import socket

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from medssl.serving.config import HttpConfig
from medssl.serving.http import HealthServer
from medssl.serving.metrics import GatewayMetrics


class Checks:
    """Switchable readiness and liveness answers."""

    def __init__(self) -> None:
        self.ready: tuple[bool, str] = (True, "ready: SCP listening, 1 model loaded")
        self.healthy: tuple[bool, str] = (True, "")


@pytest.fixture
def checks() -> Checks:
    return Checks()


@pytest.fixture
def metrics() -> GatewayMetrics:
    return GatewayMetrics()


@pytest.fixture
def server(metrics, checks):
    srv = HealthServer(
        HttpConfig(host="127.0.0.1", port=0), metrics, lambda: checks.ready, lambda: checks.healthy
    )
    srv.start()
    yield srv
    srv.stop()


def get(server: HealthServer, path: str) -> requests.Response:
    return requests.get(f"http://127.0.0.1:{server.port}{path}", timeout=5)


def test_metrics_are_prometheus_text_with_gateway_metrics(server, metrics):
    metrics.associations.labels(result="accepted").inc(3)
    metrics.deliveries.labels(destination="pacs", result="sent").inc()
    metrics.queue_depth.labels(state="queued").set(2)
    metrics.stage_seconds.labels(stage="total").observe(4.2)
    response = get(server, "/metrics")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }
    assert samples[("medssl_gateway_associations_total", (("result", "accepted"),))] == 3
    assert (
        samples[("medssl_gateway_deliveries_total", (("destination", "pacs"), ("result", "sent")))]
        == 1
    )
    assert samples[("medssl_gateway_queue_depth", (("state", "queued"),))] == 2
    assert samples[("medssl_gateway_stage_seconds_count", (("stage", "total"),))] == 1
    names = {name for name, _ in samples}
    assert names and all(name.startswith("medssl_gateway_") for name in names)


def test_healthz_is_ok_while_healthy_and_503_with_the_reason_otherwise(server, checks):
    response = get(server, "/healthz")
    assert (response.status_code, response.text) == (200, "ok\n")
    checks.healthy = (False, "worker thread 'sender' died: OSError: disk full")
    response = get(server, "/healthz")
    assert response.status_code == 503
    assert response.text == "worker thread 'sender' died: OSError: disk full\n"


def test_readyz_answers_the_readiness_check_and_its_reason(server, checks):
    response = get(server, "/readyz")
    assert (response.status_code, response.text) == (200, "ready: SCP listening, 1 model loaded\n")
    checks.ready = (False, "spool has 12 MB free, needs 1024 MB")
    response = get(server, "/readyz")
    assert (response.status_code, response.text) == (503, "spool has 12 MB free, needs 1024 MB\n")


def test_a_query_string_is_ignored_and_head_has_no_body(server):
    assert get(server, "/healthz?verbose=1").status_code == 200
    response = requests.head(f"http://127.0.0.1:{server.port}/readyz", timeout=5)
    assert response.status_code == 200 and response.content == b""


@pytest.mark.parametrize("path", ["/", "/metric", "/healthz/x", "/studies"])
def test_unknown_paths_are_404(server, path):
    response = get(server, path)
    assert response.status_code == 404
    assert path in response.text


def test_a_failing_check_answers_500_and_the_server_keeps_serving(metrics, checks, caplog):
    def broken() -> tuple[bool, str]:
        raise RuntimeError("job store closed")

    srv = HealthServer(
        HttpConfig(host="127.0.0.1", port=0), metrics, broken, lambda: checks.healthy
    )
    srv.start()
    try:
        response = get(srv, "/readyz")
        assert response.status_code == 500
        assert "RuntimeError: job store closed" in response.text
        assert get(srv, "/healthz").status_code == 200
    finally:
        srv.stop()


def test_requests_are_not_logged_to_stderr(server, capfd):
    get(server, "/metrics")
    get(server, "/nothing")
    # a connection closed before sending a request is not a traceback either
    with socket.create_connection(("127.0.0.1", server.port), timeout=5):
        pass
    get(server, "/healthz")
    assert capfd.readouterr().err == ""


def test_port_zero_binds_a_free_port_and_stop_releases_it(metrics, checks):
    srv = HealthServer(
        HttpConfig(host="127.0.0.1", port=0), metrics, lambda: checks.ready, lambda: checks.healthy
    )
    with pytest.raises(RuntimeError, match="not started"):
        _ = srv.port
    srv.start()
    port = srv.port
    assert port > 0 and get(srv, "/healthz").status_code == 200
    srv.stop()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
    srv.stop()  # idempotent


def test_a_port_in_use_is_an_error_naming_it(server, metrics, checks):
    other = HealthServer(
        HttpConfig(host="127.0.0.1", port=server.port),
        metrics,
        lambda: checks.ready,
        lambda: checks.healthy,
    )
    with pytest.raises(OSError, match=f"127.0.0.1:{server.port}"):
        other.start()
