"""What viewers find in the detection SR: each finding and where it is, and "Absent".

Read three ways, as the viewers read it (see medssl/dicom/sr.py's module docstring for the sources):

* dcmqi's ``tid1500reader`` (PyPI ``dcmqi``), which 3D Slicer's QuantitativeReporting runs
  for a TID 1500 report without planar image regions; its JSON lists every measurement group
  and never a SCOORD/SCOORD3D, and Slicer pairs measurement ``i`` with segment ``i`` of the
  SEG the report lists as evidence;
* highdicom, as QuantitativeReporting does for planar reports (a SCOORD3D POINT group becomes
  a markups point; 2D SCOORD groups are not shown there);
* the rules of OHIF's TID 1500 parser (``_ohif_measurements`` below), which merges groups by
  Tracking Unique Identifier and needs a SCOORD or SCOORD3D in each merged measurement.

Fixtures (CT series, model card, two detections) come from tests/medssl/dicom/conftest.py.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes

from medssl.dicom import write_detection_sr
from medssl.dicom.seg import write_detection_seg
from tests.conftest import require_tool

#: DCM codes of the TID 1500 containers and items OHIF's parser looks for.
_IMAGING_MEASUREMENTS, _MEASUREMENT_GROUP, _TRACKING_UID = "126010", "125007", "112040"


@pytest.fixture(scope="session")
def tid1500reader():
    """Run dcmqi's tid1500reader on an SR file; returns its JSON (a dict).

    Skipped where dcmqi is not installed (``pip install dcmqi``, the test extra), except
    under CI, where its absence is a failure.
    """
    exe = require_tool("tid1500reader", "dcmqi", installer="pip install")

    def run(sr_path: Path) -> dict:
        out = sr_path.with_suffix(".json")
        result = subprocess.run(
            [exe, "--inputDICOM", str(sr_path), "--outputMetadata", str(out)],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        return json.loads(out.read_text())

    return run


def _ohif_measurements(sr: pydicom.Dataset) -> list[dict]:
    """The measurements OHIF's SR handler (extensions/cornerstone-dicom-sr/src/
    getSopClassHandlerModule.ts: ``_getMeasurements``, ``_processMeasurement``) makes of a
    TID 1500 report: groups of Imaging Measurements merged by Tracking Unique Identifier (a
    group without one is skipped), located by the first top-level SCOORD or SCOORD3D of the
    merged items, else by SCOORD/SCOORD3D children of NUM items; ``coords`` empty when none.

    Returns:
        one dict per measurement: ``uid``, ``label`` (tracking identifier) and ``coords``
        (``(ValueType, GraphicType, GraphicData, frame of reference or referenced SOP)``).
    """

    def code(item: pydicom.Dataset) -> str:
        return item.ConceptNameCodeSequence[0].CodeValue

    containers = [i for i in sr.ContentSequence if code(i) == _IMAGING_MEASUREMENTS]
    merged: dict[str, list[pydicom.Dataset]] = {}
    for container in containers:
        for group in container.ContentSequence:
            if code(group) != _MEASUREMENT_GROUP:
                continue
            uids = [i.UID for i in group.ContentSequence if code(i) == _TRACKING_UID]
            if uids:
                merged.setdefault(uids[0], []).extend(group.ContentSequence)

    def located(item: pydicom.Dataset) -> tuple:
        where = (
            item.get("ReferencedFrameOfReferenceUID")
            if item.ValueType == "SCOORD3D"
            else item.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        )
        return item.ValueType, item.GraphicType, [float(v) for v in item.GraphicData], where

    measurements = []
    for uid, items in merged.items():
        graphic = [i for i in items if i.ValueType in ("SCOORD", "SCOORD3D")]
        inferred = [
            c
            for i in items
            if i.ValueType == "NUM"
            for c in i.get("ContentSequence", [])
            if c.ValueType in ("SCOORD", "SCOORD3D")
        ]
        label = next(i.TextValue for i in items if i.ValueType == "TEXT" and code(i) == "112039")
        measurements.append(
            {"uid": uid, "label": label, "coords": [located(i) for i in (graphic[:1] or inferred)]}
        )
    return measurements


def test_slicer_and_ohif_find_each_finding_at_its_centre(
    tmp_path, ct, detections, card, dciodvfy, tid1500reader
):
    """Without and with the companion SEG, each finding is two TID 1410 groups with one
    tracking identifier and UID: first a 2D SCOORD POINT at its centre on the source image
    nearest it (what OHIF 3.13.2 draws: tests/medssl/dicom/test_viewer_ohif.py), then a SCOORD3D
    POINT in
    the source's frame of reference with the measurements (what QuantitativeReporting shows as
    a markups point). No TID 1411 group (before, the SEG doubled every finding with one); with
    the SEG, segment i is tracked as finding i."""
    volume, source = ct
    seg_path, seg = write_detection_seg(
        source, detections, card, volume.affine, volume.shape, tmp_path / "findings-seg.dcm"
    )
    frame_of_reference = source[0].FrameOfReferenceUID
    for companion in (None, seg):
        path = write_detection_sr(
            source,
            detections,
            card,
            tmp_path / f"sr-{companion is not None}.dcm",
            companion_seg=companion,
        )
        assert dciodvfy(path) == []
        sr = hd.sr.srread(path)
        report = hd.sr.MeasurementReport.from_sequence([sr])

        # highdicom, as QuantitativeReporting's planar branch reads it
        points = report.get_planar_roi_measurement_groups(
            graphic_type=hd.sr.GraphicTypeValues3D.POINT, reference_type=codes.DCM.ImageRegion
        )
        assert [g.tracking_identifier for g in points] == ["Nodule 1", "Nodule 2"]
        assert len(report.get_planar_roi_measurement_groups()) == 2 * len(detections)
        assert report.get_volumetric_roi_measurement_groups() == []
        for group, detection in zip(points, detections):
            assert group.roi.frame_of_reference_uid == frame_of_reference
            assert np.allclose(group.roi.value, [detection.centre_lps], atol=1e-3)

        # the 2D point of each finding: on the image whose plane is nearest the centre, at
        # the centre's (column, row) + 0.5 (SCOORD pixel coordinates), same tracking UID
        images = report.get_planar_roi_measurement_groups(
            graphic_type=hd.sr.GraphicTypeValues.POINT
        )
        assert [(g.tracking_identifier, g.tracking_uid) for g in images] == [
            (g.tracking_identifier, g.tracking_uid) for g in points
        ]
        by_uid = {str(ds.SOPInstanceUID): ds for ds in source}
        for group, detection in zip(images, detections):
            z, y, x = volume.world_to_index(np.array([detection.centre_lps]))[0]
            referenced = group.roi.ContentSequence[0].ReferencedSOPSequence[0]
            image = by_uid[referenced.ReferencedSOPInstanceUID]
            [nearest] = [
                ds
                for ds in source
                if np.allclose(
                    [float(v) for v in ds.ImagePositionPatient],
                    volume.index_to_world(np.array([[round(z), 0, 0]]))[0],
                    atol=1e-3,
                )
            ]
            assert image.SOPInstanceUID == nearest.SOPInstanceUID
            assert np.allclose(group.roi.value, [[x + 0.5, y + 0.5]], atol=1e-3)
            assert group.get_measurements() == []  # measurements once, in the 3D group

        # dcmqi: each finding's two groups in order, its measurements once, one tracking UID
        listed = tid1500reader(path)["Measurements"]
        assert [m["TrackingIdentifier"] for m in listed] == [
            "Nodule 1",
            "Nodule 1",
            "Nodule 2",
            "Nodule 2",
        ]
        assert [m["TrackingUniqueIdentifier"] for m in listed] == [
            uid for g in points for uid in (g.tracking_uid, g.tracking_uid)
        ]
        for measurement, detection in zip(listed[1::2], detections):
            values = {
                item["quantity"]["CodeMeaning"]: float(item["value"])
                for item in measurement["measurementItems"]
            }
            assert values == pytest.approx(
                {
                    "Diameter": detection.diameter_mm,
                    "Certainty of Finding": 100 * detection.probability,
                }
            )
        assert all(m["measurementItems"] == [] for m in listed[::2])

        # OHIF: one measurement per finding, placed by its first (2D) point on its image
        ohif = _ohif_measurements(sr)
        assert [m["label"] for m in ohif] == ["Nodule 1", "Nodule 2"]
        for measurement, group in zip(ohif, images):
            [(value_type, graphic_type, data, where)] = measurement["coords"]
            assert (value_type, graphic_type) == ("SCOORD", "POINT")
            referenced = group.roi.ContentSequence[0].ReferencedSOPSequence[0]
            assert where == referenced.ReferencedSOPInstanceUID
            assert np.allclose(data, np.asarray(group.roi.value).ravel(), atol=1e-3)

    # with the SEG: it is evidence (dcmqi's composite context, what Slicer loads with the
    # report), and its segment i carries finding i's tracking identifier and UID
    assert tid1500reader(path)["compositeContext"] == [seg.SOPInstanceUID]
    segmentation = hd.seg.segread(seg_path)
    for number, group in enumerate(points, start=1):
        description = segmentation.get_segment_description(number)
        assert (description.tracking_id, description.tracking_uid) == (
            group.tracking_identifier,
            group.tracking_uid,
        )


def test_a_report_without_findings_says_absent_to_slicer_ohif_and_highdicom(
    tmp_path, ct, card, dciodvfy, tid1500reader
):
    """Before, dcmqi listed no measurement at all (QuantitativeReporting then fails on
    ``Measurements[0]``): now one TID 1501 group "Nodule: Absent" with the evaluation
    Nodule = Absent, beside the document-level Qualitative Evaluations. It has no tracking
    UID, so OHIF, which would need coordinates for a tracked group, skips it."""
    _, source = ct
    path = write_detection_sr(source, [], card, tmp_path / "sr.dcm")
    assert dciodvfy(path) == []

    [listed] = tid1500reader(path)["Measurements"]
    assert listed["TrackingIdentifier"] == "Nodule: Absent"
    assert "TrackingUniqueIdentifier" not in listed
    assert listed["Finding"]["CodeValue"] == "27925004"
    assert listed["measurementItems"] == []
    assert {
        "conceptCode": {
            "CodeMeaning": "Nodule",
            "CodeValue": "27925004",
            "CodingSchemeDesignator": "SCT",
        },
        "conceptValue": {
            "CodeMeaning": "Absent",
            "CodeValue": "272519000",
            "CodingSchemeDesignator": "SCT",
        },
    } in listed["qualitativeEvaluations"]

    sr = hd.sr.srread(path)
    report = hd.sr.MeasurementReport.from_sequence([sr])
    assert report.get_planar_roi_measurement_groups() == []  # Slicer takes the dcmqi branch
    [group] = report.get_image_measurement_groups()
    assert group.tracking_identifier == "Nodule: Absent" and group.tracking_uid is None
    assert group.finding_type == codes.SCT.Nodule
    [evaluation] = group.get_qualitative_evaluations(name=codes.SCT.Nodule)
    assert evaluation.value == codes.SCT.Absent
    [document_level] = [
        item
        for item in sr.ContentSequence
        if item.ConceptNameCodeSequence[0].CodeMeaning == "Qualitative Evaluations"
    ]
    assert document_level.ContentSequence[0].ConceptCodeSequence[0].CodeValue == "272519000"

    assert _ohif_measurements(sr) == []
