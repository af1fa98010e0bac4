"""A real Orthanc for tests: the PACS that sends studies to the gateway and receives its results.

Not a test module: tests import :class:`OrthancServer` (``from medssl.testing.orthanc import
OrthancServer``) and wrap it in fixtures of their own.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import requests

__all__ = ["INSTANCE_TAGS", "ORTHANC", "OrthancServer", "free_port"]

#: The Orthanc executable of the Debian package ``orthanc``.
ORTHANC = "/usr/sbin/Orthanc"

#: Tags :meth:`OrthancServer.instances_of_study` puts at the top of each instance's dict.
INSTANCE_TAGS = (
    "SOPClassUID",
    "SOPInstanceUID",
    "Modality",
    "SeriesDescription",
    "SeriesInstanceUID",
    "SeriesNumber",
    "InstanceNumber",
)


def free_port() -> int:
    """A TCP port free on every interface right now (Orthanc 1.10 binds all of them)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


#: The DICOMweb plugin of Debian's ``orthanc-dicomweb`` package.
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


class OrthancServer:
    """One Orthanc process with its own storage, configuration, log and ports, under ``root``.

    Startup recipe (what :meth:`start` does):

    1. ``root/config.json`` is written: storage and index in ``root/storage``, the HTTP and
       DICOM ports picked by :func:`free_port` (Orthanc 1.10 listens on all interfaces, so a
       test never uses a fixed port), HTTP for localhost only (``RemoteAccessAllowed: false``)
       without authentication, no plugins, no saved jobs (a restart does not replay old
       transfers), modalities kept in the database (they survive a restart),
       ``DicomAet: aet``, echo and store allowed from any AE, and
       ``UnknownSopClassAccepted: true`` (Orthanc's DCMTK list already has CT, Enhanced CT,
       SEG and Comprehensive 3D SR; promiscuous mode makes the test PACS accept any other
       storage SOP class too).
    2. ``/usr/sbin/Orthanc --logfile=root/orthanc.log root/config.json`` runs as a subprocess
       (stdout and stderr, which get what it prints before its log is open, go to
       ``root/orthanc.stdout``).
    3. ``GET /system`` is polled every 50 ms until it answers (0.1-1 s); if the process exits
       first, or ``timeout_s`` passes, a :class:`RuntimeError` carries the log's tail. On a
       first start that dies because a port was taken meanwhile, fresh ports are drawn and it
       is tried again (at most 3 times).

    :meth:`stop` sends SIGTERM and waits (Orthanc takes about 3 s to shut down); the storage
    stays, so :meth:`start` again brings back the same content, modalities and ports (a PACS
    that went down and came back).

    Args:
        root: a folder of its own (created); everything Orthanc writes goes under it.
        aet: Orthanc's AE title.
        overwrite: ``OverwriteInstances``: an instance re-sent with a SOP Instance UID already
            stored replaces the stored one. Orthanc's default (``False``) keeps the first copy
            and discards the new one, still answering the C-STORE with success.
        check_called_aet: ``DicomCheckCalledAet``: reject associations whose called AE title
            is not ``aet`` (for tests of a rejected association).

    Attributes:
        http_port / dicom_port: the ports it listens on.
        aet: its AE title.
        url: ``http://127.0.0.1:<http_port>``, the REST API.
    """

    def __init__(
        self,
        root: Path,
        aet: str = "ORTHANC",
        overwrite: bool = False,
        check_called_aet: bool = False,
        dicomweb: bool = False,
    ) -> None:
        if not 1 <= len(aet) <= 16:
            raise ValueError(f"aet must be 1-16 characters, got {aet!r}")
        self.root = Path(root)
        self.aet = aet
        self.overwrite = overwrite
        self.check_called_aet = check_called_aet
        self.dicomweb = dicomweb
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.config_path = self.root / "config.json"
        self.log_path = self.root / "orthanc.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._started_once = False
        self._session = requests.Session()

    @property
    def url(self) -> str:
        """The REST API's base URL."""
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def running(self) -> bool:
        """The process runs (it may still be starting)."""
        return self._process is not None and self._process.poll() is None

    def __enter__(self) -> OrthancServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self, timeout_s: float = 30) -> None:
        """Start Orthanc and wait until its REST API answers (see the class docstring).

        Raises:
            RuntimeError: it exited or did not answer within ``timeout_s``; the message has
                the tail of its log.
        """
        if self.running:
            raise RuntimeError(f"Orthanc on {self.url} is already running")
        for attempt in range(3):
            try:
                self._start_once(timeout_s)
                self._started_once = True
                return
            except _PortTaken:
                if self._started_once or attempt == 2:
                    raise RuntimeError(
                        f"Orthanc could not bind port {self.http_port} or "
                        f"{self.dicom_port}:\n{self.log_tail()}"
                    ) from None
                self.http_port, self.dicom_port = free_port(), free_port()

    def stop(self, timeout_s: float = 30) -> None:
        """SIGTERM and wait (SIGKILL after ``timeout_s``); the storage is kept."""
        process, self._process = self._process, None
        self._session.close()  # a kept-alive HTTP connection delays Orthanc's shutdown
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def log_tail(self, n_lines: int = 40) -> str:
        """The last lines of Orthanc's log and of its stdout/stderr."""
        lines = []
        for path in (self.root / "orthanc.stdout", self.log_path):
            if path.is_file():
                lines += path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n_lines:]) or "(no log)"

    def _config(self) -> dict[str, Any]:
        storage = self.root / "storage"
        return {
            "Name": f"medssl-test-{self.aet}",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "StorageCompression": False,
            # DICOMweb (STOW-RS at <url>/dicom-web) from Debian's orthanc-dicomweb package.
            "Plugins": [DICOMWEB_PLUGIN] if self.dicomweb else [],
            "DicomWeb": {"Enable": self.dicomweb, "Root": "/dicom-web/"},
            "ConcurrentJobs": 2,
            "SaveJobs": False,
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "HttpThreadsCount": 8,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": self.check_called_aet,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "UnknownSopClassAccepted": True,
            "DicomScuTimeout": 10,
            "DicomAssociationCloseDelay": 0,
            "OverwriteInstances": self.overwrite,
            "DicomModalities": {},
            "DicomModalitiesInDatabase": True,
            "StableAge": 1,
        }

    def _start_once(self, timeout_s: float) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self._config(), indent=2))
        self.log_path.unlink(missing_ok=True)
        with open(self.root / "orthanc.stdout", "wb") as out:
            self._process = subprocess.Popen(
                [ORTHANC, f"--logfile={self.log_path}", str(self.config_path)],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.root,
                env={**os.environ, "MALLOC_ARENA_MAX": "2"},
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                self._process = None
                log = self.log_tail()
                if "already in use" in log:
                    raise _PortTaken
                raise RuntimeError(f"Orthanc exited at start (config {self.config_path}):\n{log}")
            try:
                if self._session.get(f"{self.url}/system", timeout=1).ok:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(
            f"Orthanc did not answer on {self.url} within {timeout_s} s:\n{self.log_tail()}"
        )

    # --- REST --------------------------------------------------------------------------------

    def get(self, path: str) -> Any:
        """``GET path`` (``/system``, ``/instances``, ...) as JSON."""
        return self._request("GET", path).json()

    def add_modality(self, name: str, aet: str, host: str, port: int) -> None:
        """Declare a DICOM peer ``name`` (``PUT /modalities/{name}``) that :meth:`store_to` can
        push to."""
        self._request("PUT", f"/modalities/{name}", json={"AET": aet, "Host": host, "Port": port})

    def upload(self, paths: Sequence[Path]) -> list[str]:
        """Store files over REST (``POST /instances``); their Orthanc instance ids, in order."""
        ids = []
        for path in paths:
            answer = self._request("POST", "/instances", data=Path(path).read_bytes()).json()
            ids.append(answer["ID"])
        return ids

    def store_to(
        self,
        modality: str,
        resources: Sequence[str],
        synchronous: bool = True,
        timeout_s: float = 120,
    ) -> dict[str, Any]:
        """Push resources (instance, series, study or patient ids) to ``modality`` by C-STORE
        (``POST /modalities/{modality}/store``). Synchronous: Orthanc's job result (it fails
        with an HTTP error when a C-STORE fails); asynchronous: the job's ``ID``."""
        body = {
            "Resources": list(resources),
            "Synchronous": synchronous,
            "Asynchronous": not synchronous,
            "Timeout": timeout_s,
        }
        return self._request(
            "POST", f"/modalities/{modality}/store", json=body, timeout=timeout_s + 10
        ).json()

    def instances_of_study(self, study_uid: str) -> list[dict[str, Any]]:
        """Every instance of a study (``/tools/find``, level Instance, expanded), in Orthanc's
        order. Each dict is Orthanc's expanded instance (``ID``, ``ParentSeries``,
        ``MainDicomTags``, ...) plus the keys of :data:`INSTANCE_TAGS` (``SOPClassUID``,
        ``Modality``, ``SeriesDescription``, ...; None where the instance lacks one) and
        ``Tags``: every simplified tag of the instance. Orthanc 1.10 has no ``RequestedTags``,
        so they come from ``/instances/{id}/simplified-tags``."""
        found = self._request(
            "POST",
            "/tools/find",
            json={"Level": "Instance", "Query": {"StudyInstanceUID": study_uid}, "Expand": True},
        ).json()
        for instance in found:
            tags = self.get(f"/instances/{instance['ID']}/simplified-tags")
            instance.update({name: tags.get(name) for name in INSTANCE_TAGS}, Tags=tags)
        return found

    def instances_of(self, study_uid: str, modality: str) -> list[dict[str, Any]]:
        """The instances of a study's series of one Modality (e.g. ``SR``), expanded; one
        ``/tools/find`` request, cheap enough to poll."""
        return self._request(
            "POST",
            "/tools/find",
            json={
                "Level": "Instance",
                "Query": {"StudyInstanceUID": study_uid, "Modality": modality},
                "Expand": True,
            },
        ).json()

    def find_studies(self, study_uid: str) -> list[str]:
        """Orthanc ids of the studies with this StudyInstanceUID (none or one)."""
        return self._request(
            "POST", "/tools/find", json={"Level": "Study", "Query": {"StudyInstanceUID": study_uid}}
        ).json()

    def delete(self, path: str) -> None:
        """``DELETE`` a resource, e.g. ``/studies/{id}``."""
        self._request("DELETE", path)

    @property
    def pid(self) -> int:
        """The running Orthanc's process id."""
        if self._process is None:
            raise RuntimeError("Orthanc is not running")
        return self._process.pid

    def file(self, instance_id: str) -> bytes:
        """The stored DICOM file of an instance (``/instances/{id}/file``)."""
        return self._request("GET", f"/instances/{instance_id}/file").content

    def _request(
        self, method: str, path: str, timeout: float = 30, **kwargs: Any
    ) -> requests.Response:
        response = self._session.request(method, f"{self.url}{path}", timeout=timeout, **kwargs)
        if not response.ok:
            raise RuntimeError(
                f"Orthanc {method} {path}: HTTP {response.status_code}: {response.text[:500]}"
            )
        return response


class _PortTaken(Exception):
    """Orthanc could not bind a port (another process took it between the draw and the start)."""
