"""The Storage SCP against slow, idle, broken and hostile clients.

Real sockets on loopback, every wait bounded: idle and trickling TCP connections, garbage
PDUs, raw A-ASSOCIATE-RQs with bad presentation context IDs, per-host slot limits (a second
host is a client bound to 127.0.0.2: all of 127.0.0.0/8 is loopback on Linux), TLS callers
behind silent connections, a deflate bomb and a huge declared length.
"""

from __future__ import annotations

import json
import select
import socket
import struct
import subprocess
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path

import pydicom
import pynetdicom
import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.sop_class import CTImageStorage, Verification

from medssl.serving.config import ScpConfig, TlsConfig
from tests.conftest import require_tool
from tests.serving.helpers import associated, client_context, part10, status_of

pytestmark = [pytest.mark.slow]

A_ABORT_INVALID_PARAMETER = b"\x07\x00\x00\x00\x00\x04\x00\x00\x02\x06"  # source 2, reason 6


def _item(item_type: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(payload)) + payload


def _uid(uid: str) -> bytes:
    return uid.encode() + (b"\0" if len(uid) % 2 else b"")


def associate_rq(
    contexts: list[tuple[int, str]], called: str = "MEDSSL", calling: str = "SCU"
) -> bytes:
    """An A-ASSOCIATE-RQ PDU (PS3.8 9.3.2) proposing ``(context ID, abstract syntax)`` pairs,
    each with Implicit VR Little Endian; the IDs are written as given, even invalid ones."""
    body = struct.pack(">HH", 1, 0) + called.encode().ljust(16) + calling.encode().ljust(16)
    body += b"\0" * 32 + _item(0x10, b"1.2.840.10008.3.1.1.1")
    for context_id, abstract_syntax in contexts:
        body += _item(
            0x20,
            bytes([context_id, 0, 0, 0])
            + _item(0x30, _uid(abstract_syntax))
            + _item(0x40, _uid(ImplicitVRLittleEndian)),
        )
    body += _item(0x50, _item(0x51, struct.pack(">I", 16384)) + _item(0x52, _uid("1.2.3.4")))
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


ECHO_RQ = associate_rq([(1, Verification)])


def connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    """A plain TCP connection to the SCP from ``source``."""
    return socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))


def read_answer(sock: socket.socket, timeout_s: float) -> bytes:
    """Everything the SCP sends before it closes the connection or ``timeout_s`` passes."""
    data, deadline = b"", time.monotonic() + timeout_s
    while (remaining := deadline - time.monotonic()) > 0:
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk
    raise AssertionError(
        f"the SCP kept the connection open for {timeout_s} s ({len(data)} bytes received)"
    )


def closed_by_peer(sock: socket.socket) -> bool:
    """True once the SCP has closed ``sock`` (no data of its own expected)."""
    if not select.select([sock], [], [], 0)[0]:
        return False
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def trickle_until_closed(
    sock: socket.socket, data: bytes, every_s: float = 0.2, limit_s: float = 5.0
) -> float:
    """Send ``data`` one byte per ``every_s`` until the SCP closes ``sock``; returns the
    seconds that took. Fails if the socket is still open after ``limit_s``."""
    start = time.monotonic()
    for i in range(len(data)):
        try:
            sock.send(data[i : i + 1])
        except OSError:
            break
        if closed_by_peer(sock):
            break
        assert time.monotonic() - start < limit_s, f"still open after {limit_s} s of trickling"
        time.sleep(every_s)
    return time.monotonic() - start


@contextmanager
def trickling(sockets: list[socket.socket], payload: bytes, every_s: float) -> Iterator[None]:
    """Write ``payload`` one byte per ``every_s`` to each socket, in a thread, while inside."""
    done = threading.Event()

    def trickle() -> None:
        for i in range(len(payload)):
            if done.wait(every_s):
                return
            for sock in sockets:
                with suppress(OSError):
                    sock.send(payload[i : i + 1])

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(timeout=5)


