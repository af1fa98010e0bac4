"""NLST scale, measured: the scorer's metadata path at 1k … 200k series, and ``medssl index`` on
200k files.

1. **Metadata path.** For each size, an NLST-like index (``medssl.synth.scale``: ~105 files per
   series, a thin and a thick reconstruction and a localizer per exam; rows only, no pixel files)
   goes through the stages ``medssl-score`` runs before and after the model, each size in a fresh
   process so peak memory is its own:

   * manifest: ``build_manifest(index.parquet)``;
   * selection: the default rules (the localizers are skipped);
   * resume store: one committed row per series, as a run commits them (the skipped rows in one
     transaction at the start, then a scored row with two findings per chosen series, each its
     own fsync'd transaction), then the resume query;
   * Ray planning: the chosen series fed to Ray Data in ``ray_chunk`` chunks, each chunk's
     dataset planned as ``run_ray`` builds it (not executed; a local Ray);
   * export: ``series.parquet`` and ``findings.parquet``.

   Reported: seconds per stage, and the process's peak resident memory after each stage.
   Growth should be linear in the series count, and 200k series must fit in < 4 GB.
2. **Index.** ``medssl index`` on tiny DICOM files made by code (full headers, 2×2 pixels),
   with 1 and 2 worker processes and through its resumable part files, against a serial
   ``pydicom.dcmread(stop_before_pixels=True)`` loop reading the same 16 fields from the same
   files (the peer), and the bare parse without reading values (a floor: pydicom converts values
   only when they are read). Files/s, median of ``--repeats``.

Prints a table and writes ``benchmarks/results/scale.{json,md}``.

    python benchmarks/scale.py [--sizes 1000 10000 100000 200000] [--index-files 200000]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pydicom

from machine import cpu_device, write_report  # type: ignore[import-not-found]

RESULTS = Path(__file__).parent / "results"
STAGES = ("manifest", "selection", "resume store", "Ray planning", "export")


def _peak_mb() -> float:
    """This process's peak resident memory (VmHWM; unlike ru_maxrss it does not carry the
    parent's peak across fork + exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_stages(index: Path, work: Path, ray_chunk: int) -> dict[str, Any]:
    """The metadata stages on one index, in this process: {stage: (seconds, peak MB after)}."""
    from medssl.models.card import ModelCard  # noqa: F401 - imported before timing
    from medssl.scoring.manifest import build_manifest
    from medssl.scoring.select import SelectionRules, select_series
    from medssl.scoring.store import ResultStore

    out: dict[str, Any] = {"baseline_mb": _peak_mb()}

    def stage(name: str, start: float) -> None:
        out[name] = {"seconds": time.perf_counter() - start, "peak_mb": _peak_mb()}

    start = time.perf_counter()
    manifest = build_manifest(index)
    stage("manifest", start)
    out["series"] = len(manifest.items)
    out["files"] = sum(len(item.paths) for item in manifest.items)

    start = time.perf_counter()
    chosen, skipped = select_series(manifest.items, SelectionRules())
    stage("selection", start)
    out["chosen"] = len(chosen)

    start = time.perf_counter()
    store = ResultStore(work / "out")
    store.commit_many([({"key": skip.item.key, "status": "skipped", "error": skip.reason, "model": "m",
                         "model_version": 1}, ()) for skip in skipped])  # as score() does
    for i, item in enumerate(chosen):
        row = {"key": item.key, "patient_id": item.patient_id, "study_uid": item.study_uid,
               "series_uid": item.series_uid, "status": "ok", "model": "m", "model_version": 1,
               "n_slices": item.n_slices, "n_findings": 2, "max_probability": 0.9, "read_s": 1.0,
               "inference_s": 10.0, "n_windows": 400}
        findings = [{"key": item.key, "series_uid": item.series_uid, "index": j, "x_mm": 1.0 * i, "y_mm": 2.0,
                     "z_mm": 3.0, "diameter_mm": 6.0, "probability": 0.9 - j / 10, "passed": j == 0,
                     "model": "m", "model_version": 1} for j in range(2)]
        store.commit(row, findings)
    done = store.done("m", 1)
    assert len(done) == len(manifest.items)
    stage("resume store", start)
    out["commits"] = len(manifest.items)

    start = time.perf_counter()
    out["ray_chunks"] = _plan_ray(chosen, ray_chunk)
    stage("Ray planning", start)

    start = time.perf_counter()
    written = store.export()
    store.close()
    stage("export", start)
    out["export_mb"] = sum(p.stat().st_size for p in written) / 1e6
    return out


def _plan_ray(items: list, chunk: int) -> int:
    """Plan every chunk's dataset as ``run_ray`` does (the prepare stage's input, lazily mapped)."""
    import logging

    import ray
    import ray.data

    from medssl.scoring.ray_engine import _prepare_batch

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    try:
        chunks = 0
        for start in range(0, len(items), chunk):
            part = items[start:start + chunk]
            ds = ray.data.from_items([{"item": json.dumps(item.to_json())} for item in part],
                                     override_num_blocks=len(part))
            ds = ds.map_batches(_prepare_batch, batch_size=1, batch_format="pyarrow", num_cpus=1)
            ds.stats()  # the plan exists; nothing is executed
            chunks += 1
        return chunks
    finally:
        ray.shutdown()


