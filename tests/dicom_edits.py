"""Edits that turn the synthetic series the fixtures write into what real archives hold:
anonymised (blank UIDs, the file meta kept), without a FrameOfReferenceUID, JPEG 2000
compressed, or with malformed or implausible headers."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import JPEG2000Lossless

#: What an anonymiser blanked in a real Siemens JPEG 2000 series: the dataset's UIDs; only
#: the file meta keeps the SOP Class and Instance UIDs.
BLANKED = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")


def edit(files: Iterable[Path], **attributes: Any) -> None:
    """Set (``None``: delete) dataset attributes of every file, in place; the file meta is kept."""
    for path in files:
        ds = pydicom.dcmread(path)
        for keyword, value in attributes.items():
            if value is None:
                if keyword in ds:
                    delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
        ds.save_as(path)


def blank_uids(files: Iterable[Path]) -> None:
    """Blank the dataset's Study, Series, SOP Instance and SOP Class UIDs (file meta kept)."""
    edit(files, **dict.fromkeys(BLANKED, ""))


def to_jpeg2000(files: Iterable[Path]) -> None:
    """Re-encode every file's pixel data as JPEG 2000 (lossless; pylibjpeg-openjpeg)."""
    for path in files:
        ds = pydicom.dcmread(path)
        ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
        ds.save_as(path)


def series_files(folder: Path) -> list[Path]:
    """The files of a series folder, sorted."""
    return sorted(p for p in folder.rglob("*") if p.is_file())


def copy_series(
    source: Path, target: Path, seed: str, count: int | None = None, **attributes: Any
) -> list[Path]:
    """Copy the first ``count`` files of a series folder (all: None) as a new series of the same
    study: a SeriesInstanceUID and SOPInstanceUIDs derived from ``seed`` (file meta too), and
    ``attributes`` set as in :func:`edit`."""
    from pydicom.uid import generate_uid

    target.mkdir(parents=True, exist_ok=True)
    copies = []
    for k, path in enumerate(series_files(source)[:count]):
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = generate_uid(entropy_srcs=[seed, "series"])
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(
            entropy_srcs=[seed, str(k)]
        )
        copy = target / path.name
        ds.save_as(copy)
        copies.append(copy)
    edit(copies, **attributes)
    return copies
