"""A result object on disk, named by what was written (no one re-reads the file to learn it)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydicom.dataset import Dataset
from pydicom.uid import Comprehensive3DSRStorage, SegmentationStorage

from medssl.atomic import atomic_write

__all__ = ["WrittenObject", "save"]

#: Label Map Segmentation Storage (DICOM 2024c; a LABELMAP SEG, ``seg_type="labelmap"``).
LABEL_MAP_SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.7"
_KINDS: dict[str, Literal["sr", "seg"]] = {
    Comprehensive3DSRStorage: "sr",
    SegmentationStorage: "seg",
    LABEL_MAP_SEGMENTATION_STORAGE: "seg",
}


@dataclass(frozen=True)
class WrittenObject:
    """A DICOM result written for a series.

    Attributes:
        path: the file (DICOM Part 10).
        kind: ``"sr"`` (Comprehensive 3D SR) or ``"seg"`` (Segmentation).
        sop_class_uid / sop_instance_uid / series_instance_uid: its UIDs, from the dataset
            that was written.
    """

    path: Path
    kind: Literal["sr", "seg"]
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str


def save(ds: Dataset, path: str | Path) -> WrittenObject:
    """Write ``ds`` to ``path`` atomically (:func:`medssl.atomic.atomic_write`) and say what it is.

    Raises:
        ValueError: ``ds`` is neither an SR nor a SEG of the kinds medssl writes.
        OSError: the write failed (``path`` is left as it was).
    """
    sop_class = str(ds.SOPClassUID)
    if sop_class not in _KINDS:
        raise ValueError(f"not a result object medssl writes: SOP class {sop_class}")
    path = Path(path)
    atomic_write(path, lambda fh: ds.save_as(fh, enforce_file_format=True))
    return WrittenObject(
        path, _KINDS[sop_class], sop_class, str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID)
    )