def assert_echo_within(port: int, seconds: float, **kwargs) -> None:
    """A C-ECHO on a new association succeeds, association and release within ``seconds``."""
    start = time.monotonic()
    with associated(port, **kwargs) as assoc:
        assert assoc.is_established, "the association was not accepted"
        assert status_of(assoc.send_c_echo()) == 0x0000
    elapsed = time.monotonic() - start
    assert elapsed < seconds, f"the C-ECHO took {elapsed:.2f} s"


# -- slots: idle, trickling, broken and aborted connections ----------------------------------


def test_a_c_echo_succeeds_within_2_s_while_50_idle_or_trickling_connections_are_open(gateway):
    gw = gateway()  # max_associations 8
    with ExitStack() as stack:
        idle = [stack.enter_context(connect(gw.scp.port)) for _ in range(25)]
        slow = [stack.enter_context(connect(gw.scp.port)) for _ in range(25)]
        stack.enter_context(trickling(slow, ECHO_RQ, every_s=0.3))
        time.sleep(1.0)  # every connection has its thread and has sent what it will for now
        assert_echo_within(gw.scp.port, 2.0)
        assert not any(closed_by_peer(s) for s in idle + slow)  # none was dropped to make room


def test_an_association_request_has_a_total_deadline_however_slowly_it_trickles(gateway):
    gw = gateway(association_request_timeout_s=1.0)
    with connect(gw.scp.port) as sock:
        # one byte per 0.2 s: the whole PDU would take ~40 s
        assert 0.9 < trickle_until_closed(sock, ECHO_RQ) < 2.5
    with connect(gw.scp.port) as sock:  # slow but complete in time: answered
        for part in (ECHO_RQ[:3], ECHO_RQ[3:50], ECHO_RQ[50:]):
            sock.sendall(part)
            time.sleep(0.25)
        sock.settimeout(5)
        assert sock.recv(1) == b"\x02"  # A-ASSOCIATE-AC
    assert gw.metric("medssl_gateway_associations_total", result="dropped") == 1


def test_a_pdu_trickled_right_behind_an_association_request_is_cut_at_the_acse_timeout(gateway):
    gw = gateway(acse_timeout_s=1.0)
    with connect(gw.scp.port) as sock:
        # an A-ASSOCIATE-RQ with, right behind it, the header of a 1 MiB PDU whose bytes then
        # come one per 0.2 s: pynetdicom's DUL reads that PDU before it answers the request,
        # and would wait in the read for as long as the bytes trickle
        sock.sendall(ECHO_RQ + b"\x04\x00\x00\x10\x00\x00")
        assert trickle_until_closed(sock, bytes(50)) < 2.5
    assert gw.metric("medssl_gateway_associations_total", result="accepted") == 0
    assert_echo_within(gw.scp.port, 2.0)


def test_an_association_stalled_inside_a_pdu_frees_its_slot_after_the_network_timeout(gateway):
    gw = gateway(max_associations=1, network_timeout_s=1.0)
    with connect(gw.scp.port) as sock:
        sock.sendall(ECHO_RQ)
        sock.settimeout(5)
        assert sock.recv(1) == b"\x02"  # established; then 10 bytes of a 1 MiB P-DATA, silence
        sock.sendall(b"\x04\x00\x00\x10\x00\x00" + bytes(10))
        start = time.monotonic()
        while True:
            with associated(gw.scp.port) as assoc:
                if assoc.is_established:
                    assert status_of(assoc.send_c_echo()) == 0x0000
                    break
            assert time.monotonic() - start < 4.0, "the stalled association kept its slot"
            time.sleep(0.1)


GARBAGE = [
    b"\x04\x00\x00\x00\x00\x08\x00\x00\x00\x04\x01\x03\x00\x00",  # P-DATA, no association
    b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00",  # A-RELEASE-RQ, no association
    b"\x07\x00\x00\x00\x00\x04\x00\x00\x00\x00",  # A-ABORT, no association
    b"\xff\x00\x00\x00\x00\x02\xde\xad",  # no such PDU type
    b"\x01\x00\xff\xff\xff\xf0" + ECHO_RQ[6:],  # A-ASSOCIATE-RQ of 4 GiB
    b"\x01\x00\x00\x00\x00\x00",  # of 0 bytes
    ECHO_RQ[:40],  # cut short, then closed
    ECHO_RQ[:74] + b"\x10\x00\xff\xff" + ECHO_RQ[78:],  # an item length that lies
    associate_rq([(2, Verification)]),  # an even presentation context ID
    b"GET / HTTP/1.1\r\nHost: gateway\r\n\r\n",
    b"\x01",
    bytes(range(256)) * 4,
]


