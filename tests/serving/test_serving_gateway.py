"""The gateway end to end against a real PACS: Orthanc (Debian package) pushes studies by
C-STORE to ``medssl-serve`` (a real process), and the SR / SEG come back into Orthanc's study.

Every test starts its own gateway (its own spool, free loopback ports) and uses its own
synthetic chest CT study (the routing test also an abdominal one); Orthanc is shared by the
module. Routes select by BodyPartExamined, as ``examples/gateway.yaml`` does: chest CT to the
detector, abdominal CT to the organ segmenter.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import highdicom as hd
import numpy as np
import pyarrow.parquet as pq
import pydicom
import pytest
from pydicom.sr.codedict import codes

from medssl.models.card import load_card
from medssl.testing.gateway import GatewayProcess, gateway_config
from medssl.testing.orthanc import OrthancServer
from tests.conftest import require_tool
from tests.paths import MODEL_REPOSITORY
from tests.serving.helpers import (
    DETECTOR,
    dataset,
    part10,
    results,
    storescu,
    wait_results,
    wait_settled,
)

pytestmark = [pytest.mark.integration, pytest.mark.orthanc, pytest.mark.triton]

#: A finding's SCOORD3D group in our SRs (each finding also has a 2D point group first:
#: tests/medssl/dicom/test_sr_viewers.py).
POINT3D = hd.sr.GraphicTypeValues3D.POINT

REPOSITORY = MODEL_REPOSITORY
MIN_PROBABILITY = 0.5
NODULE = codes.SCT.Nodule
LUNG = codes.SCT.Lung


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> list[list[Path]]:
    """Eight synthetic chest CT studies (128² × 96 slices, 1 series each), files per study."""
    root = tmp_path_factory.mktemp("chest")
    subprocess.run(
        [
            f"{sys.prefix}/bin/medssl",
            "synth",
            "chest",
            "--cases",
            "8",
            "--format",
            "dicom",
            "--matrix",
            "128",
            "--slices",
            "96",
            "--seed",
            "3",
            str(root),
        ],
        check=True,
        capture_output=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    by_study: dict[str, list[Path]] = {}
    for path in sorted(root.rglob("*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        by_study.setdefault(str(ds.StudyInstanceUID), []).append(path)
    assert len(by_study) == 8
    return list(by_study.values())


@pytest.fixture(scope="module")
def abdomen(tmp_path_factory) -> list[Path]:
    """One synthetic abdominal CT study (BodyPartExamined ABDOMEN, 24 slices of 4 mm, 64²)."""
    root = tmp_path_factory.mktemp("abdomen")
    subprocess.run(
        [
            f"{sys.prefix}/bin/medssl",
            "synth",
            "organs",
            "--cases",
            "1",
            "--format",
            "dicom",
            "--shape",
            "24",
            "64",
            "64",
            "--seed",
            "11",
            str(root),
        ],
        check=True,
        capture_output=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    return sorted(root.rglob("*.dcm"))


def _study_uid(files: list[Path]) -> str:
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


def _routes(segmenter_repository: Path | None = None) -> list[dict]:
    routes = [
        {
            "model": DETECTOR,
            "min_probability": MIN_PROBABILITY,
            "select": {
                "modality": "CT",
                "min_slices": 32,
                "max_thickness_mm": 2.5,
                "body_part": ["CHEST"],
            },
        }
    ]
    if segmenter_repository is not None:
        routes.append(
            {
                "model": "organs",
                "select": {
                    "modality": "CT",
                    "min_slices": 16,
                    "max_thickness_mm": 5.0,
                    "body_part": ["ABDOMEN", "ABDOMENPELVIS"],
                },
            }
        )
    return routes


def _repository(tmp_path: Path, segmenter=None) -> Path:
    """The shipped detector, plus the test segmenter when given, in one repository."""
    repository = tmp_path / "model_repository"
    shutil.copytree(REPOSITORY / DETECTOR, repository / DETECTOR)
    if segmenter is not None:
        shutil.copytree(segmenter.model_dir, repository / "organs")
    return repository


@pytest.fixture
def start_gateway(tmp_path, orthanc):
    """Start a gateway sending to ``orthanc``, known to Orthanc as modality ``<name>``."""
    gateways: list[GatewayProcess] = []

    def start(
        name: str = "GW",
        segmenter=None,
        repository: Path | None = None,
        wait_ready: bool = True,
        **sections,
    ) -> GatewayProcess:
        root = tmp_path / name
        repository = repository or _repository(root, segmenter)
        cfg = gateway_config(
            root,
            _routes(repository if segmenter else None),
            repository,
            [
                {
                    "name": "orthanc",
                    "ae_title": orthanc.aet,
                    "host": "127.0.0.1",
                    "port": orthanc.dicom_port,
                    "timeout_s": 5,
                }
            ],
            **sections,
        )
        gateway = GatewayProcess(root, cfg)
        gateway.start(wait_ready=wait_ready)
        orthanc.add_modality(name, "MEDSSL", "127.0.0.1", gateway.port)
        gateways.append(gateway)
        return gateway

    yield start
    for gateway in gateways:
        gateway.stop()


def _push(orthanc: OrthancServer, modality: str, files: list[Path], synchronous: bool = True):
    ids = orthanc.upload(files)
    return orthanc.store_to(modality, ids, synchronous=synchronous)


def _scored_findings(files: list[Path], tmp_path: Path) -> np.ndarray:
    """medssl-score's findings (LPS mm) with p >= MIN_PROBABILITY for the same series."""
    folder = tmp_path / "score-input"
    folder.mkdir()
    for f in files:
        shutil.copy(f, folder / f.name)
    out = tmp_path / "scores"
    subprocess.run(
        [f"{sys.prefix}/bin/medssl-score", str(folder), "--out", str(out), "--workers", "0"],
        check=True,
        capture_output=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    table = pq.read_table(out / "findings.parquet").to_pandas()
    table = table[table["probability"] >= MIN_PROBABILITY]
    return table[["x_mm", "y_mm", "z_mm"]].to_numpy()


def _sr_points(sr: pydicom.Dataset) -> np.ndarray:
    report = hd.sr.Comprehensive3DSR.from_dataset(sr)
    groups = report.content.get_planar_roi_measurement_groups(graphic_type=POINT3D)
    return np.array([g.roi.value.reshape(-1) for g in groups]).reshape(-1, 3)


def test_chest_ct_comes_back_as_an_sr_and_abdominal_ct_as_a_seg_routed_by_body_part(
    start_gateway, orthanc, studies, abdomen, exported_segmenter, tmp_path, dciodvfy
):
    files = studies[0]
    study_uid, abdomen_uid = _study_uid(files), _study_uid(abdomen)
    gateway = start_gateway(segmenter=exported_segmenter)
    _push(orthanc, "GW", files)
    _push(orthanc, "GW", abdomen)
    found = wait_results(orthanc, gateway, study_uid, ("SR",))
    found_abdomen = wait_results(orthanc, gateway, abdomen_uid, ("SEG",))
    jobs = wait_settled(gateway, jobs=2)
    assert [j["state"] for j in jobs] == ["done", "done"]
    assert len(found["SR"]) == 1 and len(found_abdomen["SEG"]) == 1
    assert results(orthanc, study_uid, "SEG") == [] and results(orthanc, abdomen_uid, "SR") == []
    sr = dataset(orthanc, found["SR"][0])
    seg = dataset(orthanc, found_abdomen["SEG"][0])
    for ds, name, uid, model in (
        (sr, "sr.dcm", study_uid, DETECTOR),
        (seg, "seg.dcm", abdomen_uid, "organs"),
    ):
        path = tmp_path / name
        ds.save_as(path, enforce_file_format=True)
        assert dciodvfy(path) == [], name
        assert ds.StudyInstanceUID == uid
        models = [
            e.ManufacturerModelName
            for e in ds.ContributingEquipmentSequence
            if e.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
        ]  # Processing Equipment
        assert model in models and ({DETECTOR, "organs"} - {model}).isdisjoint(models)

    # The SR: one planar ROI group per finding, at medssl-score's coordinates, with the codes.
    expected = _scored_findings(files, tmp_path)
    points = _sr_points(sr)
    assert len(points) == len(expected) > 0
    distances = np.linalg.norm(points[:, None, :] - expected[None, :, :], axis=2)
    assert distances.min(axis=1).max() <= 2.0
    report = hd.sr.Comprehensive3DSR.from_dataset(sr)
    for group in report.content.get_planar_roi_measurement_groups(graphic_type=POINT3D):
        assert group.finding_type == NODULE
        assert [site.value for site in group.finding_sites] == [LUNG]
        assert group.get_measurements(name=codes.SCT.Diameter)
        assert group.tracking_uid and group.tracking_identifier
    assert sr.SeriesDescription.startswith(DETECTOR)

    # The SEG: BINARY, empty frames omitted (the default), segments coded from the card.
    card = load_card(exported_segmenter.model_dir)
    segmentation = hd.seg.Segmentation.from_dataset(seg)
    assert seg.SegmentationType == "BINARY"
    n_frames = int(seg.NumberOfFrames)
    assert 0 < n_frames < len(abdomen) * len(card.labels)
    assert all(frame.any() for frame in segmentation.pixel_array.reshape(n_frames, -1))
    described = [
        (d.segmented_property_type.value, d.segment_label) for d in segmentation.SegmentSequence
    ]
    assert described == [(label.type.value, label.name) for label in card.labels]
    assert (
        segmentation.SegmentSequence[0]
        .SegmentedPropertyCategoryCodeSequence[0]
        .CodingSchemeDesignator
        == "SCT"
    )

    status, metrics = gateway.http_get("/metrics")
    assert status == 200
    assert (
        "medssl_gateway_instances_received_total"
        f'{{sop_class="CT Image Storage"}} {96 + len(abdomen)}.0' in metrics
    )
    assert 'medssl_gateway_studies_total{state="done"} 2.0' in metrics
    assert 'medssl_gateway_stage_seconds_count{stage="total"} 2.0' in metrics


def test_a_jpeg_lossless_study_is_received_compressed_and_processed(
    start_gateway, orthanc, studies, tmp_path
):
    exe = require_tool("dcmcjpeg", "dcmtk")
    compressed = []
    for f in studies[1]:
        out = tmp_path / "jpeg" / f.name
        out.parent.mkdir(exist_ok=True)
        subprocess.run(
            [exe, "--encode-lossless-sv1", str(f), str(out)], check=True, capture_output=True
        )
        compressed.append(out)
    assert pydicom.dcmread(compressed[0]).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.70"
    gateway = start_gateway()
    _push(orthanc, "GW", compressed)
    wait_results(orthanc, gateway, _study_uid(compressed))
    spooled = gateway.spooled()
    assert len(spooled) == len(compressed)
    assert pydicom.dcmread(
        spooled[0], stop_before_pixels=True
    ).file_meta.TransferSyntaxUID.is_compressed


def test_an_enhanced_ct_study_is_processed(start_gateway, orthanc, studies, tmp_path, dciodvfy):
    from medssl.io import SeriesInfo, read_volume
    from medssl.io.dicom_enhanced import write_enhanced_ct

    # a study where the shipped detector reports a finding at the route's 0.5 (SYN000007: p 0.95),
    # so the SR has frame references to check
    volume = read_volume(studies[4][0].parent)
    path = write_enhanced_ct(
        volume, tmp_path / "enhanced.dcm", SeriesInfo(uid_seed="gateway-enhanced")
    )
    enhanced = pydicom.dcmread(path, stop_before_pixels=True)
    assert enhanced.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2.1"
    gateway = start_gateway()
    _push(orthanc, "GW", [path])
    found = wait_results(orthanc, gateway, str(enhanced.StudyInstanceUID))
    sr = dataset(orthanc, found["SR"][0])
    sr.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    assert dciodvfy(tmp_path / "sr.dcm") == []
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.ReferencedSOPSequence[0].ReferencedSOPClassUID == enhanced.SOPClassUID
    assert len(_sr_points(sr)) > 0


def test_an_unknown_calling_ae_is_rejected(start_gateway, studies):
    echoscu = require_tool("echoscu", "dcmtk")
    storescu = require_tool("storescu", "dcmtk")
    gateway = start_gateway()
    ok = subprocess.run(
        [echoscu, "-aet", "STORESCU", "-aec", "MEDSSL", "127.0.0.1", str(gateway.port)],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    refused = subprocess.run(
        [
            storescu,
            "-aet",
            "INTRUDER",
            "-aec",
            "MEDSSL",
            "127.0.0.1",
            str(gateway.port),
            str(studies[2][0]),
        ],
        capture_output=True,
        text=True,
    )
    assert refused.returncode != 0
    assert "reject" in (refused.stdout + refused.stderr).lower()
    assert gateway.spooled() == []
    # recorded for the operators (the console's "Refused" page, /api/v1/refusals)
    db = sqlite3.connect(gateway.spool / "jobs.sqlite", timeout=10)
    try:
        rows = db.execute("SELECT calling_ae, called_ae, peer, reason FROM refusals").fetchall()
    finally:
        db.close()
    assert rows == [("INTRUDER", "MEDSSL", "127.0.0.1", "calling AE title not allowed")]


def test_a_gateway_killed_during_reception_loses_nothing(start_gateway, orthanc, studies):
    files = studies[3]
    study_uid = _study_uid(files)
    gateway = start_gateway(spool={"study_idle_s": 2.0})
    ids = orthanc.upload(files)
    orthanc.store_to("GW", ids, synchronous=False)
    deadline = time.monotonic() + 60
    while len(gateway.spooled()) < 10 and time.monotonic() < deadline:
        time.sleep(0.005)
    gateway.kill()
    received_before_kill = len(gateway.spooled())
    assert 0 < received_before_kill < len(files), "the kill did not land during reception"
    gateway.start()
    orthanc.store_to("GW", ids, synchronous=True)  # the PACS re-sends what failed
    wait_results(orthanc, gateway, study_uid)
    wait_settled(gateway)
    time.sleep(2.0)
    assert len(results(orthanc, study_uid, "SR")) == 1
    assert len(gateway.spooled()) == len(files)


def _partial_copy(files: list[Path], folder: Path, n: int, seed: str) -> list[Path]:
    """The first ``n`` slices (by InstanceNumber) of a study as a new study: fresh Study,
    Series and SOP Instance UIDs (derived from ``seed``), so its results are its own."""
    from pydicom.uid import generate_uid

    datasets = sorted((pydicom.dcmread(f) for f in files), key=lambda ds: int(ds.InstanceNumber))[
        :n
    ]
    study, series = (
        generate_uid(entropy_srcs=[seed, "study"]),
        generate_uid(entropy_srcs=[seed, "series"]),
    )
    folder.mkdir(parents=True)
    out = []
    for ds in datasets:
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(
            entropy_srcs=[seed, str(ds.InstanceNumber)]
        )
        out.append(folder / f"{int(ds.InstanceNumber):03d}.dcm")
        ds.save_as(out[-1], enforce_file_format=True)
    return out


def _evidence(sr: pydicom.Dataset) -> set[str]:
    """The SOP Instance UIDs of the CT instances an SR lists as evidence."""
    return {
        sop.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for sop in series.ReferencedSOPSequence
        if sop.ReferencedSOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
    }


def _sop(instance: dict) -> str:
    """The SOP Instance UID of an instance as Orthanc's ``/tools/find`` expands it."""
    return instance["MainDicomTags"]["SOPInstanceUID"]


def _store_jobs(gateway: GatewayProcess) -> tuple[list, dict[int, list]]:
    """The job store as the operator reads it: its jobs and each job's outputs."""
    from medssl.serving.jobstore import JobStore

    store = JobStore(gateway.spool / "jobs.sqlite")
    try:
        jobs = store.jobs()
        return jobs, {j.id: store.outputs(j.id) for j in jobs}
    finally:
        store.close()


def test_a_study_cut_by_a_crash_waits_at_restart_for_its_missing_instances(
    start_gateway, orthanc, studies, tmp_path
):
    """A study cut by a crash: 40 of 48 instances, kill -9, a restart slower than the idle time, the
    PACS re-sends the missing 8: one job processes all 48 (the recovered job waited a fresh
    idle time). Then the PACS re-sends the whole study: a job superseding the first
    re-processes all 48, and the PACS still holds one SR (same content, same UIDs)."""
    idle_s = 4.0
    files = _partial_copy(studies[0], tmp_path / "cut", 48, "cut-by-a-crash")
    sops = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    study_uid = _study_uid(files)
    gateway = start_gateway(spool={"study_idle_s": idle_s})
    storescu(gateway, files[:40])
    gateway.kill()
    assert [(j["state"], j["n_instances"]) for j in gateway.jobs()] == [("received", 40)]
    time.sleep(idle_s + 1.0)  # the restart takes longer than the idle time
    gateway.start()
    storescu(gateway, files[40:])
    found = wait_results(orthanc, gateway, study_uid)
    wait_settled(gateway)
    jobs, outputs = _store_jobs(gateway)
    assert [(j.state.value, j.n_instances, j.n_processed, j.supersedes) for j in jobs] == [
        ("done", 48, 48, None)
    ], jobs
    (sr,) = found["SR"]
    assert _evidence(dataset(orthanc, sr)) == sops

    storescu(gateway, files)  # the PACS re-sends the whole study
    wait_settled(gateway, 120, jobs=2)
    jobs, outputs = _store_jobs(gateway)
    assert [(j.state.value, j.n_processed, j.supersedes) for j in jobs] == [
        ("done", 48, None),
        ("done", 48, jobs[0].id),
    ], jobs
    assert [o.sop_instance_uid for o in outputs[jobs[1].id] if o.kind == "sr"] == [_sop(sr)]
    assert [_sop(i) for i in results(orthanc, study_uid, "SR")] == [_sop(sr)]


def test_instances_after_a_study_was_processed_make_the_whole_study_processed_again(
    start_gateway, orthanc, studies, tmp_path
):
    """Late instances: 40 of 48 instances are processed and delivered; the missing 8 come
    after. A new job supersedes the first, processes all 48, and its SR (new content: more
    evidence) carries new UIDs, so the PACS holds it beside the partial one."""
    files = _partial_copy(studies[0], tmp_path / "late", 48, "late-instances")
    sops = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]
    study_uid = _study_uid(files)
    gateway = start_gateway(spool={"study_idle_s": 1.0})
    storescu(gateway, files[:40])
    (partial,) = wait_results(orthanc, gateway, study_uid)["SR"]
    wait_settled(gateway)
    storescu(gateway, files[40:])
    wait_settled(gateway, 120, jobs=2)
    jobs, outputs = _store_jobs(gateway)
    assert [(j.state.value, j.n_instances, j.n_processed, j.supersedes) for j in jobs] == [
        ("done", 40, 40, None),
        ("done", 8, 48, jobs[0].id),
    ], jobs
    (first_sr,) = [o.sop_instance_uid for o in outputs[jobs[0].id] if o.kind == "sr"]
    (newest_sr,) = [o.sop_instance_uid for o in outputs[jobs[1].id] if o.kind == "sr"]
    assert first_sr == _sop(partial) and newest_sr != first_sr
    deadline = time.monotonic() + 30
    while len(results(orthanc, study_uid, "SR")) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    held = {_sop(i): dataset(orthanc, i) for i in results(orthanc, study_uid, "SR")}
    assert set(held) == {first_sr, newest_sr}
    assert _evidence(held[first_sr]) == set(sops[:40])
    assert _evidence(held[newest_sr]) == set(sops)
    assert held[newest_sr].SeriesInstanceUID != held[first_sr].SeriesInstanceUID


def test_readyz_is_not_ready_while_the_spool_is_below_its_free_space_floor(
    start_gateway, tmp_path, studies
):
    """A spool free-space floor above the disk's free space makes /readyz 503 with the reason."""
    floor_mb = shutil.disk_usage(tmp_path).free / 2**20 + 1024
    gateway = start_gateway(spool={"min_free_mb": floor_mb}, wait_ready=False)
    gateway.wait_listening()  # started: models loaded, SCP listening; only the floor is left
    status, reason = gateway.http_get("/readyz")
    assert status == 503, reason
    assert (
        "below its floor" in reason
        and "spool.min_free_mb" in reason
        and f"{floor_mb:.0f} MiB" in reason
    )
    storescu = require_tool("storescu", "dcmtk")
    refused = subprocess.run(
        [
            storescu,
            "-aet",
            "STORESCU",
            "-aec",
            "MEDSSL",
            "127.0.0.1",
            str(gateway.port),
            str(studies[2][0]),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert gateway.spooled() == [], refused.stdout + refused.stderr


def test_a_gateway_killed_during_inference_resumes_the_job(start_gateway, orthanc, studies):
    files = studies[4]
    study_uid = _study_uid(files)
    gateway = start_gateway()
    _push(orthanc, "GW", files)
    deadline = time.monotonic() + 60
    while not any(j["state"] == "running" for j in gateway.jobs()) and time.monotonic() < deadline:
        time.sleep(0.01)
    gateway.kill()
    assert [j["state"] for j in gateway.jobs()] == ["running"]
    gateway.start()
    wait_results(orthanc, gateway, study_uid)
    jobs = wait_settled(gateway)
    assert [(j["state"], j["attempts"]) for j in jobs] == [("done", 2)]
    time.sleep(1.0)
    assert len(results(orthanc, study_uid, "SR")) == 1


def test_results_wait_for_a_stopped_pacs_and_arrive_when_it_is_back(
    start_gateway, orthanc, studies
):
    files = studies[5]
    study_uid = _study_uid(files)
    gateway = start_gateway(spool={"study_idle_s": 1.0})
    _push(orthanc, "GW", files)
    orthanc.stop()
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            failed = [
                d for d in gateway.deliveries() if d["attempts"] >= 2 and d["state"] == "pending"
            ]
            if failed:
                break
            time.sleep(0.2)
        assert failed, f"no failed delivery attempt: {gateway.deliveries()}\n{gateway.log_tail()}"
        assert "orthanc" in failed[0]["error"].lower() or "127.0.0.1" in failed[0]["error"]
    finally:
        orthanc.start()
    wait_results(orthanc, gateway, study_uid)
    assert [j["state"] for j in wait_settled(gateway)] == ["done"]


@pytest.mark.filterwarnings("ignore:Expected explicit VR")
def test_garbage_and_truncated_datasets_are_rejected_while_a_good_study_goes_through(
    start_gateway, orthanc, studies, tmp_path, monkeypatch
):
    import threading

    import pynetdicom
    from pydicom.uid import generate_uid

    files = studies[2]
    gateway = start_gateway()
    # send the bad files' bytes as they are (pynetdicom would decode and re-encode them)
    monkeypatch.setattr(pynetdicom._config, "STORE_SEND_CHUNKED_DATASET", True)
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(part10(b"\x13\x37 not a dataset \xff" * 40, generate_uid()))
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(studies[6][0].read_bytes()[:-5000])  # cut inside Pixel Data
    pushed = threading.Thread(target=_push, args=(orthanc, "GW", files))
    pushed.start()
    ae = pynetdicom.AE(ae_title="STORESCU")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", gateway.port, ae_title="MEDSSL")
    assert assoc.is_established
    try:
        statuses = [int(assoc.send_c_store(p).Status) for p in (garbage, truncated)]
    finally:
        assoc.release()
    pushed.join(120)
    assert statuses == [0xC210, 0xC210]
    wait_results(orthanc, gateway, _study_uid(files))
    assert [j["state"] for j in wait_settled(gateway)] == ["done"]
    quarantined = sorted((gateway.spool / "quarantine").glob("*.json"))
    assert len(quarantined) == 2
    assert len(gateway.spooled()) == len(files)
    _status, metrics = gateway.http_get("/metrics")
    assert 'medssl_gateway_instances_rejected_total{reason="undecodable"} 2.0' in metrics


def test_sigterm_stops_accepting_and_a_restart_resumes(start_gateway, orthanc, studies):
    files = studies[6]
    study_uid = _study_uid(files)
    gateway = start_gateway(spool={"study_idle_s": 3.0})
    _push(orthanc, "GW", files)
    assert gateway.terminate(60) == 0
    assert [j["state"] for j in gateway.jobs()] == ["received"]
    gateway.start()
    wait_results(orthanc, gateway, study_uid)
    assert [j["state"] for j in wait_settled(gateway)] == ["done"]


def test_the_models_can_run_on_a_triton_server(
    start_gateway, orthanc, studies, triton_env, tmp_path
):
    from medssl.testing import LocalTritonServer
    from medssl.testing.triton import python_backend_repository

    repository = tmp_path / "triton_repository"
    python_backend_repository(REPOSITORY / DETECTOR, repository)
    files = studies[1]
    with LocalTritonServer(repository, env=triton_env) as server:
        gateway = start_gateway(repository=repository, models={"triton_url": server.http_url})
        assert gateway.http_get("/readyz")[0] == 200
        _push(orthanc, "GW", files)
        found = wait_results(orthanc, gateway, _study_uid(files))
        points = _sr_points(dataset(orthanc, found["SR"][0]))
    expected = _scored_findings(files, tmp_path)
    assert len(points) == len(expected) > 0
    assert (
        np.linalg.norm(points[:, None, :] - expected[None, :, :], axis=2).min(axis=1).max() <= 2.0
    )


def test_without_its_triton_server_the_gateway_receives_but_is_not_ready(
    start_gateway, studies, tmp_path
):
    from medssl.testing.orthanc import free_port

    dead = f"127.0.0.1:{free_port()}"
    gateway = start_gateway(models={"triton_url": dead}, wait_ready=False)
    deadline = time.monotonic() + 30
    while gateway.http_get("/healthz")[0] != 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    status, reason = gateway.http_get("/readyz")
    assert status == 503 and dead in reason
    gateway.wait_listening()  # receiving does not wait for the models
    storescu(gateway, studies[2][:5])
    assert len(gateway.spooled()) == 5
    started = time.monotonic()
    assert gateway.terminate(60) == 0
    assert time.monotonic() - started < 10, "SIGTERM waited for the Triton connection attempt"
