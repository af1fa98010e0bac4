"""Results as DICOM Segmentations (BINARY; LABELMAP is not understood by Orthanc 1.10, dcmtk
3.6.7 or dciodvfy 2022).

* :func:`label_seg`: a segmenter's label volume. Segments follow the model card: segment
  ``i + 1`` is ``card.labels[i]``, always, whether the label occurs in the volume or not, so
  every SEG of a model has the same segment list and an empty segment says "looked, found
  nothing". Every frame of the source is kept, empty or not (``omit_empty_frames=False``):
  the SEG is pixel-aligned with the source series frame for frame, which is what viewers
  and the IHE AI Results profile expect of a segmentation result, and it stays valid when
  nothing was found.
* :func:`detection_seg`: a detector's findings as spheres, the companion of the SR
  (:func:`medssl.serving.sr.detection_sr` with ``companion_seg``): segment ``i + 1`` is
  detection ``i``, a sphere of its diameter around its centre on the source grid, tracked
  with the same identifier and UID as the SR's groups of that finding. A sphere covers a
  few frames, so frames empty for a segment are omitted here.

Sources are single-frame CT images (one frame each) or one Enhanced CT (multi-frame) image;
masks are given in the source's frame order, and :func:`frame_slices` maps a volume on the
source grid (what the readers return) to that order by each frame's plane position.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from medssl import __version__
from medssl.atomic import atomic_write
from medssl.io.dicom_enhanced import frame_positions
from medssl.models.card import ModelCard
from medssl.pipeline.detect import Detection
from medssl.serving.sr import coded, finding_label, finding_tracking, processing_equipment
from medssl.serving.uids import derived_uid, source_series_uid

__all__ = [
    "DETECTION_SEG_SERIES_NUMBER",
    "SEG_SERIES_NUMBER",
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
    positions = np.concatenate([
        frame_positions(ds) if _n_frames(ds) > 1 or "PerFrameFunctionalGroupsSequence" in ds
        else np.asarray([[float(v) for v in ds.ImagePositionPatient]])
        for ds in source
    ])
    index = (np.linalg.inv(np.asarray(affine, dtype=np.float64))
             @ np.c_[positions, np.ones(len(positions))].T)[:3].T
    slices = np.rint(index[:, 0]).astype(int)
    for k, (zyx, z) in enumerate(zip(index, slices)):
        off_grid = abs(zyx[0] - z) > GRID_TOLERANCE or np.abs(zyx[1:]).max() > GRID_TOLERANCE
        if off_grid or not 0 <= z < n_slices:
            raise ValueError(f"source frame {k + 1} at {positions[k].round(3).tolist()} mm is "
                             f"grid index (z, y, x) {zyx.round(3).tolist()}, not the first voxel "
                             f"of one of the grid's {n_slices} slices")
    return slices


def label_seg(
    source: Sequence[Dataset],
    labels: np.ndarray,
    card: ModelCard,
    *,
    manufacturer: str = "medssl",
    series_number: int = SEG_SERIES_NUMBER,
) -> hd.seg.Segmentation:
    """A BINARY DICOM SEG of a label volume on its source CT series, every frame kept.

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

    Returns:
        The Segmentation (a ``pydicom.Dataset``): ``n_frames`` x ``len(card.labels)``
        frames, algorithm type AUTOMATIC, SeriesInstanceUID and SOPInstanceUID from
        :func:`~medssl.serving.uids.derived_uid` roles ``"seg-series"`` and
        ``"seg-instance"``, segment tracking UIDs from ``"segment-<label value>"``, the model
        in its Contributing Equipment.

    Raises:
        ValueError: no or several source series, source images of different sizes, a
            ``labels`` array that is not 3D unsigned integers, a shape that disagrees with
            the source's frames (both named), or values that are not labels of the card (named).
    """
    series_uid = source_series_uid(source)
    _check_labels(source, labels, card)
    algorithm = _algorithm(card)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=label.name,
            segmented_property_category=coded(label.category),
            segmented_property_type=coded(label.type),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=derived_uid(series_uid, card.name, card.version, f"segment-{label.value}"),
            tracking_id=label.name,
            anatomic_regions=[coded(label.anatomic_region)] if label.anatomic_region else None,
            display_color=hd.color.CIELabColor.from_rgb(*label.colour) if label.colour else None,
        )
        for number, label in enumerate(card.labels, start=1)
    ]
    masks = np.stack([labels == label.value for label in card.labels], axis=-1).astype(np.uint8)
    return _segmentation(source, masks, descriptions, card, manufacturer, series_number,
                         roles=("seg-series", "seg-instance"), what="segmentation",
                         omit_empty_frames=False)


def detection_seg(
    source: Sequence[Dataset],
    detections: Sequence[Detection],
    card: ModelCard,
    affine: np.ndarray,
    shape: tuple[int, int, int],
    *,
    manufacturer: str = "medssl",
    series_number: int = DETECTION_SEG_SERIES_NUMBER,
) -> hd.seg.Segmentation:
    """A BINARY DICOM SEG of detections: one sphere segment per detection.

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

    Returns:
        The Segmentation: segments labelled and tracked as the SR tracks the findings
        (``"Nodule 1"`` and the ``"finding-1"`` UID, ...), SeriesInstanceUID and
        SOPInstanceUID from :func:`~medssl.serving.uids.derived_uid` roles
        ``"nodule-seg-series"`` and ``"nodule-seg-instance"``, frames empty for a segment
        omitted, the model in its Contributing Equipment. Memory: one byte per voxel and
        detection while it is built.

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
        raise ValueError(f"grid shape {shape} disagrees with the source's (Rows, Columns) "
                         f"{sorted(sizes)}")
    slices = frame_slices(source, affine, shape[0])
    masks = np.zeros((len(slices), *shape[1:], len(detections)), dtype=np.uint8)
    for i, detection in enumerate(detections):
        z0, block = _sphere(i, detection, affine, shape)
        for z in range(z0, z0 + len(block)):
            masks[slices == z, :, :, i] = block[z - z0]
    algorithm = _algorithm(card)
    descriptions = []
    for i in range(len(detections)):
        identifier, uid = finding_tracking(series_uid, card, i)
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=i + 1,
            segment_label=identifier,
            segmented_property_category=coded(label.category),
            segmented_property_type=coded(label.type),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=uid,
            tracking_id=identifier,
            anatomic_regions=[coded(label.anatomic_region)] if label.anatomic_region else None,
        ))
    return _segmentation(source, masks, descriptions, card, manufacturer, series_number,
                         roles=("nodule-seg-series", "nodule-seg-instance"), what="finding spheres",
                         omit_empty_frames=True)


