"""Header-only index of a DICOM tree: one row per series, the input of archive scoring.

Only headers are read (``stop_before_pixels``), in parallel processes for big
trees, so indexing 10,000 files takes seconds. Files that are not DICOM or do
not parse are listed with the reason instead of stopping the index: whatever one
file's header raises makes that file unreadable (named by the exception type only,
as a message may quote header values), never the index fail.

Large trees: with ``parts`` (``medssl index --out FILE`` uses ``FILE.parts/``) the file listing
and every chunk's header rows are written to Parquet part files as they are read, by the worker
processes themselves, so memory holds one chunk per worker and an interrupted index (killed,
rebooted) resumes at the first chunk without a part file. Series are grouped from the part
files with Arrow at the end, never as one Python object per file.

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
import io
import json
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, SupportsIndex, SupportsInt

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydicom.dataset import Dataset

from medssl.atomic import atomic_write
from medssl.errors import CorruptFileError, MedsslError
from medssl.io.dicom_files import derived_series_key, iter_files, read_dataset, series_key

__all__ = [
    "INDEX_SCHEMA",
    "DicomIndex",
    "SeriesRecord",
    "index_files",
    "index_table",
    "index_tree",
    "iter_index",
    "read_index",
    "write_index",
    "write_index_table",
]

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
    #: With ``index_files(..., keep_headers=True)``: each indexed file's dataset by its path
    #: (absolute), pixel data left on disk, for the reader to use instead of parsing it again.
    headers: dict[str, Dataset] = field(default_factory=dict)

    @property
    def n_files(self) -> int:
        """Files indexed into series."""
        return sum(s.n_files for s in self.series)


def index_tree(
    root: str | Path,
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
    parts: str | Path | None = None,
) -> DicomIndex:
    """Index every DICOM file under ``root`` by its header.

    Args:
        root: a directory of any layout (``patient/study/series/*.dcm``, flat, ...).
        workers: processes reading headers; default: CPU count when the tree
            has more than :data:`PARALLEL_MIN_FILES` files, else 1.
        progress: called with the number of files done after each chunk (on resume,
            first with the files the earlier run already did).
        parts: a folder for the listing and the per-chunk header tables, which makes the
            index resumable (see :func:`index_table`); None keeps them in memory.

    Returns:
        Series sorted by (patient, study, series number, series key); files
        within a series sorted by path.
    """
    table, unreadable = index_table(root, workers=workers, progress=progress, parts=parts)
    return DicomIndex(
        series=[SeriesRecord(**row) for row in table.to_pylist()], unreadable=unreadable
    )


def index_table(
    root: str | Path,
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
    parts: str | Path | None = None,
) -> tuple[pa.Table, list[tuple[str, str]]]:
    """The index of ``root`` as an Arrow table (one row per series, the columns of
    :class:`SeriesRecord`), and the unreadable files; the form :func:`write_index_table`
    writes without a Python object per file.

    With ``parts``, the sorted file listing is saved once (``listing.parquet``, with the
    root and chunk size in ``index.json``), and each chunk of :data:`CHUNK` files is written
    by the worker that read it to ``part-NNNNNNNN.parquet`` (atomically). A re-run with the
    same ``parts`` reads only the chunks without a part file. Files added to the tree after
    the listing are not seen by that resume; delete the folder to re-list.

    Raises:
        MedsslError: ``root`` is not a directory, or ``parts`` belongs to another root.
    """
    root = Path(root).absolute()
    if not root.is_dir():
        raise MedsslError(f"{root}: not a directory")
    parts_dir = Path(parts) if parts is not None else None
    paths = _listing(root, parts_dir)
    if workers is None:
        workers = (os.cpu_count() or 1) if len(paths) > PARALLEL_MIN_FILES else 1
    chunks = [
        (i, paths[i * CHUNK : (i + 1) * CHUNK]) for i in range((len(paths) + CHUNK - 1) // CHUNK)
    ]
    tables: dict[int, pa.Table] = {}
    done = 0
    if parts_dir is not None:
        finished = [(i, c) for i, c in chunks if _part_path(parts_dir, i).is_file()]
        done = sum(len(c) for _, c in finished)
        chunks = [(i, c) for i, c in chunks if not _part_path(parts_dir, i).is_file()]
        if progress and done:
            progress(done)
    if workers > 1 and len(chunks) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            pending: dict[Future[pa.Table | None], int] = {}
            queue = iter(chunks)
            for i, chunk in queue:  # a bounded number of chunks in flight: memory stays flat
                pending[
                    pool.submit(_index_chunk, chunk, str(root), _part_or_none(parts_dir, i))
                ] = i
                if len(pending) >= 2 * workers:
                    break
            while pending:
                finished_now, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished_now:
                    i = pending.pop(future)
                    table = future.result()
                    if table is not None:
                        tables[i] = table
                    done += CHUNK if (i + 1) * CHUNK <= len(paths) else len(paths) - i * CHUNK
                    if progress:
                        progress(done)
                    nxt = next(queue, None)
                    if nxt is not None:
                        pending[
                            pool.submit(
                                _index_chunk, nxt[1], str(root), _part_or_none(parts_dir, nxt[0])
                            )
                        ] = nxt[0]
    else:
        for i, chunk in chunks:
            table = _index_chunk(chunk, str(root), _part_or_none(parts_dir, i))
            if table is not None:
                tables[i] = table
            done += len(chunk)
            if progress:
                progress(done)
    if parts_dir is not None:
        headers = _read_parts(parts_dir, (len(paths) + CHUNK - 1) // CHUNK)
    else:
        headers = (
            pa.concat_tables([tables[i] for i in sorted(tables)])
            if tables
            else _HEADER_SCHEMA.empty_table()
        )
    return _series_table(headers)


def _part_path(parts: Path, i: int) -> Path:
    return parts / f"part-{i:08d}.parquet"


def _part_or_none(parts: Path | None, i: int) -> str | None:
    return None if parts is None else str(_part_path(parts, i))


def _listing(root: Path, parts: Path | None) -> list[str]:
    """The sorted files under ``root``; saved in (and on resume read from) ``parts``."""
    if parts is None:
        return [str(p) for p in iter_files(root)]
    meta = {"root": str(root), "chunk": CHUNK}
    listing, described = parts / "listing.parquet", parts / "index.json"
    if described.is_file():
        found = json.loads(described.read_text(encoding="utf-8"))
        if {k: found.get(k) for k in meta} != meta:
            raise MedsslError(
                f"{parts}: holds a partial index of another tree or chunk size "
                f"({found.get('root')}); delete the folder or give another --out"
            )
        if listing.is_file():
            return pq.read_table(listing).column("path").to_pylist()
    parts.mkdir(parents=True, exist_ok=True)
    paths = [str(p) for p in iter_files(root)]
    _write_parquet(listing, pa.table({"path": pa.array(paths, pa.string())}))
    atomic_write(described, lambda fh: fh.write(json.dumps({**meta, "files": len(paths)}).encode()))
    return paths


def _index_chunk(paths: Sequence[str], root: str, part: str | None) -> pa.Table | None:
    """Worker body: one chunk's header rows; written to ``part`` (and None returned) when given,
    so large indexes never send their rows back through the pool."""
    table = pa.Table.from_pylist(_read_headers(paths, root), schema=_HEADER_SCHEMA)
    if part is None:
        return table
    _write_parquet(Path(part), table)
    return None


def _read_parts(parts: Path, n_chunks: int) -> pa.Table:
    tables = [pq.read_table(_part_path(parts, i), schema=_HEADER_SCHEMA) for i in range(n_chunks)]
    return pa.concat_tables(tables) if tables else _HEADER_SCHEMA.empty_table()


def _write_parquet(path: Path, table: pa.Table) -> None:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    atomic_write(path, lambda fh: fh.write(buffer.getvalue()))


def index_files(paths: Sequence[str | Path], keep_headers: bool = False) -> DicomIndex:
    """Index the given files by their headers, in this process (e.g. one study's instances).

    Args:
        paths: the files.
        keep_headers: also return each file's dataset (``DicomIndex.headers``, pixel data
            deferred), so that reading a series parses no header a second time
            (:func:`medssl.io.dicom_series.load_dicom_series`'s ``headers``). For one study,
            not an archive: the datasets stay in memory.

    Returns:
        As :func:`index_tree`: series sorted by (patient, study, series number, series key),
        files within a series sorted by path (absolute), files whose header does not parse
        (or raises anything) listed.
    """
    kept: dict[str, Dataset] | None = {} if keep_headers else None
    index = _index(_read_headers([str(Path(p).absolute()) for p in paths], kept=kept))
    if kept is not None:
        index.headers = kept
    return index


def _index(headers: list[dict[str, object]]) -> DicomIndex:
    """Series and unreadable files of :func:`_read_headers`' output."""
    table, unreadable = _series_table(pa.Table.from_pylist(headers, schema=_HEADER_SCHEMA))
    return DicomIndex(
        series=[SeriesRecord(**row) for row in table.to_pylist()], unreadable=unreadable
    )


def _read_headers(
    paths: Sequence[str], root: str | None = None, kept: dict[str, Dataset] | None = None
) -> list[dict[str, object]]:
    """Header fields of each file (picklable dicts, for worker processes).

    A file whose header raises anything is ``{"path", "error"}``: the reason of a
    CorruptFileError, else the exception's type only (its message may quote header values).
    ``root``: derived series keys name folders relative to it (absolute without it).
    ``kept``: each file's dataset is read whole with its pixel data deferred and stored here
    by path (in this process only).
    """
    out: list[dict[str, object]] = []
    for path in paths:
        try:
            if kept is None:
                out.append(_header(read_dataset(path, stop_before_pixels=True), path, root))
            else:
                ds = read_dataset(path, defer_pixels=True)
                out.append(_header(ds, path, root))
                kept[path] = ds
        except CorruptFileError as exc:
            out.append({"path": path, "error": exc.problem})
        except Exception as exc:  # noqa: BLE001 - one file's header never stops the index
            out.append({"path": path, "error": f"header could not be read ({type(exc).__name__})"})
    return out


def _header(ds: Dataset, path: str, root: str | None) -> dict[str, object]:
    """The index fields of ``ds``, the dataset of the file at ``path``."""
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


#: One row per file: the header fields :func:`_header` reads, or ``path`` + ``error``.
_HEADER_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("error", pa.string()),
        ("patient_id", pa.string()),
        ("study_uid", pa.string()),
        ("series_uid", pa.string()),
        ("series_key", pa.string()),
        ("series_uid_absent", pa.bool_()),
        ("sop_uid", pa.string()),
        ("modality", pa.string()),
        ("sop_class_uid", pa.string()),
        ("image_type", pa.string()),
        ("series_description", pa.string()),
        ("series_number", pa.int64()),
        ("study_date", pa.string()),
        ("body_part", pa.string()),
        ("slice_thickness", pa.float64()),
        ("orientation", pa.string()),
        ("rows", pa.int64()),
        ("columns", pa.int64()),
        ("frames", pa.int64()),
    ]
)
#: Series fields taken from the first file (by path) of the series.
_FIRST = (
    "patient_id",
    "study_uid",
    "series_uid",
    "modality",
    "sop_class_uid",
    "image_type",
    "series_description",
    "series_number",
    "study_date",
    "body_part",
    "rows",
    "columns",
    "series_uid_absent",
)


def _series_table(headers: pa.Table) -> tuple[pa.Table, list[tuple[str, str]]]:
    """Group per-file header rows into series (Arrow group-by; no Python object per file).

    Returns:
        The series table (:func:`_arrow_schema`), sorted by (patient, study, series number,
        series key), files sorted by path; and ``(path, reason)`` of the unreadable files, sorted.
    """
    failed = headers.filter(pc.is_valid(headers["error"]))
    unreadable = sorted(zip(failed["path"].to_pylist(), failed["error"].to_pylist()))
    ok = headers.filter(pc.is_null(headers["error"])).sort_by(
        [("series_key", "ascending"), ("path", "ascending")]
    )
    if ok.num_rows == 0:
        return _arrow_schema().empty_table(), unreadable
    ok = _derive_absent_keys(ok)
    first = pc.ScalarAggregateOptions(skip_nulls=False)
    grouped = ok.group_by("series_key", use_threads=False).aggregate(
        [(name, "first", first) for name in _FIRST]
        + [
            ("path", "list"),
            ("path", "count"),
            ("frames", "sum"),
            ("slice_thickness", "list"),
            ("orientation", "count_distinct", pc.CountOptions(mode="all")),
            ("orientation", "first", first),
        ]
    )
    thickness = [
        float(np.median([t for t in ts if t is not None]))
        if any(t is not None for t in ts)
        else None
        for ts in grouped["slice_thickness_list"].to_pylist()
    ]
    orientation = pc.if_else(
        pc.equal(grouped["orientation_count_distinct"], 1),
        grouped["orientation_first"],
        pa.scalar("MIXED"),
    )
    columns: dict[str, Any] = {name: grouped[f"{name}_first"] for name in _FIRST}
    columns.update(
        n_files=grouped["path_count"],
        n_slices=grouped["frames_sum"],
        slice_thickness=pa.array(thickness, pa.float64()),
        orientation=orientation,
        files=grouped["path_list"],
        series_key=grouped["series_key"],
    )
    schema = _arrow_schema()
    table = pa.table(
        {name: pc.cast(columns[name], schema.field(name).type) for name in schema.names},
        schema=schema,
    )
    order = pa.table(
        {
            "p": table["patient_id"],
            "s": table["study_uid"],
            "n": pc.fill_null(table["series_number"], 0),
            "k": table["series_key"],
        }
    )
    indices = pc.sort_indices(
        order,
        sort_keys=[("p", "ascending"), ("s", "ascending"), ("n", "ascending"), ("k", "ascending")],
    )
    return table.take(indices), unreadable


def _derive_absent_keys(ok: pa.Table) -> pa.Table:
    """Give the files of each series without a SeriesInstanceUID the derived key of its members'
    SOP Instance UIDs (:func:`medssl.io.dicom_files.derived_series_key`). ``ok`` is sorted by
    (series key, path); the absent series are few, so they are grouped in Python."""
    absent = ok["series_uid_absent"]
    if not pc.any(absent).as_py():
        return ok
    rows = ok.filter(absent).select(["series_key", "sop_uid"]).to_pylist()
    members: dict[str, list[str]] = {}
    for row in rows:
        members.setdefault(row["series_key"], []).append(row["sop_uid"] or "")
    derived = {key: derived_series_key(uids, key) for key, uids in members.items()}
    keys = ok["series_key"].to_pylist()
    flags = absent.to_pylist()
    new = [derived[k] if flag else k for k, flag in zip(keys, flags)]
    return ok.set_column(
        ok.schema.get_field_index("series_key"), "series_key", pa.array(new, pa.string())
    )


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
    """An integer header value; None when absent, not a number, or beyond 64 bits (a damaged
    header must not stop the index's Arrow tables)."""
    if not isinstance(value, (int, float, str, bytes, SupportsInt, SupportsIndex)):
        return None  # int() would raise TypeError
    try:
        number = int(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return number if -(2**63) <= number < 2**63 else None


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
    table = pa.Table.from_pylist([asdict(s) for s in index.series], schema=_arrow_schema())
    return write_index_table(table, path)


def write_index_table(table: pa.Table, path: str | Path) -> Path:
    """Write a series table of :func:`index_table` as Parquet or CSV (atomically), as
    :func:`write_index` does."""
    path = Path(path)
    if path.suffix not in (".parquet", ".csv"):
        raise MedsslError(f"{path}: index tables are .parquet or .csv")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        _write_parquet(path, table)
        return path
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in table.to_pylist():
        writer.writerow({**row, "files": json.dumps(row["files"])})
    data = text.getvalue().encode("utf-8")
    atomic_write(path, lambda fh: fh.write(data))
    return path


def read_index(path: str | Path) -> DicomIndex:
    """Read a table written by :func:`write_index` (unreadable files are not stored)."""
    return DicomIndex(series=list(iter_index(path)), unreadable=[])


def iter_index(path: str | Path, batch_rows: int = 2048) -> Iterator[SeriesRecord]:
    """The series of an index table one at a time, read ``batch_rows`` rows at a time from
    Parquet, so a 200k-series index (~21M file paths) is never in memory as Python objects at once.

    Raises:
        MedsslError: not a ``.parquet`` / ``.csv`` table.
    """
    path = Path(path)
    if path.suffix.lower() == ".parquet":
        for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows):
            for row in batch.to_pylist():
                yield SeriesRecord(**row)
    elif path.suffix.lower() == ".csv":
        with open(path, newline="") as fh:
            for row in csv.DictReader(fh):
                yield SeriesRecord(**_parse_csv_row(row))  # type: ignore[arg-type]
    else:
        raise MedsslError(f"{path}: index tables are .parquet or .csv")


def _parse_csv_row(row: dict[str, str]) -> dict[str, object]:
    parsed: dict[str, object] = dict(row)
    parsed["files"] = json.loads(row["files"])
    for key in ("series_number", "rows", "columns", "n_files", "n_slices"):
        parsed[key] = _int_or_none(row[key])
    parsed["slice_thickness"] = _float_or_none(row["slice_thickness"])
    if "series_uid_absent" in row:
        parsed["series_uid_absent"] = row["series_uid_absent"] == "True"
    return parsed


def _arrow_schema() -> pa.Schema:
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


#: The Arrow schema of an index table (the fields of :class:`SeriesRecord`).
INDEX_SCHEMA = _arrow_schema()
