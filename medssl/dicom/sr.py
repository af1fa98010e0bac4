"""Detections as a DICOM Comprehensive 3D SR: a TID 1500 Measurement Report (IHE AI Results).

Structure of the document (PS3.16 template numbers)::

    TID 1500  Imaging Measurement Report
      TID 1204  Language of content: English
      TID 1001  Observation context: device observer = the model (UID, "name vN", manufacturer)
      Procedure reported (default: CT unspecified body region)
      Imaging Measurements
        TID 1410  Planar ROI Measurements, two groups per detection, in this order:
          (a) the finding on an image
          Tracking Identifier "<label name> <i>" + Tracking Unique Identifier (derived UID)
          Finding category / Finding          <- Label.category / Label.type (e.g. Nodule)
          Finding Site                        <- Label.anatomic_region (e.g. Lung), if any
          Algorithm Identification (TID 4019) <- card name and version, family AI
          Image Region: SCOORD POINT (column, row) at the centre, SELECTED FROM the source
                        image (and frame) whose plane is nearest the centre
          (b) the finding in 3D, with its measurements
          the same tracking identifier and UID, codes, site and algorithm
          Image Region: SCOORD3D POINT at the centre (LPS mm, the source's frame of reference)
          Diameter (SCT 81827009), mm
          Certainty of Finding (DCM 111012), % = 100 x probability
        TID 1501  Measurement Group                         (no detections)
          Tracking Identifier "<finding>: Absent" (no Tracking Unique Identifier)
          Finding category / Finding / Finding Site / Algorithm Identification
          <Label.type> = Absent (SCT 272519000)
      Qualitative Evaluations                               (no detections)
        <Label.type> = Absent (SCT 272519000), e.g. "Nodule: Absent"

A companion SEG (:func:`medssl.dicom.seg.detection_seg`: segment ``i + 1`` a sphere around
detection ``i``) is listed in the evidence, and its segment ``i + 1`` carries the tracking
identifier and UID of finding ``i``'s group: that UID is what ties point, sphere and
measurements of one nodule together. There is no TID 1411 group (see below).

How the viewers read it (from their sources; outputs measured with dcmqi 1.5.7
and highdicom 0.28 in tests/medssl/dicom/test_sr_viewers.py):

* 3D Slicer, QuantitativeReporting (QIICR/QuantitativeReporting,
  ``DICOMPlugins/DICOMTID1500Plugin.py``, planar branch added 2025-04): a report with any
  TID 1410 "Image Region" group is read with highdicom; SCOORD3D POINT groups
  (``get_planar_roi_measurement_groups(graphic_type=GraphicTypeValues3D.POINT)``) become
  markups points named by the tracking identifier, with a table, and the view jumps to the
  first. 2D SCOORD POINT/CIRCLE groups are not shown there (only POLYLINE lines and boxes),
  and a report whose only image regions are 2D loads nothing. A report without image regions
  goes to dcmqi's ``tid1500reader`` instead: the SEGs listed in the evidence are loaded,
  measurement ``i`` of its JSON is tagged onto segment ``i``, and the table needs
  ``Measurements[0]``. Older QuantitativeReporting (and dcmqi users) always take that branch.
* dcmqi ``tid1500reader`` (QIICR/dcmqi, ``libsrc/TID1500Reader.cpp``): lists every
  "Measurement Group" under Imaging Measurements (TID 1410, 1411 and 1501 alike) with its
  codes, tracking identifier/UID, NUM items and "Referenced Segment"; it reads no SCOORD or
  SCOORD3D at all (measured: a 2D CIRCLE on the source image comes out as nothing either) and
  nothing outside Imaging Measurements. A report with only document-level Qualitative
  Evaluations came out as an empty list: hence the TID 1501 "Absent" group.
* OHIF 3.13.2, run for real (tests/medssl/dicom/test_viewer_ohif.py: npm ``@ohif/app``, headless
  chromium): a SCOORD3D POINT is parsed but not drawn in its SR (stack) viewport ("Unable to apply
  reference viewable", the annotation names no image); a 2D SCOORD POINT SELECTED FROM the CT image
  is drawn at the centre with the measurements of the merged groups. Hence group (a) first: OHIF
  merges the two groups by tracking UID and places the first point. Its source, read before that run
  (OHIF/Viewers, ``extensions/cornerstone-dicom-sr/src/getSopClassHandlerModule.ts``): Comprehensive
  3D SR has its own handler; groups under Imaging Measurements are merged by Tracking Unique
  Identifier (a group without one is skipped); a merged measurement is placed by its first top-level
  SCOORD or SCOORD3D (a SCOORD3D POINT is drawn when its ReferencedFrameOfReferenceUID is the image
  series' frame of reference; a 2D SCOORD needs its SELECTED FROM image, by SOP instance and frame),
  else by SCOORD/SCOORD3D children of its NUM items; in that version a measurement with no
  coordinates fails the placement loop (``measurement.coords[0]``), hence no tracking UID on the
  "Absent" group (which, measured in 3.13.2, still breaks its SR viewport: OHIF reads the UID of the
  group it says it skips). Older OHIF 3 versions look only for a 2D SCOORD in TID 1410 but also
  require an Image Library container, which this report lacks.
* highdicom refuses coordinates on the NUM items of TID 1410/1411 groups (TID 1419), and
  TID 1410 and TID 1411 take exactly one region reference each (SCOORD, SCOORD3D or a
  segment), so no single group can carry both a 2D and a 3D point. Current OHIF draws only
  the 2D point and current QuantitativeReporting shows only the 3D one, so each finding gets
  both groups. The cost: dcmqi lists two rows per finding (one tracking UID; the measurements
  in the second), and older QuantitativeReporting (dcmqi branch) with a companion SEG pairs
  row i with segment i, which no longer lines up. A TID 1411 segment-reference group is not
  added (a third row, and the SEG already carries each finding's tracking UID).

The probability uses "Certainty of Finding", the concept the CAD SR templates (mammography,
chest CAD) use for a detector's confidence that a finding is real, in percent as they do; a
model's score is not a probability of malignancy, so "Probability of cancer" would be wrong.

A report without detections is a valid "no findings" report, not no report: "Nodule:
Absent" both as a TID 1501 group (what dcmqi, Slicer and highdicom's group getters see) and
as a document-level qualitative evaluation (what dsrdump shows at the top).

The source instances (and the companion SEG) are recorded as evidence (Current Requested
Procedure Evidence), so the report references every image of the scored series. Every
object medssl writes names the model in its Contributing Equipment Sequence
(:func:`processing_equipment`); patient and study attributes are copied from the source.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, cast

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import SegmentationStorage

from medssl import __version__
from medssl.dicom.source import output_source
from medssl.dicom.uids import (
    content_key,
    derived_uid,
    detection_key,
    device_uid,
    report_key,
    source_series_uid,
)
from medssl.dicom.written import save
from medssl.finding import Finding
from medssl.io.dicom_enhanced import frame_planes
from medssl.models.card import Code, Label, ModelCard

__all__ = [
    "CT_UNSPECIFIED_BODY_REGION",
    "SR_SERIES_NUMBER",
    "coded",
    "detection_sr",
    "finding_label",
    "finding_tracking",
    "processing_equipment",
    "write_detection_sr",
]

#: Series number of result SR series (PACS lists series by number).
SR_SERIES_NUMBER = 9001
#: Default "Procedure reported" (CID 100): the scored CT series' protocol is not known here.
CT_UNSPECIFIED_BODY_REGION = Code("25045-6", "LN", "CT unspecified body region")

_QUALITATIVE_EVALUATIONS = hd.sr.CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
#: (112040, DCM, "Tracking Unique Identifier")
_TRACKING_UID_CODE = "112040"


def coded(code: Code) -> hd.sr.CodedConcept:
    """A card :class:`~medssl.models.card.Code` as a highdicom coded concept."""
    return hd.sr.CodedConcept(code.value, code.scheme, code.meaning)


def processing_equipment(
    card: ModelCard, manufacturer: str = "medssl", when: datetime | None = None
) -> hd.ContributingEquipment:
    """The Contributing Equipment Sequence (0018,A001) item naming the model behind an object.

    Purpose of Reference is (109102, DCM, "Processing Equipment") of CID 7005 "Contributing
    Equipment Purposes of Reference": the equipment that processed the source images into
    this object (acquisition equipment, the CT scanner, is 109101 and highdicom adds it from
    the source when the source names its scanner).

    Args:
        card: the model: ManufacturerModelName is its name, SoftwareVersions its name and
            version, then medssl's version.
        manufacturer: Manufacturer of the equipment.
        when: ContributionDateTime; None: now.
    """
    return hd.ContributingEquipment(
        manufacturer=manufacturer,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=card.name,
        software_versions=[f"{card.name} v{card.version}", f"medssl {__version__}"],
        contribution_datetime=when or datetime.now(),
        contribution_description=f"automated {card.task.value} by {card.name} v{card.version}",
    )


def detection_sr(
    source: Sequence[Dataset],
    detections: Sequence[Finding],
    card: ModelCard,
    *,
    manufacturer: str = "medssl",
    series_number: int = SR_SERIES_NUMBER,
    procedure_reported: Code = CT_UNSPECIFIED_BODY_REGION,
    companion_seg: Dataset | None = None,
    settings: Mapping[str, Any] | None = None,
) -> hd.sr.Comprehensive3DSR:
    """A TID 1500 Measurement Report of a detector's findings on one CT series.

    Args:
        source: the scored CT series' datasets (headers suffice; pixel data is not read), one
            series, one frame of reference: single-frame CT images, or one Enhanced CT
            (multi-frame) image. Patient and study attributes are copied from ``source[0]``.
        detections: findings, reported in the given order (``detect`` sorts by descending
            probability); centres in LPS mm in the source's frame of reference, diameters in
            mm, probabilities in ``[0, 1]``. Empty gives a "no findings" report.
        card: the detector's model card: exactly one label (the finding's codes); its name
            and version identify the observer and the algorithm and seed the UIDs.
        manufacturer: Manufacturer of the SR and of the algorithm.
        series_number: SeriesNumber of the SR series.
        procedure_reported: TID 1500 "Procedure reported" (CID 100).
        companion_seg: the SEG of these detections (:func:`~medssl.dicom.seg.detection_seg`,
            segment ``i + 1`` = ``detections[i]``, tracked with the same identifier and UID
            as finding ``i``'s groups); it is recorded as evidence, and each finding keeps
            its two TID 1410 groups (no TID 1411 group: see the module docstring).
        settings: what chose the reported findings and outputs (e.g. ``{"min_probability":
            0.5, "companion_seg": True}``); part of the content key the UIDs derive from.

    Returns:
        The SR document (a ``pydicom.Dataset``), SeriesInstanceUID and SOPInstanceUID from
        :func:`~medssl.dicom.uids.derived_uid` roles ``"sr-series"`` and ``"sr-instance"``
        with the report's content key (:func:`~medssl.dicom.uids.report_key`: findings,
        evidence, companion SEG, ``settings``, options); patient and study attributes as
        :mod:`medssl.dicom.source` copies them,
        tracking UIDs from roles ``"finding-<i>"`` (1-based, in ``detections`` order); its
        Contributing Equipment names the model (:func:`processing_equipment`).

    Raises:
        ValueError: no or several source series or frames of reference, a card with other
            than one label, a detection with a non-finite centre, a diameter <= 0 or a
            probability outside ``[0, 1]`` (its index and value named), or a
            ``companion_seg`` that is not a SEG of one segment per detection.
    """
    series_uid = source_series_uid(source)
    prepared = output_source(source)  # copies highdicom accepts; received values restored below
    source = prepared.datasets
    frame_of_reference = _frame_of_reference(source)
    label = finding_label(card)
    for i, detection in enumerate(detections):
        _check_detection(i, detection)
    if companion_seg is not None:
        _check_companion(companion_seg, len(detections))
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid(card.name, card.version),
            name=f"{card.name} v{card.version}",
            manufacturer_name=manufacturer,
            model_name=card.name,
        ),
    )
    context = hd.sr.ObservationContext(observer_device_context=observer)
    procedure = coded(procedure_reported)
    if detections:
        planes = _source_planes(source)
        groups = [
            group
            for i, d in enumerate(detections)
            for group in _finding_groups(
                i, d, label, card, manufacturer, series_uid, frame_of_reference, planes
            )
        ]
        content: Dataset = hd.sr.MeasurementReport(context, procedure, groups)[0]
    else:
        content = _no_findings_report(context, procedure, label, card, manufacturer)
    key = report_key(
        source,
        detections,
        card,
        companion_seg=companion_seg,
        settings=settings,
        manufacturer=manufacturer,
        series_number=series_number,
        procedure_reported=procedure_reported,
    )
    return prepared.restore(
        hd.sr.Comprehensive3DSR(
            evidence=[*source, companion_seg] if companion_seg is not None else source,
            content=content,
            series_instance_uid=derived_uid(
                series_uid, card.name, card.version, "sr-series", content=key
            ),
            series_number=series_number,
            sop_instance_uid=derived_uid(
                series_uid, card.name, card.version, "sr-instance", content=key
            ),
            instance_number=1,
            manufacturer=manufacturer,
            manufacturer_model_name=card.name,
            is_complete=True,
            series_description=f"{card.name} v{card.version} findings"[:64],
            software_versions=f"medssl {__version__}",
            contributing_equipment=[processing_equipment(card, manufacturer)],
        )
    )


def write_detection_sr(
    source: Sequence[Dataset],
    detections: Sequence[Finding],
    card: ModelCard,
    path: str | Path,
    *,
    manufacturer: str = "medssl",
    series_number: int = SR_SERIES_NUMBER,
    procedure_reported: Code = CT_UNSPECIFIED_BODY_REGION,
    companion_seg: Dataset | None = None,
    settings: Mapping[str, Any] | None = None,
) -> Path:
    """Build :func:`detection_sr` and write it to ``path`` (atomically); returns the path."""
    path = Path(path)
    sr = detection_sr(
        source,
        detections,
        card,
        manufacturer=manufacturer,
        series_number=series_number,
        procedure_reported=procedure_reported,
        companion_seg=companion_seg,
        settings=settings,
    )
    return save(sr, path).path


def finding_tracking(
    series_uid: str, card: ModelCard, index: int, detection: Finding
) -> tuple[str, str]:
    """``(identifier, UID)`` tracking detection ``index`` (0-based) of a series: the
    identifier is ``"<label name> <index + 1>"``, the UID :func:`derived_uid` role
    ``"finding-<index + 1>"`` with the finding's content (centre, diameter, probability,
    rounded as :func:`~medssl.dicom.uids.detection_key` states), so it stays the same for
    the same finding at the same rank (a report at another threshold keeps it) and changes
    when the finding does. The SR's groups and the companion SEG's segments share them."""
    number = index + 1
    return (
        f"{finding_label(card).name} {number}",
        derived_uid(
            series_uid,
            card.name,
            card.version,
            f"finding-{number}",
            content=content_key(finding=detection_key(detection)),
        ),
    )


@dataclass(frozen=True)
class _Plane:
    """One source frame's geometry: the image (and frame number of a multi-frame image) and
    its ImagePositionPatient, ImageOrientationPatient and PixelSpacing."""

    image: Dataset
    frame: int | None
    position: tuple[float, ...]
    orientation: tuple[float, ...]
    spacing: tuple[float, ...]


def _source_planes(source: Sequence[Dataset]) -> list[_Plane]:
    """Every frame of the source series with its plane geometry (single-frame images: their
    own attributes; multi-frame images: their functional groups, frames numbered from 1)."""
    planes = []
    for ds in source:
        if int(ds.get("NumberOfFrames", 1) or 1) > 1 or "PerFrameFunctionalGroupsSequence" in ds:
            for k, (position, orientation, spacing) in enumerate(zip(*frame_planes(ds)), start=1):
                planes.append(_Plane(ds, k, tuple(position), tuple(orientation), tuple(spacing)))
        else:
            planes.append(
                _Plane(
                    ds,
                    None,
                    tuple(map(float, ds.ImagePositionPatient)),
                    tuple(map(float, ds.ImageOrientationPatient)),
                    tuple(map(float, ds.PixelSpacing)),
                )
            )
    return planes


def _image_point(
    centre_lps: Sequence[float], planes: Sequence[_Plane]
) -> tuple[_Plane, np.ndarray]:
    """The source frame whose plane is nearest ``centre_lps`` (LPS mm), and the centre in its
    pixel matrix as SCOORD ``[[column, row]]`` (pixel units, (0, 0) the top left corner of the
    top left pixel, so a pixel centre is at .5; highdicom's ReferenceToImageTransformer)."""
    centre = np.asarray(centre_lps, dtype=np.float64).reshape(1, 3)
    best: tuple[float, _Plane, np.ndarray] | None = None
    for plane in planes:
        to_image = hd.spatial.ReferenceToImageTransformer(
            image_position=plane.position,
            image_orientation=plane.orientation,
            pixel_spacing=plane.spacing,
        )
        column, row, off_plane_mm = to_image(centre)[0]
        if best is None or abs(off_plane_mm) < best[0]:
            best = (abs(off_plane_mm), plane, np.array([[column, row]]))
    assert best is not None  # source_series_uid refused an empty source
    return best[1], best[2]


def _finding_groups(
    index: int,
    detection: Finding,
    label: Label,
    card: ModelCard,
    manufacturer: str,
    series_uid: str,
    frame_of_reference: str,
    planes: Sequence[_Plane],
) -> list[hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations]:
    """The two TID 1410 groups of detection ``index`` (0-based), with one tracking identifier
    and UID (which a companion SEG's segment ``index + 1`` carries too), codes and algorithm:

    1. the finding on an image: a 2D SCOORD POINT at its centre on the source frame nearest
       it (SELECTED FROM that image and frame), no measurements: what OHIF 3.13.2 draws
       (tests/medssl/dicom/test_viewer_ohif.py);
    2. the finding in 3D: its SCOORD3D POINT, diameter and certainty: what QuantitativeReporting
       shows.

    See the module docstring for why both, in this order, and no TID 1411 group."""
    identifier, uid = finding_tracking(series_uid, card, index, detection)
    plane, point = _image_point(detection.centre_lps, planes)
    centre = np.asarray(detection.centre_lps, dtype=np.float64).reshape(1, 3)
    on_image = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POINT,
        graphic_data=point,
        source_image=hd.sr.SourceImageForRegion(
            referenced_sop_class_uid=str(plane.image.SOPClassUID),
            referenced_sop_instance_uid=str(plane.image.SOPInstanceUID),
            referenced_frame_numbers=None if plane.frame is None else [plane.frame],
        ),
    )
    in_3d = hd.sr.ImageRegion3D(
        graphic_type=hd.sr.GraphicTypeValues3D.POINT,
        graphic_data=centre,
        frame_of_reference_uid=frame_of_reference,
    )
    measurements = [
        hd.sr.Measurement(
            name=codes.SCT.Diameter, value=float(detection.diameter_mm), unit=codes.UCUM.Millimeter
        ),
        hd.sr.Measurement(
            name=codes.DCM.CertaintyOfFinding,
            value=100.0 * float(detection.probability),
            unit=codes.UCUM.Percent,
        ),
    ]
    return [
        hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=uid, identifier=identifier),
            referenced_region=region,
            measurements=values,
            **_finding_codes(label, card, manufacturer),
        )
        for region, values in ((on_image, None), (in_3d, measurements))
    ]