def test_after_a_burst_of_garbage_pdus_200_sequential_c_echoes_all_succeed(gateway):
    gw = gateway()  # max_associations 8, fewer than the garbage connections
    for _burst in range(2):
        for garbage in GARBAGE:
            with connect(gw.scp.port) as sock:
                sock.sendall(garbage)
    ae = pynetdicom.AE(ae_title="SCU")
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 5
    ae.add_requested_context(Verification)
    statuses = []
    try:
        for _ in range(200):  # ~25 ms each on loopback (measured): ~5 s
            assoc = ae.associate("127.0.0.1", gw.scp.port, ae_title="MEDSSL")
            statuses.append(int(assoc.send_c_echo().Status) if assoc.is_established else None)
            if assoc.is_established:
                assoc.release()
    finally:
        ae.shutdown()
    assert statuses == [0] * 200, f"{statuses.count(0)} of 200 C-ECHOs succeeded"


def test_a_closed_aborted_or_reset_connection_frees_its_slot_at_once(gateway):
    gw = gateway(max_associations=1)
    with connect(gw.scp.port):  # connected, nothing sent, closed: it never held the slot
        time.sleep(0.2)
    assert_echo_within(gw.scp.port, 1.0)

    @contextmanager
    def established_soon() -> Iterator[pynetdicom.association.Association]:
        """The one slot, retried for up to 1 s: the server's thread of the association before
        ends a few ms after its peer saw the release or abort."""
        deadline = time.monotonic() + 1.0
        while True:
            with associated(gw.scp.port) as assoc:
                if assoc.is_established or time.monotonic() > deadline:
                    assert assoc.is_established, "the slot was not freed within 1 s"
                    yield assoc
                    return
            time.sleep(0.05)

    with established_soon() as assoc:
        assoc.abort()  # A-ABORT
    with established_soon() as assoc:
        assert status_of(assoc.send_c_echo()) == 0x0000
    deadline = time.monotonic() + 1.0
    while True:  # established on a raw socket ...
        sock = connect(gw.scp.port)
        sock.sendall(ECHO_RQ)
        sock.settimeout(5)
        answer = sock.recv(1)
        if answer == b"\x02" or time.monotonic() > deadline:
            break
        sock.close()
        time.sleep(0.05)
    assert answer == b"\x02", "the slot was not freed within 1 s"
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # ... then reset
    with established_soon() as assoc:
        assert status_of(assoc.send_c_echo()) == 0x0000


def test_slots_are_limited_per_host_so_one_host_cannot_take_them_all(gateway):
    gw = gateway(max_associations=4, max_associations_per_peer=2)
    with ExitStack() as stack:
        for _ in range(2):
            assert stack.enter_context(associated(gw.scp.port)).is_established
        with associated(gw.scp.port) as third:
            assert third.is_rejected
            rj = third.acceptor.primitive
            assert (rj.result, rj.result_source, rj.diagnostic) == (0x02, 0x03, 0x02)
        for _ in range(2):  # another host still gets in, up to the total
            other = stack.enter_context(associated(gw.scp.port, bind_address=("127.0.0.2", 0)))
            assert other.is_established and status_of(other.send_c_echo()) == 0x0000
        with associated(gw.scp.port, bind_address=("127.0.0.3", 0)) as fifth:
            assert fifth.is_rejected  # max_associations: 4 in all
    assert gw.metric("medssl_gateway_associations_total", result="rejected") == 2
    assert gw.metric("medssl_gateway_associations_total", result="accepted") == 4


