"""The gateway's Storage SCP: CT in over DICOM (TLS optional), durable before acknowledged.

:class:`StorageSCP` is a pynetdicom association server that

* answers C-ECHO (Verification) with Success;
* accepts C-STORE of CT Image Storage and Enhanced CT Image Storage in every transfer syntax
  pynetdicom knows (compressed included) and spools the bytes as received, in their original
  transfer syntax (they are decoded at inference, through pydicom's pixel-data plugins);
* refuses other SOP classes at presentation-context negotiation (``other_sop_classes:
  refuse``), or accepts them and discards the data with Success (``ignore``);
* lets in only the configured callers (calling AE title, optionally source address); others
  get an A-ASSOCIATE-RJ "rejected permanent, calling AE title not recognised", and a call to
  another AE title than ``ae_title`` gets "rejected permanent, called AE title not
  recognised" (PS3.8 9.3.4: service user, diagnostic 7).

Slow, idle and broken clients (PS3.8 9.1, 9.3): each TCP connection is served on a thread of
its own, never on the accept loop. Its TLS handshake and its whole A-ASSOCIATE-RQ PDU must
arrive within ``association_request_timeout_s`` in total (a trickle of bytes does not extend
it), or the connection is closed. Until its A-ASSOCIATE-RQ is complete a connection holds no
association slot, so idle, trickling and half-open connections lock nobody out; at most
``max_pending_connections`` wait at once (beyond, the oldest one of the host with the most is
closed). Slots are counted per association past its A-ASSOCIATE-RQ, in all
(``max_associations``) and per source address (``max_associations_per_peer``); beyond either
the caller gets A-ASSOCIATE-RJ "rejected transient, local limit exceeded", and a slot is
free again the moment its association ends (released, aborted, or the connection dropped).
A first PDU that is not a well-formed A-ASSOCIATE-RQ, or that proposes a presentation context
ID that is not odd in 1-255 or proposes one twice (PS3.8 9.3.2.2), is answered with an
A-ABORT (service provider, reason "invalid PDU parameter value" or "unexpected PDU") and the
connection is closed, holding nothing. Past the request, each read and write of the
association waits at most ``network_timeout_s``, and a connection still not associated
``acse_timeout_s`` after its request (a PDU trickling in right behind it) is closed: pynetdicom
checks neither its idle nor its ARTIM timer while its DUL is blocked inside a PDU.

C-STORE statuses (PS3.4 Annex B.2.3, PS3.7 Annex C):

=========  ===================================================================================
0x0000     stored durably (written, fsynced, renamed into the spool), then ``on_stored`` ran
0xC210     cannot understand: the dataset does not decode, is cut short (an element holds
           fewer bytes than its length says), lacks a UID, names another SOP Instance UID than
           the request, has no/short pixel data, or is deflated and inflates past
           ``max_inflated_bytes``; the bytes are quarantined (as received)
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

import contextlib
import ipaddress
import logging
import socket
import ssl
import struct
import sys
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any, cast

from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    JPEG2000Lossless,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.association import Association
from pynetdicom.dsutils import decode
from pynetdicom.events import Event
from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_RQ
from pynetdicom.sop_class import CTImageStorage, EnhancedCTImageStorage, Verification
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from medssl.serving.config import ScpConfig
from medssl.serving.logs import loggable_uid
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
TRANSFER_SYNTAXES: list[str] = [
    JPEGLosslessSV1,
    JPEGLossless,
    JPEGLSLossless,
    JPEG2000Lossless,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    RLELossless,
    ExplicitVRLittleEndian,
]
TRANSFER_SYNTAXES += [ts for ts in ALL_TRANSFER_SYNTAXES if ts not in TRANSFER_SYNTAXES]

# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 9.3.4.
_RJ_CALLING_AE_NOT_RECOGNISED = (0x01, 0x01, 0x03)  # permanent, service user
_RJ_CALLED_AE_NOT_RECOGNISED = (0x01, 0x01, 0x07)  # permanent, service user
_RJ_SHUTTING_DOWN = (0x02, 0x01, 0x01)  # transient, service user, no reason given
_RJ_LOCAL_LIMIT_EXCEEDED = (0x02, 0x03, 0x02)  # transient, service provider (presentation)

# A-ABORT reasons of the service provider (source 2), PS3.8 Table 9-26.
_ABORT_UNEXPECTED_PDU = 0x02
_ABORT_INVALID_PARAMETER = 0x06

#: The largest A-ASSOCIATE-RQ PDU read (bytes): 128 presentation contexts of 64-character
#: UIDs with 30 transfer syntaxes each stay far below it.
_MAX_ASSOCIATE_RQ_BYTES = 1 << 20

#: pynetdicom's own association limit counts every acceptor thread, those still waiting for
#: their A-ASSOCIATE-RQ and those being rejected included; the SCP counts slots itself
#: (:class:`_Slots`) and sets pynetdicom's limit out of the way.
_PYNETDICOM_MAX_ASSOCIATIONS = 1 << 20

#: Bytes inflated per step while a deflated dataset is measured (:func:`_inflated_dataset`).
_INFLATE_CHUNK = 1 << 20

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
        raise _Refused(
            "undecodable",
            f"image size {frames}x{rows}x{columns}x{samples}, "
            f"{bits} bits allocated: a value is < 1",
        )
    pixels = ds.PixelData
    if syntax.is_encapsulated:
        offsets = None
        if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
            offsets = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
        found = sum(
            1
            for frame in generate_frames(pixels, number_of_frames=frames, extended_offsets=offsets)
            if frame
        )
        if found < frames:
            raise _Refused(
                "undecodable",
                f"encapsulated Pixel Data holds {found} non-empty "
                f"frames, NumberOfFrames is {frames}",
            )
    else:
        expected = (rows * columns * samples * bits * frames + 7) // 8
        if len(pixels) < expected:
            raise _Refused(
                "undecodable",
                f"Pixel Data has {len(pixels)} bytes, {expected} "
                f"expected for {frames}x{rows}x{columns}x{samples} "
                f"at {bits} bits",
            )


def _text(ds: Dataset, keyword: str, max_chars: int = 64) -> str:
    """A short text element as a string ("" when absent or undecodable)."""
    try:
        return str(ds.get(keyword, "") or "").strip()[:max_chars]
    except Exception:  # noqa: BLE001 - a value pydicom cannot decode is no value
        return ""


def _check_complete(ds: Dataset) -> None:
    """Raise :class:`_Refused` if an element of ``ds`` (not yet parsed) holds fewer bytes than
    its declared length: pydicom reads what is there, so a dataset cut short, or whose last
    element declares a huge length, would otherwise pass. Call it before touching values."""
    for tag in ds.keys():  # noqa: SIM118 - iterating a Dataset parses its elements
        raw = ds.get_item(tag)
        if (
            isinstance(raw, RawDataElement)
            and raw.length != 0xFFFFFFFF
            and raw.value is not None
            and len(raw.value) < raw.length
        ):
            raise _Refused(
                "undecodable",
                f"element {tag} holds {len(raw.value)} bytes of the "
                f"{raw.length} it declares (truncated)",
            )


def _checked_uids(ds: Dataset, affected_sop_instance_uid: str) -> tuple[str, str, str]:
    """(study, series, SOP instance) UIDs of ``ds``; :class:`_Refused` if missing or mismatched."""
    uids = []
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        value = str(ds.get(keyword) or "").strip()
        if not value:
            raise _Refused("missing-uid", f"no {keyword}")
        uids.append(value)
    if uids[2] != affected_sop_instance_uid:
        # the dataset's value is not quoted: a damaged one may hold anything (PHI)
        raise _Refused(
            "missing-uid",
            "the dataset's SOPInstanceUID differs from the request's "
            f"AffectedSOPInstanceUID {affected_sop_instance_uid}",
        )
    return uids[0], uids[1], uids[2]


def _inflated_dataset(deflated: bytes, limit: int) -> Dataset:
    """Decode a Deflated Explicit VR Little Endian dataset that inflates to ``limit`` bytes or
    fewer.

    A first pass inflates 1 MiB at a time and keeps only the count, so a deflate bomb is
    refused holding ~1 MiB, whatever ``limit``; a dataset within it is then inflated once
    into a buffer of its exact size.

    Args:
        deflated: the dataset as received (raw deflate, PS3.5 A.5), without file meta.
        limit: the most bytes it may inflate to.

    Raises:
        _Refused: it inflates past ``limit`` (nothing past ``limit`` + 1 MiB is inflated), or
            the deflate stream is corrupt or incomplete.
    """
    inflater, pending, size = zlib.decompressobj(-zlib.MAX_WBITS), deflated, 0
    try:
        while not inflater.eof:
            chunk = inflater.decompress(pending, _INFLATE_CHUNK)
            size += len(chunk)
            if size > limit:
                raise _Refused(
                    "too-large",
                    f"the deflated dataset inflates past {limit} bytes "
                    f"({len(deflated)} bytes received)",
                )
            pending = inflater.unconsumed_tail
            if not chunk and not pending:
                break
    except zlib.error:
        raise _Refused("undecodable", "the deflated dataset does not inflate") from None
    if not inflater.eof:
        raise _Refused("undecodable", "the deflated dataset ends before its deflate stream")
    inflated = zlib.decompress(deflated, -zlib.MAX_WBITS, max(size, 1))
    return decode(BytesIO(inflated), False, True, False)


def _shutdown(sock: socket.socket) -> None:
    """Shut ``sock`` down both ways (socket.socket's own, also for an SSLSocket, whose TLS
    state it leaves alone): a read blocked on it in another thread returns."""
    with contextlib.suppress(OSError, ValueError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


def _peer_key(address: str) -> str:
    """The source address a connection is counted under (IPv4-mapped IPv6 as IPv4)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip)


