"""A label volume as a DICOM Segmentation (BINARY; LABELMAP is not understood by Orthanc 1.10,
dcmtk 3.6.7 or dciodvfy 2022).

Segments follow the model card: segment ``i + 1`` is ``card.labels[i]``, always, whether the
label occurs in the volume or not, so every SEG of a model has the same segment list and an
empty segment says "looked, found nothing". Frames that are empty for a segment are omitted
(a nodule SEG stays small); when the whole volume is empty (nothing found), every frame is
kept, empty, so the object still has pixel data and stays a valid SEG.
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
from medssl.models.card import ModelCard
from medssl.serving.sr import coded
from medssl.serving.uids import derived_uid, source_series_uid

__all__ = ["SEG_SERIES_NUMBER", "label_seg", "write_label_seg"]

#: Series number of result SEG series.
SEG_SERIES_NUMBER = 9002


def label_seg(
    source: Sequence[Dataset],
    labels: np.ndarray,
    card: ModelCard,
    *,
    manufacturer: str = "medssl",
    series_number: int = SEG_SERIES_NUMBER,
) -> hd.seg.Segmentation:
    """A BINARY DICOM SEG of a label volume on its source CT series.

    Args:
        source: the CT series' single-frame datasets (headers suffice), one series. Their
            order is the order contract: ``labels[k]`` is the mask of ``source[k]``; nothing
            is re-sorted here (pass them sorted as the label volume was computed, e.g. the
            order of ``Volume.meta["files"]`` from ``read_dicom_series``).
        labels: label volume ``(Z, Y, X)`` = ``(len(source), Rows, Columns)``, unsigned
            integers; 0 is background, every other value must be a ``Label.value`` of the card.
        card: the model card: one segment per label (all of them, in card order), labelled
            ``Label.name``, coded with its category, type and anatomic region; its name and
            version identify the algorithm and seed the UIDs.
        manufacturer: Manufacturer of the SEG.
        series_number: SeriesNumber of the SEG series.

    Returns:
        The Segmentation (a ``pydicom.Dataset``); algorithm type AUTOMATIC, SeriesInstanceUID
        and SOPInstanceUID from :func:`~medssl.serving.uids.derived_uid` roles
        ``"seg-series"`` and ``"seg-instance"``, segment tracking UIDs from
        ``"segment-<label value>"``.

    Raises:
        ValueError: no or several source series, source images of different sizes, a
            ``labels`` array that is not 3D unsigned integers, a shape that disagrees with
            the source series (both named), or values that are not labels of the card (named).
    """
    series_uid = source_series_uid(source)
    _check_labels(source, labels, card)
    algorithm = hd.AlgorithmIdentificationSequence(
        name=card.name, family=codes.cid7162.ArtificialIntelligence, version=str(card.version))
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
    return hd.seg.Segmentation(
        source_images=source,
        pixel_array=masks,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=derived_uid(series_uid, card.name, card.version, "seg-series"),
        series_number=series_number,
        sop_instance_uid=derived_uid(series_uid, card.name, card.version, "seg-instance"),
        instance_number=1,
        manufacturer=manufacturer,
        manufacturer_model_name=card.name,
        software_versions=f"medssl {__version__}",
        device_serial_number=f"{card.name} v{card.version}",
        content_description=f"{card.name} v{card.version}"[:64],
        series_description=f"{card.name} v{card.version} segmentation"[:64],
        omit_empty_frames=bool(masks.any()),
    )


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
    path = Path(path)
    seg = label_seg(source, labels, card, manufacturer=manufacturer, series_number=series_number)
    atomic_write(path, lambda fh: seg.save_as(fh, enforce_file_format=True))
    return path


def _check_labels(source: Sequence[Dataset], labels: np.ndarray, card: ModelCard) -> None:
    sizes = {(int(ds.Rows), int(ds.Columns)) for ds in source}
    if len(sizes) != 1:
        raise ValueError(f"source images differ in size (Rows, Columns): {sorted(sizes)}")
    expected = (len(source), *sizes.pop())
    if not isinstance(labels, np.ndarray) or labels.dtype.kind not in "ub":
        kind = labels.dtype if isinstance(labels, np.ndarray) else type(labels).__name__
        raise ValueError(f"labels must be a numpy array of unsigned integers, got {kind}")
    if labels.shape != expected:
        raise ValueError(f"labels shape {labels.shape} disagrees with the source series "
                         f"(slices, rows, columns) {expected}")
    known = {0, *(label.value for label in card.labels)}
    unknown = sorted(int(v) for v in np.unique(labels) if int(v) not in known)
    if unknown:
        raise ValueError(f"labels hold values {unknown} that are not labels of model "
                         f"{card.name!r} (0 = background, card labels {sorted(known - {0})})")