def test_beyond_max_pending_connections_the_busiest_hosts_oldest_one_is_closed(gateway):
    gw = gateway(max_pending_connections=4)
    with ExitStack() as stack:
        hogs = []
        for _ in range(4):  # apart, so that their threads register them in this order
            hogs.append(stack.enter_context(connect(gw.scp.port, "127.0.0.2")))
            time.sleep(0.1)
        time.sleep(0.2)
        mine = stack.enter_context(connect(gw.scp.port))
        time.sleep(0.3)
        assert [closed_by_peer(s) for s in hogs] == [True, False, False, False]
        assert not closed_by_peer(mine)
        mine.sendall(ECHO_RQ)  # the newcomer is served
        mine.settimeout(5)
        assert mine.recv(1) == b"\x02"
        assert_echo_within(gw.scp.port, 2.0)


# -- TLS -------------------------------------------------------------------------------------


def test_tls_silent_tcp_connections_do_not_delay_a_tls_caller(gateway, certificate):
    cert, key = certificate
    gw = gateway(
        tls=TlsConfig(enabled=True, certificate=cert, private_key=key),
        association_request_timeout_s=1.5,
    )
    with connect(gw.scp.port) as first, connect(gw.scp.port) as second:  # no TLS handshake
        time.sleep(0.2)
        start = time.monotonic()
        assert_echo_within(gw.scp.port, 2.0, tls_args=(client_context(cert), "localhost"))
        assert read_answer(first, 3.0) == b"" and read_answer(second, 3.0) == b""
        assert time.monotonic() - start < 3.0  # closed at their deadline


# -- called AE title, presentation context IDs -----------------------------------------------


