"""Delivering a job's result files (SEG, SR) to a destination: DIMSE C-STORE or DICOMweb STOW-RS.

:func:`send_files` sends every file of one job in one go: over one association (``dimse``)
or in one multipart POST (``stow``). It either returns (every file acknowledged) or raises
:class:`DeliveryError`, whose message names the destination, its address and what failed;
the gateway keeps that message in the job store and retries after a backoff
(:class:`~medssl.serving.config.DeliveryConfig`). Re-sending is safe: the result objects
carry deterministic UIDs, so the peer replaces or ignores the copy it already has.

Every network wait is bounded by ``destination.timeout_s``: a peer that is down, refuses,
or stops answering mid-transfer makes :func:`send_files` fail, never hang.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Sequence
from pathlib import Path

import pydicom
import requests
from dicomweb_client import DICOMwebClient
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, Association, evt
from pynetdicom.status import code_to_category

from medssl.errors import MedsslError
from medssl.serving.config import DestinationConfig, redact_url

__all__ = ["SUCCESS_STATUSES", "DeliveryError", "send_files"]

#: C-STORE statuses that count as stored: success, and the warnings "coercion of data
#: elements" (0xB000), "elements discarded" (0xB006), "data set does not match SOP class"
#: (0xB007), after which the peer keeps the instance.
SUCCESS_STATUSES = frozenset({0x0000, 0xB000, 0xB006, 0xB007})

#: pynetdicom's limit on the presentation contexts of one association request.
_MAX_CONTEXTS = 128


class DeliveryError(MedsslError):
    """Result files could not be delivered. The message names the destination, its address
    (``AE@host:port`` or the URL) and what failed (connection refused, association rejected
    or aborted, a failure status and the file it answered, an HTTP error)."""


def send_files(
    destination: DestinationConfig, files: Sequence[Path], calling_ae_title: str
) -> None:
    """Send ``files`` (DICOM Part 10 files) to ``destination``, all or nothing.

    ``dimse``: one association from ``destination.calling_ae_title`` (or ``calling_ae_title``
    when that is empty) to ``destination.ae_title@host:port``, proposing a presentation
    context per SOP class and transfer syntax of the files (the file's own syntax plus
    Explicit and Implicit VR Little Endian), then one C-STORE per file. Success and the
    warning statuses of :data:`SUCCESS_STATUSES` count as stored. The association is released
    after the last file, aborted after a failure.

    ``stow``: one STOW-RS request (``POST {url}/studies``, ``multipart/related;
    type="application/dicom"``) with every file; an HTTP error or any instance in the answer's
    Failed SOP Sequence fails the delivery.

    Args:
        destination: where to send.
        files: the files, sent in this order.
        calling_ae_title: our AE title when the destination sets none (the SCP's title).

    Raises:
        DeliveryError: nothing to send, a file unreadable, or the peer did not acknowledge
            every file. Files before the failing one may have been stored.
        ValueError: the calling AE title is not 1-16 characters.
    """
    where = _describe(destination)
    if not files:
        raise DeliveryError(f"{where}: no files to send")
    if destination.kind == "dimse":
        calling = (destination.calling_ae_title or calling_ae_title).strip()
        if not 1 <= len(calling) <= 16 or "\\" in calling:
            raise ValueError(
                f"calling AE title must be 1-16 characters without a backslash, got {calling!r}"
            )
        _send_dimse(destination, [Path(f) for f in files], calling, where)
    else:
        _send_stow(destination, [Path(f) for f in files], where)


def _describe(destination: DestinationConfig) -> str:
    if destination.kind == "dimse":
        return (
            f"destination {destination.name!r} "
            f"({destination.ae_title}@{destination.host}:{destination.port})"
        )
    return f"destination {destination.name!r} ({redact_url(destination.url)})"


# --- DIMSE ---------------------------------------------------------------------------------


def _send_dimse(
    destination: DestinationConfig, files: list[Path], calling: str, where: str
) -> None:
    contexts = _presentation_contexts(files, where)
    if len(contexts) > _MAX_CONTEXTS:
        raise DeliveryError(
            f"{where}: the files need {len(contexts)} presentation contexts "
            f"(SOP class x transfer syntax), more than the {_MAX_CONTEXTS} of "
            f"one association"
        )
    timeout = destination.timeout_s
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    for (sop_class, _), syntaxes in contexts.items():
        ae.add_requested_context(sop_class, syntaxes)

    connected: list[bool] = []
    started = time.monotonic()
    try:
        assoc = ae.associate(
            destination.host,
            destination.port,
            ae_title=destination.ae_title.strip(),
            evt_handlers=[(evt.EVT_CONN_OPEN, lambda event: connected.append(True))],
        )
    except OSError as exc:  # the host name does not resolve
        raise DeliveryError(f"{where}: cannot connect: {exc.strerror or exc}") from exc
    if not assoc.is_established:
        why = _why_not_established(assoc, bool(connected), destination, time.monotonic() - started)
        raise DeliveryError(f"{where}: {why}")
    try:
        for path in files:
            _store(assoc, path, timeout, where)
    except BaseException:
        assoc.abort()
        raise
    assoc.release()


def _presentation_contexts(files: list[Path], where: str) -> dict[tuple[UID, UID], list[UID]]:
    """``(SOP class, file's transfer syntax) -> proposed transfer syntaxes``, in file order."""
    contexts: dict[tuple[UID, UID], list[UID]] = {}
    for path in files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            sop_class = UID(ds.file_meta.get("MediaStorageSOPClassUID") or ds.SOPClassUID)
            syntax = UID(ds.file_meta.TransferSyntaxUID)
        except (OSError, InvalidDicomError, AttributeError, KeyError) as exc:
            raise DeliveryError(
                f"{where}: cannot read {path} as a DICOM file with a SOP class "
                f"and a transfer syntax: {exc}"
            ) from exc
        uncompressed = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
        others = [s for s in uncompressed if s != syntax]
        contexts.setdefault((sop_class, syntax), [syntax, *others])
    return contexts


def _store(assoc: Association, path: Path, timeout: float, where: str) -> None:
    try:
        status = assoc.send_c_store(path)
    except (OSError, InvalidDicomError, AttributeError, ValueError, RuntimeError) as exc:
        raise DeliveryError(f"{where}: cannot send {path}: {exc}") from exc
    if "Status" not in status:
        raise DeliveryError(
            f"{where}: no C-STORE response for {path}: the association was "
            f"aborted or the peer did not answer within {timeout:g} s"
        )
    code = int(status.Status)
    if code not in SUCCESS_STATUSES:
        comment = status.get("ErrorComment")
        raise DeliveryError(
            f"{where}: C-STORE of {path} answered status 0x{code:04X} "
            f"({code_to_category(code)}){f': {comment}' if comment else ''}"
        )


def _why_not_established(
    assoc: Association, connected: bool, destination: DestinationConfig, elapsed_s: float
) -> str:
    """Words for an association that did not come up."""
    timeout = destination.timeout_s
    if assoc.is_rejected:
        rsp = assoc.acceptor.primitive
        if rsp is None:
            return "association rejected"
        return (
            f"association rejected ({rsp.result_str}, source: {rsp.source_str}, "
            f"reason: {rsp.reason_str})"
        )
    if not connected:
        if elapsed_s >= timeout:
            return f"cannot connect: no TCP connection within {timeout:g} s (timed out)"
        return f"cannot connect: {_connect_error(destination.host, destination.port, timeout)}"
    if assoc.rejected_contexts and not assoc.accepted_contexts:
        refused = sorted({str(cx.abstract_syntax.name) for cx in assoc.rejected_contexts})
        return (
            f"association aborted: the peer accepted none of the presentation contexts "
            f"({', '.join(refused)})"
        )
    return (
        f"association aborted (the peer aborted, or sent no association response within "
        f"{timeout:g} s)"
    )


def _connect_error(host: str, port: int, timeout: float) -> str:
    """The OS's reason a TCP connection to ``host:port`` fails, found by one more attempt
    (pynetdicom logs the reason instead of keeping it). Called only after a quick failure."""
    try:
        with socket.create_connection((host, port), timeout=min(timeout, 1.0)):
            return "the TCP connection failed once, a second try connected (peer restarting?)"
    except OSError as exc:
        return exc.strerror or str(exc) or type(exc).__name__


# --- STOW-RS -------------------------------------------------------------------------------


def _send_stow(destination: DestinationConfig, files: list[Path], where: str) -> None:
    datasets = []
    for path in files:
        try:
            datasets.append(pydicom.dcmread(path))
        except (OSError, InvalidDicomError) as exc:
            raise DeliveryError(f"{where}: cannot read {path}: {exc}") from exc
    with requests.Session() as session:
        try:
            client = DICOMwebClient(
                url=destination.url, session=session, timeout=destination.timeout_s
            )
            client.set_http_retry_params(retry=False)  # the gateway retries, with its backoff
            answer = client.store_instances(datasets)
        except requests.HTTPError as exc:
            response = exc.response
            body = " ".join((response.text if response is not None else "").split())[:300]
            code = response.status_code if response is not None else "?"
            raise DeliveryError(
                f"{where}: STOW-RS of {len(files)} files answered HTTP {code}"
                f"{f': {body}' if body else ''}"
            ) from exc
        except (requests.RequestException, ValueError) as exc:
            raise DeliveryError(f"{where}: STOW-RS of {len(files)} files failed: {exc}") from exc
    failed = _failed_instances(answer)
    if failed:
        raise DeliveryError(
            f"{where}: STOW-RS refused {len(failed)} of {len(files)} instances: {'; '.join(failed)}"
        )


def _failed_instances(answer: Dataset) -> list[str]:
    """``"<SOP Instance UID> (reason 0x....)"`` per item of the answer's Failed SOP Sequence."""
    failed = []
    for item in answer.get("FailedSOPSequence", []):
        reason = item.get("FailureReason")
        failed.append(
            f"{item.get('ReferencedSOPInstanceUID', '?')} "
            f"(reason {'?' if reason is None else f'0x{int(reason):04X}'})"
        )
    return failed