class _Dropped(Exception):
    """A connection closed before it became an association; ``str()`` says why (no PHI)."""


class _ClosedSilently(_Dropped):
    """The peer closed without sending a byte (a port probe, a TCP health check)."""


class _BadRequest(_Dropped):
    """The first PDU is not an acceptable A-ASSOCIATE-RQ: answer A-ABORT with ``reason``."""

    def __init__(self, message: str, reason: int) -> None:
        self.reason = reason
        super().__init__(message)


@dataclass(eq=False)
class _Pending:
    """A connection waiting for its A-ASSOCIATE-RQ (see :class:`_Slots`)."""

    peer: str
    sock: socket.socket
    since: float = field(default_factory=time.monotonic)
    evicted: bool = False


class _Slots:
    """Connections waiting for their A-ASSOCIATE-RQ, and association slots, by source address.

    Thread-safe. A pending connection costs a thread and a socket but no slot; beyond
    ``max_pending`` the oldest pending connection of the peer with the most is shut down (its
    owner's blocked read returns and it closes). A slot is held from the admission of an
    A-ASSOCIATE-RQ to the end of its association.
    """

    def __init__(self, max_total: int, max_per_peer: int, max_pending: int) -> None:
        self.max_total = max_total
        self.max_per_peer = min(max_per_peer, max_total)
        self.max_pending = max_pending
        self._lock = threading.Lock()
        self._pending: list[_Pending] = []
        self._active: dict[Association, str] = {}
        self._cut: set[Association] = set()

    def enter_pending(self, peer: str, sock: socket.socket) -> tuple[_Pending, _Pending | None]:
        """Register a new connection; returns it and the one evicted to make room (or None)."""
        entry = _Pending(peer, sock)
        with self._lock:
            self._pending.append(entry)
            victim = None
            if len(self._pending) > self.max_pending:
                counts: dict[str, int] = {}
                for pending in self._pending:
                    counts[pending.peer] = counts.get(pending.peer, 0) + 1
                busiest = max(counts.values())
                victim = min(
                    (p for p in self._pending if counts[p.peer] == busiest), key=lambda p: p.since
                )
                self._evict(victim)
        return entry, victim

    def replace_socket(self, entry: _Pending, sock: socket.socket) -> None:
        """The connection's socket is now ``sock`` (TLS wraps and detaches the plain one)."""
        with self._lock:
            entry.sock = sock
            if entry.evicted:  # evicted while it was being wrapped
                _shutdown(sock)

    def leave_pending(self, entry: _Pending) -> None:
        """The connection got its A-ASSOCIATE-RQ or is closed: it no longer waits."""
        with self._lock:
            if entry in self._pending:
                self._pending.remove(entry)

    def drop_pending(self) -> int:
        """Shut down every waiting connection (stopping); returns how many."""
        with self._lock:
            victims = list(self._pending)
            for victim in victims:
                self._evict(victim)
        return len(victims)

    def _evict(self, victim: _Pending) -> None:  # under the lock
        self._pending.remove(victim)
        victim.evicted = True
        _shutdown(victim.sock)

    def cut(self, assoc: Association) -> None:
        """``assoc``'s connection is being closed by the SCP: it gets no slot any more."""
        with self._lock:
            self._cut.add(assoc)

    def acquire(self, assoc: Association, peer: str) -> str | None:
        """Take a slot for ``assoc``; None if taken, else why not (no PHI)."""
        with self._lock:
            if assoc in self._cut:
                return "the connection was closed before its A-ASSOCIATE-RQ was answered"
            total = len(self._active)
            mine = sum(1 for p in self._active.values() if p == peer)
            if total >= self.max_total:
                return f"too many associations ({total} of {self.max_total})"
            if mine >= self.max_per_peer:
                return f"too many associations from this host ({mine} of {self.max_per_peer})"
            self._active[assoc] = peer
        return None

    def release(self, assoc: Association) -> None:
        """Free ``assoc``'s slot, if it holds one; forget it."""
        with self._lock:
            self._active.pop(assoc, None)
            self._cut.discard(assoc)