def _finding_codes(label: Label, card: ModelCard, manufacturer: str) -> dict[str, Any]:
    """Finding category, finding, finding site and algorithm of a measurement group (fresh
    content items on each call: a content item belongs to one group)."""
    return {
        "finding_category": coded(label.category),
        "finding_type": coded(label.type),
        "finding_sites": [hd.sr.FindingSite(coded(label.anatomic_region))]
        if label.anatomic_region is not None
        else None,
        "algorithm_id": hd.sr.AlgorithmIdentification(
            name=card.name,
            version=str(card.version),
            manufacturer=manufacturer,
            family=codes.cid7162.ArtificialIntelligence,
        ),
    }


def _no_findings_report(
    context: hd.sr.ObservationContext,
    procedure: hd.sr.CodedConcept,
    label: Label,
    card: ModelCard,
    manufacturer: str,
) -> hd.sr.ContainerContentItem:
    """The TID 1500 root of a report without findings, "<finding>: Absent" said twice:

    * in Imaging Measurements, one TID 1501 group: Tracking Identifier
      ``"<finding>: Absent"`` (no Tracking Unique Identifier: there is nothing to track, and
      OHIF skips a group without one instead of failing on a group without coordinates),
      the finding's codes and algorithm, and the qualitative evaluation ``<finding> =
      Absent``. dcmqi's ``tid1500reader`` (3D Slicer) lists measurement groups only, so this
      is what makes the absence visible there (one caveat: QuantitativeReporting tags
      segments of a segmentation already in its scene with each listed tracking UID, and
      fails on this group's missing one; OHIF would fail on a tracked group without
      coordinates, which weighs more);
    * in Qualitative Evaluations (TID 1500 row 12, as dcmtk's TID1500_MeasurementReport
      writes them): ``<finding> = Absent`` (SCT 272519000) for readers of the document tree.
    """
    absent = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(identifier=f"{label.type.meaning}: Absent"),
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(coded(label.type), codes.SCT.Absent)],
        **_finding_codes(label, card, manufacturer),
    )
    group = absent[0]
    group.ContentSequence = hd.sr.ContentSequence(
        [  # TID 1501 row 3 is optional (U)
            item
            for item in group.ContentSequence
            if item.ConceptNameCodeSequence[0].CodeValue != _TRACKING_UID_CODE
        ]
    )
    # highdicom types a template's items as pydicom Datasets; TID 1500's root is a container
    root = cast(
        hd.sr.ContainerContentItem, hd.sr.MeasurementReport(context, procedure, [absent])[0]
    )
    evaluations = hd.sr.ContainerContentItem(
        name=_QUALITATIVE_EVALUATIONS, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    evaluations.ContentSequence = hd.sr.ContentSequence(
        [
            hd.sr.CodeContentItem(
                name=coded(label.type),
                value=codes.SCT.Absent,
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            ),
        ]
    )
    root.ContentSequence.append(evaluations)
    return root


def _frame_of_reference(source: Sequence[Dataset]) -> str:
    uids = {str(getattr(ds, "FrameOfReferenceUID", "")) for ds in source}
    if len(uids) != 1 or "" in uids:
        raise ValueError(f"source datasets must share one FrameOfReferenceUID, got {sorted(uids)}")
    return uids.pop()


def finding_label(card: ModelCard) -> Label:
    """The one label of a detector's card (the codes of its findings).

    Raises:
        ValueError: the card has no or several labels (named).
    """
    if len(card.labels) != 1:
        names = [label.name for label in card.labels]
        raise ValueError(
            f"model {card.name!r}: a detection report needs a card with one label, "
            f"got {len(card.labels)}: {names}"
        )
    return card.labels[0]


def _check_companion(seg: Dataset, n_detections: int) -> None:
    if str(getattr(seg, "SOPClassUID", "")) != SegmentationStorage:
        raise ValueError(
            f"companion_seg must be a Segmentation Storage object, got SOP class "
            f"{getattr(seg, 'SOPClassUID', 'missing')}"
        )
    n_segments = len(seg.get("SegmentSequence", []))
    if n_segments != n_detections:
        raise ValueError(
            f"companion_seg has {n_segments} segments; one per detection ({n_detections}) is needed"
        )


def _check_detection(index: int, detection: Finding) -> None:
    centre = tuple(float(c) for c in detection.centre_lps)
    if len(centre) != 3 or not all(math.isfinite(c) for c in centre):
        raise ValueError(f"detection {index}: centre_lps must be 3 finite mm values, got {centre}")
    if not (math.isfinite(detection.diameter_mm) and detection.diameter_mm > 0):
        raise ValueError(f"detection {index}: diameter_mm must be > 0, got {detection.diameter_mm}")
    if not 0.0 <= detection.probability <= 1.0:
        raise ValueError(
            f"detection {index}: probability must be in [0, 1], got {detection.probability}"
        )
