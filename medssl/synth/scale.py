"""NLST-sized inputs made by code, for the scale tests and ``benchmarks/scale.py``.

NLST: ~73k CT exams, ~200k series, ~21M files (about 105 files per series, about 2.7 series
per exam: the thin reconstruction, a thick one, a localizer). Two forms:

* :func:`header_records` / :func:`write_header_index`: index rows (``medssl index``'s table),
  no files at all, for the metadata path (manifest, selection, resume store, Ray planning,
  the final tables) at 200k series;
* :func:`write_header_files`: tiny DICOM files (real headers, 2×2 pixels) in a
  patient/study/series tree, for ``medssl index`` at 200k files.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian

from medssl.index import INDEX_SCHEMA, SeriesRecord

__all__ = ["header_records", "write_header_files", "write_header_index"]

#: (description, image type, slice thickness mm, files relative to the mean) of an NLST-like
#: exam's series: a thin and a thick reconstruction and a localizer average ``files_per_series``.
_SERIES_KINDS = (
    ("1.0 mm lung", "ORIGINAL\\PRIMARY\\AXIAL", 1.0, 1.95),
    ("2.5 mm std", "ORIGINAL\\PRIMARY\\AXIAL", 2.5, 1.03),
    ("scout", "ORIGINAL\\PRIMARY\\LOCALIZER", 2.0, 0.0),
)
_ROOT_UID = "1.2.826.0.1.3680043.10.1147."


def _uid(*parts: int) -> str:
    return _ROOT_UID + ".".join(str(p) for p in parts)


def header_records(
    n_series: int, files_per_series: int = 105, root: str = "/archive/NLST", seed: int = 0
) -> Iterator[SeriesRecord]:
    """NLST-like index rows, about three series per exam and three exams per participant.

    Args:
        n_series: rows to make.
        files_per_series: mean files of a CT series (localizers have 1-2).
        root: the folder the (absent) files are named under.
        seed: the random draw of sizes.

    Yields:
        :class:`~medssl.index.SeriesRecord` rows, in index order; file paths like
        ``ROOT/<participant>/<exam>/<series>/<n>.dcm``.
    """
    rng = random.Random(seed)
    made = 0
    exam = 0
    while made < n_series:
        participant = 100000 + exam // 3
        study = _uid(1, exam)
        for number, (description, image_type, thickness, share) in enumerate(
            _SERIES_KINDS, start=1
        ):
            if made >= n_series:
                break
            if share == 0.0:
                n_files = rng.randint(1, 2)
            else:
                n_files = max(
                    16, int(rng.gauss(files_per_series * share, 0.1 * files_per_series * share))
                )
            folder = f"{root}/{participant}/{study}/{number}"
            yield SeriesRecord(
                patient_id=str(participant),
                study_uid=study,
                series_uid=_uid(2, exam, number),
                modality="CT",
                sop_class_uid=CTImageStorage,
                image_type=image_type,
                series_description=description,
                series_number=number,
                study_date=f"{1999 + exam % 3}0{1 + exam % 9}15",
                body_part="CHEST",
                n_files=n_files,
                n_slices=n_files,
                slice_thickness=thickness,
                orientation="AXIAL" if share else "CORONAL",
                rows=512,
                columns=512,
                files=[f"{folder}/{i:06d}.dcm" for i in range(1, n_files + 1)],
                series_key=_uid(2, exam, number),
            )
            made += 1
        exam += 1


def write_header_index(
    path: str | Path, n_series: int, files_per_series: int = 105, seed: int = 0, batch: int = 5000
) -> Path:
    """Write :func:`header_records` as a ``medssl index`` Parquet table, ``batch`` rows at a
    time (memory stays flat whatever ``n_series``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    schema = INDEX_SCHEMA
    rows: list[dict] = []
    with pq.ParquetWriter(path, schema) as writer:
        for record in header_records(n_series, files_per_series, seed=seed):
            rows.append(asdict(record))
            if len(rows) == batch:
                writer.write_table(pa.Table.from_pylist(rows, schema=schema))
                rows = []
        if rows:
            writer.write_table(pa.Table.from_pylist(rows, schema=schema))
    return path


def write_header_files(root: str | Path, n_files: int, files_per_series: int = 100) -> Path:
    """Write ``n_files`` tiny CT files (full headers, 2×2 pixels) as series of ``files_per_series``
    slices, three series per study: ``root/<patient>/<study>/<series>/<n>.dcm``.

    About 1 KB each; 200k files take a minute or two and ~250 MB.
    """
    root = Path(root)
    template = _template()
    for i in range(n_files):
        series, instance = divmod(i, files_per_series)
        exam = series // 3
        folder = root / f"{100000 + exam // 3}" / f"{exam}" / f"{series % 3 + 1}"
        if instance == 0:
            folder.mkdir(parents=True, exist_ok=True)
        ds = template
        ds.PatientID = str(100000 + exam // 3)
        ds.StudyInstanceUID = _uid(1, exam)
        ds.SeriesInstanceUID = _uid(2, series)
        ds.SeriesNumber = series % 3 + 1
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = UID(_uid(3, i))
        ds.InstanceNumber = instance + 1
        ds.ImagePositionPatient = [-175.0, -175.0, -1.25 * instance]
        ds.save_as(folder / f"{instance + 1:06d}.dcm", enforce_file_format=True)
    return root


def _template() -> pydicom.Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = UID(_uid(3, 0))
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.Modality = "CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.PatientName = "SCALE^TEST"
    ds.StudyDate = "20000101"
    ds.SeriesDescription = "1.25 mm lung"
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = 1.25
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [0.7, 0.7]
    ds.Rows = ds.Columns = 2
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = -1024.0
    ds.RescaleSlope = 1.0
    ds.PixelData = np.zeros((2, 2), np.int16).tobytes()
    return ds