def _recv_exactly(sock: socket.socket, n_bytes: int, deadline: float) -> bytes:
    """Read exactly ``n_bytes`` before ``deadline`` (time.monotonic()), however they trickle.

    Raises:
        _Dropped: the peer closed the connection, or the deadline passed.
    """
    data = bytearray()
    while len(data) < n_bytes:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _Dropped(
                f"no complete A-ASSOCIATE-RQ in time ({len(data)} of {n_bytes} bytes of a read)"
            )
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(min(n_bytes - len(data), 65536))
        except TimeoutError:
            continue  # the loop reports the deadline
        if not chunk:
            if not data and n_bytes == 6:  # the first read of the connection
                raise _ClosedSilently("the peer closed the connection without sending anything")
            raise _Dropped("the peer closed the connection before its A-ASSOCIATE-RQ")
        data += chunk
    return bytes(data)


def _read_associate_rq(sock: socket.socket, deadline: float) -> bytes:
    """The first PDU of a connection, which must be an A-ASSOCIATE-RQ, read before ``deadline``.

    Reads exactly one PDU (nothing past it), checks that its presentation context IDs are
    odd, in 1-255 and distinct (PS3.8 9.3.2.2) and that pynetdicom can decode it and make it
    a primitive (its DUL thread would otherwise die on it, and leave the request unanswered).

    Raises:
        _BadRequest: another PDU type, an implausible length, an undecodable PDU or a bad
            presentation context ID (the message names which, never a value of the peer's).
        _Dropped: closed, or too slow.
    """
    header = _recv_exactly(sock, 6, deadline)
    pdu_type, _, length = struct.unpack(">BBL", header)
    if pdu_type != 0x01:
        raise _BadRequest(
            f"the first PDU is of type 0x{pdu_type:02X}, not an A-ASSOCIATE-RQ",
            _ABORT_UNEXPECTED_PDU,
        )
    if not 68 <= length <= _MAX_ASSOCIATE_RQ_BYTES:
        raise _BadRequest(
            f"an A-ASSOCIATE-RQ of {length} bytes (68 to {_MAX_ASSOCIATE_RQ_BYTES} accepted)",
            _ABORT_INVALID_PARAMETER,
        )
    raw = header + _recv_exactly(sock, length, deadline)
    pdu = A_ASSOCIATE_RQ()
    try:
        pdu.decode(raw)
        ids = [item.presentation_context_id for item in pdu.presentation_context]
    except Exception as exc:  # noqa: BLE001 - peer bytes; its message may quote them
        raise _BadRequest(
            f"the A-ASSOCIATE-RQ does not decode ({type(exc).__name__})", _ABORT_INVALID_PARAMETER
        ) from None
    for i, context_id in enumerate(ids):
        if context_id is None or not 1 <= context_id <= 255 or context_id % 2 == 0:
            raise _BadRequest(
                f"presentation context ID {context_id} is not an odd integer "
                "in 1-255 (PS3.8 9.3.2.2)",
                _ABORT_INVALID_PARAMETER,
            )
        if context_id in ids[:i]:
            raise _BadRequest(
                f"presentation context ID {context_id} is proposed twice", _ABORT_INVALID_PARAMETER
            )
    try:
        pdu.to_primitive()
    except Exception as exc:  # noqa: BLE001 - peer bytes; its message may quote them
        raise _BadRequest(
            f"the A-ASSOCIATE-RQ has an invalid value ({type(exc).__name__})",
            _ABORT_INVALID_PARAMETER,
        ) from None
    return raw


