"""``medssl score merge``: join the outputs of sharded runs into the tables of one run.

Each shard (``medssl-score --shard I/N``, :mod:`medssl.scoring.shard`) writes its own output
folder. :func:`merge_outputs` reads their result stores (``score.sqlite``) and writes one store
and the same tables a single run writes (``series.parquet``, ``findings.parquet``, a LUNA16
``submission.csv`` when the shards wrote one, ``unreadable.csv``). Label maps and DICOM
outputs stay where the shards wrote them; the rows keep their paths.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medssl.errors import MedsslError
from medssl.scoring.store import ResultStore, write_unreadable

__all__ = ["MergeSummary", "merge_outputs"]

#: Columns that differ between two runs of the same series (wall times), ignored when the same
#: series is found in two inputs.
_TIMINGS = ("read_s", "preprocess_s", "inference_s", "postprocess_s", "lung_mask_s")

_STORE = "score.sqlite"


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


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return {k: v for k, v in a.items() if k not in _TIMINGS} == {k: v for k, v in b.items() if k not in _TIMINGS}


def merge_outputs(sources: Sequence[str | Path], out_dir: str | Path) -> MergeSummary:
    """Merge the output folders of sharded ``medssl-score`` runs into ``out_dir``.

    A series found in two inputs (a shard given twice, or overlapping runs) is kept once when
    both rows agree except for timings.

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
    rows: dict[str, dict[str, Any]] = {}
    findings: dict[str, list[dict[str, Any]]] = {}
    models: set[tuple[str, int]] = set()
    for folder in folders:
        store = ResultStore(folder)
        try:
            found: dict[str, list[dict[str, Any]]] = {}
            for finding in store.findings():
                found.setdefault(finding["key"], []).append(finding)
            for row in store.rows():
                key = row["key"]
                models.add((row.get("model"), row.get("model_version")))
                if key in rows:
                    if not _same(rows[key], row) or [_drop(f) for f in findings[key]] != \
                            [_drop(f) for f in found.get(key, [])]:
                        raise MedsslError(f"series {key} has different results in two inputs "
                                          f"(one of them is {folder}); merge outputs of one sharded run")
                    continue
                rows[key], findings[key] = row, found.get(key, [])
        finally:
            store.close()
    if len(models) > 1:
        shown = ", ".join(f"{name} v{version}" for name, version in sorted(models, key=str))
        raise MedsslError(f"merge: the inputs were scored by different models ({shown})")
    merged = ResultStore(out_dir)
    try:
        for key in sorted(rows):
            merged.commit(rows[key], findings[key])
        outputs = merged.export(luna16_submission=any((f / "submission.csv").is_file() for f in folders))
        unreadable = _unreadable(folders)
        if unreadable:
            outputs.append(write_unreadable(out_dir / "unreadable.csv", unreadable))
        return MergeSummary(len(rows), merged.counts(), outputs)
    finally:
        merged.close()


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

