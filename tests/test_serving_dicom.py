"""SR and SEG result writers: valid DICOM (dciodvfy, dcmtk), read back by highdicom, stable UIDs,
on classic and Enhanced CT sources; the Enhanced CT writer that makes the latter."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes

from medssl import Volume, __version__, affine_from_geometry
from medssl.dicom import (
    derived_uid,
    detection_sr,
    label_seg,
    write_detection_sr,
    write_label_seg,
)
from medssl.dicom.seg import detection_seg, frame_slices, write_detection_seg
from medssl.finding import Finding
from medssl.io import SeriesInfo, read_volume, write_dicom_series
from medssl.io.dicom_enhanced import write_enhanced_ct
from medssl.models import load_card
from tests.conftest import oblique_direction, require_tool

#: A finding's SCOORD3D group in our SRs (each finding also has a 2D point group first:
#: tests/test_sr_viewers.py).
POINT3D = hd.sr.GraphicTypeValues3D.POINT

CARD_DIR = Path(__file__).resolve().parents[1] / "model_repository" / "focalmix-nodules"
SHAPE = (16, 64, 64)
NODULES = [((8.0, 30.0, 35.0), 8.0, 0.93), ((4.0, 50.0, 12.0), 5.0, 0.41)]  # voxel zyx, mm, p


@pytest.fixture(scope="module")
def card():
    return load_card(CARD_DIR)


#: Patient and study attributes every result object copies from its source.
COPIED = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyID",
    "AccessionNumber",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)
INFO = dict(
    patient_name="Doe^Jane",
    patient_id="P-0042",
    patient_birth_date="19580214",
    patient_sex="F",
    study_id="77",
    accession_number="ACC-9",
    study_date="20250304",
    study_time="101500",
)


def _oblique_volume() -> Volume:
    """16 slices of 64 x 64 (2 x 1.25 x 1.25 mm), rotated 20 degrees about S; every voxel
    value differs (a flipped or shifted frame would show)."""
    values = (np.arange(np.prod(SHAPE)) % 2000 - 1000).astype(np.float32).reshape(SHAPE)
    return Volume(
        values,
        affine_from_geometry((-40.0, -60.0, -120.0), (2.0, 1.25, 1.25), oblique_direction(20)),
    )


@pytest.fixture(scope="module")
def ct(tmp_path_factory):
    """A 16-slice 64 x 64 oblique CT series: its Volume and its datasets (headers only), in
    slice order."""
    volume = _oblique_volume()
    folder = tmp_path_factory.mktemp("ct")
    paths = write_dicom_series(volume, folder, SeriesInfo(uid_seed="serving", **INFO))
    return volume, [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]


@pytest.fixture(scope="module")
def enhanced_ct(tmp_path_factory):
    """The same volume as one Enhanced CT file whose frames are stored out of slice order
    (frame k is slice ``ORDER[k]``): the path, the volume, the dataset (headers only)."""
    volume = _oblique_volume()
    path = write_enhanced_ct(
        volume,
        tmp_path_factory.mktemp("enhanced") / "ct.dcm",
        SeriesInfo(uid_seed="serving-enhanced", **INFO),
    )
    ds = pydicom.dcmread(path)
    frames = ds.pixel_array.reshape(SHAPE)
    items = list(ds.PerFrameFunctionalGroupsSequence)
    ds.PerFrameFunctionalGroupsSequence = [items[z] for z in ORDER]
    ds.PixelData = np.ascontiguousarray(frames[ORDER]).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path, volume, pydicom.dcmread(path, stop_before_pixels=True)


ORDER = np.random.default_rng(7).permutation(SHAPE[0])


@pytest.fixture(scope="module")
def detections(ct):
    volume, _ = ct
    return [
        Finding(
            centre_lps=tuple(float(c) for c in volume.index_to_world(zyx)),
            diameter_mm=d,
            probability=p,
            centre_voxel=zyx,
        )
        for zyx, d, p in NODULES
    ]


def _sphere(volume: Volume, centre_zyx, diameter_mm: float) -> np.ndarray:
    """uint8 mask ``(Z, Y, X)``: 1 within ``diameter_mm / 2`` of the voxel centre."""
    offsets = np.indices(volume.shape).reshape(3, -1).T - np.asarray(centre_zyx)
    distance = np.linalg.norm(offsets * volume.spacing, axis=1)
    return (distance <= diameter_mm / 2).reshape(volume.shape).astype(np.uint8)


def _report(path: Path) -> tuple[hd.sr.Comprehensive3DSR, hd.sr.MeasurementReport]:
    sr = hd.sr.srread(path)
    return sr, hd.sr.MeasurementReport.from_sequence([sr])


def _assert_names_model_and_copies_source(output, source, card) -> None:
    """The object carries the source's patient and study, and a Contributing Equipment item
    naming the model as processing equipment (CID 7005)."""
    for keyword in COPIED:
        assert output.get(keyword) == source.get(keyword), keyword
    [item] = [
        e for e in output.ContributingEquipmentSequence if e.ManufacturerModelName == card.name
    ]
    purpose = item.PurposeOfReferenceCodeSequence[0]
    assert (purpose.CodeValue, purpose.CodingSchemeDesignator) == ("109102", "DCM")
    assert list(item.SoftwareVersions) == [f"{card.name} v{card.version}", f"medssl {__version__}"]
    assert item.Manufacturer == "medssl" and item.ContributionDateTime
    assert card.name in item.ContributionDescription


# -- SR --------------------------------------------------------------------------------------


def test_sr_with_detections_is_a_valid_tid1500_report_of_planar_point_groups(
    tmp_path, ct, detections, card, dciodvfy
):
    volume, source = ct
    path = write_detection_sr(source, detections, card, tmp_path / "sr.dcm")
    assert dciodvfy(path) == []
    sr, report = _report(path)
    assert sr.SOPClassUID == pydicom.uid.Comprehensive3DSRStorage
    _assert_names_model_and_copies_source(sr, source[0], card)
    assert sr.SeriesDescription == "focalmix-nodules v1 findings"
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    series_uid, frame_uid = source[0].SeriesInstanceUID, source[0].FrameOfReferenceUID
    assert sr.get_evidence_series() == [(source[0].StudyInstanceUID, series_uid)]
    assert {e[2] for e in sr.get_evidence()} == {ds.SOPInstanceUID for ds in source}

    [observer] = report.get_observer_contexts()
    assert observer.observer_type == codes.DCM.Device
    assert observer.observer_identifying_attributes.name == "focalmix-nodules v1"

    assert report.get_volumetric_roi_measurement_groups() == []
    every = report.get_planar_roi_measurement_groups()
    assert [g[0].ContentTemplateSequence[0].TemplateIdentifier for g in every] == ["1410"] * 4
    # each finding: a 2D point group on its image (tests/test_sr_viewers.py), then this one
    groups = report.get_planar_roi_measurement_groups(graphic_type=POINT3D)
    assert [g.tracking_identifier for g in groups] == ["Nodule 1", "Nodule 2"]
    assert len({g.tracking_uid for g in groups}) == 2
    assert [g.tracking_uid for g in every] == [g.tracking_uid for g in groups for _ in "2D"]
    for group, detection in zip(groups, detections):
        assert group.finding_type == codes.SCT.Nodule
        assert group.finding_category == hd.sr.CodedConcept(
            "49755003", "SCT", "Morphologically abnormal structure"
        )
        assert [site.value for site in group.finding_sites] == [codes.SCT.Lung]
        [diameter] = group.get_measurements(name=codes.SCT.Diameter)
        assert diameter.value == pytest.approx(detection.diameter_mm)
        assert diameter.unit == codes.UCUM.Millimeter
        [certainty] = group.get_measurements(name=codes.DCM.CertaintyOfFinding)
        assert certainty.value == pytest.approx(100 * detection.probability)
        assert certainty.unit == codes.UCUM.Percent
        region = group.roi
        assert isinstance(region, hd.sr.ImageRegion3D)  # SCOORD3D, no image to choose
        assert region.graphic_type == hd.sr.GraphicTypeValues3D.POINT
        assert region.frame_of_reference_uid == frame_uid
        assert np.allclose(region.value, [detection.centre_lps], atol=1e-3)
        # the point is the detection's voxel centre in the source volume (LPS mm)
        index = volume.world_to_index(np.asarray(region.value[0]))
        assert np.allclose(index, detection.centre_voxel, atol=1e-3)
        algorithm = group[0].ContentSequence
        names = {
            item.ConceptNameCodeSequence[0].CodeMeaning: item.get("TextValue") for item in algorithm
        }
        assert names["Algorithm Name"] == "focalmix-nodules"
        assert names["Algorithm Version"] == "1"


def test_sr_without_detections_is_a_valid_no_findings_report(tmp_path, ct, card, dciodvfy):
    _, source = ct
    path = write_detection_sr(source, [], card, tmp_path / "sr.dcm")
    assert dciodvfy(path) == []
    sr, report = _report(path)
    assert report.get_planar_roi_measurement_groups(graphic_type=POINT3D) == []
    _assert_names_model_and_copies_source(sr, source[0], card)
    [evaluations] = [
        item
        for item in sr.ContentSequence
        if item.ConceptNameCodeSequence[0].CodeMeaning == "Qualitative Evaluations"
    ]
    [absent] = evaluations.ContentSequence
    assert absent.ConceptNameCodeSequence[0].CodeValue == "27925004"  # Nodule
    assert absent.ConceptCodeSequence[0].CodeValue == codes.SCT.Absent.value
    assert sr.get_evidence_series() == [(source[0].StudyInstanceUID, source[0].SeriesInstanceUID)]


def test_dcmtk_reads_both_reports(tmp_path, ct, detections, card):
    exe = require_tool("dsrdump", "dcmtk")
    _, source = ct
    for found, expected in (
        (detections, ['"Nodule 2"', '"Certainty of Finding")="41.0" (%,UCUM']),
        ([], ['(272519000,SCT,"Absent")']),
    ):
        path = write_detection_sr(source, found, card, tmp_path / f"sr{len(found)}.dcm")
        result = subprocess.run([exe, str(path)], capture_output=True, text=True, check=False)
        assert result.returncode == 0 and not result.stderr, result.stderr
        assert "Imaging Measurement Report" in result.stdout
        for text in expected:
            assert text in result.stdout


def test_sr_rejects_a_detection_outside_the_probability_range(ct, detections, card):
    _, source = ct
    bad = dataclasses.replace(detections[1], probability=1.5)
    with pytest.raises(ValueError, match=r"detection 1: probability .* got 1\.5"):
        detection_sr(source, [detections[0], bad], card)


# -- UIDs ------------------------------------------------------------------------------------


def _uids(dataset) -> tuple[str, ...]:
    return str(dataset.SeriesInstanceUID), str(dataset.SOPInstanceUID)


def test_output_uids_repeat_for_a_retry_and_change_with_the_model_version(
    tmp_path, ct, detections, card
):
    volume, source = ct
    labels = _sphere(volume, *NODULES[0][:2])
    sr_first, sr_again = (
        pydicom.dcmread(write_detection_sr(source, detections, card, tmp_path / f"sr{i}.dcm"))
        for i in range(2)
    )
    seg_first, seg_again = (
        pydicom.dcmread(write_label_seg(source, labels, card, tmp_path / f"seg{i}.dcm"))
        for i in range(2)
    )
    assert _uids(sr_first) == _uids(sr_again)
    assert _uids(seg_first) == _uids(seg_again)
    tracking = [
        g.tracking_uid
        for g in hd.sr.MeasurementReport.from_sequence(
            [sr_first]
        ).get_planar_roi_measurement_groups(graphic_type=POINT3D)
    ]
    assert tracking == [
        g.tracking_uid
        for g in hd.sr.MeasurementReport.from_sequence(
            [sr_again]
        ).get_planar_roi_measurement_groups(graphic_type=POINT3D)
    ]

    v2 = dataclasses.replace(card, version=2)
    every = {
        *_uids(sr_first),
        *_uids(seg_first),
        *_uids(detection_sr(source, detections, v2)),
        *_uids(label_seg(source, labels, v2)),
    }
    assert len(every) == 8
    series = source[0].SeriesInstanceUID
    assert derived_uid(series, card.name, 1, "sr-series", content="a") != derived_uid(
        "1.2.3", card.name, 1, "sr-series", content="a"
    )
    assert derived_uid(series, card.name, 1, "sr-series", content="a") != derived_uid(
        series, card.name, 1, "sr-series", content="b"
    )


# -- SEG -------------------------------------------------------------------------------------


def test_seg_of_a_nodule_is_a_valid_binary_seg_with_the_same_mask_and_only_non_empty_frames(
    tmp_path, ct, card, dciodvfy
):
    volume, source = ct
    labels = _sphere(volume, *NODULES[0][:2])
    assert labels.sum() > 20
    path = write_label_seg(source, labels, card, tmp_path / "seg.dcm")
    assert dciodvfy(path) == []
    seg = hd.seg.segread(path)
    assert seg.SegmentationType == "BINARY"
    assert seg.NumberOfFrames == int(labels.any(axis=(1, 2)).sum()) < SHAPE[0]  # sparse
    dense = write_label_seg(source, labels, card, tmp_path / "dense.dcm", omit_empty_frames=False)
    assert dciodvfy(dense) == [] and hd.seg.segread(dense).NumberOfFrames == SHAPE[0]
    _assert_names_model_and_copies_source(seg, source[0], card)
    assert seg.FrameOfReferenceUID == source[0].FrameOfReferenceUID
    description = seg.get_segment_description(1)
    assert seg.number_of_segments == 1
    assert description.segment_label == "Nodule"
    assert description.algorithm_type == hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
    assert description.algorithm_identification[0].AlgorithmName == "focalmix-nodules"
    assert description.segmented_property_type == codes.SCT.Nodule
    assert description.anatomic_regions == [codes.SCT.Lung]
    mask = seg.get_pixels_by_source_instance(
        [ds.SOPInstanceUID for ds in source],
        segment_numbers=[1],
        assert_missing_frames_are_empty=True,
    )
    assert np.array_equal(mask[..., 0], labels)


def test_seg_of_an_empty_volume_keeps_the_segment_and_empty_frames(tmp_path, ct, card, dciodvfy):
    _, source = ct
    path = write_label_seg(source, np.zeros(SHAPE, np.uint8), card, tmp_path / "seg.dcm")
    assert dciodvfy(path) == []
    seg = hd.seg.segread(path)
    assert seg.number_of_segments == 1
    mask = seg.get_pixels_by_source_instance(
        [ds.SOPInstanceUID for ds in source], segment_numbers=[1]
    )
    assert mask.shape == (*SHAPE, 1) and not mask.any()


def test_seg_rejects_labels_whose_shape_disagrees_with_the_series(ct, card):
    _, source = ct
    with pytest.raises(ValueError, match=r"\(15, 64, 64\).*\(16, 64, 64\)"):
        label_seg(source, np.zeros((15, 64, 64), np.uint8), card)


def test_frames_off_the_grid_are_refused_with_the_frame_named(ct):
    volume, source = ct
    shifted = volume.affine.copy()
    shifted[:3, 3] += 0.5 * volume.affine[:3, 1]  # half a row
    with pytest.raises(ValueError, match=r"source frame 1 at .* not the first voxel"):
        frame_slices(source, shifted, SHAPE[0])


def test_seg_rejects_a_label_value_not_in_the_card(ct, card):
    _, source = ct
    labels = np.zeros(SHAPE, np.uint8)
    labels[3, 4, 5] = 7
    with pytest.raises(ValueError, match=r"values \[7\].*focalmix-nodules"):
        label_seg(source, labels, card)


# -- companion SEG of the detections -----------------------------------------------------------


def test_companion_seg_has_a_sphere_per_detection_tracked_like_the_sr_findings(
    tmp_path, ct, detections, card, dciodvfy
):
    volume, source = ct
    seg_path, seg = write_detection_seg(
        source, detections, card, volume.affine, volume.shape, tmp_path / "findings-seg.dcm"
    )
    sr_path = write_detection_sr(source, detections, card, tmp_path / "sr.dcm", companion_seg=seg)
    assert dciodvfy(seg_path) == [] and dciodvfy(sr_path) == []
    seg = hd.seg.segread(seg_path)
    assert seg.SegmentationType == "BINARY" and seg.number_of_segments == 2
    again = detection_seg(source, detections, card, volume.affine, volume.shape)
    assert (seg.SeriesInstanceUID, seg.SOPInstanceUID) == _uids(again)  # a retry repeats them
    assert seg.SOPInstanceUID not in _uids(
        detection_seg(source, detections[:1], card, volume.affine, volume.shape)
    )
    _assert_names_model_and_copies_source(seg, source[0], card)
    masks = seg.get_pixels_by_source_instance(
        [ds.SOPInstanceUID for ds in source],
        segment_numbers=[1, 2],
        assert_missing_frames_are_empty=True,
    )
    for i, (zyx, diameter, _) in enumerate(NODULES):
        assert np.array_equal(masks[..., i], _sphere(volume, zyx, diameter))

    sr, report = _report(sr_path)
    _assert_names_model_and_copies_source(sr, source[0], card)
    # one TID 1410 group per finding (tests/test_sr_viewers.py: why no TID 1411 group);
    # segment i of the SEG is tracked like finding i's group
    planar = report.get_planar_roi_measurement_groups(graphic_type=POINT3D)
    assert report.get_volumetric_roi_measurement_groups() == []
    assert [g.tracking_identifier for g in planar] == ["Nodule 1", "Nodule 2"]
    for number, (group, detection) in enumerate(zip(planar, detections), start=1):
        description = seg.get_segment_description(number)
        assert (description.tracking_id, description.tracking_uid) == (
            group.tracking_identifier,
            group.tracking_uid,
        )
        assert description.segment_label == f"Nodule {number}"
        assert np.allclose(group.roi.value, [detection.centre_lps], atol=1e-3)
        [diameter] = group.get_measurements(name=codes.SCT.Diameter)
        assert diameter.value == pytest.approx(detection.diameter_mm)
    # the SEG is evidence of the report, beside the CT series
    assert (sr.StudyInstanceUID, seg.SeriesInstanceUID) in sr.get_evidence_series()


def test_companion_seg_refuses_no_detections_and_a_mismatched_report(ct, detections, card):
    volume, source = ct
    with pytest.raises(ValueError, match="at least one detection"):
        detection_seg(source, [], card, volume.affine, volume.shape)
    seg = detection_seg(source, detections[:1], card, volume.affine, volume.shape)
    with pytest.raises(ValueError, match=r"companion_seg has 1 segments; one per detection \(2\)"):
        detection_sr(source, detections, card, companion_seg=seg)
    outside = dataclasses.replace(detections[0], centre_lps=(900.0, 0.0, 0.0))
    with pytest.raises(ValueError, match=r"detection 0: centre \(900.0, 0.0, 0.0\) mm .* outside"):
        detection_seg(source, [outside], card, volume.affine, volume.shape)


# -- Enhanced CT sources -----------------------------------------------------------------------


def test_enhanced_ct_writer_gives_a_valid_file_that_reads_back_as_the_volume(
    tmp_path, enhanced_ct, dciodvfy
):
    volume = _oblique_volume()
    path = write_enhanced_ct(volume, tmp_path / "ct.dcm", SeriesInfo(uid_seed="roundtrip"))
    assert dciodvfy(path) == []
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2.1" and ds.NumberOfFrames == SHAPE[0]
    for written in (path, enhanced_ct[0]):  # frames in slice order, and shuffled
        back = read_volume(written)
        assert back.meta["format"] == "dicom-enhanced"
        assert np.array_equal(back.array, volume.array)
        assert np.allclose(back.affine, volume.affine, atol=1e-4)


def test_reports_on_an_enhanced_ct_are_valid_and_reference_it(
    tmp_path, enhanced_ct, detections, card, dciodvfy
):
    _, _, ds = enhanced_ct
    seg_path, seg = write_detection_seg(
        [ds], detections, card, _oblique_volume().affine, SHAPE, tmp_path / "findings-seg.dcm"
    )
    for found, companion in ((detections, seg), (detections, None), ([], None)):
        path = write_detection_sr([ds], found, card, tmp_path / "sr.dcm", companion_seg=companion)
        assert dciodvfy(path) == []
        sr, report = _report(path)
        _assert_names_model_and_copies_source(sr, ds, card)
        assert (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID) in [
            e[:3] for e in sr.get_evidence()
        ]
        assert len(report.get_planar_roi_measurement_groups(graphic_type=POINT3D)) == len(found)
        # each finding's 2D point names the frame holding its slice (frames are out of order)
        images = report.get_planar_roi_measurement_groups(
            graphic_type=hd.sr.GraphicTypeValues.POINT
        )
        for group, detection in zip(images, found):
            [reference] = group.roi.ContentSequence[0].ReferencedSOPSequence
            assert reference.ReferencedSOPInstanceUID == ds.SOPInstanceUID
            z, y, x = detection.centre_voxel
            assert ORDER[int(reference.ReferencedFrameNumber) - 1] == round(z)
            assert np.allclose(group.roi.value, [[x + 0.5, y + 0.5]], atol=1e-3)
    assert dciodvfy(seg_path) == []


def test_seg_on_an_enhanced_ct_follows_its_frame_order(tmp_path, enhanced_ct, card, dciodvfy):
    """Mask frame k is the file's frame k (here slice ORDER[k]), mapped by plane position."""
    _, volume, ds = enhanced_ct
    labels = _sphere(volume, *NODULES[0][:2])
    slices = frame_slices([ds], volume.affine, SHAPE[0])
    assert np.array_equal(slices, ORDER)
    path = write_label_seg([ds], labels[slices], card, tmp_path / "seg.dcm")
    assert dciodvfy(path) == []
    seg = hd.seg.segread(path)
    assert seg.NumberOfFrames == int(labels.any(axis=(1, 2)).sum())  # empty frames omitted
    _assert_names_model_and_copies_source(seg, ds, card)
    frames = seg.get_pixels_by_source_frame(
        ds.SOPInstanceUID,
        list(range(1, SHAPE[0] + 1)),
        segment_numbers=[1],
        assert_missing_frames_are_empty=True,
    )
    assert np.array_equal(frames[..., 0], labels[ORDER])
