"""Header-only index of a DICOM tree: one row per series, the input of archive scoring.

Only headers are read (``stop_before_pixels``), in parallel processes for big
trees, so indexing 10,000 files takes seconds. Files that are not DICOM or do
not parse are listed with the reason instead of stopping the index: whatever one
file's header raises makes that file unreadable (named by the exception type only,
as a message may quote header values), never the index fail.

Series are grouped by SeriesInstanceUID. Anonymised files whose SeriesInstanceUID is
blank or missing are grouped by folder and geometry instead
(:func:`medssl.io.dicom_files.series_key`) and flagged ``series_uid_absent``; their SOP Class
and Instance UIDs are taken from the file meta when the dataset's are blank, and the series
is keyed by a hash of its members' SOP Instance UIDs
(:func:`medssl.io.dicom_files.derived_series_key`), the same on every run, wherever the
archive lies, and the same key the readers give it.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from pathlib import Path

import numpy as np

from medssl.errors import CorruptFileError, MedsslError
from medssl.io.dicom_files import derived_series_key, iter_files, read_dataset, series_key

__all__ = ["DicomIndex", "SeriesRecord", "index_files", "index_tree", "read_index", "write_index"]

#: Headers read per task when indexing in parallel processes.
CHUNK = 256
#: Below this many files, parallel processes cost more than they save.
PARALLEL_MIN_FILES = 1000


@dataclass
class SeriesRecord:
    """One series of an indexed tree.

    ``orientation`` is AXIAL, CORONAL, SAGITTAL (slice normal within ~25 degrees
    of an axis), OBLIQUE, or MIXED when slices disagree. ``n_slices`` counts
    frames (enhanced CT holds many in one file). ``files`` are absolute paths.

    ``series_key`` is the SeriesInstanceUID, or for a series without one
    (``series_uid_absent``, ``series_uid == ""``) the derived ``nouid-<20 hex>`` key of
    its members' SOP Instance UIDs (:func:`medssl.io.dicom_files.derived_series_key`):
    unique and the same on every run.
    """

    patient_id: str
    study_uid: str
    series_uid: str
    modality: str
    sop_class_uid: str
    image_type: str
    series_description: str
    series_number: int | None
    study_date: str
    body_part: str
    n_files: int
    n_slices: int
    slice_thickness: float | None
    orientation: str
    rows: int | None
    columns: int | None
    files: list[str] = field(default_factory=list)
    series_key: str = ""
    series_uid_absent: bool = False

    def __post_init__(self) -> None:
        if not self.series_key:  # tables written before the key existed
            self.series_key = self.series_uid


@dataclass
class DicomIndex:
    """The index of a tree: its series and the files that could not be indexed."""

    series: list[SeriesRecord]
    unreadable: list[tuple[str, str]]

    @property
    def n_files(self) -> int:
        """Files indexed into series."""
        return sum(s.n_files for s in self.series)


def index_tree(
    root: str | Path,
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> DicomIndex:
    """Index every DICOM file under ``root`` by its header.

    Args:
        root: a directory of any layout (``patient/study/series/*.dcm``, flat, ...).
        workers: processes reading headers; default: CPU count when the tree
            has more than :data:`PARALLEL_MIN_FILES` files, else 1.
        progress: called with the number of files done after each chunk.

    Returns:
        Series sorted by (patient, study, series number, series UID); files
        within a series sorted by path.
    """
    root = Path(root)
    if not root.is_dir():
        raise MedsslError(f"{root}: not a directory")
    # Files that are not DICOM fail in read_dataset and are listed as unreadable.
    paths = [str(p) for p in iter_files(root.absolute())]
    if workers is None:
        workers = (os.cpu_count() or 1) if len(paths) > PARALLEL_MIN_FILES else 1
    chunks = [paths[i : i + CHUNK] for i in range(0, len(paths), CHUNK)]
    headers: list[dict[str, object]] = []
    done = 0
    read = partial(_read_headers, root=str(root.absolute()))
    if workers > 1 and len(chunks) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results: Iterable[list[dict[str, object]]] = pool.map(read, chunks)
            for chunk, result in zip(chunks, results):
                headers.extend(result)
                done += len(chunk)
                if progress:
                    progress(done)
    else:
        for chunk in chunks:
            headers.extend(read(chunk))
            done += len(chunk)
            if progress:
                progress(done)
    return _index(headers)


def index_files(paths: Sequence[str | Path]) -> DicomIndex:
    """Index the given files by their headers, in this process (e.g. one study's instances).

    Returns:
        As :func:`index_tree`: series sorted by (patient, study, series number, series key),
        files within a series sorted by path (absolute), files whose header does not parse
        (or raises anything) listed.
    """
    return _index(_read_headers([str(Path(p).absolute()) for p in paths]))


def _index(headers: list[dict[str, object]]) -> DicomIndex:
    """Series and unreadable files of :func:`_read_headers`' output."""
    unreadable = [(str(h["path"]), str(h["error"])) for h in headers if "error" in h]
    series = _build_series([h for h in headers if "error" not in h])
    return DicomIndex(series=series, unreadable=sorted(unreadable))


def _read_headers(paths: Sequence[str], root: str | None = None) -> list[dict[str, object]]:
    """Header fields of each file (picklable dicts, for worker processes).

    A file whose header raises anything is ``{"path", "error"}``: the reason of a
    CorruptFileError, else the exception's type only (its message may quote header values).
    ``root``: derived series keys name folders relative to it (absolute without it).
    """
    out: list[dict[str, object]] = []
    for path in paths:
        try:
            out.append(_header(path, root))
        except CorruptFileError as exc:
            out.append({"path": path, "error": exc.problem})
        except Exception as exc:  # noqa: BLE001 - one file's header never stops the index
            out.append({"path": path, "error": f"header could not be read ({type(exc).__name__})"})
    return out


def _header(path: str, root: str | None) -> dict[str, object]:
    ds = read_dataset(path, stop_before_pixels=True)
    folder = os.path.dirname(path)
    if root is not None:
        folder = os.path.relpath(folder, root)
    key, absent = series_key(ds, folder)
    orientation = ds.get("ImageOrientationPatient")
    if orientation is None and "SharedFunctionalGroupsSequence" in ds:
        shared = ds.SharedFunctionalGroupsSequence
        plane = shared[0].get("PlaneOrientationSequence") if shared else None
        orientation = plane[0].get("ImageOrientationPatient") if plane else None
    return {
        "path": path,
        "patient_id": str(ds.get("PatientID", "")),
        "study_uid": str(ds.get("StudyInstanceUID", "") or "").strip(),
        "series_uid": "" if absent else key,
        "series_key": key,
        "series_uid_absent": absent,
        "sop_uid": str(ds.get("SOPInstanceUID", "") or ""),
        "modality": str(ds.get("Modality", "")),
        "sop_class_uid": str(ds.get("SOPClassUID", "")),
        "image_type": "\\".join(str(v) for v in _values(ds.get("ImageType"))),
        "series_description": str(ds.get("SeriesDescription", "")),
        "series_number": _int_or_none(ds.get("SeriesNumber")),
        "study_date": str(ds.get("StudyDate", "")),
        "body_part": str(ds.get("BodyPartExamined", "")),
        "slice_thickness": _float_or_none(ds.get("SliceThickness")),
        "orientation": _orientation_label(orientation),
        "rows": _int_or_none(ds.get("Rows")),
        "columns": _int_or_none(ds.get("Columns")),
        "frames": _int_or_none(ds.get("NumberOfFrames")) or 1,
    }


def _values(value: object) -> list[object]:
    """A header value as a list (a one-valued attribute is not a sequence)."""
    if value is None:
        return []
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return list(value)
    return [value]


def _build_series(headers: list[dict[str, object]]) -> list[SeriesRecord]:
    groups: dict[str, list[dict[str, object]]] = {}
    for header in headers:
        groups.setdefault(str(header["series_key"]), []).append(header)
    records = []
    for key, members in groups.items():
        members.sort(key=lambda h: str(h["path"]))
        first = members[0]
        if first["series_uid_absent"]:
            key = derived_series_key([str(m["sop_uid"]) for m in members], key)
        orientations = {m["orientation"] for m in members}
        thicknesses = [m["slice_thickness"] for m in members if m["slice_thickness"] is not None]
        records.append(
            SeriesRecord(
                patient_id=str(first["patient_id"]),
                study_uid=str(first["study_uid"]),
                series_uid=str(first["series_uid"]),
                modality=str(first["modality"]),
                sop_class_uid=str(first["sop_class_uid"]),
                image_type=str(first["image_type"]),
                series_description=str(first["series_description"]),
                series_number=first["series_number"],  # type: ignore[arg-type]
                study_date=str(first["study_date"]),
                body_part=str(first["body_part"]),
                n_files=len(members),
                n_slices=int(sum(int(m["frames"]) for m in members)),  # type: ignore[call-overload]
                slice_thickness=float(np.median(thicknesses)) if thicknesses else None,
                orientation=str(orientations.pop()) if len(orientations) == 1 else "MIXED",
                rows=first["rows"],  # type: ignore[arg-type]
                columns=first["columns"],  # type: ignore[arg-type]
                files=[str(m["path"]) for m in members],
                series_key=key,
                series_uid_absent=bool(first["series_uid_absent"]),
            )
        )
    records.sort(key=lambda r: (r.patient_id, r.study_uid, r.series_number or 0, r.series_key))
    return records


def _orientation_label(orientation: object) -> str:
    """AXIAL / CORONAL / SAGITTAL / OBLIQUE from ImageOrientationPatient (plain floats, hot);
    ``""`` when it is absent or malformed (not 6 numbers)."""
    values = _values(orientation)
    if len(values) != 6:
        return ""
    try:
        rx, ry, rz, cx, cy, cz = (float(v) for v in values)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return ""
    normal = (ry * cz - rz * cy, rz * cx - rx * cz, rx * cy - ry * cx)
    axis = max(range(3), key=lambda k: abs(normal[k]))
    if abs(normal[axis]) < 0.9:
        return "OBLIQUE"
    return ("SAGITTAL", "CORONAL", "AXIAL")[axis]


def _int_or_none(value: object) -> int | None:
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _float_or_none(value: object) -> float | None:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


# -- tables -------------------------------------------------------------------

_COLUMNS = [f.name for f in fields(SeriesRecord)]


def write_index(index: DicomIndex, path: str | Path) -> Path:
    """Write the series table as Parquet (``.parquet``) or CSV (``.csv``).

    In CSV the ``files`` column holds a JSON list.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [asdict(s) for s in index.series]
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pylist(rows, schema=_arrow_schema(pa))
        pq.write_table(table, path)
    elif path.suffix == ".csv":
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=_COLUMNS)
            writer.writeheader()
            for row in rows:
                writer.writerow({**row, "files": json.dumps(row["files"])})
    else:
        raise MedsslError(f"{path}: index tables are .parquet or .csv")
    return path


def read_index(path: str | Path) -> DicomIndex:
    """Read a table written by :func:`write_index` (unreadable files are not stored)."""
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    elif path.suffix == ".csv":
        with open(path, newline="") as fh:
            rows = [_parse_csv_row(r) for r in csv.DictReader(fh)]
    else:
        raise MedsslError(f"{path}: index tables are .parquet or .csv")
    return DicomIndex(series=[SeriesRecord(**r) for r in rows], unreadable=[])


def _parse_csv_row(row: dict[str, str]) -> dict[str, object]:
    parsed: dict[str, object] = dict(row)
    parsed["files"] = json.loads(row["files"])
    for key in ("series_number", "rows", "columns", "n_files", "n_slices"):
        parsed[key] = _int_or_none(row[key])
    parsed["slice_thickness"] = _float_or_none(row["slice_thickness"])
    if "series_uid_absent" in row:
        parsed["series_uid_absent"] = row["series_uid_absent"] == "True"
    return parsed


def _arrow_schema(pa):  # type: ignore[no-untyped-def]
    text = pa.string()
    return pa.schema(
        [
            ("patient_id", text),
            ("study_uid", text),
            ("series_uid", text),
            ("modality", text),
            ("sop_class_uid", text),
            ("image_type", text),
            ("series_description", text),
            ("series_number", pa.int64()),
            ("study_date", text),
            ("body_part", text),
            ("n_files", pa.int64()),
            ("n_slices", pa.int64()),
            ("slice_thickness", pa.float64()),
            ("orientation", text),
            ("rows", pa.int64()),
            ("columns", pa.int64()),
            ("files", pa.list_(text)),
            ("series_key", text),
            ("series_uid_absent", pa.bool_()),
        ]
    )
