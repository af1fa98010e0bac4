"""Results as DICOM Segmentations: BINARY by default, LABELMAP on request.

* :func:`label_seg`: a segmenter's label volume. Segments follow the model card: segment
  ``i + 1`` is ``card.labels[i]``, always, whether the label occurs in the volume or not, so
  every SEG of a model has the same segment list and an empty segment says "looked, found
  nothing".
* :func:`detection_seg`: a detector's findings as spheres, the companion of the SR
  (:func:`medssl.dicom.sr.detection_sr` with ``companion_seg``): segment ``i + 1`` is
  detection ``i``, a sphere of its diameter around its centre on the source grid, tracked
  with the same identifier and UID as the SR's groups of that finding, shown in its own
  display colour (:data:`FINDING_COLOURS`, recommended CIELab values).

**Empty frames are omitted by default** (``omit_empty_frames=True``): a BINARY SEG stores
one frame per source frame *and segment*, and most of them are empty (an 11-organ label SEG
of a 300 x 512 x 512 study: 91 % of 3,300 frames, 110 MB dense; medssl's organ phantom in
``benchmarks/seg_size.py``: 64 % empty, 109.6 MB dense, 39.4 MB sparse). A sparse SEG keeps each
frame's Per-Frame Functional Groups (source image reference, plane position, segment
number), so highdicom, dcmqi, OHIF and 3D Slicer rebuild the full volume, with the missing
frames empty; a SEG in which nothing was found is written with every frame (highdicom
reverts to dense, as a SEG needs at least one frame).
``omit_empty_frames=False`` writes every frame (dense), for receivers that expect a SEG
frame-aligned with the source.

**Segmentation type** (:class:`SegType`): ``binary`` (default) is one bit-packed frame per segment
and source frame, understood everywhere; ``labelmap`` (DICOM 2024c, highdicom >= 0.24) is one 8- or
16-bit frame per source frame holding segment numbers. Written uncompressed, as here, it is smaller
than a dense BINARY SEG but larger than a sparse one unless labelled slices hold more than 8
segments on average (the benchmark: 69.4 MB vs 39.4 MB; it writes faster); ``labelmap-rle`` writes
its frames RLE Lossless compressed (encapsulated; decoded by pydicom, highdicom, dcmtk, GDCM), a
fraction of either (1.5 MB in the benchmark), for a receiver that accepts that transfer syntax.
Orthanc 1.10, dcmtk 3.6.7 and dciodvfy 2022 do not know LABELMAP, so both are options for receivers
that support it. LABELMAP needs non-overlapping segments, so it applies to label SEGs only: the
companion SEG of findings (spheres may overlap) is always BINARY.

**UIDs** come from :mod:`medssl.dicom.uids`: a SEG's Series and SOP Instance UIDs are
derived from its content (the masks' digest or the findings, the source instances, the
segmentation type and frame options, the card's labels), so different content never shares
a UID and a retry repeats them. Patient and study attributes are copied as
:mod:`medssl.dicom.source` describes (invalid values in real archives never make the
writer fail); a series without a Frame of Reference UID gets a derived one.

Sources are single-frame CT images (one frame each) or one Enhanced CT (multi-frame) image;
masks are given in the source's frame order, and :func:`frame_slices` maps a volume on the
source grid (what the readers return) to that order by each frame's plane position.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from enum import Enum
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, RLELossless

from medssl import __version__
from medssl.dicom.source import output_source
from medssl.dicom.sr import coded, finding_label, finding_tracking, processing_equipment
from medssl.dicom.uids import (
    array_key,
    card_key,
    content_key,
    derived_uid,
    detections_key,
    instances_key,
    jsonable,
    label_key,
    source_series_uid,
)
from medssl.dicom.written import save
from medssl.finding import Finding
from medssl.io.dicom_enhanced import frame_positions
from medssl.models.card import ModelCard

__all__ = [
    "DETECTION_SEG_SERIES_NUMBER",
    "FINDING_COLOURS",
    "SEG_SERIES_NUMBER",
    "SegType",
    "detection_seg",
    "frame_slices",
    "label_seg",
    "write_detection_seg",
    "write_label_seg",
]

#: Series number of result SEG series.
SEG_SERIES_NUMBER = 9002
#: Series number of the detections' companion SEG series.
DETECTION_SEG_SERIES_NUMBER = 9003
#: How far (in voxels) a frame's position may lie off the grid's slice it is mapped to.
GRID_TOLERANCE = 0.01
#: Display colours (RGB 0..255, written as CIELab) of the companion SEG's findings: finding
#: ``i`` gets ``FINDING_COLOURS[i % 10]`` (Tableau 10: neighbours stay distinguishable).
FINDING_COLOURS: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
)


class SegType(str, Enum):
    """Segmentation Type of a label SEG (module docs): ``binary``, ``labelmap``, or
    ``labelmap-rle`` (LABELMAP, frames RLE Lossless compressed)."""

    BINARY = "binary"
    LABELMAP = "labelmap"
    LABELMAP_RLE = "labelmap-rle"

    @classmethod
    def parse(cls, value: str | SegType) -> SegType:
        """``value`` as a SegType (case-insensitive).

        Raises:
            ValueError: not one of the values (the value and the choices named).
        """
        try:
            return cls(value.lower() if isinstance(value, str) else value)
        except ValueError:
            choices = [t.value for t in cls]
            raise ValueError(f"seg_type must be one of {choices}, got {value!r}") from None


def frame_slices(source: Sequence[Dataset], affine: np.ndarray, n_slices: int) -> np.ndarray:
    """The slice of a grid that each source frame is, in the source's frame order.

    Args:
        source: the series' datasets (headers suffice): single-frame images (one frame
            each, ImagePositionPatient) or multi-frame images (their frames in order, by
            Plane Position (Patient) functional group).
        affine: 4x4 index ``(z, y, x)`` -> LPS mm affine of the grid, e.g. a Volume read
            from this series (``Volume.affine``).
        n_slices: slices of the grid (its ``Z``).

    Returns:
        int array ``(n_frames,)``: ``volume.array[frame_slices(...)]`` is the volume in the
        source's frame order, the ``(frames, Rows, Columns)`` array the SEG writers take.

    Raises:
        ValueError: a frame whose first pixel is not a voxel centre of the grid's
            ``(z, 0, 0)`` column, or lies outside its ``n_slices`` (frame and index named).
    """
    positions = np.concatenate(
        [
            frame_positions(ds)
            if _n_frames(ds) > 1 or "PerFrameFunctionalGroupsSequence" in ds
            else np.asarray([[float(v) for v in ds.ImagePositionPatient]])
            for ds in source
        ]
    )
    index = (
        np.linalg.inv(np.asarray(affine, dtype=np.float64))
        @ np.c_[positions, np.ones(len(positions))].T
    )[:3].T
    slices = np.rint(index[:, 0]).astype(int)
    for k, (zyx, z) in enumerate(zip(index, slices)):
        off_grid = abs(zyx[0] - z) > GRID_TOLERANCE or np.abs(zyx[1:]).max() > GRID_TOLERANCE
        if off_grid or not 0 <= z < n_slices:
            raise ValueError(
                f"source frame {k + 1} at {positions[k].round(3).tolist()} mm is "
                f"grid index (z, y, x) {zyx.round(3).tolist()}, not the first voxel "
                f"of one of the grid's {n_slices} slices"
            )
    return slices


def label_seg(
    source: Sequence[Dataset],
    labels: np.ndarray,
    card: ModelCard,
    *,
    manufacturer: str = "medssl",
    series_number: int = SEG_SERIES_NUMBER,
    seg_type: str | SegType = SegType.BINARY,
    omit_empty_frames: bool = True,
) -> hd.seg.Segmentation:
    """A DICOM SEG of a label volume on its source CT series (BINARY, empty frames omitted,
    unless asked otherwise).

    Args:
        source: the CT series' datasets (headers suffice), one series: single-frame images,
            or one Enhanced CT image. Their frame order is the order contract:
            ``labels[k]`` is the mask of the source's frame ``k`` (datasets in the given
            order, each one's frames in order); nothing is re-sorted here (map a volume
            with :func:`frame_slices`).
        labels: ``(n_frames, Rows, Columns)`` unsigned integers; 0 is background, every
            other value must be a ``Label.value`` of the card.
        card: the model card: one segment per label (all of them, in card order), labelled
            ``Label.name``, coded with its category, type and anatomic region; its name and
            version identify the algorithm and seed the UIDs.
        manufacturer: Manufacturer of the SEG.
        series_number: SeriesNumber of the SEG series.
        seg_type: ``binary``, ``labelmap`` or ``labelmap-rle`` (:class:`SegType`, module
            docs).
        omit_empty_frames: leave out frames without a segmented pixel (default; module
            docs); False writes every frame.

    Returns:
        The Segmentation (a ``pydicom.Dataset``): BINARY: up to ``n_frames`` x
        ``len(card.labels)`` frames (only the non-empty ones by default); LABELMAP: up to
        ``n_frames`` frames of segment numbers. Algorithm type AUTOMATIC, each segment in
        its label's colour (CIELab) when the card gives one; SeriesInstanceUID and
        SOPInstanceUID from :func:`~medssl.dicom.uids.derived_uid` roles
        ``"seg-series"`` and ``"seg-instance"`` with a content key of the labels' digest,
        the source instances, the card's labels and the options; segment tracking UIDs
        from ``"segment-<label value>"`` and the label (the same for every SEG of that
        label); the model in its Contributing Equipment. Memory: about the label volume
        again (the segment-number map handed to highdicom) plus highdicom's frames.

    Raises:
        ValueError: no or several source series, source images of different sizes, a
            ``labels`` array that is not 3D unsigned integers, a shape that disagrees with
            the source's frames (both named), or values that are not labels of the card (named).
    """
    series_uid = source_series_uid(source)
    _check_labels(source, labels, card)
    seg_type = SegType.parse(seg_type)
    algorithm = _algorithm(card)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=label.name,
            segmented_property_category=coded(label.category),
            segmented_property_type=coded(label.type),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=derived_uid(
                series_uid,
                card.name,
                card.version,
                f"segment-{label.value}",
                content=content_key(label=label_key(label)),
            ),
            tracking_id=label.name,
            anatomic_regions=[coded(label.anatomic_region)] if label.anatomic_region else None,
            display_color=hd.color.CIELabColor.from_rgb(*label.colour) if label.colour else None,
        )
        for number, label in enumerate(card.labels, start=1)
    ]
    # the label-map style array highdicom takes for both types: segment numbers (card order)
    numbers = np.zeros(
        max(int(label.value) for label in card.labels) + 1,
        dtype=np.uint8 if len(card.labels) < 256 else np.uint16,
    )
    for number, label in enumerate(card.labels, start=1):
        numbers[label.value] = number
    segments = numbers[labels]
    content = content_key(
        labels=array_key(labels),
        evidence=instances_key(source),
        card=card_key(card),
        seg_type=seg_type.value,
        omit_empty_frames=bool(omit_empty_frames),
        manufacturer=manufacturer,
        series_number=int(series_number),
    )
    return _segmentation(
        source,
        segments,
        descriptions,
        card,
        manufacturer,
        series_number,
        roles=("seg-series", "seg-instance"),
        what="segmentation",
        omit_empty_frames=omit_empty_frames,
        seg_type=seg_type,
        content=content,
    )


def detection_seg(
    source: Sequence[Dataset],
    detections: Sequence[Finding],
    card: ModelCard,
    affine: np.ndarray,
    shape: tuple[int, int, int],
    *,
    manufacturer: str = "medssl",
    series_number: int = DETECTION_SEG_SERIES_NUMBER,
    settings: Mapping[str, Any] | None = None,
) -> hd.seg.Segmentation:
    """A BINARY DICOM SEG of detections: one sphere segment per detection, empty frames
    omitted.

    Args:
        source: the scored CT series' datasets (headers suffice), as for :func:`label_seg`.
        detections: at least one; detection ``i`` becomes segment ``i + 1``: the voxels of
            the source grid whose centres lie within ``diameter_mm / 2`` of its centre
            (LPS mm), and always the voxel nearest the centre, so a finding smaller than a
            voxel still has one.
        card: the detector's card (one label: the segments' codes); name and version
            identify the algorithm and seed the UIDs.
        affine: 4x4 index ``(z, y, x)`` -> LPS mm affine of the source grid (the Volume
            read from ``source``); frames are mapped to it with :func:`frame_slices`.
        shape: the source grid ``(Z, Y, X)``; ``(Y, X)`` must be ``(Rows, Columns)``.
        manufacturer: Manufacturer of the SEG.
        series_number: SeriesNumber of the SEG series.
        settings: what chose the findings (e.g. ``{"min_probability": 0.5,
            "companion_seg": True}``, as the SR gets them); part of the content key, so the
            SEG of a report at another threshold is another SEG, as its report is another.

    Returns:
        The Segmentation: segments labelled and tracked as the SR tracks the findings
        (``"Nodule 1"`` and its tracking UID, :func:`~medssl.dicom.sr.finding_tracking`),
        coloured :data:`FINDING_COLOURS` in order, SeriesInstanceUID and SOPInstanceUID
        from :func:`~medssl.dicom.uids.derived_uid` roles ``"nodule-seg-series"`` and
        ``"nodule-seg-instance"`` with a content key of the findings (rounded as
        :func:`~medssl.dicom.uids.detections_key` states), ``settings``, the source
        instances, the grid and the card's labels; frames empty for a segment omitted, the
        model in its
        Contributing Equipment. Memory: one byte per voxel and detection while it is built.

    Raises:
        ValueError: no detections, a grid whose in-plane size is not the source's, a
            detection whose centre lies outside the grid (index and centre named), or
            source frames off the grid (:func:`frame_slices`).
    """
    if not detections:
        raise ValueError("detection_seg needs at least one detection (a SEG needs a segment)")
    series_uid = source_series_uid(source)
    label = finding_label(card)
    shape = (int(shape[0]), int(shape[1]), int(shape[2]))
    sizes = {(int(ds.Rows), int(ds.Columns)) for ds in source}
    if sizes != {shape[1:]}:
        raise ValueError(
            f"grid shape {shape} disagrees with the source's (Rows, Columns) {sorted(sizes)}"
        )
    slices = frame_slices(source, affine, shape[0])
    masks = np.zeros((len(slices), *shape[1:], len(detections)), dtype=np.uint8)
    for i, detection in enumerate(detections):
        z0, block = _sphere(i, detection, affine, shape)
        for z in range(z0, z0 + len(block)):
            masks[slices == z, :, :, i] = block[z - z0]
    algorithm = _algorithm(card)
    descriptions = []
    for i, detection in enumerate(detections):
        identifier, uid = finding_tracking(series_uid, card, i, detection)
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=i + 1,
                segment_label=identifier,
                segmented_property_category=coded(label.category),
                segmented_property_type=coded(label.type),
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
                tracking_uid=uid,
                tracking_id=identifier,
                anatomic_regions=[coded(label.anatomic_region)] if label.anatomic_region else None,
                display_color=hd.color.CIELabColor.from_rgb(
                    *FINDING_COLOURS[i % len(FINDING_COLOURS)]
                ),
            )
        )
    grid = [np.round(np.asarray(affine, dtype=np.float64), 6).tolist(), list(shape)]
    content = content_key(
        findings=detections_key(detections),
        evidence=instances_key(source),
        card=card_key(card),
        grid=grid,
        seg_type=SegType.BINARY.value,
        omit_empty_frames=True,
        manufacturer=manufacturer,
        series_number=int(series_number),
        settings=jsonable(dict(settings or {})),
    )
    return _segmentation(
        source,
        masks,
        descriptions,
        card,
        manufacturer,
        series_number,
        roles=("nodule-seg-series", "nodule-seg-instance"),
        what="finding spheres",
        omit_empty_frames=True,
        seg_type=SegType.BINARY,
        content=content,
    )


def write_label_seg(
    source: Sequence[Dataset],
    labels: np.ndarray,
    card: ModelCard,
    path: str | Path,
    *,
    manufacturer: str = "medssl",
    series_number: int = SEG_SERIES_NUMBER,
    seg_type: str | SegType = SegType.BINARY,
    omit_empty_frames: bool = True,
) -> Path:
    """Build :func:`label_seg` and write it to ``path`` (atomically); returns the path."""
    seg = label_seg(
        source,
        labels,
        card,
        manufacturer=manufacturer,
        series_number=series_number,
        seg_type=seg_type,
        omit_empty_frames=omit_empty_frames,
    )
    return _write(seg, path)


def write_detection_seg(
    source: Sequence[Dataset],
    detections: Sequence[Finding],
    card: ModelCard,
    affine: np.ndarray,
    shape: tuple[int, int, int],
    path: str | Path,
    *,
    manufacturer: str = "medssl",
    series_number: int = DETECTION_SEG_SERIES_NUMBER,
    settings: Mapping[str, Any] | None = None,
) -> tuple[Path, hd.seg.Segmentation]:
    """Build :func:`detection_seg` and write it to ``path`` (atomically).

    Returns:
        The path and the SEG (the SR's ``companion_seg``).
    """
    seg = detection_seg(
        source,
        detections,
        card,
        affine,
        shape,
        manufacturer=manufacturer,
        series_number=series_number,
        settings=settings,
    )
    return _write(seg, path), seg


def _write(seg: hd.seg.Segmentation, path: str | Path) -> Path:
    return save(seg, path).path


def _algorithm(card: ModelCard) -> hd.AlgorithmIdentificationSequence:
    return hd.AlgorithmIdentificationSequence(
        name=card.name, family=codes.cid7162.ArtificialIntelligence, version=str(card.version)
    )


def _segmentation(
    source: Sequence[Dataset],
    masks: np.ndarray,
    descriptions: Sequence[hd.seg.SegmentDescription],
    card: ModelCard,
    manufacturer: str,
    series_number: int,
    roles: tuple[str, str],
    what: str,
    omit_empty_frames: bool,
    seg_type: SegType,
    content: str,
) -> hd.seg.Segmentation:
    """The SEG of ``masks`` on ``source``: ``(n_frames, Rows, Columns, segments)`` binary
    masks, or ``(n_frames, Rows, Columns)`` segment numbers; UIDs from ``content``."""
    series_uid = source_series_uid(source)
    prepared = output_source(source)
    labelmap = seg_type in (SegType.LABELMAP, SegType.LABELMAP_RLE)
    segmentation_type = (
        hd.seg.SegmentationTypeValues.LABELMAP if labelmap else hd.seg.SegmentationTypeValues.BINARY
    )
    return prepared.restore(
        hd.seg.Segmentation(
            source_images=prepared.datasets,
            pixel_array=masks,
            segmentation_type=segmentation_type,
            transfer_syntax_uid=(
                RLELossless if seg_type is SegType.LABELMAP_RLE else ExplicitVRLittleEndian
            ),
            segment_descriptions=descriptions,
            series_instance_uid=derived_uid(
                series_uid, card.name, card.version, roles[0], content=content
            ),
            series_number=series_number,
            sop_instance_uid=derived_uid(
                series_uid, card.name, card.version, roles[1], content=content
            ),
            instance_number=1,
            manufacturer=manufacturer,
            manufacturer_model_name=card.name,
            software_versions=f"medssl {__version__}",
            device_serial_number=f"{card.name} v{card.version}"[:64],
            content_description=f"{card.name} v{card.version}"[:64],
            series_description=f"{card.name} v{card.version} {what}"[:64],
            omit_empty_frames=omit_empty_frames,
            contributing_equipment=[processing_equipment(card, manufacturer)],
        )
    )


def _sphere(
    index: int, detection: Finding, affine: np.ndarray, shape: tuple[int, int, int]
) -> tuple[int, np.ndarray]:
    """Detection ``index``'s sphere on the grid: its first slice and its masks
    ``(slices, Y, X)`` uint8 from that slice on."""
    affine = np.asarray(affine, dtype=np.float64)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    centre = (np.linalg.inv(affine) @ [*map(float, detection.centre_lps), 1.0])[:3]
    limit = np.asarray(shape) - 1
    if np.any(centre < -0.5) or np.any(centre > limit + 0.5):
        raise ValueError(
            f"detection {index}: centre {tuple(detection.centre_lps)} mm is grid "
            f"index {centre.round(2).tolist()}, outside the grid {shape}"
        )
    radius = float(detection.diameter_mm) / 2.0
    low = np.clip(np.floor(centre - radius / spacing), 0, limit).astype(int)
    high = np.clip(np.ceil(centre + radius / spacing), 0, limit).astype(int)
    z, y, x = np.ogrid[low[0] : high[0] + 1, 0 : shape[1], 0 : shape[2]]
    distance2 = (
        ((z - centre[0]) * spacing[0]) ** 2
        + ((y - centre[1]) * spacing[1]) ** 2
        + ((x - centre[2]) * spacing[2]) ** 2
    )
    block = (distance2 <= radius**2).astype(np.uint8)
    nearest = np.clip(np.rint(centre), 0, limit).astype(int)
    block[nearest[0] - low[0], nearest[1], nearest[2]] = 1
    return int(low[0]), block


def _n_frames(ds: Dataset) -> int:
    return int(ds.get("NumberOfFrames", 1) or 1)


def _check_labels(source: Sequence[Dataset], labels: np.ndarray, card: ModelCard) -> None:
    sizes = {(int(ds.Rows), int(ds.Columns)) for ds in source}
    if len(sizes) != 1:
        raise ValueError(f"source images differ in size (Rows, Columns): {sorted(sizes)}")
    expected = (sum(_n_frames(ds) for ds in source), *sizes.pop())
    if not isinstance(labels, np.ndarray) or labels.dtype.kind not in "ub":
        kind = labels.dtype if isinstance(labels, np.ndarray) else type(labels).__name__
        raise ValueError(f"labels must be a numpy array of unsigned integers, got {kind}")
    if labels.shape != expected:
        raise ValueError(
            f"labels shape {labels.shape} disagrees with the source's "
            f"(frames, rows, columns) {expected}"
        )
    known = {0, *(label.value for label in card.labels)}
    unknown = sorted(int(v) for v in np.unique(labels) if int(v) not in known)
    if unknown:
        raise ValueError(
            f"labels hold values {unknown} that are not labels of model "
            f"{card.name!r} (0 = background, card labels {sorted(known - {0})})"
        )
