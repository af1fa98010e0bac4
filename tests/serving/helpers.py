"""Helpers shared by the gateway tests: senders, waits, readers (fixtures are in conftest.py)."""

from __future__ import annotations

import io
import ssl
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pynetdicom
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from medssl.serving.metrics import GatewayMetrics
from medssl.serving.scp import StorageSCP
from medssl.serving.spool import Spool, StoredInstance
from medssl.testing.gateway import GatewayProcess, gateway_config
from medssl.testing.orthanc import OrthancServer
from tests.conftest import require_tool
from tests.paths import MODEL_REPOSITORY

#: The shipped model every gateway test routes CT to.
DETECTOR = "focalmix-nodules"
SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
#: The patient of the SCP tests' series (values no log may show).
PHI = {"patient_name": "Doe^Jane", "patient_id": "MRN-424242"}


@dataclass
class Gateway:
    scp: StorageSCP
    spool: Spool
    metrics: GatewayMetrics
    stored: list[StoredInstance] = field(default_factory=list)

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0

    def incoming_files(self) -> list[Path]:
        return sorted(self.spool.incoming.rglob("*.dcm"))


@contextmanager
def associated(
    port: int,
    calling: str = "SCU",
    contexts=((CTImageStorage, SYNTAXES),),
    tls_args=None,
    called: str = "MEDSSL",
    bind_address: tuple[str, int] = ("", 0),
) -> Iterator[pynetdicom.association.Association]:
    """A pynetdicom SCU association (released or aborted on exit; may be rejected), calling
    ``called`` on 127.0.0.1 from ``bind_address`` (e.g. ``("127.0.0.2", 0)``: another host)."""
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.network_timeout = 5
    ae.dimse_timeout = 10
    ae.add_requested_context(Verification)
    for sop_class, syntaxes in contexts:
        ae.add_requested_context(sop_class, syntaxes)
    assoc = ae.associate(
        "127.0.0.1", port, ae_title=called, tls_args=tls_args, bind_address=bind_address
    )
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()


def status_of(rsp: pydicom.Dataset) -> int:
    assert "Status" in rsp, "no response from the SCP (association aborted or timed out)"
    return int(rsp.Status)


def part10(
    dataset_bytes: bytes, sop_instance_uid: str, transfer_syntax: str = ExplicitVRLittleEndian
) -> bytes:
    """File meta (CT, ``transfer_syntax``) followed by ``dataset_bytes`` as they are."""
    meta = pydicom.dataset.FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = transfer_syntax
    buffer = DicomBytesIO()
    write_file_meta_info(buffer, meta, enforce_standard=True)
    return b"\0" * 128 + b"DICM" + buffer.getvalue() + dataset_bytes


def results(orthanc: OrthancServer, study_uid: str, modality: str) -> list[dict]:
    return orthanc.instances_of(study_uid, modality)


def wait_results(
    orthanc: OrthancServer,
    gateway: GatewayProcess,
    study_uid: str,
    modalities: tuple[str, ...] = ("SR",),
    timeout_s: float = 180.0,
) -> dict[str, list[dict]]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = {m: results(orthanc, study_uid, m) for m in modalities}
        if all(found.values()):
            return found
        time.sleep(0.25)
    raise AssertionError(
        f"no {modalities} for study {study_uid} in Orthanc after {timeout_s} s; "
        f"jobs {gateway.jobs()}, deliveries {gateway.deliveries()}\n{gateway.log_tail()}"
    )


def wait_settled(gateway: GatewayProcess, timeout_s: float = 60.0, jobs: int = 1) -> list[dict]:
    """Wait until there are ``jobs`` jobs or more and none is unfinished; returns the jobs."""
    n_jobs = jobs
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        jobs = gateway.jobs()
        if len(jobs) >= n_jobs and all(
            j["state"] in ("done", "failed", "dead-letter") for j in jobs
        ):
            return jobs
        time.sleep(0.2)
    raise AssertionError(
        f"jobs unfinished after {timeout_s} s: {gateway.jobs()}\n{gateway.log_tail()}"
    )


def dataset(orthanc: OrthancServer, instance: dict) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(orthanc.file(instance["ID"])))


def storescu(gateway: GatewayProcess, files: list[Path], timeout_s: float = 60.0) -> None:
    tool = require_tool("storescu", "dcmtk")
    sent = subprocess.run(
        [
            tool,
            "-aet",
            "STORESCU",
            "-aec",
            "MEDSSL",
            "127.0.0.1",
            str(gateway.port),
            *map(str, files),
        ],
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    assert sent.returncode == 0, sent.stdout + sent.stderr


def fuzz_gateway(
    root: Path, destinations: list[dict] | None = None, min_slices: int = 1, **sections: dict
) -> GatewayProcess:
    """A ``medssl-serve`` on free loopback ports running the shipped detector on the CT series
    of at least ``min_slices`` slices (not started)."""
    routes = [{"model": DETECTOR, "select": {"modality": "CT", "min_slices": min_slices}}]
    config = gateway_config(
        root, routes, MODEL_REPOSITORY, destinations, **{"spool": {"study_idle_s": 0.5}, **sections}
    )
    return GatewayProcess(root, config)


def client_context(cert: Path, key: Path | None = None) -> ssl.SSLContext:
    """A TLS client context trusting `cert` (and presenting it with `key` when given)."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
    if key is not None:
        context.load_cert_chain(str(cert), str(key))
    return context
