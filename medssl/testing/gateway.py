"""Run ``medssl-serve`` as a real process for end-to-end tests and benchmarks.

:class:`GatewayProcess` writes a gateway config under its root, starts the console script
(``<venv>/bin/medssl-serve --config``) on free loopback ports, waits for ``/readyz``, and can
stop it with SIGTERM or kill it with SIGKILL and start it again on the same spool and ports.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from medssl.testing.orthanc import free_port

__all__ = ["GatewayProcess", "gateway_config"]


def gateway_config(
    root: Path,
    routes: list[dict[str, Any]],
    repository: Path,
    destinations: list[dict[str, Any]] | None = None,
    **sections: dict[str, Any],
) -> dict[str, Any]:
    """A gateway config (a plain dict) on free loopback ports, spool under ``root``.

    ``sections`` update the defaults section by section, e.g. ``spool={"study_idle_s": 2}``.
    """
    cfg: dict[str, Any] = {
        "scp": {
            "ae_title": "MEDSSL",
            "host": "127.0.0.1",
            "port": free_port(),
            "allowed_callers": [
                {"ae_title": "ORTHANC"},
                {"ae_title": "STORESCU"},
                {"ae_title": "BENCH"},
            ],
        },
        "spool": {"path": str(root / "spool"), "min_free_mb": 16, "study_idle_s": 1.0},
        "models": {"repository": str(repository), "batch_size": 4},
        "routes": routes,
        "processing": {"workers": 1, "max_attempts": 3, "retry_backoff_s": 0.5},
        "destinations": destinations or [],
        "delivery": {"max_attempts": 20, "backoff_initial_s": 0.5, "backoff_max_s": 2.0},
        "http": {"host": "127.0.0.1", "port": free_port()},
        "log_level": "INFO",
    }
    for name, values in sections.items():
        cfg[name] = {**cfg.get(name, {}), **values}
    return cfg


class GatewayProcess:
    """``medssl-serve`` on a config written to ``root/gateway.yaml``.

    Attributes:
        config: the config dict (ports fixed at construction, so restarts keep them).
        log: the process's stderr (JSON lines), appended across restarts.
    """

    def __init__(
        self, root: Path, config: dict[str, Any], env: dict[str, str] | None = None
    ) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.config = config
        self.path = self.root / "gateway.yaml"
        self.path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.log = self.root / "gateway.log"
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def port(self) -> int:
        return int(self.config["scp"]["port"])

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.config['http']['port']}"

    @property
    def spool(self) -> Path:
        return Path(self.config["spool"]["path"])

    def start(self, timeout_s: float = 90.0, wait_ready: bool = True) -> None:
        """Start the process; wait until ``/readyz`` answers 200 (raises with the log tail)."""
        exe = Path(sys.prefix) / "bin" / "medssl-serve"
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [str(exe), "--config", str(self.path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
            )
        if wait_ready:
            self.wait_ready(timeout_s)

    def wait_ready(self, timeout_s: float = 90.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(
                    f"medssl-serve exited with {self.process.returncode}:\n{self.log_tail()}"
                )
            if self.http_get("/readyz")[0] == 200:
                return
            time.sleep(0.1)
        raise TimeoutError(f"medssl-serve not ready after {timeout_s} s:\n{self.log_tail()}")

    def wait_listening(self, timeout_s: float = 60.0) -> None:
        """Wait until the gateway logs "gateway started" (its SCP listens): ``/healthz`` answers
        before the SCP binds (the HTTP server starts first), and without its models ``/readyz``
        never says so."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.log.is_file() and '"gateway started"' in self.log.read_text():
                return
            time.sleep(0.1)
        raise TimeoutError(f"the gateway did not start within {timeout_s} s:\n{self.log_tail()}")

    def http_get(self, path: str) -> tuple[int, str]:
        """(status, body) of a GET on the gateway's HTTP port; (0, reason) when unreachable."""
        try:
            with urllib.request.urlopen(self.http_url + path, timeout=2) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except OSError as exc:
            return 0, str(exc)

    def kill(self) -> None:
        """SIGKILL (no cleanup at all), then reap."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def terminate(self, timeout_s: float = 60.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout_s)

    def stop(self) -> None:
        """Terminate if running (fixtures' teardown); kill if it does not stop."""
        if self.process is not None and self.process.poll() is None:
            try:
                self.terminate(30)
            except subprocess.TimeoutExpired:
                self.kill()

    def jobs(self) -> list[dict[str, Any]]:
        """The job store's rows (read through a second SQLite connection; WAL allows it)."""
        db = sqlite3.connect(self.spool / "jobs.sqlite", timeout=10)
        db.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in db.execute("SELECT * FROM jobs ORDER BY id")]
        except sqlite3.OperationalError:
            return []
        finally:
            db.close()

    def deliveries(self) -> list[dict[str, Any]]:
        db = sqlite3.connect(self.spool / "jobs.sqlite", timeout=10)
        db.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in db.execute("SELECT * FROM deliveries ORDER BY id")]
        except sqlite3.OperationalError:
            return []
        finally:
            db.close()

    def spooled(self) -> list[Path]:
        """The instance files in the spool's ``incoming/``."""
        return sorted((self.spool / "incoming").rglob("*.dcm"))

    def log_tail(self, lines: int = 40) -> str:
        if not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
