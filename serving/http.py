"""The gateway's HTTP endpoints: Prometheus ``/metrics``, ``/healthz`` (liveness), ``/readyz``.

* ``GET /metrics``: :meth:`GatewayMetrics.render` in the Prometheus text format;
* ``GET /healthz``: 200 ``ok`` while the process is healthy (its threads alive), else 503 and
  the reason: a container orchestrator restarts the gateway;
* ``GET /readyz``: 200 while it is ready to receive studies (SCP listening, the spool above its
  free-space floor, models loaded), else 503 and the reason: a load balancer sends no new
  associations;
* anything else: 404.

``HEAD`` answers like ``GET`` without a body. The server runs on a daemon thread of its own
(:class:`http.server.ThreadingHTTPServer`) and logs nothing per request (no access log on
stderr); a failing check or metrics rendering answers 500 with the error instead of raising.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from medssl.serving.config import HttpConfig
from medssl.serving.metrics import GatewayMetrics

__all__ = ["METRICS_CONTENT_TYPE", "HealthServer", "HttpListener"]

LOGGER = logging.getLogger("medssl.serving.http")

#: The content type of the classic Prometheus text format that ``GatewayMetrics.render`` writes.
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: A check: ``(passed, reason)``; the reason is the response body (``ok`` when it passed).
Check = Callable[[], tuple[bool, str]]


class HttpListener:
    """A threaded HTTP server on its own daemon thread: what :class:`HealthServer` and the
    operator API (:class:`~medssl.serving.api.ApiServer`) share.

    Subclasses set :attr:`what` (named in errors and the log), :attr:`handler` (a
    :class:`BaseHTTPRequestHandler` subclass that finds the listener as ``self.owner``) and
    may wrap the socket (:meth:`_wrap`, e.g. in TLS).
    """

    what = "HTTP"
    handler: type[BaseHTTPRequestHandler]

    def __init__(self, host: str, port: int) -> None:
        self.host, self.requested_port = host, port
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port (the one the OS picked when the requested port is 0).

        Raises:
            RuntimeError: not started.
        """
        if self._server is None:
            raise RuntimeError(f"the {self.what} server is not started")
        return int(self._server.server_address[1])

    def start(self) -> None:
        """Bind and serve on a daemon thread.

        Raises:
            OSError: the address cannot be bound (the message names host and port).
            RuntimeError: already started.
        """
        if self._server is not None:
            raise RuntimeError(f"the {self.what} server already serves on port {self.port}")
        handler = type("Handler", (self.handler,), {"owner": self})
        try:
            server = _Server((self.host, self.requested_port), handler)
        except OSError as exc:
            raise OSError(
                exc.errno,
                f"cannot serve {self.what} on {self.host}:{self.requested_port}: "
                f"{exc.strerror or exc}",
            ) from exc
        try:
            self._wrap(server)
        except BaseException:
            server.server_close()
            raise
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name=f"medssl-{self.what.lower().replace(' ', '-')}",
            daemon=True,
        )
        self._thread.start()

    def _wrap(self, server: ThreadingHTTPServer) -> None:
        """Change the bound server before it serves (nothing here)."""

    def stop(self) -> None:
        """Stop serving and close the socket (a no-op when not started)."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)


class HealthServer(HttpListener):
    """``/metrics``, ``/healthz`` and ``/readyz`` on ``cfg.host:cfg.port`` (module docstring).

    Args:
        cfg: bind address and port (0 picks a free port, see :attr:`port`).
        metrics: what ``/metrics`` renders.
        ready: the readiness check, called on every ``/readyz``.
        healthy: the liveness check, called on every ``/healthz``.
    """

    what = "HTTP"

    def __init__(
        self, cfg: HttpConfig, metrics: GatewayMetrics, ready: Check, healthy: Check
    ) -> None:
        super().__init__(cfg.host, cfg.port)
        self.cfg = cfg
        self.metrics = metrics
        self.ready = ready
        self.healthy = healthy
        self.handler = _Handler

    def start(self) -> None:
        """Bind and serve on a daemon thread (see :meth:`HttpListener.start`)."""
        super().start()
        LOGGER.info("metrics and health checks on http://%s:%d", self.cfg.host, self.port)


class _Server(ThreadingHTTPServer):
    """Daemon request threads; a broken connection is logged at debug level, not printed."""

    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        LOGGER.debug("HTTP connection from %s failed", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    """One request; ``owner`` (the :class:`HealthServer`) is set on a per-server subclass."""

    owner: HealthServer
    timeout = 10  # seconds a client may take to send its request (HTTP/1.0: one per connection)

    def do_GET(self) -> None:  # http.server's naming
        self._answer(body=True)

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def _answer(self, body: bool) -> None:
        try:
            status, content_type, payload = self._route(self.path.split("?", 1)[0])
        except Exception as exc:  # a failing check or metric must not kill the server
            LOGGER.exception("HTTP %s failed", self.path)
            status, content_type = HTTPStatus.INTERNAL_SERVER_ERROR, "text/plain; charset=utf-8"
            payload = f"{type(exc).__name__}: {exc}\n".encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            if body:
                self.wfile.write(payload)
        except OSError:  # the client went away
            self.close_connection = True

    def _route(self, path: str) -> tuple[HTTPStatus, str, bytes]:
        text = "text/plain; charset=utf-8"
        if path == "/metrics":
            return HTTPStatus.OK, METRICS_CONTENT_TYPE, self.owner.metrics.render()
        if path == "/healthz":
            passed, reason = self.owner.healthy()
            if passed:
                return HTTPStatus.OK, text, b"ok\n"
            return HTTPStatus.SERVICE_UNAVAILABLE, text, f"{reason or 'unhealthy'}\n".encode()
        if path == "/readyz":
            passed, reason = self.owner.ready()
            status = HTTPStatus.OK if passed else HTTPStatus.SERVICE_UNAVAILABLE
            return status, text, f"{reason or ('ready' if passed else 'not ready')}\n".encode()
        return (
            HTTPStatus.NOT_FOUND,
            text,
            f"not found: {path} (try /metrics, /healthz, /readyz)\n".encode(),
        )

    def log_message(self, format: str, *args: Any) -> None:  # http.server's signature
        """Quiet: no line per request on stderr."""