class _GatedRequestHandler(RequestHandler):
    """pynetdicom's request handler, run on a thread of its own per TCP connection: the
    TLS handshake and the A-ASSOCIATE-RQ are read here under a total deadline, and the thread
    holds the association's slot until it ends (see :meth:`StorageSCP._serve_connection`)."""

    server: _GatedServer

    def handle(self) -> None:
        self.server.scp._serve_connection(self)


class _GatedServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with nothing slow on its accept loop: ``get_request`` only
    accepts (no TLS handshake there), and per-connection threads are not joined at close
    (:meth:`StorageSCP.stop` ends associations itself)."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, *args: Any, scp: StorageSCP, **kwargs: Any) -> None:
        self.scp = scp
        super().__init__(*args, **kwargs)

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        client, address = cast(socket.socket, self.socket).accept()
        return client, address

    def handle_error(self, request: Any, client_address: Any) -> None:
        """socketserver prints a traceback to stderr: log the exception type only instead."""
        exc = sys.exc_info()[1]
        LOGGER.error(
            "connection handler failed: %s",
            type(exc).__name__,
            extra={"peer": str(client_address[0]) if client_address else ""},
        )


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
        on_refused: called with ``(calling_ae, called_ae, peer, reason)`` for every refused
            association (e.g. recorded in the job store for the operators); its failure is
            logged, never raised.

    Raises:
        ValueError: an ``allowed_callers[i].hosts`` entry is not an IP address (it names it).
    """

    def __init__(
        self,
        cfg: ScpConfig,
        spool: Spool,
        on_stored: Callable[[StoredInstance], None],
        metrics: GatewayMetrics | None = None,
        on_refused: Callable[[str, str, str, str], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.spool = spool
        self.on_stored = on_stored
        self.on_refused = on_refused
        self.metrics = metrics if metrics is not None else GatewayMetrics()
        self._callers: dict[str, frozenset[ipaddress.IPv4Address | ipaddress.IPv6Address]] = {}
        for i, caller in enumerate(cfg.allowed_callers):
            hosts = set()
            for host in caller.hosts:
                try:
                    hosts.add(ipaddress.ip_address(host))
                except ValueError:
                    raise ValueError(
                        f"allowed_callers[{i}].hosts: {host!r} is not an IP address"
                    ) from None
            self._callers[caller.ae_title.strip()] = frozenset(hosts)
        self._stopping = threading.Event()
        self._slots = _Slots(
            cfg.max_associations, cfg.max_associations_per_peer, cfg.max_pending_connections
        )
        self._tls: ssl.SSLContext | None = None
        self._server: ThreadedAssociationServer | None = None
        self._port: int | None = None
        self._ae = self._make_ae()

    def _make_ae(self) -> AE:
        cfg = self.cfg
        ae = AE(ae_title=cfg.ae_title)
        ae.maximum_associations = _PYNETDICOM_MAX_ASSOCIATIONS  # the SCP's _Slots count
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
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
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
        self._tls = self._ssl_context()
        # As AE.start_server(block=False), with a server whose accept loop only accepts: the
        # TLS handshake happens on the connection's thread (_serve_connection), so the server
        # gets no ssl_context.
        server = self._ae.make_server(
            (self.cfg.host, self.cfg.port),
            evt_handlers=handlers,
            server_class=_GatedServer,
            request_handler=_GatedRequestHandler,
            scp=self,
        )
        threading.Thread(target=server.serve_forever, name="medssl-scp-accept", daemon=True).start()
        self._ae._servers.append(server)  # AssociationServer.shutdown removes it
        self._server = server
        self._port = int(server.server_address[1])
        LOGGER.info(
            "storage SCP %s listening on %s:%d%s",
            self.cfg.ae_title,
            self.cfg.host,
            self._port,
            " (TLS)" if self.cfg.tls.enabled else "",
        )

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
        A-ASSOCIATE-RJ (rejected transient). Connections still without an A-ASSOCIATE-RQ
        are closed at once. Active associations get up to ``timeout_s``
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
        self._slots.drop_pending()
        deadline = time.monotonic() + max(timeout_s, 0.0)
        while server.active_associations and time.monotonic() < deadline:
            time.sleep(_POLL_S)
        for assoc in server.active_associations:
            LOGGER.warning(
                "aborting an association still active after %.1f s",
                timeout_s,
                extra={
                    "calling_ae": assoc.requestor.ae_title.strip(),
                    "peer": assoc.requestor.address,
                },
            )
            assoc.abort()
        LOGGER.info("storage SCP %s stopped", self.cfg.ae_title)

    # -- connections -------------------------------------------------------------------------

    def _serve_connection(self, handler: RequestHandler) -> None:
        """One TCP connection, on its own thread: TLS handshake and A-ASSOCIATE-RQ under a
        total deadline (holding no slot), then the association (holding its slot, taken in
        :meth:`_on_requested`, until it ends). Never raises."""
        peer = _peer_key(str(handler.client_address[0]))
        raw = cast(socket.socket, handler.request)
        deadline = time.monotonic() + self.cfg.association_request_timeout_s
        entry, victim = self._slots.enter_pending(peer, raw)
        if victim is not None:
            LOGGER.warning(
                "closed a connection still without A-ASSOCIATE-RQ after %.1f s: "
                "more than %d connections wait for theirs",
                time.monotonic() - victim.since,
                self._slots.max_pending,
                extra={"peer": victim.peer, "reason": "too-many-pending"},
            )
        sock = raw
        try:
            try:
                if self._tls is not None:
                    sock = self._tls.wrap_socket(
                        raw, server_side=True, do_handshake_on_connect=False
                    )
                    self._slots.replace_socket(entry, sock)
                    sock.settimeout(max(deadline - time.monotonic(), 1e-3))
                    sock.do_handshake()  # one deadline for the whole handshake (CPython _ssl)
                request = _read_associate_rq(sock, deadline)
            finally:
                self._slots.leave_pending(entry)
        except _BadRequest as exc:
            self._drop(sock, peer, str(exc), abort_reason=exc.reason)
            return
        except (_Dropped, OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            why = str(exc) if isinstance(exc, _Dropped) else type(exc).__name__
            if entry.evicted:
                why = "closed to make room for other connections"
            elif isinstance(exc, TimeoutError):
                why = "no complete TLS handshake in time"
            self._drop(
                sock,
                peer,
                why,
                level=logging.INFO if isinstance(exc, _ClosedSilently) else logging.WARNING,
            )
            return
        except Exception as exc:  # noqa: BLE001 - boundary: a log record, never a dead server
            LOGGER.error("connection failed: %s", type(exc).__name__, extra={"peer": peer})
            self._drop(sock, peer, type(exc).__name__)
            return

        assoc: Association | None = None
        try:
            # pynetdicom reads only once select() says there is data, but then blocks until a
            # whole PDU is in: bound each read and write by the network timeout
            sock.settimeout(self.cfg.network_timeout_s)
            handler.request = sock
            assoc = handler._create_association()
            # Hand pynetdicom the A-ASSOCIATE-RQ as its DUL would have read it (Evt6 after
            # the Evt5 the AssociationSocket queued): the DUL reads from the socket next.
            pdu, event = assoc.dul._decode_pdu(bytearray(request))
            assoc.dul._recv_pdu.put(pdu)
            assoc.dul.event_queue.put(event)
            evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": handler.client_address})
            assoc.start()
            assoc.join(self.cfg.acse_timeout_s)
            if assoc.is_alive() and not assoc.is_established:
                # Not established (nor ended) after the ACSE timeout: its DUL is blocked in
                # the read of a PDU that trickles in behind the request, or waits after a
                # rejection for a peer that does not close; its ARTIM timer is not checked
                # while a read blocks. Closing the socket ends the read.
                LOGGER.warning(
                    "closing a connection not associated %.1f s after its A-ASSOCIATE-RQ",
                    self.cfg.acse_timeout_s,
                    extra={"peer": peer},
                )
                self._slots.cut(assoc)
                _shutdown(sock)
            assoc.join()
        except Exception as exc:  # noqa: BLE001 - boundary: a log record, never a dead server
            LOGGER.error("association failed: %s", type(exc).__name__, extra={"peer": peer})
            if assoc is None or not assoc.is_alive():
                self._drop(sock, peer, type(exc).__name__)
        finally:
            if assoc is not None:
                self._slots.release(assoc)

    def _drop(
        self,
        sock: socket.socket,
        peer: str,
        reason: str,
        abort_reason: int | None = None,
        level: int = logging.WARNING,
    ) -> None:
        """Close a connection that is no association (sending an A-ABORT first if asked)."""
        self.metrics.associations.labels(result="dropped").inc()
        LOGGER.log(
            level,
            "connection closed without an association: %s",
            reason,
            extra={"peer": peer, "reason": reason},
        )
        try:
            if abort_reason is not None:
                abort = A_ABORT_RQ()
                abort.source, abort.reason_diagnostic = 0x02, abort_reason
                sock.settimeout(1.0)
                sock.sendall(abort.encode())
        except (OSError, ValueError):
            pass
        finally:
            _shutdown(sock)
            sock.close()

    # -- association events ------------------------------------------------------------------

    def _caller_refusal(self, calling_ae: str, peer: str) -> str | None:
        """Why ``calling_ae`` calling from ``peer`` is not let in; None lets it in."""
        if self.cfg.allow_any:
            return None
        if calling_ae not in self._callers:
            return "calling AE title not allowed"
        hosts = self._callers[calling_ae]
        if hosts and ipaddress.ip_address(_peer_key(peer)) not in hosts:
            return "calling AE title not allowed from this host"
        return None

    def _on_requested(self, event: Event) -> None:
        """A-ASSOCIATE-RQ received: reject everyone while stopping, calls to another AE
        title, unknown callers, and callers beyond the slot limits; else take a slot."""
        assoc = event.assoc
        calling_ae = str(assoc.requestor.primitive.calling_ae_title).strip()
        called_ae = str(assoc.requestor.primitive.called_ae_title).strip()
        peer = str(assoc.requestor.address)
        reason: str | None
        if self._stopping.is_set():
            reason, rj = "the SCP is stopping", _RJ_SHUTTING_DOWN
        elif called_ae != self.cfg.ae_title.strip():
            reason, rj = "called AE title not recognised", _RJ_CALLED_AE_NOT_RECOGNISED
        else:
            rj = _RJ_CALLING_AE_NOT_RECOGNISED
            try:
                reason = self._caller_refusal(calling_ae, peer)
            except Exception as exc:  # noqa: BLE001 - fail closed (pynetdicom would accept)
                reason = f"caller check failed: {type(exc).__name__}"
            if reason is None:
                reason, rj = self._slots.acquire(assoc, _peer_key(peer)), _RJ_LOCAL_LIMIT_EXCEEDED
        if reason is None:
            return
        # The same steps as pynetdicom's own rejection (acse._negotiate_as_acceptor): send the
        # A-ASSOCIATE-RJ, then wait for the peer to close; negotiation is then skipped.
        assoc.acse.send_reject(*rj)
        self.metrics.associations.labels(result="rejected").inc()
        LOGGER.warning(
            "association rejected: %s",
            reason,
            extra={"calling_ae": calling_ae, "peer": peer, "reason": reason},
        )
        self._refused(calling_ae, called_ae, peer, reason)
        assoc.kill()

    def _on_accepted(self, event: Event) -> None:
        self.metrics.associations.labels(result="accepted").inc()
        LOGGER.info(
            "association accepted",
            extra={
                "calling_ae": event.assoc.requestor.ae_title.strip(),
                "peer": event.assoc.requestor.address,
            },
        )

    def _on_rejected(self, event: Event) -> None:
        """pynetdicom rejected the association itself (its own checks; the SCP's limits are
        in :meth:`_on_requested`, pynetdicom's association limit is set out of reach)."""
        self.metrics.associations.labels(result="rejected").inc()
        calling_ae = str(event.assoc.requestor.ae_title).strip()
        LOGGER.warning(
            "association rejected by pynetdicom",
            extra={
                "calling_ae": calling_ae,
                "peer": event.assoc.requestor.address,
                "reason": "pynetdicom",
            },
        )
        self._refused(
            calling_ae,
            self.cfg.ae_title,
            str(event.assoc.requestor.address),
            "rejected by pynetdicom (association negotiation)",
        )

    def _refused(self, calling_ae: str, called_ae: str, peer: str, reason: str) -> None:
        if self.on_refused is None:
            return
        try:
            self.on_refused(calling_ae, called_ae, peer, reason)
        except Exception as exc:  # noqa: BLE001 - recording is a courtesy; the refusal stands
            LOGGER.error("recording a refused association failed: %s", type(exc).__name__)

    # -- C-STORE -----------------------------------------------------------------------------

    def _on_store(self, event: Event) -> int:
        """EVT_C_STORE: validate, store durably, notify, then answer; never raises."""
        fields: dict[str, Any] = {
            "calling_ae": event.assoc.requestor.ae_title.strip(),
            "peer": event.assoc.requestor.address,
            # a peer may put anything in the request's UIDs: logged and noted only when UIDs
            "sop_instance_uid": loggable_uid(event.request.AffectedSOPInstanceUID),
            "sop_class_uid": loggable_uid(event.request.AffectedSOPClassUID),
        }
        try:
            return self._store(event, fields)
        except Exception as exc:  # the service boundary: a status, never a dead association
            LOGGER.exception(
                "C-STORE failed unexpectedly: %s",
                type(exc).__name__,
                extra={**fields, "status": PROCESSING_FAILURE, "reason": "error"},
            )
            return PROCESSING_FAILURE

    def _store(self, event: Event, fields: dict[str, Any]) -> int:
        sop_class = fields["sop_class_uid"]
        if sop_class not in CT_SOP_CLASSES:  # only negotiated with other_sop_classes: ignore
            self.metrics.rejected.labels(reason="ignored-sop-class").inc()
            LOGGER.info(
                "discarded an instance of SOP class %s (other_sop_classes: ignore)",
                sop_class,
                extra={**fields, "status": SUCCESS, "reason": "ignored-sop-class"},
            )
            return SUCCESS
        try:
            syntax = UID(event.context.transfer_syntax)
            if syntax == DeflatedExplicitVRLittleEndian:  # event.dataset inflates without bound
                ds = _inflated_dataset(
                    event.encoded_dataset(include_meta=False), self.cfg.max_inflated_bytes
                )
            else:
                ds = event.dataset
            _check_complete(ds)
            for _ in ds.iterall():  # pydicom parses lazily: force every element now
                pass
            _check_pixel_data(ds, syntax)
            study_uid, series_uid, sop_uid = _checked_uids(ds, fields["sop_instance_uid"])
        except _Refused as exc:
            return self._refuse(event, fields, exc.label, str(exc))
        except Exception as exc:  # noqa: BLE001 - undecodable; its message may quote values (PHI)
            return self._refuse(
                event, fields, "undecodable", f"the dataset does not decode ({type(exc).__name__})"
            )

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
        stored = StoredInstance(
            study_uid=study_uid,
            series_uid=series_uid,
            sop_instance_uid=sop_uid,
            sop_class_uid=sop_class,
            path=path,
            n_bytes=len(data),
            received_at=time.time(),
            calling_ae=fields["calling_ae"],
            accession_number=_text(ds, "AccessionNumber"),
        )
        try:
            self.on_stored(stored)
        except Exception as exc:
            LOGGER.exception(
                "stored, but on_stored failed: %s",
                type(exc).__name__,
                extra={**fields, "status": PROCESSING_FAILURE, "reason": "on-stored-failed"},
            )
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
            LOGGER.warning(
                "instance refused (%s), quarantined as %s",
                reason,
                where.name,
                extra={**fields, "status": CANNOT_UNDERSTAND, "reason": label},
            )
        except (OSError, SpoolError) as exc:
            LOGGER.error(
                "instance refused (%s); quarantining it failed: %s",
                reason,
                exc,
                extra={**fields, "status": CANNOT_UNDERSTAND, "reason": label},
            )
        return CANNOT_UNDERSTAND

    def _out_of_resources(self, fields: dict[str, Any], label: str, exc: Exception) -> int:
        self.metrics.rejected.labels(reason=label).inc()
        LOGGER.error(
            "instance not stored: %s",
            exc,
            extra={**fields, "status": OUT_OF_RESOURCES, "reason": label},
        )
        return OUT_OF_RESOURCES
