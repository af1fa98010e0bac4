"""Detections as a DICOM Comprehensive 3D SR: a TID 1500 Measurement Report.

Structure of the document (PS3.16 template numbers)::

    TID 1500  Imaging Measurement Report
      TID 1204  Language of content: English
      TID 1001  Observation context: device observer = the model (UID, "name vN", manufacturer)
      Procedure reported (default: CT unspecified body region)
      Imaging Measurements                                  (one or more detections)
        TID 1411  Volumetric ROI Measurements, one group per detection:
          Tracking Identifier "<label name> <i>" + Tracking Unique Identifier (derived UID)
          Finding category / Finding          <- Label.category / Label.type (e.g. Nodule)
          Finding Site                        <- Label.anatomic_region (e.g. Lung), if any
          Algorithm Identification (TID 4019) <- card name and version, family AI
          Volume Surface: SCOORD3D POINT at the centre (LPS mm, the source's frame of reference)
          Source Series for Segmentation      <- the source SeriesInstanceUID
          Diameter (SCT 81827009), mm
          Certainty of Finding (DCM 111012), % = 100 x probability
      Qualitative Evaluations                               (no detections)
        <Label.type> = Absent (SCT 272519000), e.g. "Nodule: Absent"

Why TID 1411 with a POINT: a detection is a location in 3D patient space, not a region on
one image. TID 1410 is for planar regions (a contour on one plane), and a TID 1501 group has
no place for coordinates; TID 1411's Volume Surface takes a SCOORD3D POINT in a frame of
reference and names the source series, which is what a detection is. The probability uses
"Certainty of Finding", the concept the CAD SR templates (mammography, chest CAD) use for a
detector's confidence that a finding is real, in percent as they do; a model's score is not
a probability of malignancy, so "Probability of cancer" would be wrong.

TID 1500 needs Imaging Measurements or Qualitative Evaluations, and a measurement group
needs a region, so a report without detections carries one qualitative evaluation instead
("Nodule: Absent"): a valid "no findings" report rather than no report.

The source instances are recorded as evidence (Pertinent Other Evidence), so the report
references every image of the scored series.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
from highdicom.sr.templates import DEFAULT_LANGUAGE
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from medssl import __version__
from medssl.atomic import atomic_write
from medssl.models.card import Code, Label, ModelCard
from medssl.pipeline.detect import Detection
from medssl.serving.uids import derived_uid, device_uid, source_series_uid

__all__ = [
    "CT_UNSPECIFIED_BODY_REGION",
    "SR_SERIES_NUMBER",
    "coded",
    "detection_sr",
    "write_detection_sr",
]

#: Series number of result SR series (PACS lists series by number).
SR_SERIES_NUMBER = 9001
#: Default "Procedure reported" (CID 100): the scored CT series' protocol is not known here.
CT_UNSPECIFIED_BODY_REGION = Code("25045-6", "LN", "CT unspecified body region")

_QUALITATIVE_EVALUATIONS = hd.sr.CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")


def coded(code: Code) -> hd.sr.CodedConcept:
    """A card :class:`~medssl.models.card.Code` as a highdicom coded concept."""
    return hd.sr.CodedConcept(code.value, code.scheme, code.meaning)


def detection_sr(
    source: Sequence[Dataset],
    detections: Sequence[Detection],
    card: ModelCard,
    *,
    manufacturer: str = "medssl",
    series_number: int = SR_SERIES_NUMBER,
    procedure_reported: Code = CT_UNSPECIFIED_BODY_REGION,
) -> hd.sr.Comprehensive3DSR:
    """A TID 1500 Measurement Report of a detector's findings on one CT series.

    Args:
        source: the scored CT series' datasets (headers suffice; pixel data is not read), one
            series, one frame of reference. Patient and study attributes are copied from
            ``source[0]``.
        detections: findings, reported in the given order (``detect`` sorts by descending
            probability); centres in LPS mm in the source's frame of reference, diameters in
            mm, probabilities in ``[0, 1]``. Empty gives a "no findings" report.
        card: the detector's model card: exactly one label (the finding's codes); its name
            and version identify the observer and the algorithm and seed the UIDs.
        manufacturer: Manufacturer of the SR and of the algorithm.
        series_number: SeriesNumber of the SR series.
        procedure_reported: TID 1500 "Procedure reported" (CID 100).

    Returns:
        The SR document (a ``pydicom.Dataset``), SeriesInstanceUID and SOPInstanceUID from
        :func:`~medssl.serving.uids.derived_uid` roles ``"sr-series"`` and ``"sr-instance"``,
        tracking UIDs from roles ``"finding-<i>"`` (1-based, in ``detections`` order).

    Raises:
        ValueError: no or several source series or frames of reference, a card with other
            than one label, or a detection with a non-finite centre, a diameter <= 0 or a
            probability outside ``[0, 1]`` (its index and value named).
    """
    series_uid = source_series_uid(source)
    frame_of_reference = _frame_of_reference(source)
    label = _finding_label(card)
    for i, detection in enumerate(detections):
        _check_detection(i, detection)
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid(card.name, card.version), name=f"{card.name} v{card.version}",
            manufacturer_name=manufacturer, model_name=card.name,
        ),
    )
    context = hd.sr.ObservationContext(observer_device_context=observer)
    procedure = coded(procedure_reported)
    if detections:
        groups = [
            _measurement_group(i, d, label, card, manufacturer, series_uid, frame_of_reference)
            for i, d in enumerate(detections)
        ]
        content: Dataset = hd.sr.MeasurementReport(context, procedure, groups)[0]
    else:
        content = _no_findings_report(context, procedure, label)
    return hd.sr.Comprehensive3DSR(
        evidence=source,
        content=content,
        series_instance_uid=derived_uid(series_uid, card.name, card.version, "sr-series"),
        series_number=series_number,
        sop_instance_uid=derived_uid(series_uid, card.name, card.version, "sr-instance"),
        instance_number=1,
        manufacturer=manufacturer,
        is_complete=True,
        series_description=f"{card.name} v{card.version} findings"[:64],
        software_versions=f"medssl {__version__}",
    )


def write_detection_sr(
    source: Sequence[Dataset],
    detections: Sequence[Detection],
    card: ModelCard,
    path: str | Path,
    *,
    manufacturer: str = "medssl",
    series_number: int = SR_SERIES_NUMBER,
    procedure_reported: Code = CT_UNSPECIFIED_BODY_REGION,
) -> Path:
    """Build :func:`detection_sr` and write it to ``path`` (atomically); returns the path."""
    path = Path(path)
    sr = detection_sr(source, detections, card, manufacturer=manufacturer,
                      series_number=series_number, procedure_reported=procedure_reported)
    atomic_write(path, lambda fh: sr.save_as(fh, enforce_file_format=True))
    return path


def _measurement_group(
    index: int,
    detection: Detection,
    label: Label,
    card: ModelCard,
    manufacturer: str,
    series_uid: str,
    frame_of_reference: str,
) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    """The TID 1411 group of detection ``index`` (0-based)."""
    number = index + 1
    centre = np.asarray(detection.centre_lps, dtype=np.float64).reshape(1, 3)
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derived_uid(series_uid, card.name, card.version, f"finding-{number}"),
            identifier=f"{label.name} {number}",
        ),
        referenced_volume_surface=hd.sr.VolumeSurface(
            graphic_type=hd.sr.GraphicTypeValues3D.POINT,
            graphic_data=centre,
            frame_of_reference_uid=frame_of_reference,
            source_series=hd.sr.SourceSeriesForSegmentation(series_uid),
        ),
        finding_category=coded(label.category),
        finding_type=coded(label.type),
        finding_sites=[hd.sr.FindingSite(coded(label.anatomic_region))]
        if label.anatomic_region is not None else None,
        algorithm_id=hd.sr.AlgorithmIdentification(
            name=card.name, version=str(card.version), manufacturer=manufacturer,
            family=codes.cid7162.ArtificialIntelligence),
        measurements=[
            hd.sr.Measurement(name=codes.SCT.Diameter, value=float(detection.diameter_mm),
                              unit=codes.UCUM.Millimeter),
            hd.sr.Measurement(name=codes.DCM.CertaintyOfFinding,
                              value=100.0 * float(detection.probability),
                              unit=codes.UCUM.Percent),
        ],
    )


def _no_findings_report(
    context: hd.sr.ObservationContext, procedure: hd.sr.CodedConcept, label: Label
) -> hd.sr.ContainerContentItem:
    """The TID 1500 root of a report without findings: the label's type evaluated Absent
    (rows 12-13, as dcmtk's TID1500_MeasurementReport writes qualitative evaluations)."""
    root = hd.sr.ContainerContentItem(name=codes.cid7021.ImagingMeasurementReport,
                                      template_id="1500")
    evaluations = hd.sr.ContainerContentItem(
        name=_QUALITATIVE_EVALUATIONS, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    evaluations.ContentSequence = hd.sr.ContentSequence([
        hd.sr.CodeContentItem(name=coded(label.type), value=codes.SCT.Absent,
                              relationship_type=hd.sr.RelationshipTypeValues.CONTAINS),
    ])
    root.ContentSequence = hd.sr.ContentSequence([
        *hd.sr.LanguageOfContentItemAndDescendants(DEFAULT_LANGUAGE),
        *context,
        hd.sr.CodeContentItem(name=codes.DCM.ProcedureReported, value=procedure,
                              relationship_type=hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD),
        evaluations,
    ])
    return root


def _frame_of_reference(source: Sequence[Dataset]) -> str:
    uids = {str(getattr(ds, "FrameOfReferenceUID", "")) for ds in source}
    if len(uids) != 1 or "" in uids:
        raise ValueError(f"source datasets must share one FrameOfReferenceUID, got {sorted(uids)}")
    return uids.pop()


def _finding_label(card: ModelCard) -> Label:
    if len(card.labels) != 1:
        names = [label.name for label in card.labels]
        raise ValueError(f"model {card.name!r}: a detection report needs a card with one label, "
                         f"got {len(card.labels)}: {names}")
    return card.labels[0]


def _check_detection(index: int, detection: Detection) -> None:
    centre = tuple(float(c) for c in detection.centre_lps)
    if len(centre) != 3 or not all(math.isfinite(c) for c in centre):
        raise ValueError(f"detection {index}: centre_lps must be 3 finite mm values, got {centre}")
    if not (math.isfinite(detection.diameter_mm) and detection.diameter_mm > 0):
        raise ValueError(f"detection {index}: diameter_mm must be > 0, got {detection.diameter_mm}")
    if not 0.0 <= detection.probability <= 1.0:
        raise ValueError(f"detection {index}: probability must be in [0, 1], "
                         f"got {detection.probability}")
