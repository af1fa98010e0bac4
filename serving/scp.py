"""The gateway's Storage SCP: CT in over DICOM (TLS optional), durable before acknowledged.

:class:`StorageSCP` is a pynetdicom association server that

* answers C-ECHO (Verification) with Success;
* accepts C-STORE of CT Image Storage and Enhanced CT Image Storage in every transfer syntax
  pynetdicom knows (compressed included) and spools the bytes as received, in their original
  transfer syntax (they are decoded at inference, through pydicom's pixel-data plugins);
* refuses other SOP classes at presentation-context negotiation (``other_sop_classes:
  refuse``), or accepts them and discards the data with Success (``ignore``);
* lets in only the configured callers (calling AE title, optionally source address); others
  get an A-ASSOCIATE-RJ "rejected permanent, calling AE title not recognised".

C-STORE statuses (PS3.4 Annex B.2.3, PS3.7 Annex C):

=========  ===================================================================================
0x0000     stored durably (written, fsynced, renamed into the spool), then ``on_stored`` ran
0xC210     cannot understand: the dataset does not decode, lacks a UID, names another SOP
           Instance UID than the request, or has no/short pixel data; the bytes are quarantined
0xA700     out of resources: the spool is below its free-space floor or the write failed;
           nothing is stored, so the sender may retry later
0x0110     processing failure: stored, but ``on_stored`` raised (the instance stays spooled and
           is found again by :meth:`Spool.recover` at the next start)
=========  ===================================================================================

No handler raises: an exception at this service boundary becomes a DICOM status and a log
record, never a dead server. Logs (logger ``medssl.serving.scp``) carry UIDs, AE titles and
addresses in ``extra`` fields; never patient names, IDs or other PHI.
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any, cast

from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    JPEG2000Lossless,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)
from pynetdicom import ALL_TRANSFER_SYNTAXES, AE, AllStoragePresentationContexts, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import CTImageStorage, EnhancedCTImageStorage, Verification
from pynetdicom.transport import ThreadedAssociationServer

from medssl.serving.config import ScpConfig
from medssl.serving.metrics import GatewayMetrics
from medssl.serving.spool import Spool, SpoolError, SpoolFullError, StoredInstance

__all__ = [
    "CANNOT_UNDERSTAND",
    "CT_SOP_CLASSES",
    "OUT_OF_RESOURCES",
    "PROCESSING_FAILURE",
    "SUCCESS",
    "TRANSFER_SYNTAXES",
    "StorageSCP",
]

LOGGER = logging.getLogger("medssl.serving.scp")

#: C-STORE statuses the SCP answers.
SUCCESS = 0x0000
CANNOT_UNDERSTAND = 0xC210
OUT_OF_RESOURCES = 0xA700
PROCESSING_FAILURE = 0x0110

#: The SOP classes the gateway stores, with their names (the ``sop_class`` metric label).
CT_SOP_CLASSES: dict[str, str] = {
    CTImageStorage: "CT Image Storage",
    EnhancedCTImageStorage: "Enhanced CT Image Storage",
}

#: Transfer syntaxes accepted for CT, best first. When a presentation context proposes several,
#: pynetdicom takes the first of this list that the sender offers: lossless compressed ones
#: (what a sender holding compressed images offers; bit-exact, 2-3x smaller), then Explicit VR
#: Little Endian, then the rest of pynetdicom's ALL_TRANSFER_SYNTAXES in its order, which puts
#: the other uncompressed ones before the lossy ones.
TRANSFER_SYNTAXES: list[str] = [JPEGLosslessSV1, JPEGLossless, JPEGLSLossless, JPEG2000Lossless,
                                HTJ2KLossless, HTJ2KLosslessRPCL, RLELossless,
                                ExplicitVRLittleEndian]
TRANSFER_SYNTAXES += [ts for ts in ALL_TRANSFER_SYNTAXES if ts not in TRANSFER_SYNTAXES]

# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 9.3.4.
_RJ_CALLING_AE_NOT_RECOGNISED = (0x01, 0x01, 0x03)  # permanent, service user
_RJ_SHUTTING_DOWN = (0x02, 0x01, 0x01)  # transient, service user, no reason given

_POLL_S = 0.05


class _Refused(Exception):
    """An instance the SCP will not store: ``label`` is the metric reason, ``str()`` the why."""

    def __init__(self, label: str, message: str) -> None:
        self.label = label
        super().__init__(message)


def _check_pixel_data(ds: Dataset, syntax: UID) -> None:
    """Raise :class:`_Refused` unless ``ds`` has (structurally) complete pixel data.

    Native: at least Rows x Columns x SamplesPerPixel x BitsAllocated/8 x NumberOfFrames bytes.
    Encapsulated: the fragments parse into NumberOfFrames non-empty frames. Nothing is decoded.
    """
    if "PixelData" not in ds:
        raise _Refused("undecodable", "no Pixel Data")
    rows, columns, bits = int(ds.Rows), int(ds.Columns), int(ds.BitsAllocated)
    frames = int(ds.get("NumberOfFrames") or 1)
    samples = int(ds.get("SamplesPerPixel") or 1)
    if min(rows, columns, bits, frames, samples) < 1:
        raise _Refused("undecodable", f"image size {frames}x{rows}x{columns}x{samples}, "
                                      f"{bits} bits allocated: a value is < 1")
    pixels = ds.PixelData
    if syntax.is_encapsulated:
        offsets = None
        if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
            offsets = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
        found = sum(1 for frame in generate_frames(pixels, number_of_frames=frames,
                                                   extended_offsets=offsets) if frame)
        if found < frames:
            raise _Refused("undecodable", f"encapsulated Pixel Data holds {found} non-empty "
                                          f"frames, NumberOfFrames is {frames}")
    else:
        expected = (rows * columns * samples * bits * frames + 7) // 8
        if len(pixels) < expected:
            raise _Refused("undecodable", f"Pixel Data has {len(pixels)} bytes, {expected} "
                                          f"expected for {frames}x{rows}x{columns}x{samples} "
                                          f"at {bits} bits")


def _checked_uids(ds: Dataset, affected_sop_instance_uid: str) -> tuple[str, str, str]:
    """(study, series, SOP instance) UIDs of ``ds``; :class:`_Refused` if missing or mismatched."""
    uids = []
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        value = str(ds.get(keyword) or "").strip()
        if not value:
            raise _Refused("missing-uid", f"no {keyword}")
        uids.append(value)
    if uids[2] != affected_sop_instance_uid:
        raise _Refused("missing-uid", f"SOPInstanceUID {uids[2]} differs from the request's "
                                      f"AffectedSOPInstanceUID {affected_sop_instance_uid}")
    return uids[0], uids[1], uids[2]


class _ServerTlsContext(ssl.SSLContext):
    """An SSL context whose server-side handshake is bounded in time.

    pynetdicom wraps each accepted socket on its accept loop (``AssociationServer.get_request``)
    and the accepted socket has no timeout: without a bound, one peer that connects and sends
    nothing would stall every later caller and :meth:`StorageSCP.stop`.
    """

    handshake_timeout_s: float = 30.0

    def wrap_socket(  # type: ignore[override]
            self, sock: Any, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        sock.settimeout(self.handshake_timeout_s)
        wrapped = super().wrap_socket(sock, *args, **kwargs)
        wrapped.settimeout(None)  # as plain-TCP associations: blocking, pynetdicom polls first
        return wrapped


class StorageSCP:
    """A Storage SCP that spools CT instances durably before acknowledging them.

    Args:
        cfg: AE title, bind address, callers, TLS, limits and timeouts.
        spool: where instances are stored and refused input is quarantined.
        on_stored: called once per stored instance, after it is durable and before Success is
            answered; it runs on the association's thread (several may run at once) and
            should be quick (record the instance, e.g. in the job store). If it raises, the
            sender gets 0x0110 (Processing failure).
        metrics: counters to update; None keeps private ones.

    Raises:
        ValueError: an ``allowed_callers[i].hosts`` entry is not an IP address (it names it).
    """

    def __init__(self, cfg: ScpConfig, spool: Spool, on_stored: Callable[[StoredInstance], None],
                 metrics: GatewayMetrics | None = None) -> None:
        self.cfg = cfg
        self.spool = spool
        self.on_stored = on_stored
        self.metrics = metrics if metrics is not None else GatewayMetrics()
        self._callers: dict[str, frozenset[ipaddress.IPv4Address | ipaddress.IPv6Address]] = {}
        for i, caller in enumerate(cfg.allowed_callers):
            hosts = set()
            for host in caller.hosts:
                try:
                    hosts.add(ipaddress.ip_address(host))
                except ValueError:
                    raise ValueError(f"allowed_callers[{i}].hosts: {host!r} is not an IP "
                                     "address") from None
            self._callers[caller.ae_title.strip()] = frozenset(hosts)
        self._stopping = threading.Event()
        self._server: ThreadedAssociationServer | None = None
        self._port: int | None = None
        self._ae = self._make_ae()

    def _make_ae(self) -> AE:
        cfg = self.cfg
        ae = AE(ae_title=cfg.ae_title)
        ae.maximum_associations = cfg.max_associations
        ae.acse_timeout = cfg.acse_timeout_s
        ae.dimse_timeout = cfg.dimse_timeout_s
        ae.network_timeout = cfg.network_timeout_s
        ae.add_supported_context(Verification)
        for sop_class in CT_SOP_CLASSES:
            ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
        if cfg.other_sop_classes == "ignore":
            for context in AllStoragePresentationContexts:
                if context.abstract_syntax not in CT_SOP_CLASSES:
                    ae.add_supported_context(context.abstract_syntax, TRANSFER_SYNTAXES)
        return ae

    def _ssl_context(self) -> ssl.SSLContext | None:
        tls = self.cfg.tls
        if not tls.enabled:
            return None
        context = _ServerTlsContext(ssl.PROTOCOL_TLS_SERVER)
        context.handshake_timeout_s = self.cfg.acse_timeout_s
        context.load_cert_chain(certfile=str(tls.certificate), keyfile=str(tls.private_key))
        if tls.ca_certificate is not None:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(cafile=str(tls.ca_certificate))
        return context

    def start(self) -> None:
        """Bind ``cfg.host:cfg.port`` and serve in background threads; returns at once.

        Raises:
            RuntimeError: already started, or stopped (a stopped SCP is not restarted: make
                a new one).
            OSError: the address cannot be bound, or a TLS file cannot be read.
        """
        if self._stopping.is_set():
            raise RuntimeError("StorageSCP.start: this SCP was stopped; make a new one")
        if self._server is not None:
            raise RuntimeError("StorageSCP.start: already started")
        handlers = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_C_STORE, self._on_store),
        ]
        server = self._ae.start_server((self.cfg.host, self.cfg.port), block=False,
                                       evt_handlers=handlers, ssl_context=self._ssl_context())
        self._server = cast(ThreadedAssociationServer, server)  # block=False returns it
        self._port = int(self._server.server_address[1])
        LOGGER.info("storage SCP %s listening on %s:%d%s", self.cfg.ae_title, self.cfg.host,
                    self._port, " (TLS)" if self.cfg.tls.enabled else "")

    @property
    def port(self) -> int:
        """The bound TCP port (the one picked when ``cfg.port`` is 0).

        Raises:
            RuntimeError: not started yet.
        """
        if self._port is None:
            raise RuntimeError("StorageSCP.port: the SCP is not started")
        return self._port

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop serving: refuse new associations at once, let active ones finish, shut down.

        The listening socket is closed within about half a second (pynetdicom's accept loop
        polls); a connection attempt is then refused, and one that raced in gets an
        A-ASSOCIATE-RJ (rejected transient). Active associations get up to ``timeout_s``
        seconds to release; those still running are then aborted: their unacknowledged
        instance, if any, is resent by the sender (and replaces a stored copy).
        Calling it before :meth:`start`, or again, does nothing.
        """
        server = self._server
        if server is None:
            return
        self._stopping.set()
        self._server = None
        server.shutdown()
        deadline = time.monotonic() + max(timeout_s, 0.0)
        while server.active_associations and time.monotonic() < deadline:
            time.sleep(_POLL_S)
        for assoc in server.active_associations:
            LOGGER.warning("aborting an association still active after %.1f s", timeout_s,
                           extra={"calling_ae": assoc.requestor.ae_title.strip(),
                                  "peer": assoc.requestor.address})
            assoc.abort()
        LOGGER.info("storage SCP %s stopped", self.cfg.ae_title)

    # -- association events ------------------------------------------------------------------

    def _caller_refusal(self, calling_ae: str, peer: str) -> str | None:
        """Why ``calling_ae`` calling from ``peer`` is not let in; None lets it in."""
        if self.cfg.allow_any:
            return None
        if calling_ae not in self._callers:
            return "calling AE title not allowed"
        hosts = self._callers[calling_ae]
        if hosts:
            address = ipaddress.ip_address(peer)
            if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
                address = address.ipv4_mapped
            if address not in hosts:
                return "calling AE title not allowed from this host"
        return None

    def _on_requested(self, event: Event) -> None:
        """A-ASSOCIATE-RQ received: reject unknown callers and everyone while stopping."""
        assoc = event.assoc
        calling_ae = str(assoc.requestor.primitive.calling_ae_title).strip()
        peer = str(assoc.requestor.address)
        if self._stopping.is_set():
            reason, rj = "the SCP is stopping", _RJ_SHUTTING_DOWN
        else:
            rj = _RJ_CALLING_AE_NOT_RECOGNISED
            try:
                reason = self._caller_refusal(calling_ae, peer)
            except Exception as exc:  # fail closed: pynetdicom would log it and accept
                reason = f"caller check failed: {type(exc).__name__}: {exc}"
        if reason is None:
            return
        # The same steps as pynetdicom's own rejection (acse._negotiate_as_acceptor): send the
        # A-ASSOCIATE-RJ, then wait for the peer to close; negotiation is then skipped.
        assoc.acse.send_reject(*rj)
        self.metrics.associations.labels(result="rejected").inc()
        LOGGER.warning("association rejected: %s", reason,
                       extra={"calling_ae": calling_ae, "peer": peer, "reason": reason})
        assoc.kill()

    def _on_accepted(self, event: Event) -> None:
        self.metrics.associations.labels(result="accepted").inc()
        LOGGER.info("association accepted", extra={
            "calling_ae": event.assoc.requestor.ae_title.strip(),
            "peer": event.assoc.requestor.address})

    def _on_rejected(self, event: Event) -> None:
        """pynetdicom rejected the association itself (more than max_associations)."""
        self.metrics.associations.labels(result="rejected").inc()
        LOGGER.warning("association rejected: too many associations", extra={
            "calling_ae": event.assoc.requestor.ae_title.strip(),
            "peer": event.assoc.requestor.address, "reason": "max-associations"})

    # -- C-STORE -----------------------------------------------------------------------------

    def _on_store(self, event: Event) -> int:
        """EVT_C_STORE: validate, store durably, notify, then answer; never raises."""
        fields: dict[str, Any] = {
            "calling_ae": event.assoc.requestor.ae_title.strip(),
            "peer": event.assoc.requestor.address,
            "sop_instance_uid": str(event.request.AffectedSOPInstanceUID),
            "sop_class_uid": str(event.request.AffectedSOPClassUID),
        }
        try:
            return self._store(event, fields)
        except Exception as exc:  # the service boundary: a status, never a dead association
            LOGGER.exception("C-STORE failed unexpectedly: %s", type(exc).__name__,
                             extra={**fields, "status": PROCESSING_FAILURE, "reason": "error"})
            return PROCESSING_FAILURE

    def _store(self, event: Event, fields: dict[str, Any]) -> int:
        sop_class = fields["sop_class_uid"]
        if sop_class not in CT_SOP_CLASSES:  # only negotiated with other_sop_classes: ignore
            self.metrics.rejected.labels(reason="ignored-sop-class").inc()
            LOGGER.info("discarded an instance of SOP class %s (other_sop_classes: ignore)",
                        sop_class, extra={**fields, "status": SUCCESS,
                                          "reason": "ignored-sop-class"})
            return SUCCESS
        try:
            ds = event.dataset
            for _ in ds.iterall():  # pydicom parses lazily: force every element now
                pass
            _check_pixel_data(ds, UID(event.context.transfer_syntax))
            study_uid, series_uid, sop_uid = _checked_uids(ds, fields["sop_instance_uid"])
        except _Refused as exc:
            return self._refuse(event, fields, exc.label, str(exc))
        except Exception as exc:  # pydicom cannot decode it; its message may quote values (PHI)
            return self._refuse(event, fields, "undecodable",
                                f"the dataset does not decode ({type(exc).__name__})")

        data = event.encoded_dataset()
        try:
            path = self.spool.store(data, study_uid, series_uid, sop_uid)
        except SpoolFullError as exc:
            return self._out_of_resources(fields, "spool-full", exc)
        except SpoolError as exc:  # a malformed UID: the spool will not make it a path
            return self._refuse(event, fields, "missing-uid", str(exc))
        except OSError as exc:
            return self._out_of_resources(fields, "write-failed", exc)

        fields.update(study_uid=study_uid, series_uid=series_uid)
        stored = StoredInstance(study_uid=study_uid, series_uid=series_uid,
                                sop_instance_uid=sop_uid, sop_class_uid=sop_class, path=path,
                                n_bytes=len(data), received_at=time.time(),
                                calling_ae=fields["calling_ae"])
        try:
            self.on_stored(stored)
        except Exception as exc:
            LOGGER.exception("stored, but on_stored failed: %s", type(exc).__name__,
                             extra={**fields, "status": PROCESSING_FAILURE,
                                    "reason": "on-stored-failed"})
            return PROCESSING_FAILURE
        self.metrics.instances.labels(sop_class=CT_SOP_CLASSES[sop_class]).inc()
        LOGGER.debug("stored %s", sop_uid, extra={**fields, "status": SUCCESS})
        return SUCCESS

    def _refuse(self, event: Event, fields: dict[str, Any], label: str, reason: str) -> int:
        """Quarantine the received bytes (best effort) and answer 0xC210."""
        self.metrics.rejected.labels(reason=label).inc()
        try:
            raw = event.encoded_dataset()
            where = self.spool.quarantine(raw, reason, **{k: str(v) for k, v in fields.items()})
            LOGGER.warning("instance refused (%s), quarantined as %s", reason, where.name,
                           extra={**fields, "status": CANNOT_UNDERSTAND, "reason": label})
        except (OSError, SpoolError) as exc:
            LOGGER.error("instance refused (%s); quarantining it failed: %s", reason, exc,
                         extra={**fields, "status": CANNOT_UNDERSTAND, "reason": label})
        return CANNOT_UNDERSTAND

    def _out_of_resources(self, fields: dict[str, Any], label: str, exc: Exception) -> int:
        self.metrics.rejected.labels(reason=label).inc()
        LOGGER.error("instance not stored: %s", exc,
                     extra={**fields, "status": OUT_OF_RESOURCES, "reason": label})
        return OUT_OF_RESOURCES
