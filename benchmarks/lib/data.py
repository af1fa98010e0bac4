"""Benchmark data made by code, kept between runs: the LUNA16-layout chest sets of the detection
benchmarks (:func:`generated_dataset`) and whole-chest DICOM series (:func:`write_scans`)."""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["dataset_fingerprint", "generated_dataset", "write_scans"]


def generated_dataset(data: Path, wanted: dict[str, Any]) -> dict[str, Any]:
    """Make ``data`` with :func:`medssl.synth.datasets.write_chest_dataset` (keyword arguments
    ``wanted``) unless it exists; ``data/benchmark_data.json`` records them, and an existing
    folder made otherwise is an error rather than silently reused.

    Raises:
        SystemExit: the folder exists with other settings, or without the record.
    """
    from medssl.synth.datasets import write_chest_dataset

    record = data / "benchmark_data.json"
    if record.is_file():
        made = json.loads(record.read_text())
        if made != wanted:
            raise SystemExit(
                f"{data} was generated with {made}, not {wanted}: pass matching options "
                "or another --data folder"
            )
        return made
    if (data / "annotations.csv").exists():
        raise SystemExit(
            f"{data} holds a dataset without benchmark_data.json (made by an older version "
            "of a benchmark?): pass another --data folder"
        )
    write_chest_dataset(data, **wanted)
    record.write_text(json.dumps(wanted, indent=2) + "\n")
    return wanted


def dataset_fingerprint(data: Path) -> str:
    """SHA-256 (hex) over the relative path and bytes of every file under ``data`` but
    ``benchmark_data.json``, in sorted order.

    Benchmarks whose runs span machines (a session's ``/tmp`` does not outlive it) regenerate
    their data from the same settings; the fingerprint in their results' meta makes sure the
    runs they mix were trained and tested on the same bytes, not on the output of a generator
    that has changed since.
    """
    digest = hashlib.sha256()
    for path in sorted(p for p in data.rglob("*") if p.is_file()):
        rel = path.relative_to(data).as_posix()
        if rel == "benchmark_data.json":
            continue
        digest.update(rel.encode() + b"\0")
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()


def write_scans(folder: Path, n: int, seed: int) -> list[Path]:
    """``n`` synthetic 300x512x512 chest CT series as DICOM under ``folder/scanNN`` (kept if
    present).

    Each folder gets ``truth.json``: the nodules' LPS centres and diameters.
    """
    from medssl.io.dicom_writer import SeriesInfo, write_dicom_series
    from medssl.synth.chest import ChestConfig, generate_chest_ct

    folders = []
    for i in range(n):
        target = folder / f"scan{i:02d}"
        folders.append(target)
        if (target / "truth.json").is_file():
            continue
        start = time.perf_counter()
        case = generate_chest_ct(seed + i, ChestConfig(matrix=512, n_slices=300))
        info = SeriesInfo(
            uid_seed=f"score-throughput-{seed + i}",
            patient_id=f"ST{seed + i:04d}",
            series_description="Chest (score_throughput)",
        )
        write_dicom_series(case.volume, target, info)
        truth = {
            "seed": seed + i,
            "shape": list(case.volume.shape),
            "spacing_mm": [float(s) for s in case.volume.spacing],
            "nodules": [
                {"centre_lps": list(map(float, n.centre_lps)), "diameter_mm": float(n.diameter_mm)}
                for n in case.nodules
            ],
        }
        (target / "truth.json").write_text(json.dumps(truth, indent=1))
        print(
            f"wrote {target} {case.volume.shape} spacing "
            f"{np.round(case.volume.spacing, 3).tolist()} in {time.perf_counter() - start:.1f} s",
            file=sys.stderr,
        )
    return folders