def test_a_call_to_another_ae_title_is_rejected_permanently(gateway):
    gw = gateway()
    with associated(gw.scp.port, called="NOT_MEDSSL") as assoc:
        assert assoc.is_rejected
        rj = assoc.acceptor.primitive
        assert (rj.result, rj.result_source, rj.diagnostic) == (0x01, 0x01, 0x07)
    echoscu = require_tool("echoscu", "dcmtk")
    result = subprocess.run(
        [echoscu, "-aet", "SCU", "-aec", "medssl", "127.0.0.1", str(gw.scp.port)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert "Called AE Title Not Recognized" in result.stderr + result.stdout
    assert gw.metric("medssl_gateway_associations_total", result="rejected") == 2
    assert_echo_within(gw.scp.port, 2.0)  # the right one still works


@pytest.mark.parametrize(
    "contexts",
    [
        [(1, Verification), (2, CTImageStorage)],
        [(0, Verification)],
        [(1, Verification), (3, CTImageStorage), (3, Verification)],
    ],
    ids=["even", "zero", "twice"],
)
def test_a_bad_presentation_context_id_is_answered_with_an_a_abort(gateway, contexts):
    gw = gateway()
    with connect(gw.scp.port) as sock:
        sock.sendall(associate_rq(contexts))
        assert read_answer(sock, 3.0) == A_ABORT_INVALID_PARAMETER
    with connect(gw.scp.port) as sock:  # the same contexts with odd, distinct IDs are accepted
        sock.sendall(associate_rq([(2 * i + 1, uid) for i, (_, uid) in enumerate(contexts)]))
        sock.settimeout(5)
        assert sock.recv(1) == b"\x02"


# -- deflate bomb, huge declared length ------------------------------------------------------


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/self/status")


@contextmanager
def peak_rss_growth() -> Iterator[list[int]]:
    """Yields a list that holds, on exit, how far this process's peak RSS rose above its RSS
    at entry (bytes): the peak (VmHWM) is reset through /proc/self/clear_refs."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError as exc:
        pytest.skip(f"cannot reset the peak RSS here: {exc}")
    growth: list[int] = []
    before = _rss("VmRSS")
    yield growth
    growth.append(_rss("VmHWM") - before)


def _header_bytes(ds: pydicom.Dataset) -> bytes:
    """``ds`` without Pixel Data, encoded Explicit VR Little Endian."""
    del ds.PixelData
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, ds)
    return buffer.getvalue()


def deflate_bomb(source: Path, pixel_bytes: int = 512 * 2**20) -> tuple[bytes, str]:
    """``source``'s header with ``pixel_bytes`` of zero Pixel Data (a 16-bit square image),
    raw-deflated (PS3.5 A.5) in 1 MiB pieces: ~1,000:1, so 512 MiB are ~0.5 MB. Returns the
    deflated dataset and its SOP Instance UID."""
    ds = pydicom.dcmread(source)
    side = int((pixel_bytes // 2) ** 0.5)
    ds.Rows = ds.Columns = side
    header = _header_bytes(ds) + b"\xe0\x7f\x10\x00OW\x00\x00" + struct.pack("<I", pixel_bytes)
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts, zeros = [deflater.compress(header)], bytes(2**20)
    for _ in range(pixel_bytes // len(zeros)):
        parts.append(deflater.compress(zeros))
    parts.append(deflater.flush())
    return b"".join(parts), str(ds.SOPInstanceUID)


@pytest.fixture
def send_raw(monkeypatch, tmp_path):
    """Send a dataset's bytes as they are: ``send_raw(port, body, sop_uid, syntax) -> status``."""
    monkeypatch.setattr(pynetdicom._config, "STORE_SEND_CHUNKED_DATASET", True)

    def send(port: int, body: bytes, sop_uid: str, syntax: str) -> int:
        path = tmp_path / f"{sop_uid}.dcm"
        path.write_bytes(part10(body, sop_uid, syntax))
        with associated(port, contexts=((CTImageStorage, [syntax]),)) as assoc:
            return status_of(assoc.send_c_store(path))

    return send


def test_a_deflate_bomb_is_refused_without_inflating_it(gateway, series, send_raw):
    gw = gateway()  # max_inflated_bytes: 256 MiB
    bomb, sop_uid = deflate_bomb(series[0])  # 512 MiB of Pixel Data
    assert len(bomb) < 2 * 2**20
    with peak_rss_growth() as growth:
        status = send_raw(gw.scp.port, bomb, sop_uid, DeflatedExplicitVRLittleEndian)
    assert status == 0xC210
    assert growth[0] < 64 * 2**20, f"peak RSS rose by {growth[0] / 2**20:.0f} MiB"
    assert send_raw(gw.scp.port, bomb[:4096], sop_uid, DeflatedExplicitVRLittleEndian) == 0xC210
    notes = sorted(
        json.loads(p.read_text())["reason"] for p in gw.spool.quarantine_dir.glob("*.json")
    )
    assert notes == [
        "the deflated dataset ends before its deflate stream",
        f"the deflated dataset inflates past 268435456 bytes ({len(bomb)} bytes received)",
    ]
    assert gw.metric("medssl_gateway_instances_rejected_total", reason="too-large") == 1
    # an honest deflated instance, encoded by pynetdicom, is stored as received
    with associated(
        gw.scp.port, contexts=((CTImageStorage, [DeflatedExplicitVRLittleEndian]),)
    ) as assoc:
        assert status_of(assoc.send_c_store(pydicom.dcmread(series[1]))) == 0x0000
    (stored,) = gw.stored
    spooled = pydicom.dcmread(stored.path)
    assert spooled.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    assert spooled.PixelData == pydicom.dcmread(series[1]).PixelData


def test_a_huge_declared_length_is_refused_without_allocating_it(gateway, series, send_raw):
    """pydicom reads what is there, not what is declared (so memory stays low, a guard), but
    it did not say the element was cut short: the SCP once stored this with Success."""
    from pydicom.uid import ExplicitVRLittleEndian

    gw = gateway()
    ds = pydicom.dcmread(series[0])
    body = (
        _header_bytes(ds)
        + b"\xe0\x7f\x10\x00OW\x00\x00"
        + struct.pack("<I", 0xFFFFFFF0)
        + bytes(1024)
    )
    with peak_rss_growth() as growth:
        status = send_raw(gw.scp.port, body, str(ds.SOPInstanceUID), ExplicitVRLittleEndian)
    assert status == 0xC210 and gw.stored == []
    assert growth[0] < 64 * 2**20, f"peak RSS rose by {growth[0] / 2**20:.0f} MiB"


# -- configuration -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key, value",
    [
        ("max_associations_per_peer", 0),
        ("max_pending_connections", 0),
        ("max_inflated_bytes", 0),
        ("association_request_timeout_s", 0.0),
    ],
)
def test_the_new_scp_limits_are_validated(key, value):
    with pytest.raises(ValueError, match=f"{key} must be"):
        ScpConfig(**{key: value})
