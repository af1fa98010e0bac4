"""The result store of a scoring run: one committed row per series, resumable.

``OUT_DIR/score.sqlite`` holds every series' row and findings. A series is written in one
transaction (its row and all its findings, or nothing), so killing the process loses at
most the series in flight; a re-run skips what is already ``ok`` or ``skipped`` for the same
model version and retries ``failed`` rows. :meth:`ResultStore.export` writes the tables users
read: ``series.parquet``, ``findings.parquet`` (and a LUNA16 submission), atomically.
"""

from __future__ import annotations

import csv
import io
import json
import sqlite3
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from medssl.atomic import atomic_write
from medssl.finding import Finding

__all__ = ["FINDING_COLUMNS", "SERIES_COLUMNS", "ResultStore", "write_unreadable"]

#: ``series.parquet`` columns and types. ``key`` is the SeriesInstanceUID, or the derived
#: ``nouid-...`` key of a series without one (``series_uid_absent`` true, ``series_uid`` empty);
#: ``note`` says why asked-for DICOM outputs were not written (the source lacks a UID).
#: ``report_threshold``: a detector's threshold in effect for the series (findings at or above
#: it are ``passed`` and in its SR/SEG); ``threshold_source`` says where it came from
#: (``operating_point``: the card's, chosen on validation; ``override``; ``legacy_default``).
#: ``n_windows_skipped`` and ``lung_mask_s``: windows a detector's lung mask skipped and the
#: mask's time; ``warning``: what the pipeline reported about the series (e.g. no lung found,
#: so every window ran).
SERIES_COLUMNS: dict[str, pa.DataType] = {
    "key": pa.string(),
    "patient_id": pa.string(),
    "study_uid": pa.string(),
    "series_uid": pa.string(),
    "status": pa.string(),
    "error": pa.string(),
    "model": pa.string(),
    "model_version": pa.int64(),
    "n_slices": pa.int64(),
    "source": pa.string(),
    "read_s": pa.float64(),
    "preprocess_s": pa.float64(),
    "inference_s": pa.float64(),
    "postprocess_s": pa.float64(),
    "n_windows": pa.int64(),
    "n_findings": pa.int64(),
    "max_probability": pa.float64(),
    "dicom_outputs": pa.string(),
    "label_map": pa.string(),
    "note": pa.string(),
    "series_uid_absent": pa.bool_(),
    "report_threshold": pa.float64(),
    "threshold_source": pa.string(),
    "n_windows_skipped": pa.int64(),
    "lung_mask_s": pa.float64(),
    "warning": pa.string(),
}
#: ``findings.parquet`` columns. Detection: one detection per row, LPS millimetres (``x_mm`` ...
#: ``probability``); every candidate is kept, and ``passed`` says whether it reached the series'
#: ``report_threshold`` (is in the SR/SEG). Segmentation: one row per label, ``index`` the class
#: value, ``label`` its
#: name and ``volume_ml`` its volume on the source grid.
FINDING_COLUMNS: dict[str, pa.DataType] = {
    "key": pa.string(),
    "series_uid": pa.string(),
    "index": pa.int64(),
    "x_mm": pa.float64(),
    "y_mm": pa.float64(),
    "z_mm": pa.float64(),
    "diameter_mm": pa.float64(),
    "probability": pa.float64(),
    "passed": pa.bool_(),
    "label": pa.string(),
    "volume_ml": pa.float64(),
    "model": pa.string(),
    "model_version": pa.int64(),
}
DONE = ("ok", "skipped")
#: Rows read from the store and written per Parquet row group by :meth:`ResultStore.export`.
_BATCH = 50_000


