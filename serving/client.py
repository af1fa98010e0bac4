"""``medssl-serve jobs``'s back ends: the running gateway's API, or the spool itself.

:func:`open_jobs` reads the gateway's config. When the operator API is enabled and answers,
every call goes through it (the action is then recorded as the API user's, and the running
gateway acts at once); otherwise the job store and spool are opened directly, which is what
an administrator does on a stopped gateway. Both back ends expose the same calls with the
same results: they are :class:`~medssl.serving.operations.Operations` on either side.
Direct access to a running gateway's store is safe too (SQLite transactions in WAL mode,
and the gateway's loops read their state from the store), but is recorded as the OS user.
"""

from __future__ import annotations

import base64
import getpass
import json
import ssl
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Protocol

from medssl.errors import MedsslError
from medssl.serving.config import GatewayConfig
from medssl.serving.jobstore import ActionRefused, JobStore
from medssl.serving.operations import NotFound, Operations
from medssl.serving.spool import Spool

__all__ = ["ApiClient", "Jobs", "JobsError", "LocalJobs", "open_jobs"]


class JobsError(MedsslError):
    """An operator call failed: the job is unknown, its state forbids the action, or the API
    answered an error (the message is the API's)."""


class Jobs(Protocol):
    """What ``medssl-serve jobs`` calls; results as :class:`Operations` returns them."""

    where: str

    def studies(self, **filters: Any) -> dict[str, Any]: ...
    def study(self, ref: str) -> dict[str, Any]: ...
    def retry(self, ref: str, reason: str | None = None) -> dict[str, Any]: ...
    def redeliver(
        self, ref: str, destination: str, reason: str | None = None
    ) -> dict[str, Any]: ...
    def cancel(self, ref: str, reason: str | None = None) -> dict[str, Any]: ...
    def close(self) -> None: ...


class LocalJobs:
    """The spool's job store, opened directly (actions recorded as ``<OS user> (cli)``)."""

    def __init__(self, cfg: GatewayConfig) -> None:
        db = cfg.spool.path / "jobs.sqlite"
        if not db.is_file():
            raise JobsError(f"no job store at {db}: has this gateway (spool.path) ever run?")
        self.store = JobStore(db)
        self.ops = Operations(self.store, Spool(cfg.spool.path), cfg)
        self.actor = f"{getpass.getuser()} (cli)"
        self.where = f"the spool at {cfg.spool.path}"

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        try:
            return fn(*args, **kwargs)
        except (NotFound, ActionRefused, ValueError) as exc:
            raise JobsError(str(exc)) from None

    def studies(self, **filters: Any) -> dict[str, Any]:
        return self._call(self.ops.studies, **filters)

    def study(self, ref: str) -> dict[str, Any]:
        return self._call(self.ops.study, ref)

    def retry(self, ref: str, reason: str | None = None) -> dict[str, Any]:
        return self._call(self.ops.retry, ref, self.actor, reason)

    def redeliver(self, ref: str, destination: str, reason: str | None = None) -> dict[str, Any]:
        return self._call(self.ops.redeliver, ref, destination, self.actor, reason)

    def cancel(self, ref: str, reason: str | None = None) -> dict[str, Any]:
        return self._call(self.ops.cancel, ref, self.actor, reason)

    def close(self) -> None:
        self.store.close()


class ApiClient:
    """The running gateway's operator API (credentials from its config or environment).

    Args:
        cfg: the gateway's config (``api`` section: address, credentials, TLS).
        timeout_s: per request.
    """

    def __init__(self, cfg: GatewayConfig, timeout_s: float = 10.0) -> None:
        api = cfg.api
        host = (
            "127.0.0.1" if api.host in ("0.0.0.0", "") else "::1" if api.host == "::" else api.host
        )
        scheme = "https" if api.tls.enabled else "http"
        self.base = f"{scheme}://{host if ':' not in host else f'[{host}]'}:{api.port}"
        self.where = f"the gateway's API at {self.base}"
        if api.token is not None:
            self._auth = f"Bearer {api.token}"
        elif api.username is not None and api.password is not None:
            self._auth = (
                "Basic " + base64.b64encode(f"{api.username}:{api.password}".encode()).decode()
            )
        else:
            raise JobsError("the API has no credentials in the config")
        self._context: ssl.SSLContext | None = None
        if api.tls.enabled:  # trust exactly the gateway's own certificate (often self-signed)
            self._context = ssl.create_default_context(cafile=str(api.tls.certificate))
            self._context.check_hostname = False
        self.timeout_s = timeout_s
        self._csrf: str | None = None

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        headers = {"Authorization": self._auth, "Accept": "application/json"}
        data = None
        if method == "POST":
            if self._csrf is None:
                self._csrf = str(self._request("GET", "/api/v1/session")["csrf_token"])
            headers.update({"Content-Type": "application/json", "X-CSRF-Token": self._csrf})
            data = json.dumps(body or {}).encode()
        request = urllib.request.Request(
            self.base + path, data=data, headers=headers, method=method
        )
        try:
            with urllib.request.urlopen(
                request, timeout=self.timeout_s, context=self._context
            ) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            try:
                message = json.loads(exc.read()).get("error", exc.reason)
            except ValueError:
                message = exc.reason
            raise JobsError(f"{exc.code}: {message}") from None

    def ping(self) -> None:
        """Raises OSError when the API does not answer, JobsError when it refuses us."""
        self._request("GET", "/api/v1/session")

    def studies(self, **filters: Any) -> dict[str, Any]:
        query = []
        for key, value in filters.items():
            if value is None or value == () or value == []:
                continue
            if key == "states":
                query += [("state", s) for s in value]
            else:
                query.append((key, str(value)))
        return self._request(
            "GET", "/api/v1/studies" + ("?" + urllib.parse.urlencode(query) if query else "")
        )

    def study(self, ref: str) -> dict[str, Any]:
        return self._request("GET", f"/api/v1/studies/{urllib.parse.quote(ref, safe='')}")

    def retry(self, ref: str, reason: str | None = None) -> dict[str, Any]:
        return self._request(
            "POST", f"/api/v1/studies/{urllib.parse.quote(ref, safe='')}/retry", {"reason": reason}
        )

    def redeliver(self, ref: str, destination: str, reason: str | None = None) -> dict[str, Any]:
        return self._request(
            "POST",
            f"/api/v1/studies/{urllib.parse.quote(ref, safe='')}/redeliver",
            {"destination": destination, "reason": reason},
        )

    def cancel(self, ref: str, reason: str | None = None) -> dict[str, Any]:
        return self._request(
            "POST", f"/api/v1/studies/{urllib.parse.quote(ref, safe='')}/cancel", {"reason": reason}
        )

    def close(self) -> None:
        pass


def open_jobs(cfg: GatewayConfig, mode: str = "auto") -> Jobs:
    """The API when ``mode`` is ``api`` (or ``auto`` and the API answers), else the spool.

    Raises:
        JobsError: ``mode="api"`` and the API is off, unreachable or refuses the credentials;
            or ``mode="spool"``/fallback and the spool has no job store.
    """
    if mode not in ("auto", "api", "spool"):
        raise ValueError(f"mode must be auto, api or spool, got {mode!r}")
    if mode != "spool" and cfg.api.enabled:
        client = ApiClient(cfg)
        try:
            client.ping()
            return client
        except (OSError, urllib.error.URLError) as exc:
            if mode == "api":
                raise JobsError(
                    f"{client.where} does not answer ({exc}); is the gateway running?"
                ) from None
    elif mode == "api":
        raise JobsError("the operator API is not enabled in this config (api.enabled)")
    return LocalJobs(cfg)