def write_label_seg(
    source: Sequence[Dataset],
    labels: np.ndarray,
    card: ModelCard,
    path: str | Path,
    *,
    manufacturer: str = "medssl",
    series_number: int = SEG_SERIES_NUMBER,
) -> Path:
    """Build :func:`label_seg` and write it to ``path`` (atomically); returns the path."""
    seg = label_seg(source, labels, card, manufacturer=manufacturer, series_number=series_number)
    return _write(seg, path)


def write_detection_seg(
    source: Sequence[Dataset],
    detections: Sequence[Detection],
    card: ModelCard,
    affine: np.ndarray,
    shape: tuple[int, int, int],
    path: str | Path,
    *,
    manufacturer: str = "medssl",
    series_number: int = DETECTION_SEG_SERIES_NUMBER,
) -> tuple[Path, hd.seg.Segmentation]:
    """Build :func:`detection_seg` and write it to ``path`` (atomically).

    Returns:
        The path and the SEG (the SR's ``companion_seg``).
    """
    seg = detection_seg(source, detections, card, affine, shape, manufacturer=manufacturer,
                        series_number=series_number)
    return _write(seg, path), seg


def _write(seg: hd.seg.Segmentation, path: str | Path) -> Path:
    path = Path(path)
    atomic_write(path, lambda fh: seg.save_as(fh, enforce_file_format=True))
    return path


def _algorithm(card: ModelCard) -> hd.AlgorithmIdentificationSequence:
    return hd.AlgorithmIdentificationSequence(
        name=card.name, family=codes.cid7162.ArtificialIntelligence, version=str(card.version))


def _segmentation(source: Sequence[Dataset], masks: np.ndarray,
                  descriptions: Sequence[hd.seg.SegmentDescription], card: ModelCard,
                  manufacturer: str, series_number: int, roles: tuple[str, str], what: str,
                  omit_empty_frames: bool) -> hd.seg.Segmentation:
    """The BINARY SEG of ``masks`` ``(n_frames, Rows, Columns, segments)`` on ``source``."""
    series_uid = source_series_uid(source)
    return hd.seg.Segmentation(
        source_images=source,
        pixel_array=masks,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=derived_uid(series_uid, card.name, card.version, roles[0]),
        series_number=series_number,
        sop_instance_uid=derived_uid(series_uid, card.name, card.version, roles[1]),
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


def _sphere(index: int, detection: Detection, affine: np.ndarray,
            shape: tuple[int, int, int]) -> tuple[int, np.ndarray]:
    """Detection ``index``'s sphere on the grid: its first slice and its masks
    ``(slices, Y, X)`` uint8 from that slice on."""
    affine = np.asarray(affine, dtype=np.float64)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    centre = (np.linalg.inv(affine) @ [*map(float, detection.centre_lps), 1.0])[:3]
    limit = np.asarray(shape) - 1
    if np.any(centre < -0.5) or np.any(centre > limit + 0.5):
        raise ValueError(f"detection {index}: centre {tuple(detection.centre_lps)} mm is grid "
                         f"index {centre.round(2).tolist()}, outside the grid {shape}")
    radius = float(detection.diameter_mm) / 2.0
    low = np.clip(np.floor(centre - radius / spacing), 0, limit).astype(int)
    high = np.clip(np.ceil(centre + radius / spacing), 0, limit).astype(int)
    z, y, x = np.ogrid[low[0]:high[0] + 1, 0:shape[1], 0:shape[2]]
    distance2 = (((z - centre[0]) * spacing[0]) ** 2 + ((y - centre[1]) * spacing[1]) ** 2
                 + ((x - centre[2]) * spacing[2]) ** 2)
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
        raise ValueError(f"labels shape {labels.shape} disagrees with the source's "
                         f"(frames, rows, columns) {expected}")
    known = {0, *(label.value for label in card.labels)}
    unknown = sorted(int(v) for v in np.unique(labels) if int(v) not in known)
    if unknown:
        raise ValueError(f"labels hold values {unknown} that are not labels of model "
                         f"{card.name!r} (0 = background, card labels {sorted(known - {0})})")
