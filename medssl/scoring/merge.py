"""``medssl score merge``: join the outputs of sharded runs into the tables of one run.

Each shard (``medssl-score --shard I/N``, :mod:`medssl.scoring.shard`) writes its own output
folder. :func:`merge_outputs` reads their result stores (``score.sqlite``) and writes one store
and the same tables a single run writes (``series.parquet``, ``findings.parquet``, a LUNA16
``submission.csv`` when the shards wrote one, ``unreadable.csv``). Label maps and DICOM
outputs stay where the shards wrote them; the rows keep their paths.
"""

from __future__ import annotations

import csv
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import Any

from medssl.errors import MedsslError
from medssl.scoring.store import ResultStore, write_unreadable

__all__ = ["MergeSummary", "merge_outputs"]

#: Columns that differ between two runs of the same series (wall times), ignored when the same
#: series is found in two inputs.
_TIMINGS = ("read_s", "preprocess_s", "inference_s", "postprocess_s", "lung_mask_s")

_STORE = "score.sqlite"
#: Series per transaction of the merged store.
_COMMIT_BATCH = 1000


@dataclass(frozen=True)
class MergeSummary:
    """What a merge wrote.

    Attributes:
        series: series rows in the merged store.
        counts: rows per status.
        outputs: the files written.
    """

    series: int
    counts: dict[str, int]
    outputs: list[Path]


def merge_outputs(sources: Sequence[str | Path], out_dir: str | Path) -> MergeSummary:
    """Merge the output folders of sharded ``medssl-score`` runs into ``out_dir``.

    A series found in two inputs (a shard given twice, or overlapping runs) is kept once when
    both rows agree except for timings (the row carries the findings' count and top
    probability). Rows and findings are streamed in key order, so memory holds one row per
    series, never the findings of a whole archive. A failed merge leaves no result store.

    Args:
        sources: the shards' ``--out`` folders.
        out_dir: the merged folder (created; must not hold a result store yet).

    Raises:
        MedsslError: no inputs, an input without a result store, ``out_dir`` already holding
            one, rows of different models, or one series with different results in two inputs.
    """
    out_dir = Path(out_dir)
    folders = [Path(s) for s in sources]
    if not folders:
        raise MedsslError("merge: give the output folders of the shards")
    for folder in folders:
        if not (folder / _STORE).is_file():
            raise MedsslError(f"{folder}: no {_STORE} (not a medssl-score output folder)")
    if (out_dir / _STORE).exists():
        raise MedsslError(f"{out_dir}: already holds a result store; merge into a new folder")
    models: set[tuple[str, int]] = set()
    for folder in folders:
        with sqlite3.connect(f"file:{folder / _STORE}?mode=ro", uri=True) as db:
            models.update(db.execute("SELECT DISTINCT model, version FROM series").fetchall())
    if len(models) > 1:
        shown = ", ".join(f"{name} v{version}" for name, version in sorted(models, key=str))
        raise MedsslError(f"merge: the inputs were scored by different models ({shown})")
    merged = ResultStore(out_dir)
    try:
        seen: dict[
            str, dict[str, Any]
        ] = {}  # key -> row without timings (one per series, not per finding)
        for folder in folders:
            _merge_one(folder, merged, seen)
        outputs = merged.export(
            luna16_submission=any((f / "submission.csv").is_file() for f in folders)
        )
        unreadable = _unreadable(folders)
        if unreadable:
            outputs.append(write_unreadable(out_dir / "unreadable.csv", unreadable))
        return MergeSummary(len(seen), merged.counts(), outputs)
    except BaseException:
        merged.close()
        for leftover in out_dir.glob(_STORE + "*"):  # a partial merge is not a result
            leftover.unlink()
        raise
    finally:
        merged.close()


def _merge_one(folder: Path, merged: ResultStore, seen: dict[str, dict[str, Any]]) -> None:
    """Copy ``folder``'s rows and findings into ``merged``, streaming both in key order (an NLST
    shard holds millions of findings), a batch of series per transaction."""
    store = ResultStore(folder)
    try:
        groups = groupby(store.iter_findings(), key=lambda f: f["key"])
        current: tuple[str, list[dict[str, Any]]] | None = None
        batch: list[tuple[dict[str, Any], list[dict[str, Any]]]] = []
        for row in store.iter_rows():
            key = row["key"]
            while current is None or current[0] < key:
                nxt = next(groups, None)
                if nxt is None:
                    current = (chr(0x10FFFF) * 4, [])  # past every key
                    break
                current = (nxt[0], list(nxt[1]))
            found = current[1] if current[0] == key else []
            plain = _drop(row)
            if key in seen:
                if seen[key] != plain:
                    raise MedsslError(
                        f"series {key} has different results in two inputs "
                        f"(one of them is {folder}); merge outputs of one sharded run"
                    )
                continue
            seen[key] = plain
            batch.append((row, found))
            if len(batch) >= _COMMIT_BATCH:
                merged.commit_many(batch)
                batch = []
        if batch:
            merged.commit_many(batch)
    finally:
        store.close()


def _drop(finding: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in finding.items() if k not in _TIMINGS}


def _unreadable(folders: Sequence[Path]) -> list[tuple[str, str]]:
    """The union of the inputs' ``unreadable.csv`` rows (every shard lists the whole tree's)."""
    rows: set[tuple[str, str]] = set()
    for folder in folders:
        path = folder / "unreadable.csv"
        if path.is_file():
            with open(path, newline="", encoding="utf-8") as fh:
                rows.update((r["path"], r["reason"]) for r in csv.DictReader(fh))
    return sorted(rows)