class ResultStore:
    """SQLite-backed rows of one output folder.

    Args:
        out_dir: the run's output folder (created if absent).
    """

    def __init__(self, out_dir: str | Path) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / "score.sqlite"
        self._db = sqlite3.connect(self.path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS series (key TEXT PRIMARY KEY, status TEXT, "
            "model TEXT, version INTEGER, row TEXT)"
        )
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS findings (key TEXT, idx INTEGER, row TEXT, "
            "PRIMARY KEY (key, idx))"
        )

    def close(self) -> None:
        self._db.close()

    def done(self, model: str, version: int) -> set[str]:
        """Keys already ``ok`` or ``skipped`` with this model version."""
        rows = self._db.execute(
            "SELECT key FROM series WHERE model = ? AND version = ? AND status IN (?, ?)",
            (model, version, *DONE),
        )
        return {key for (key,) in rows}

    def commit(self, row: Mapping[str, Any], findings: Sequence[Mapping[str, Any]] = ()) -> None:
        """Replace ``row["key"]``'s row and findings, in one transaction."""
        self.commit_many([(row, findings)])

    def commit_many(
        self, results: Sequence[tuple[Mapping[str, Any], Sequence[Mapping[str, Any]]]]
    ) -> None:
        """Replace the rows and findings of several series in one transaction (one fsync):
        for the skipped rows a run writes before it starts, ~70k of them for NLST."""
        for row, _ in results:
            unknown = set(row) - set(SERIES_COLUMNS)
            if unknown:
                raise ValueError(f"unknown series columns {sorted(unknown)}")
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            for row, findings in results:
                key = row["key"]
                self._db.execute("DELETE FROM findings WHERE key = ?", (key,))
                self._db.execute(
                    "INSERT OR REPLACE INTO series VALUES (?, ?, ?, ?, ?)",
                    (
                        key,
                        row["status"],
                        row.get("model"),
                        row.get("model_version"),
                        json.dumps(dict(row), allow_nan=False),
                    ),
                )
                self._db.executemany(
                    "INSERT INTO findings VALUES (?, ?, ?)",
                    [
                        (key, i, json.dumps(dict(f), allow_nan=False))
                        for i, f in enumerate(findings)
                    ],
                )

    def rows(self) -> list[dict[str, Any]]:
        """Every series row, by key."""
        return list(self.iter_rows())

    def findings(self) -> list[dict[str, Any]]:
        """Every finding, by key then index."""
        return list(self.iter_findings())

    def iter_rows(self) -> Iterator[dict[str, Any]]:
        """Every series row, by key, read a batch at a time."""
        return _iter_json(self._db.execute("SELECT row FROM series ORDER BY key"))

    def iter_findings(self) -> Iterator[dict[str, Any]]:
        """Every finding, by key then index, read a batch at a time (an NLST run holds millions)."""
        return _iter_json(self._db.execute("SELECT row FROM findings ORDER BY key, idx"))

    def counts(self) -> dict[str, int]:
        """Rows per status."""
        return dict(
            self._db.execute("SELECT status, COUNT(*) FROM series GROUP BY status").fetchall()
        )

    def export(self, luna16_submission: bool = False) -> list[Path]:
        """Write ``series.parquet``, ``findings.parquet`` and, for LUNA16 inputs,
        ``submission.csv`` (seriesuid, coordX, coordY, coordZ, probability) atomically."""
        written = [
            _write_parquet(self.out_dir / "series.parquet", self.iter_rows(), SERIES_COLUMNS),
            _write_parquet(
                self.out_dir / "findings.parquet", self.iter_findings(), FINDING_COLUMNS
            ),
        ]
        if luna16_submission:
            from medssl.metrics.luna16 import write_predictions  # sklearn: slow import

            predictions = [Finding.from_row(f) for f in self.findings()]
            written.append(write_predictions(self.out_dir / "submission.csv", predictions))
        return written


def _iter_json(cursor: sqlite3.Cursor) -> Iterator[dict[str, Any]]:
    while True:
        chunk = cursor.fetchmany(_BATCH)
        if not chunk:
            return
        for (text,) in chunk:
            yield json.loads(text)


def _write_parquet(
    path: Path, rows: Iterable[Mapping[str, Any]], columns: Mapping[str, pa.DataType]
) -> Path:
    """Write ``rows`` as Parquet :data:`_BATCH` rows (one row group) at a time, atomically: memory
    stays flat whatever the number of rows."""
    batch = _BATCH
    schema = pa.schema(list(columns.items()))

    def table(chunk: list[Mapping[str, Any]]) -> pa.Table:
        return pa.table(
            {
                name: pa.array([r.get(name) for r in chunk], type=kind)
                for name, kind in columns.items()
            },
            schema=schema,
        )

    def write(fh: Any) -> None:
        with pq.ParquetWriter(fh, schema) as writer:
            chunk: list[Mapping[str, Any]] = []
            wrote = False
            for row in rows:
                chunk.append(row)
                if len(chunk) == batch:
                    writer.write_table(table(chunk))
                    chunk, wrote = [], True
            if chunk or not wrote:
                writer.write_table(table(chunk))

    atomic_write(path, write)
    return path


def write_unreadable(path: Path, unreadable: Sequence[tuple[str, str]]) -> Path:
    """Write ``path,reason`` rows (the files a DICOM index could not parse) as CSV, atomically."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["path", "reason"])
    writer.writerows(unreadable)
    data = text.getvalue().encode("utf-8")
    atomic_write(path, lambda fh: fh.write(data))
    return path