def bench_metadata(sizes: list[int], work: Path, ray_chunk: int) -> list[dict[str, Any]]:
    from medssl.synth.scale import write_header_index

    rows = []
    for n in sizes:
        index = work / f"index-{n}.parquet"
        if not index.exists():
            write_header_index(index, n)
        folder = Path(tempfile.mkdtemp(dir=work))
        proc = subprocess.run([sys.executable, __file__, "--stages", str(index), "--work", str(folder),
                               "--ray-chunk", str(ray_chunk)], capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        shutil.rmtree(folder, ignore_errors=True)
        if proc.returncode != 0:
            raise SystemExit(f"stages at {n} series failed:\n{proc.stderr[-3000:]}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        result["size"] = n
        rows.append(result)
        print(f"  {n} series: " + ", ".join(f"{s} {result[s]['seconds']:.1f} s" for s in STAGES)
              + f"; peak {max(result[s]['peak_mb'] for s in STAGES):.0f} MB", flush=True)
    return rows


def bench_index(n_files: int, work: Path, repeats: int) -> dict[str, Any]:
    from medssl.index import index_tree
    from medssl.synth.scale import write_header_files

    root = work / f"files-{n_files}"
    if not (root / ".complete").exists():
        shutil.rmtree(root, ignore_errors=True)
        start = time.perf_counter()
        write_header_files(root, n_files)
        (root / ".complete").write_text("")
        print(f"  wrote {n_files} files in {time.perf_counter() - start:.0f} s", flush=True)
    files = sorted(str(p) for p in root.rglob("*.dcm"))

    fields = ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "Modality",
              "SOPClassUID", "ImageType", "SeriesDescription", "SeriesNumber", "StudyDate",
              "BodyPartExamined", "SliceThickness", "ImageOrientationPatient", "Rows", "Columns",
              "NumberOfFrames")

    def serial() -> None:  # the peer: what a hand-written indexer does, one file after another
        for f in files:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            for name in fields:
                ds.get(name)

    def bare() -> None:  # a floor: parsing only (pydicom converts values lazily, on access)
        for f in files:
            pydicom.dcmread(f, stop_before_pixels=True)

    def parted(workers: int) -> None:
        parts = work / "parts"
        shutil.rmtree(parts, ignore_errors=True)
        index_tree(root, workers=workers, parts=parts)
        shutil.rmtree(parts, ignore_errors=True)

    runs = {"pydicom loop (serial)": serial, "pydicom parse only, no values read (floor)": bare,
            "medssl index, 1 worker": lambda: index_tree(root, workers=1),
            "medssl index, 2 workers": lambda: index_tree(root, workers=2),
            "medssl index, 2 workers, part files": lambda: parted(2)}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
            print(f"  {name}: {times[name][-1]:.1f} s", flush=True)
    median = {k: statistics.median(v) for k, v in times.items()}
    return {"files": len(files), "median_seconds": median,
            "files_per_s": {k: len(files) / v for k, v in median.items()},
            "ratio_to_serial_pydicom": {k: median["pydicom loop (serial)"] / v for k, v in median.items()},
            "all_seconds": times}


def _table(metadata: list[dict[str, Any]], index: dict[str, Any] | None) -> str:
    lines = ["## Metadata path (NLST-like index rows; fresh process per size)", "",
             "| series | files | " + " | ".join(f"{s} s" for s in STAGES) + " | peak memory MB |",
             "|---:|---:|" + "---:|" * len(STAGES) + "---:|"]
    for row in metadata:
        peak = max(row[s]["peak_mb"] for s in STAGES)
        lines.append(f"| {row['size']:,} | {row['files']:,} | "
                     + " | ".join(f"{row[s]['seconds']:.1f}" for s in STAGES) + f" | {peak:,.0f} |")
    if len(metadata) > 1:
        a, b = metadata[0], metadata[-1]
        lines += ["", f"Growth from {a['size']:,} to {b['size']:,} series ({b['size'] / a['size']:.0f}× the rows): "
                  + ", ".join(f"{s} {b[s]['seconds'] / max(a[s]['seconds'], 1e-9):.0f}×" for s in STAGES)
                  + f"; peak memory above the interpreter with its imports ({b['baseline_mb']:.0f} MB): "
                  f"{max(a[s]['peak_mb'] for s in STAGES) - a['baseline_mb']:.0f} → "
                  f"{max(b[s]['peak_mb'] for s in STAGES) - b['baseline_mb']:.0f} MB."]
    if index:
        lines += ["", f"## medssl index on {index['files']:,} tiny DICOM files (median)", "",
                  "| indexer | seconds | files/s | × serial pydicom |", "|---|---:|---:|---:|"]
        for name, seconds in index["median_seconds"].items():
            lines.append(f"| {name} | {seconds:.1f} | {index['files_per_s'][name]:,.0f} | "
                         f"{index['ratio_to_serial_pydicom'][name]:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000, 200000])
    parser.add_argument("--index-files", type=int, default=200000, help="0: skip the index benchmark")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ray-chunk", type=int, default=512)
    parser.add_argument("--work", type=Path, default=Path("/tmp/medssl-scale"))
    parser.add_argument("--out", type=Path, default=RESULTS / "scale")
    parser.add_argument("--stages", type=Path, default=None, help=argparse.SUPPRESS)  # child process
    args = parser.parse_args()
    if args.stages is not None:
        print(json.dumps(run_stages(args.stages, args.work, args.ray_chunk)))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    print("metadata path:", flush=True)
    metadata = bench_metadata(args.sizes, args.work, args.ray_chunk)
    index = None
    if args.index_files:
        print("index:", flush=True)
        index = bench_index(args.index_files, args.work, args.repeats)
    report = {"benchmark": "scale", "device": cpu_device(), "load_average_at_end": os.getloadavg(),
              "ray_chunk": args.ray_chunk, "metadata": metadata, "index": index}
    write_report(args.out, report, _table(metadata, index))


if __name__ == "__main__":
    main()
