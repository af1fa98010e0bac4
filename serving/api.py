"""The operator REST API (``/api/v1``) and web console (``/``) of the gateway.

A listener of its own (``api.host``/``api.port``, loopback by default; HTTPS with
``api.tls``), off unless ``api.enabled``; ``/metrics`` and the health checks stay on the
unauthenticated HTTP port for Prometheus and the orchestrator.

Security, in the order a request meets it:

* **credentials** on every request, pages and static files included: ``Authorization:
  Bearer <api.token>`` or HTTP basic ``api.username``/``api.password``, compared with
  :func:`hmac.compare_digest`; else 401 with a ``WWW-Authenticate`` challenge (the browser's
  login prompt);
* **actions** are POSTs only (a GET of an action's path is 405) and carry the CSRF token of
  the session (the console's forms hold it; API clients read it from ``GET /api/v1/session``)
  in the ``csrf_token`` form field or the ``X-CSRF-Token`` header; a request whose ``Origin``
  is not this server's is refused too (403);
* **responses** hold no patient-identifying value unless ``api.show_patient_id`` (see
  :mod:`medssl.serving.operations`), and every one carries ``Cache-Control: no-store`` and a
  strict ``Content-Security-Policy`` (same-origin scripts and styles only: the console needs
  nothing from elsewhere);
* a slow client gets ``timeout`` seconds per request; bodies above 64 KiB are refused (413).

Every action is recorded in the job store with who (the user name, or ``token``, and the
channel: ``console`` or ``api``), when, what and why. The OpenAPI description is
``GET /api/v1/openapi.json`` (:data:`medssl.serving.openapi.OPENAPI`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import secrets
import ssl
import urllib.parse
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from medssl.serving import console
from medssl.serving.config import ApiConfig
from medssl.serving.http import HttpListener
from medssl.serving.httpquery import int_param as _int
from medssl.serving.httpquery import list_param as _list
from medssl.serving.httpquery import one_param as _one
from medssl.serving.httpquery import time_param as _time
from medssl.serving.jobstore import ActionRefused
from medssl.serving.openapi import OPENAPI
from medssl.serving.operations import NotFound, Operations

__all__ = ["ApiServer"]

LOGGER = logging.getLogger("medssl.serving.api")

_MAX_BODY = 64 * 1024
_STATIC = Path(__file__).with_name("static")
_STATIC_TYPES = {
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".png": "image/png",
}
_SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
}
_JSON = "application/json"
_HTML = "text/html; charset=utf-8"


class _HttpError(Exception):
    def __init__(
        self, status: HTTPStatus, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


class ApiServer(HttpListener):
    """Serves the API and console of one gateway (module docstring).

    Args:
        cfg: the ``api`` section (credentials, bind address, TLS).
        ops: what the endpoints read and do.
    """

    what = "operator API"

    def __init__(self, cfg: ApiConfig, ops: Operations) -> None:
        super().__init__(cfg.host, cfg.port)
        self.cfg = cfg
        self.ops = ops
        self.handler = _Handler
        self._secret = secrets.token_bytes(32)  # per process: CSRF tokens change at restart

    @property
    def scheme(self) -> str:
        return "https" if self.cfg.tls.enabled else "http"

    def start(self) -> None:
        """Bind (in TLS when configured) and serve on a daemon thread.

        Raises:
            OSError: the address cannot be bound.
            ssl.SSLError: the certificate or key cannot be loaded.
        """
        super().start()
        LOGGER.info(
            "operator API and console on %s://%s:%d/", self.scheme, self.cfg.host, self.port
        )

    def _wrap(self, server: ThreadingHTTPServer) -> None:
        if not self.cfg.tls.enabled:
            return
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(str(self.cfg.tls.certificate), str(self.cfg.tls.private_key))
        # the handshake happens in the request's thread (bounded by the handler's timeout),
        # so a client that connects and never says hello cannot stall the listener
        server.socket = context.wrap_socket(
            server.socket, server_side=True, do_handshake_on_connect=False
        )

    # --- credentials ------------------------------------------------------------------------

    def principal(self, authorization: str | None) -> str | None:
        """Who ``authorization`` (the header's value) proves to be, or None."""
        if not authorization:
            return None
        scheme, _, value = authorization.strip().partition(" ")
        value = value.strip()
        if scheme.lower() == "bearer" and self.cfg.token is not None:
            if hmac.compare_digest(value.encode(), self.cfg.token.encode()):
                return "token"
        elif (
            scheme.lower() == "basic"
            and self.cfg.username is not None
            and self.cfg.password is not None
        ):
            try:
                user, _, password = (
                    base64.b64decode(value, validate=True).decode("utf-8").partition(":")
                )
            except (binascii.Error, UnicodeDecodeError):
                return None
            user_ok = hmac.compare_digest(user.encode(), self.cfg.username.encode())
            password_ok = hmac.compare_digest(password.encode(), self.cfg.password.encode())
            if user_ok and password_ok:
                return self.cfg.username
        return None

    def csrf_token(self, principal: str) -> str:
        """The CSRF token of ``principal``'s session (HMAC of a per-process secret)."""
        return hmac.new(self._secret, b"csrf:" + principal.encode(), hashlib.sha256).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    owner: ApiServer
    timeout = 10  # seconds a client may take to send its request
    protocol_version = "HTTP/1.0"
    server_version = "medssl-gateway"
    sys_version = ""

    def do_GET(self) -> None:  # http.server's naming
        self._serve("GET")

    def do_HEAD(self) -> None:
        self._serve("HEAD")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def log_message(self, format: str, *args: Any) -> None:  # http.server's signature
        """Quiet: no access log on stderr (paths hold UIDs)."""

    # --- dispatch ---------------------------------------------------------------------------

    def _serve(self, method: str) -> None:
        try:
            principal = self.owner.principal(self.headers.get("Authorization"))
            if principal is None:
                raise _HttpError(
                    HTTPStatus.UNAUTHORIZED,
                    "credentials required",
                    {
                        "WWW-Authenticate": 'Basic realm="medssl gateway", charset="UTF-8"'
                        if self.owner.cfg.username is not None
                        else 'Bearer realm="medssl gateway"'
                    },
                )
            url = urllib.parse.urlsplit(self.path)
            query = urllib.parse.parse_qs(url.query, keep_blank_values=False)
            path = urllib.parse.unquote(url.path)
            if method == "POST":
                self._post(path, principal)
            elif method in ("GET", "HEAD"):
                status, content_type, payload = self._get(path, query, principal)
                self._send(status, content_type, payload, body=method == "GET")
            else:
                raise _HttpError(
                    HTTPStatus.METHOD_NOT_ALLOWED,
                    f"{method} is not supported",
                    {"Allow": "GET, HEAD, POST"},
                )
        except _HttpError as exc:
            self._error(exc.status, str(exc), exc.headers, body=method != "HEAD")
        except NotFound as exc:
            self._error(HTTPStatus.NOT_FOUND, str(exc), body=method != "HEAD")
        except ActionRefused as exc:
            self._error(HTTPStatus.CONFLICT, str(exc), body=method != "HEAD")
        except ValueError as exc:
            self._error(HTTPStatus.BAD_REQUEST, str(exc), body=method != "HEAD")
        except Exception as exc:  # the service boundary: an answer, never a dead server
            LOGGER.exception("API %s failed: %s", method, type(exc).__name__)
            self._error(
                HTTPStatus.INTERNAL_SERVER_ERROR,
                f"internal error ({type(exc).__name__})",
                body=method != "HEAD",
            )

    def _get(
        self, path: str, query: dict[str, list[str]], principal: str
    ) -> tuple[HTTPStatus, str, bytes]:
        ops = self.owner.ops
        if path.startswith("/api/v1/"):
            route = path[len("/api/v1/") :].rstrip("/")
            parts = route.split("/")
            if route in _ACTION_ROUTES or (
                len(parts) == 3 and parts[0] == "studies" and parts[2] in _ACTIONS
            ):
                raise _HttpError(
                    HTTPStatus.METHOD_NOT_ALLOWED, "actions need POST", {"Allow": "POST"}
                )
            data = self._api_read(parts, query, principal)
            return HTTPStatus.OK, _JSON, json.dumps(data, indent=1).encode()
        if path.startswith("/static/"):
            return self._static(path[len("/static/") :])
        page = console.render(
            path, query, ops, csrf=self.owner.csrf_token(principal), user=principal
        )
        if page is None:
            raise _HttpError(HTTPStatus.NOT_FOUND, f"no page {path}")
        return HTTPStatus.OK, _HTML, page.encode()

    def _api_read(self, parts: list[str], query: dict[str, list[str]], principal: str) -> Any:
        ops = self.owner.ops
        page = {"limit": _int(query, "limit", 50), "offset": _int(query, "offset", 0)}
        match parts:
            case ["openapi.json"]:
                return OPENAPI
            case ["session"]:
                return {
                    "user": principal,
                    "csrf_token": self.owner.csrf_token(principal),
                    "show_patient_id": ops.cfg.api.show_patient_id,
                }
            case ["studies"]:
                return ops.studies(
                    states=_list(query, "state"),
                    since=_time(query, "since"),
                    until=_time(query, "until"),
                    uid=_one(query, "uid"),
                    **page,
                )
            case ["studies", ref]:
                return ops.study(ref)
            case ["deliveries"]:
                return ops.deliveries(states=_list(query, "state"), **page)
            case ["quarantine"]:
                return ops.quarantine(**page)
            case ["refusals"]:
                return ops.refusals(**page)
            case ["counters"]:
                return ops.counters()
            case ["overview"]:
                return ops.overview()
            case ["destinations"]:
                return ops.destinations()
            case ["actions"]:
                return ops.actions(page["limit"])
            case ["config"]:
                return ops.config()
        raise _HttpError(HTTPStatus.NOT_FOUND, "no such API endpoint (see /api/v1/openapi.json)")

    def _post(self, path: str, principal: str) -> None:
        form = self._body()
        origin = self.headers.get("Origin")
        if (
            origin is not None
            and origin != "null"
            and urllib.parse.urlsplit(origin).netloc != self.headers.get("Host")
        ):
            raise _HttpError(HTTPStatus.FORBIDDEN, "cross-origin request refused")
        token = self.headers.get("X-CSRF-Token") or str(form.get("csrf_token") or "")
        if not hmac.compare_digest(token.encode(), self.owner.csrf_token(principal).encode()):
            raise _HttpError(
                HTTPStatus.FORBIDDEN, "missing or wrong CSRF token (GET /api/v1/session gives it)"
            )
        from_console = "csrf_token" in form and self.headers.get("X-CSRF-Token") is None
        actor = f"{principal} ({'console' if from_console else 'api'})"
        if not path.startswith("/api/v1/"):
            raise _HttpError(HTTPStatus.NOT_FOUND, f"no action at {path}")
        parts = path[len("/api/v1/") :].rstrip("/").split("/")
        reason = str(form.get("reason") or "").strip()[:500] or None
        ops = self.owner.ops
        match parts:
            case ["studies", ref, "retry"]:
                result = ops.retry(ref, actor, reason)
            case ["studies", ref, "cancel"]:
                result = ops.cancel(ref, actor, reason)
            case ["studies", ref, "redeliver"]:
                destination = str(form.get("destination") or "")
                if not destination:
                    raise ValueError("redeliver needs a destination")
                result = ops.redeliver(ref, destination, actor, reason)
            case ["quarantine", "purge"]:
                if form.get("older_than_days") in (None, ""):
                    raise ValueError("purge needs older_than_days")
                result = ops.purge_quarantine(float(form["older_than_days"]), actor, reason)
            case _:
                raise _HttpError(HTTPStatus.NOT_FOUND, f"no action at {path}")
        LOGGER.info(
            "operator action",
            extra={
                "action": parts[-1],
                "actor": actor,
                "job_id": result.get("id"),
                "state": result.get("state"),
            },
        )
        if from_console:
            target = str(form.get("next") or "/")
            if not target.startswith("/") or target.startswith("//"):
                target = "/"
            self.send_response(HTTPStatus.SEE_OTHER)
            self.send_header("Location", target)
            self.send_header("Content-Length", "0")
            for name, value in _SECURITY_HEADERS.items():
                self.send_header(name, value)
            self.end_headers()
            return
        self._send(HTTPStatus.OK, _JSON, json.dumps(result, indent=1).encode())

    def _body(self) -> dict[str, Any]:
        """The POST body as a dict: JSON (``application/json``) or an HTML form."""
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise _HttpError(HTTPStatus.BAD_REQUEST, "bad Content-Length") from None
        if length > _MAX_BODY or length < 0:
            raise _HttpError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body over {_MAX_BODY} bytes")
        raw = self.rfile.read(length) if length else b""
        kind = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if not raw:
            return {}
        if kind == "application/json":
            try:
                value = json.loads(raw)
            except ValueError:
                raise _HttpError(HTTPStatus.BAD_REQUEST, "the body is not JSON") from None
            if not isinstance(value, dict):
                raise _HttpError(HTTPStatus.BAD_REQUEST, "the JSON body must be an object")
            return value
        if kind == "application/x-www-form-urlencoded":
            return {
                k: v[-1] for k, v in urllib.parse.parse_qs(raw.decode("utf-8", "replace")).items()
            }
        raise _HttpError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "send application/json or a form")

    def _static(self, name: str) -> tuple[HTTPStatus, str, bytes]:
        path = _STATIC / name
        if (
            "/" in name
            or name.startswith(".")
            or path.suffix not in _STATIC_TYPES
            or not path.is_file()
        ):
            raise _HttpError(HTTPStatus.NOT_FOUND, f"no static file {name}")
        return HTTPStatus.OK, _STATIC_TYPES[path.suffix], path.read_bytes()

    # --- answers ----------------------------------------------------------------------------

    def _send(
        self,
        status: HTTPStatus,
        content_type: str,
        payload: bytes,
        body: bool = True,
        headers: dict[str, str] | None = None,
    ) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            for name, value in {**_SECURITY_HEADERS, **(headers or {})}.items():
                self.send_header(name, value)
            self.end_headers()
            if body:
                self.wfile.write(payload)
        except OSError:  # the client went away
            self.close_connection = True

    def _error(
        self,
        status: HTTPStatus,
        message: str,
        headers: dict[str, str] | None = None,
        body: bool = True,
    ) -> None:
        wants_html = "text/html" in (self.headers.get("Accept") or "") and not self.path.startswith(
            "/api/"
        )
        if wants_html:
            payload = console.error_page(int(status), status.phrase, message).encode()
            self._send(status, _HTML, payload, body, headers)
        else:
            payload = json.dumps({"error": message, "status": int(status)}).encode()
            self._send(status, _JSON, payload, body, headers)


#: Action names under ``/api/v1/studies/<ref>/``.
_ACTIONS = ("retry", "cancel", "redeliver")
#: Action routes not under a study.
_ACTION_ROUTES = ("quarantine/purge",)
