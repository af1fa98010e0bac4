"""The gateway's Storage SCP and spool over real DICOM networking on loopback.

Senders are dcmtk (``storescu``, ``echoscu``) and pynetdicom SCUs; every SCP binds port 0.
"""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import pynetdicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLosslessSV1,
    generate_uid,
)
from pynetdicom.sop_class import (
    CTImageStorage,
    EnhancedCTImageStorage,
    MRImageStorage,
)

from medssl.serving.config import AllowedCaller, TlsConfig
from medssl.serving.spool import Spool, SpoolError, SpoolFullError, StoredInstance
from tests.conftest import require_tool
from tests.serving.helpers import SYNTAXES, Gateway, associated, client_context, part10, status_of


def assert_no_phi_logged(records: list[logging.LogRecord]) -> None:
    """No record of the SCP's logger holds the patient's name or ID (message or extra)."""
    ours = [r for r in records if r.name == "medssl.serving.scp"]
    assert ours
    for record in ours:
        text = record.getMessage() + repr(vars(record))
        assert "Doe^Jane" not in text and "MRN-424242" not in text


def _assert_spooled(gw: Gateway, sources: list[Path]) -> None:
    """Each source instance is stored once at incoming/<study>/<series>/<sop>.dcm, same pixels."""
    assert len(gw.stored) == len(sources)
    by_sop = {s.sop_instance_uid: s for s in gw.stored}
    for source in sources:
        original = pydicom.dcmread(source)
        got = by_sop[original.SOPInstanceUID]
        assert (got.study_uid, got.series_uid) == (
            original.StudyInstanceUID,
            original.SeriesInstanceUID,
        )
        assert got.sop_class_uid == CTImageStorage and got.calling_ae in ("SCU", "STORESCU")
        expected = (
            gw.spool.incoming
            / original.StudyInstanceUID
            / original.SeriesInstanceUID
            / f"{original.SOPInstanceUID}.dcm"
        )
        assert got.path == expected and got.n_bytes == expected.stat().st_size
        spooled = pydicom.dcmread(expected)
        assert np.array_equal(spooled.pixel_array, original.pixel_array)
    assert gw.incoming_files() == sorted(s.path for s in gw.stored)
    assert list(gw.spool.tmp.iterdir()) == []


# -- spool -----------------------------------------------------------------------------------


def test_spool_stores_durably_replaces_a_resent_instance_and_recovers(tmp_path):
    spool = Spool(tmp_path / "spool")
    path = spool.store(b"first", "1.2.3", "1.2.3.4", "1.2.3.4.5")
    assert path == spool.incoming / "1.2.3" / "1.2.3.4" / "1.2.3.4.5.dcm"
    assert spool.store(b"second", "1.2.3", "1.2.3.4", "1.2.3.4.5") == path
    assert path.read_bytes() == b"second" and spool.study_files("1.2.3") == [path]
    (spool.tmp / "deadbeef.part").write_bytes(b"half a write")  # a killed process's leftover
    assert spool.recover() == ["1.2.3"] and list(spool.tmp.iterdir()) == []
    out = spool.output_dir(7)
    (out / "seg.dcm").write_bytes(b"12345")
    assert spool.usage_bytes() == len(b"second") + 5
    spool.remove_outputs(7)
    spool.remove_study("1.2.3")
    assert spool.study_files("1.2.3") == [] and not out.exists() and spool.recover() == []


def test_spool_refuses_uids_that_are_not_uids_and_writes_below_the_floor(tmp_path):
    spool = Spool(tmp_path / "spool")
    with pytest.raises(SpoolError, match=r"SeriesInstanceUID \(9 characters, not quoted\)"):
        spool.store(b"x", "1.2", "../../etc", "1.2.3")
    with pytest.raises(SpoolError, match=r"SOPInstanceUID \(65 characters"):
        spool.store(b"x", "1.2", "1.2.3", "1" * 65)
    full = Spool(tmp_path / "spool", min_free_bytes=2**62)
    with pytest.raises(SpoolFullError, match=r"bytes free.*floor of 4611686018427387904 bytes"):
        full.store(b"x", "1.2", "1.2.3", "1.2.3.4")
    assert list(full.incoming.iterdir()) == [] and list(full.tmp.iterdir()) == []


def test_spool_quarantine_keeps_the_bytes_and_a_json_reason(tmp_path):
    spool = Spool(tmp_path / "spool")
    path = spool.quarantine(b"junk", "no Pixel Data", calling_ae="SCU")
    assert path.parent == spool.quarantine_dir and path.read_bytes() == b"junk"
    note = json.loads(path.with_suffix(".json").read_text())
    assert note["reason"] == "no Pixel Data" and note["calling_ae"] == "SCU" and note["time"]


