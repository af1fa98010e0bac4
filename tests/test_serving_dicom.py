"""SR and SEG result writers: valid DICOM (dciodvfy, dcmtk), read back by highdicom, stable UIDs."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes

from medssl import Volume, affine_from_geometry
from medssl.io import SeriesInfo, write_dicom_series
from medssl.models import load_card
from medssl.pipeline.detect import Detection
from medssl.serving import (
    derived_uid,
    detection_sr,
    label_seg,
    write_detection_sr,
    write_label_seg,
)
from tests.conftest import oblique_direction, require_tool

CARD_DIR = Path(__file__).resolve().parents[1] / "model_repository" / "focalmix-nodules"
SHAPE = (16, 64, 64)
NODULES = [((8.0, 30.0, 35.0), 8.0, 0.93), ((4.0, 50.0, 12.0), 5.0, 0.41)]  # voxel zyx, mm, p


@pytest.fixture(scope="module")
def card():
    return load_card(CARD_DIR)


@pytest.fixture(scope="module")
def ct(tmp_path_factory):
    """A 16-slice 64 x 64 oblique CT series: its Volume and its datasets (headers only), in
    slice order."""
    volume = Volume(np.full(SHAPE, -800.0, np.float32),
                    affine_from_geometry((-40.0, -60.0, -120.0), (2.0, 1.25, 1.25),
                                         oblique_direction(20)))
    folder = tmp_path_factory.mktemp("ct")
    paths = write_dicom_series(volume, folder, SeriesInfo(uid_seed="serving"))
    return volume, [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]


@pytest.fixture(scope="module")
def detections(ct):
    volume, _ = ct
    return [Detection(tuple(float(c) for c in volume.index_to_world(zyx)), d, p, zyx)
            for zyx, d, p in NODULES]


def _sphere(volume: Volume, centre_zyx, diameter_mm: float) -> np.ndarray:
    """uint8 mask ``(Z, Y, X)``: 1 within ``diameter_mm / 2`` of the voxel centre."""
    offsets = np.indices(volume.shape).reshape(3, -1).T - np.asarray(centre_zyx)
    distance = np.linalg.norm(offsets * volume.spacing, axis=1)
    return (distance <= diameter_mm / 2).reshape(volume.shape).astype(np.uint8)


def _report(path: Path) -> tuple[hd.sr.Comprehensive3DSR, hd.sr.MeasurementReport]:
    sr = hd.sr.srread(path)
    return sr, hd.sr.MeasurementReport.from_sequence([sr])


# -- SR --------------------------------------------------------------------------------------


def test_sr_with_detections_is_a_valid_tid1500_report(tmp_path, ct, detections, card, dciodvfy):
    volume, source = ct
    path = write_detection_sr(source, detections, card, tmp_path / "sr.dcm")
    assert dciodvfy(path) == []
    sr, report = _report(path)
    assert sr.SOPClassUID == pydicom.uid.Comprehensive3DSRStorage
    assert (sr.PatientID, sr.StudyInstanceUID) == (source[0].PatientID, source[0].StudyInstanceUID)
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    series_uid, frame_uid = source[0].SeriesInstanceUID, source[0].FrameOfReferenceUID
    assert sr.get_evidence_series() == [(source[0].StudyInstanceUID, series_uid)]
    assert {e[2] for e in sr.get_evidence()} == {ds.SOPInstanceUID for ds in source}

    [observer] = report.get_observer_contexts()
    assert observer.observer_type == codes.DCM.Device
    assert observer.observer_identifying_attributes.name == "focalmix-nodules v1"

    groups = report.get_volumetric_roi_measurement_groups()
    assert [g.tracking_identifier for g in groups] == ["Nodule 1", "Nodule 2"]
    assert len({g.tracking_uid for g in groups}) == 2
    for group, detection in zip(groups, detections):
        assert group.finding_type == codes.SCT.Nodule
        assert group.finding_category == hd.sr.CodedConcept(
            "49755003", "SCT", "Morphologically abnormal structure")
        assert [site.value for site in group.finding_sites] == [codes.SCT.Lung]
        [diameter] = group.get_measurements(name=codes.SCT.Diameter)
        assert diameter.value == pytest.approx(detection.diameter_mm)
        assert diameter.unit == codes.UCUM.Millimeter
        [certainty] = group.get_measurements(name=codes.DCM.CertaintyOfFinding)
        assert certainty.value == pytest.approx(100 * detection.probability)
        assert certainty.unit == codes.UCUM.Percent
        surface = group.roi
        assert surface.graphic_type == hd.sr.GraphicTypeValues3D.POINT
        assert surface.frame_of_reference_uid == frame_uid
        assert np.allclose(surface.graphic_data, [detection.centre_lps], atol=1e-3)
        assert surface.source_series_for_segmentation.value == series_uid
        # the point is the detection's voxel centre in the source volume (LPS mm)
        index = volume.world_to_index(np.asarray(surface.graphic_data[0]))
        assert np.allclose(index, detection.centre_voxel, atol=1e-3)
        algorithm = group[0].ContentSequence
        names = {item.ConceptNameCodeSequence[0].CodeMeaning: item.get("TextValue")
                 for item in algorithm}
        assert names["Algorithm Name"] == "focalmix-nodules"
        assert names["Algorithm Version"] == "1"


def test_sr_without_detections_is_a_valid_no_findings_report(tmp_path, ct, card, dciodvfy):
    _, source = ct
    path = write_detection_sr(source, [], card, tmp_path / "sr.dcm")
    assert dciodvfy(path) == []
    sr, report = _report(path)
    assert report.get_volumetric_roi_measurement_groups() == []
    [evaluations] = [item for item in sr.ContentSequence
                     if item.ConceptNameCodeSequence[0].CodeMeaning == "Qualitative Evaluations"]
    [absent] = evaluations.ContentSequence
    assert absent.ConceptNameCodeSequence[0].CodeValue == "27925004"  # Nodule
    assert absent.ConceptCodeSequence[0].CodeValue == codes.SCT.Absent.value
    assert sr.get_evidence_series() == [(source[0].StudyInstanceUID, source[0].SeriesInstanceUID)]


def test_dcmtk_reads_both_reports(tmp_path, ct, detections, card):
    exe = require_tool("dsrdump", "dcmtk")
    _, source = ct
    for found, expected in ((detections, ['"Nodule 2"', '"Certainty of Finding")="41.0" (%,UCUM']),
                            ([], ['(272519000,SCT,"Absent")'])):
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
        for i in range(2))
    seg_first, seg_again = (
        pydicom.dcmread(write_label_seg(source, labels, card, tmp_path / f"seg{i}.dcm"))
        for i in range(2))
    assert _uids(sr_first) == _uids(sr_again)
    assert _uids(seg_first) == _uids(seg_again)
    tracking = [g.tracking_uid for g in hd.sr.MeasurementReport.from_sequence(
        [sr_first]).get_volumetric_roi_measurement_groups()]
    assert tracking == [g.tracking_uid for g in hd.sr.MeasurementReport.from_sequence(
        [sr_again]).get_volumetric_roi_measurement_groups()]

    v2 = dataclasses.replace(card, version=2)
    every = {*_uids(sr_first), *_uids(seg_first), *_uids(detection_sr(source, detections, v2)),
             *_uids(label_seg(source, labels, v2))}
    assert len(every) == 8
    series = source[0].SeriesInstanceUID
    assert _uids(sr_first)[0] == derived_uid(series, card.name, card.version, "sr-series")
    assert derived_uid(series, card.name, 1, "sr-series") != derived_uid("1.2.3", card.name, 1,
                                                                         "sr-series")


# -- SEG -------------------------------------------------------------------------------------


def test_seg_of_a_nodule_is_a_valid_binary_seg_with_the_same_mask(tmp_path, ct, card, dciodvfy):
    volume, source = ct
    labels = _sphere(volume, *NODULES[0][:2])
    assert labels.sum() > 20
    path = write_label_seg(source, labels, card, tmp_path / "seg.dcm")
    assert dciodvfy(path) == []
    seg = hd.seg.segread(path)
    assert seg.SegmentationType == "BINARY"
    assert seg.FrameOfReferenceUID == source[0].FrameOfReferenceUID
    description = seg.get_segment_description(1)
    assert seg.number_of_segments == 1
    assert description.segment_label == "Nodule"
    assert description.algorithm_type == hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
    assert description.algorithm_identification[0].AlgorithmName == "focalmix-nodules"
    assert description.segmented_property_type == codes.SCT.Nodule
    assert description.anatomic_regions == [codes.SCT.Lung]
    mask = seg.get_pixels_by_source_instance(
        [ds.SOPInstanceUID for ds in source], segment_numbers=[1],
        assert_missing_frames_are_empty=True)
    assert np.array_equal(mask[..., 0], labels)


def test_seg_of_an_empty_volume_keeps_the_segment_and_empty_frames(tmp_path, ct, card, dciodvfy):
    _, source = ct
    path = write_label_seg(source, np.zeros(SHAPE, np.uint8), card, tmp_path / "seg.dcm")
    assert dciodvfy(path) == []
    seg = hd.seg.segread(path)
    assert seg.number_of_segments == 1
    mask = seg.get_pixels_by_source_instance([ds.SOPInstanceUID for ds in source],
                                             segment_numbers=[1])
    assert mask.shape == (*SHAPE, 1) and not mask.any()


def test_seg_rejects_labels_whose_shape_disagrees_with_the_series(ct, card):
    _, source = ct
    with pytest.raises(ValueError, match=r"\(15, 64, 64\).*\(16, 64, 64\)"):
        label_seg(source, np.zeros((15, 64, 64), np.uint8), card)


def test_seg_rejects_a_label_value_not_in_the_card(ct, card):
    _, source = ct
    labels = np.zeros(SHAPE, np.uint8)
    labels[3, 4, 5] = 7
    with pytest.raises(ValueError, match=r"values \[7\].*focalmix-nodules"):
        label_seg(source, labels, card)