# -- association level ---------------------------------------------------------------------


def test_c_echo_is_answered_with_success(gateway):
    gw = gateway()
    with associated(gw.scp.port) as assoc:
        assert assoc.is_established
        assert status_of(assoc.send_c_echo()) == 0x0000
    echoscu = require_tool("echoscu", "dcmtk")
    result = subprocess.run(
        [echoscu, "-aet", "SCU", "-aec", "MEDSSL", "127.0.0.1", str(gw.scp.port)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert gw.metric("medssl_gateway_associations_total", result="accepted") == 2


def test_unknown_calling_ae_is_rejected_at_association(gateway):
    gw = gateway()
    with associated(gw.scp.port, calling="INTRUDER") as assoc:
        assert assoc.is_rejected and not assoc.is_established and not assoc.is_aborted
        rj = assoc.acceptor.primitive
        assert (rj.result, rj.result_source, rj.diagnostic) == (0x01, 0x01, 0x03)
    echoscu = require_tool("echoscu", "dcmtk")
    result = subprocess.run(
        [echoscu, "-aet", "INTRUDER", "-aec", "MEDSSL", "127.0.0.1", str(gw.scp.port)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert "Association Rejected" in result.stderr + result.stdout
    assert "Calling AE Title Not Recognized" in result.stderr + result.stdout
    assert gw.metric("medssl_gateway_associations_total", result="rejected") == 2
    assert gw.metric("medssl_gateway_associations_total", result="accepted") == 0


def test_allowed_ae_from_a_wrong_host_is_rejected(gateway):
    gw = gateway(
        allowed_callers=(
            AllowedCaller("LOCAL", hosts=("127.0.0.1",)),
            AllowedCaller("REMOTE", hosts=("192.0.2.7",)),
        )
    )
    with associated(gw.scp.port, calling="LOCAL") as assoc:
        assert assoc.is_established
    with associated(gw.scp.port, calling="REMOTE") as assoc:
        assert assoc.is_rejected
        assert assoc.acceptor.primitive.diagnostic == 0x03


def test_max_associations_is_honoured(gateway):
    gw = gateway(max_associations=1)
    with associated(gw.scp.port) as first:
        assert first.is_established
        with associated(gw.scp.port) as second:
            assert second.is_rejected
            rj = second.acceptor.primitive
            assert (rj.result, rj.result_source, rj.diagnostic) == (0x02, 0x03, 0x02)
    assert gw.metric("medssl_gateway_associations_total", result="rejected") == 1
    deadline = time.monotonic() + 5  # the first association's thread ends just after release
    while True:
        with associated(gw.scp.port) as third:
            if third.is_established or time.monotonic() > deadline:
                assert third.is_established
                break
        time.sleep(0.05)


# -- C-STORE -------------------------------------------------------------------------------


def test_series_sent_with_storescu_is_spooled_durably(gateway, series):
    storescu = require_tool("storescu", "dcmtk")
    gw = gateway()
    result = subprocess.run(
        [
            storescu,
            "-aet",
            "STORESCU",
            "-aec",
            "MEDSSL",
            "127.0.0.1",
            str(gw.scp.port),
            *map(str, series),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    _assert_spooled(gw, series)
    assert gw.metric(
        "medssl_gateway_instances_received_total", sop_class="CT Image Storage"
    ) == len(series)


def test_series_sent_with_pynetdicom_is_spooled_durably(gateway, series, caplog):
    caplog.set_level(logging.DEBUG, logger="medssl.serving.scp")
    gw = gateway()
    with associated(gw.scp.port) as assoc:
        assert [status_of(assoc.send_c_store(pydicom.dcmread(p))) for p in series] == [0] * 4
    _assert_spooled(gw, series)
    assert_no_phi_logged(caplog.records)


def test_jpeg_lossless_instance_is_spooled_still_compressed(gateway, series, tmp_path):
    dcmcjpeg = require_tool("dcmcjpeg", "dcmtk")
    storescu = require_tool("storescu", "dcmtk")
    jpeg = tmp_path / "jpeg.dcm"
    subprocess.run([dcmcjpeg, str(series[0]), str(jpeg)], check=True, timeout=30)
    assert pydicom.dcmread(jpeg).file_meta.TransferSyntaxUID == JPEGLosslessSV1
    gw = gateway()
    # -xs: one presentation context per SOP class, JPEG Lossless SV1 proposed before the
    # uncompressed syntaxes (plain storescu proposes only uncompressed ones)
    result = subprocess.run(
        [
            storescu,
            "-xs",
            "-aet",
            "STORESCU",
            "-aec",
            "MEDSSL",
            "127.0.0.1",
            str(gw.scp.port),
            str(jpeg),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    # one context offering uncompressed and JPEG Lossless: the SCP prefers the lossless one
    offer = ((CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGLosslessSV1]),)
    with associated(gw.scp.port, contexts=offer) as assoc:
        (context,) = [cx for cx in assoc.accepted_contexts if cx.abstract_syntax == CTImageStorage]
        assert context.transfer_syntax == [JPEGLosslessSV1]
        assert status_of(assoc.send_c_store(jpeg)) == 0x0000
    assert len(gw.stored) == 2 and gw.stored[0].path == gw.stored[1].path  # re-sent: replaced
    spooled = pydicom.dcmread(gw.stored[0].path)
    assert spooled.file_meta.TransferSyntaxUID == JPEGLosslessSV1
    assert np.array_equal(spooled.pixel_array, pydicom.dcmread(series[0]).pixel_array)


def test_enhanced_ct_instance_is_accepted(gateway):
    path = get_testdata_file("eCT_Supplemental.dcm")
    if path is None:
        pytest.skip("pydicom-data is not installed")
    gw = gateway()
    with associated(gw.scp.port, contexts=((EnhancedCTImageStorage, SYNTAXES),)) as assoc:
        assert status_of(assoc.send_c_store(path)) == 0x0000
    (stored,) = gw.stored
    original = pydicom.dcmread(path)
    assert stored.sop_class_uid == EnhancedCTImageStorage
    assert stored.sop_instance_uid == original.SOPInstanceUID
    assert pydicom.dcmread(stored.path).PixelData == original.PixelData
    assert (
        gw.metric("medssl_gateway_instances_received_total", sop_class="Enhanced CT Image Storage")
        == 1
    )


def _mr_dataset(ct: Path) -> pydicom.Dataset:
    ds = pydicom.dcmread(ct)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.Modality = "MR"
    return ds


def test_other_sop_class_is_refused_at_negotiation(gateway, series):
    gw = gateway(other_sop_classes="refuse")
    contexts = ((CTImageStorage, SYNTAXES), (MRImageStorage, SYNTAXES))
    with associated(gw.scp.port, contexts=contexts) as assoc:
        assert assoc.is_established
        assert {cx.abstract_syntax for cx in assoc.rejected_contexts} == {MRImageStorage}
        with pytest.raises(ValueError, match="No presentation context"):
            assoc.send_c_store(_mr_dataset(series[0]))
    assert gw.stored == [] and gw.incoming_files() == []


def test_other_sop_class_is_acknowledged_and_discarded_when_ignored(gateway, series):
    gw = gateway(other_sop_classes="ignore")
    contexts = ((CTImageStorage, SYNTAXES), (MRImageStorage, SYNTAXES))
    with associated(gw.scp.port, contexts=contexts) as assoc:
        assert status_of(assoc.send_c_store(_mr_dataset(series[0]))) == 0x0000
        assert status_of(assoc.send_c_store(pydicom.dcmread(series[1]))) == 0x0000
    assert [s.sop_class_uid for s in gw.stored] == [CTImageStorage]
    assert len(gw.incoming_files()) == 1
    assert gw.metric("medssl_gateway_instances_rejected_total", reason="ignored-sop-class") == 1


@pytest.mark.filterwarnings("ignore:Expected explicit VR")
def test_garbage_and_truncated_instances_are_quarantined_while_a_good_one_is_stored(
    gateway, series, tmp_path, monkeypatch, caplog
):
    caplog.set_level(logging.DEBUG, logger="medssl.serving.scp")
    # send the files' bytes as they are (pynetdicom would otherwise decode and re-encode them)
    monkeypatch.setattr(pynetdicom._config, "STORE_SEND_CHUNKED_DATASET", True)
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(part10(b"\x13\x37 not a dataset \xff" * 40, generate_uid()))
    truncated = tmp_path / "truncated.dcm"
    whole = series[1].read_bytes()
    truncated.write_bytes(whole[:-200])  # cut inside Pixel Data
    no_study = pydicom.dcmread(series[3])
    del no_study.StudyInstanceUID
    gw = gateway()
    with associated(gw.scp.port) as assoc:
        statuses = [
            status_of(assoc.send_c_store(p)) for p in (garbage, truncated, series[2], no_study)
        ]
    assert statuses == [0xC210, 0xC210, 0x0000, 0xC210]
    assert [s.sop_instance_uid for s in gw.stored] == [pydicom.dcmread(series[2]).SOPInstanceUID]
    assert len(gw.incoming_files()) == 1
    quarantined = sorted(gw.spool.quarantine_dir.glob("*.dcm"))
    notes = [json.loads(p.with_suffix(".json").read_text()) for p in quarantined]
    assert len(quarantined) == 3 and all(n["reason"] and n["calling_ae"] == "SCU" for n in notes)
    # the garbage's first "element" declares more bytes than follow, as the truncated one's
    assert sorted(n["reason"].split(" ")[0] for n in notes) == ["element", "element", "no"]
    assert any(
        "element (7FE0,0010) holds 376 bytes of the 576 it declares (truncated)" in n["reason"]
        for n in notes
    )
    assert any(p.read_bytes().endswith(whole[-1000:-200]) for p in quarantined)
    assert gw.metric("medssl_gateway_instances_rejected_total", reason="undecodable") == 2
    assert gw.metric("medssl_gateway_instances_rejected_total", reason="missing-uid") == 1
    assert_no_phi_logged(caplog.records)
    assert not any("Doe^Jane" in p.with_suffix(".json").read_text() for p in quarantined)


def test_spool_below_its_free_space_floor_answers_out_of_resources(gateway, series):
    gw = gateway(min_free_bytes=2**62)
    with associated(gw.scp.port) as assoc:
        assert status_of(assoc.send_c_store(pydicom.dcmread(series[0]))) == 0xA700
    assert gw.stored == [] and gw.incoming_files() == [] and list(gw.spool.tmp.iterdir()) == []
    assert gw.metric("medssl_gateway_instances_rejected_total", reason="spool-full") == 1


def test_on_stored_raising_answers_processing_failure_and_the_server_lives_on(gateway, series):
    def broken(instance: StoredInstance) -> None:
        raise RuntimeError("job store is down")

    gw = gateway(on_stored=broken)
    with associated(gw.scp.port) as assoc:
        assert status_of(assoc.send_c_store(pydicom.dcmread(series[0]))) == 0x0110
        assert status_of(assoc.send_c_echo()) == 0x0000
    assert gw.metric("medssl_gateway_instances_received_total", sop_class="CT Image Storage") == 0


# -- TLS -----------------------------------------------------------------------------------


def test_tls_scu_can_store_and_a_plain_tcp_scu_cannot(gateway, series, certificate):
    cert, key = certificate
    gw = gateway(tls=TlsConfig(enabled=True, certificate=cert, private_key=key))
    with associated(gw.scp.port, tls_args=(client_context(cert), "localhost")) as assoc:
        assert assoc.is_established
        assert status_of(assoc.send_c_store(pydicom.dcmread(series[0]))) == 0x0000
    with associated(gw.scp.port) as plain:
        assert not plain.is_established
    assert len(gw.stored) == 1


def test_tls_peer_that_connects_and_sends_nothing_does_not_stall_other_callers(
    gateway, certificate
):
    cert, key = certificate
    gw = gateway(tls=TlsConfig(enabled=True, certificate=cert, private_key=key), acse_timeout_s=1)
    with socket.create_connection(("127.0.0.1", gw.scp.port)):  # idle: no TLS handshake
        time.sleep(0.2)
        with associated(gw.scp.port, tls_args=(client_context(cert), "localhost")) as assoc:
            assert status_of(assoc.send_c_echo()) == 0x0000


def test_tls_with_a_ca_requires_a_client_certificate(gateway, series, certificate):
    cert, key = certificate  # self-signed: it is its own CA
    gw = gateway(
        tls=TlsConfig(enabled=True, certificate=cert, private_key=key, ca_certificate=cert)
    )
    with associated(gw.scp.port, tls_args=(client_context(cert, key), "localhost")) as assoc:
        assert status_of(assoc.send_c_echo()) == 0x0000
    with associated(gw.scp.port, tls_args=(client_context(cert), "localhost")) as anonymous:
        assert not anonymous.is_established


# -- stop ----------------------------------------------------------------------------------


def test_stop_refuses_new_associations_and_lets_active_ones_finish(gateway, series):
    gw = gateway()
    with associated(gw.scp.port) as active:
        assert active.is_established
        stopper = threading.Thread(target=gw.scp.stop, kwargs={"timeout_s": 20})
        stopper.start()
        time.sleep(0.8)  # the accept loop has been shut down by now
        with associated(gw.scp.port) as late:
            assert not late.is_established
        assert status_of(active.send_c_store(pydicom.dcmread(series[0]))) == 0x0000
        assert stopper.is_alive()  # stop() waits for the active association
    stopper.join(timeout=10)
    assert not stopper.is_alive() and len(gw.stored) == 1
