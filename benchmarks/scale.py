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

3. **Scoring end to end** on ``--score-series`` tiny series (NIfTI volumes of 48 x 64 x 64
   voxels listed in a ``.txt``: chest-like noise with a few nodule-like spheres, 20 variants
   cycled) with the shipped detector, through the local engine and the Ray engine (local Ray),
   each ``medssl-score`` in its own process, its process tree's RSS sampled every second:
   memory must stay flat (the peak over the last fifth of the series against the first
   fifth), the two engines' tables must be identical (timings aside), and a local run killed
   (SIGKILL) half-way and run again must score exactly the series left and end with the same
   tables.

Prints a table and writes ``benchmarks/results/scale.{json,md}``.

    python benchmarks/scale.py [--sizes 1000 10000 100000 200000] [--index-files 200000] \
        [--score-series 5000]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pydicom

from medssl.bench.machine import alternate, cpu_device, write_report

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
    store.commit_many(
        [
            (
                {
                    "key": skip.item.key,
                    "status": "skipped",
                    "error": skip.reason,
                    "model": "m",
                    "model_version": 1,
                },
                (),
            )
            for skip in skipped
        ]
    )  # as score() does
    for i, item in enumerate(chosen):
        row = {
            "key": item.key,
            "patient_id": item.patient_id,
            "study_uid": item.study_uid,
            "series_uid": item.series_uid,
            "status": "ok",
            "model": "m",
            "model_version": 1,
            "n_slices": item.n_slices,
            "n_findings": 2,
            "max_probability": 0.9,
            "read_s": 1.0,
            "inference_s": 10.0,
            "n_windows": 400,
        }
        findings = [
            {
                "key": item.key,
                "series_uid": item.series_uid,
                "index": j,
                "x_mm": 1.0 * i,
                "y_mm": 2.0,
                "z_mm": 3.0,
                "diameter_mm": 6.0,
                "probability": 0.9 - j / 10,
                "passed": j == 0,
                "model": "m",
                "model_version": 1,
            }
            for j in range(2)
        ]
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
            part = items[start : start + chunk]
            ds = ray.data.from_items(
                [{"item": json.dumps(item.to_json())} for item in part],
                override_num_blocks=len(part),
            )
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
        proc = subprocess.run(
            [
                sys.executable,
                __file__,
                "--stages",
                str(index),
                "--work",
                str(folder),
                "--ray-chunk",
                str(ray_chunk),
            ],
            capture_output=True,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        shutil.rmtree(folder, ignore_errors=True)
        if proc.returncode != 0:
            raise SystemExit(f"stages at {n} series failed:\n{proc.stderr[-3000:]}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        result["size"] = n
        rows.append(result)
        print(
            f"  {n} series: "
            + ", ".join(f"{s} {result[s]['seconds']:.1f} s" for s in STAGES)
            + f"; peak {max(result[s]['peak_mb'] for s in STAGES):.0f} MB",
            flush=True,
        )
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

    fields = (
        "PatientID",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SOPInstanceUID",
        "Modality",
        "SOPClassUID",
        "ImageType",
        "SeriesDescription",
        "SeriesNumber",
        "StudyDate",
        "BodyPartExamined",
        "SliceThickness",
        "ImageOrientationPatient",
        "Rows",
        "Columns",
        "NumberOfFrames",
    )

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

    runs = {
        "pydicom loop (serial)": serial,
        "pydicom parse only, no values read (floor)": bare,
        "medssl index, 1 worker": lambda: index_tree(root, workers=1),
        "medssl index, 2 workers": lambda: index_tree(root, workers=2),
        "medssl index, 2 workers, part files": lambda: parted(2),
    }
    times = alternate(runs, repeats, verbose=True)
    median = {k: statistics.median(v) for k, v in times.items()}
    return {
        "files": len(files),
        "median_seconds": median,
        "files_per_s": {k: len(files) / v for k, v in median.items()},
        "ratio_to_serial_pydicom": {
            k: median["pydicom loop (serial)"] / v for k, v in median.items()
        },
        "all_seconds": times,
    }


_TIMINGS = ("read_s", "preprocess_s", "inference_s", "postprocess_s", "lung_mask_s")


def _tiny_series(n: int, folder: Path) -> Path:
    """``n`` NIfTI volumes (20 variants cycled) listed in ``folder/series.txt``."""
    import nibabel as nib
    import numpy as np

    listing = folder / "series.txt"
    if listing.exists() and len(listing.read_text().split()) == n:
        return listing
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    z, y, x = np.indices((48, 64, 64))
    variants = []
    for _ in range(20):
        hu = -800.0 + rng.normal(0, 30, (48, 64, 64))
        for _ in range(rng.integers(1, 4)):
            c = rng.uniform((8, 12, 12), (40, 52, 52))
            r = rng.uniform(2.5, 5.0)
            hu[(z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2 <= r * r] = 40.0
        variants.append(hu.astype(np.int16))
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])  # RAS on disk; 1 mm
    paths = []
    for i in range(n):
        path = folder / f"{i // 1000:02d}" / f"s{i:05d}.nii.gz"
        path.parent.mkdir(exist_ok=True)
        nib.save(
            nib.Nifti1Image(np.ascontiguousarray(variants[i % 20].transpose(2, 1, 0)), affine), path
        )
        paths.append(str(path))
    listing.write_text("\n".join(paths) + "\n")
    return listing


def _score(listing: Path, out: Path, engine: str, kill_after: int | None = None) -> dict[str, Any]:
    """``medssl-score`` in its own process; RSS of its tree and rows committed, sampled each
    second."""
    import sqlite3

    from medssl.bench.machine import TreeMemory

    command = [
        str(Path(sys.executable).parent / "medssl-score"),
        str(listing),
        "--out",
        str(out),
        "--engine",
        engine,
        "--workers",
        "1",
    ]
    start = time.perf_counter()
    log = out.parent / f"{out.name}.{engine}{'.killed' if kill_after else ''}.log"
    # a file, not a pipe: the progress lines would fill a pipe and block it; the child keeps
    # its own descriptor of it
    with open(log, "w") as log_file:
        process = subprocess.Popen(
            command,
            stdout=subprocess.DEVNULL,
            stderr=log_file,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
    monitor = TreeMemory(process.pid, period_s=1.0)
    monitor.start()
    progress: list[tuple[float, int]] = []
    killed = False
    while process.poll() is None:
        time.sleep(1.0)
        done = 0
        if (out / "score.sqlite").exists():
            try:
                with sqlite3.connect(
                    f"file:{out / 'score.sqlite'}?mode=ro", uri=True, timeout=5
                ) as db:
                    done = db.execute("SELECT COUNT(*) FROM series").fetchone()[0]
            except sqlite3.Error:
                done = progress[-1][1] if progress else 0
        progress.append((time.perf_counter() - start, done))
        if kill_after is not None and done >= kill_after:
            process.send_signal(signal.SIGKILL)
            killed = True
            break
    process.wait()
    monitor.stop()
    stderr = log.read_text()
    if not killed and process.returncode not in (0, 3):
        raise SystemExit(f"medssl-score ({engine}) failed:\n{stderr[-3000:]}")
    return {
        "engine": engine,
        "wall_s": time.perf_counter() - start,
        "killed": killed,
        "peak_mb": monitor.peak_mb,
        "rss_samples": monitor.samples,
        "progress": progress,
    }


def _rss_by_fifth(run: dict[str, Any], n: int) -> tuple[float, float]:
    """Peak tree RSS (MB) while the first fifth of the series was scored, and while the last
    fifth was (before the final tables are written: ``done < n``)."""
    rss = {round(t): kb for t, kb in run["rss_samples"]}
    first = [rss.get(round(t), 0) for t, done in run["progress"] if done <= n / 5]
    last = [rss.get(round(t), 0) for t, done in run["progress"] if 4 * n / 5 <= done < n]
    return max(first, default=0) / 1024, max(last, default=0) / 1024


def _tables(out: Path) -> tuple[list[dict], list[dict]]:
    import pyarrow.parquet as pq

    def rows(name: str, keys: tuple[str, ...]) -> list[dict]:
        table = pq.read_table(out / f"{name}.parquet").to_pylist()
        return sorted(
            ({k: v for k, v in r.items() if k not in _TIMINGS} for r in table),
            key=lambda r: tuple(str(r.get(k)) for k in keys),
        )

    return rows("series", ("key",)), rows("findings", ("key", "index"))


def bench_scoring(n: int, work: Path) -> dict[str, Any]:
    import shutil as sh

    listing = _tiny_series(n, work / f"tiny-{n}")
    outs = {name: work / f"score-{name}" for name in ("local", "ray", "resumed")}
    for folder in outs.values():
        sh.rmtree(folder, ignore_errors=True)
    runs = {"local": _score(listing, outs["local"], "local")}
    print(f"  local: {runs['local']['wall_s']:.0f} s", flush=True)
    runs["ray"] = _score(listing, outs["ray"], "ray")
    print(f"  ray: {runs['ray']['wall_s']:.0f} s", flush=True)
    runs["killed"] = _score(listing, outs["resumed"], "local", kill_after=n // 2)
    import sqlite3

    with sqlite3.connect(outs["resumed"] / "score.sqlite") as db:
        committed = db.execute("SELECT COUNT(*) FROM series").fetchone()[0]
    runs["resumed"] = _score(listing, outs["resumed"], "local")
    with sqlite3.connect(outs["resumed"] / "score.sqlite") as db:
        total = db.execute("SELECT COUNT(*) FROM series").fetchone()[0]
    local, ray, resumed = (_tables(outs[k]) for k in ("local", "ray", "resumed"))
    result: dict[str, Any] = {
        "series": n,
        "wall_s": {k: v["wall_s"] for k, v in runs.items()},
        "peak_mb": {k: v["peak_mb"] for k, v in runs.items()},
        "rss_first_fifth_mb": {k: _rss_by_fifth(runs[k], n)[0] for k in ("local", "ray")},
        "rss_last_fifth_mb": {k: _rss_by_fifth(runs[k], n)[1] for k in ("local", "ray")},
        "ray_equals_local": ray == local,
        "resumed_equals_local": resumed == local,
        "killed_after_rows": committed,
        "rows_after_resume": total,
        "findings": len(local[1]),
        "scored_in_resumed_run": total - committed,
    }
    for k in ("local", "ray", "killed", "resumed"):
        result[f"{k}_progress"] = runs[k]["progress"]
        result[f"{k}_rss_samples"] = runs[k]["rss_samples"]
    return result


def _table(
    metadata: list[dict[str, Any]],
    index: dict[str, Any] | None,
    scoring: dict[str, Any] | None = None,
) -> str:
    lines = (
        []
        if not metadata
        else [
            "## Metadata path (NLST-like index rows; fresh process per size)",
            "",
            "| series | files | " + " | ".join(f"{s} s" for s in STAGES) + " | peak memory MB |",
            "|---:|---:|" + "---:|" * len(STAGES) + "---:|",
        ]
    )
    for row in metadata:
        peak = max(row[s]["peak_mb"] for s in STAGES)
        lines.append(
            f"| {row['size']:,} | {row['files']:,} | "
            + " | ".join(f"{row[s]['seconds']:.1f}" for s in STAGES)
            + f" | {peak:,.0f} |"
        )
    if len(metadata) > 1:
        a, b = metadata[0], metadata[-1]
        lines += [
            "",
            f"Growth from {a['size']:,} to {b['size']:,} "
            f"series ({b['size'] / a['size']:.0f}× the rows): "
            + ", ".join(f"{s} {b[s]['seconds'] / max(a[s]['seconds'], 1e-9):.0f}×" for s in STAGES)
            + f"; peak memory above the interpreter with its imports ({b['baseline_mb']:.0f} MB): "
            f"{max(a[s]['peak_mb'] for s in STAGES) - a['baseline_mb']:.0f} → "
            f"{max(b[s]['peak_mb'] for s in STAGES) - b['baseline_mb']:.0f} MB.",
        ]
    if index:
        lines += [
            "",
            f"## medssl index on {index['files']:,} tiny DICOM files (median)",
            "",
            "| indexer | seconds | files/s | × serial pydicom |",
            "|---|---:|---:|---:|",
        ]
        for name, seconds in index["median_seconds"].items():
            lines.append(
                f"| {name} | {seconds:.1f} | {index['files_per_s'][name]:,.0f} | "
                f"{index['ratio_to_serial_pydicom'][name]:.2f} |"
            )
    if scoring:
        n = scoring["series"]
        lines += [
            "",
            f"## Scoring {n:,} tiny series end to end (medssl-score, shipped detector, 1 worker)",
            "",
            "| run | wall s | series/s | RSS scoring the first fifth, MB | RSS "
            "scoring the last fifth, MB | peak RSS with the final tables, MB |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for k in ("local", "ray"):
            lines.append(
                f"| {k} engine | {scoring['wall_s'][k]:.0f} | "
                f"{n / scoring['wall_s'][k]:.1f} | {scoring['rss_first_fifth_mb'][k]:,.0f} "
                f"| {scoring['rss_last_fifth_mb'][k]:,.0f} | {scoring['peak_mb'][k]:,.0f} |"
            )
        lines += [
            "",
            "- Ray tables equal the local engine's (timings "
            f"aside): **{scoring['ray_equals_local']}** ({n:,} "
            f"series rows, {scoring['findings']:,} findings).",
            f"- Resume: killed (SIGKILL) after {scoring['killed_after_rows']:,} "
            f"committed rows; the re-run scored {scoring['scored_in_resumed_run']:,} "
            f"more ({scoring['rows_after_resume']:,} in all) and its tables equal "
            f"the uninterrupted run's: **{scoring['resumed_equals_local']}**.",
        ]
        lines += [f"- {note}" for note in scoring.get("notes", [])]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="*",
        default=[1000, 10000, 100000, 200000],
        help="series counts of the metadata path (none: skip it)",
    )
    parser.add_argument(
        "--index-files", type=int, default=200000, help="0: skip the index benchmark"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--score-series", type=int, default=5000, help="0: skip the end-to-end scoring"
    )
    parser.add_argument("--ray-chunk", type=int, default=512)
    parser.add_argument("--work", type=Path, default=Path("/tmp/medssl-scale"))
    parser.add_argument("--out", type=Path, default=RESULTS / "scale")
    parser.add_argument(
        "--stages", type=Path, default=None, help=argparse.SUPPRESS
    )  # child process
    parser.add_argument(
        "--render", action="store_true", help="only re-render --out's table from its JSON"
    )
    args = parser.parse_args()
    if args.stages is not None:
        print(json.dumps(run_stages(args.stages, args.work, args.ray_chunk)))
        return
    if args.render:
        report = json.loads(args.out.with_suffix(".json").read_text())
        scoring = report.get("scoring")
        if scoring:
            runs = {
                k: {
                    "rss_samples": scoring[f"{k}_rss_samples"],
                    "progress": scoring[f"{k}_progress"],
                }
                for k in ("local", "ray")
            }
            for k, run in runs.items():
                first, last = _rss_by_fifth(run, scoring["series"])
                scoring["rss_first_fifth_mb"][k], scoring["rss_last_fifth_mb"][k] = first, last
        write_report(
            args.out, report, _table(report.get("metadata") or [], report.get("index"), scoring)
        )
        return
    args.work.mkdir(parents=True, exist_ok=True)
    print("metadata path:", flush=True)
    metadata = bench_metadata(args.sizes, args.work, args.ray_chunk) if args.sizes else []
    index = None
    if args.index_files:
        print("index:", flush=True)
        index = bench_index(args.index_files, args.work, args.repeats)
    scoring = None
    if args.score_series:
        print("scoring:", flush=True)
        scoring = bench_scoring(args.score_series, args.work)
    report = {
        "benchmark": "scale",
        "device": cpu_device(),
        "load_average_at_end": os.getloadavg(),
        "ray_chunk": args.ray_chunk,
        "metadata": metadata,
        "index": index,
        "scoring": scoring,
    }
    write_report(args.out, report, _table(metadata, index, scoring))


if __name__ == "__main__":
    main()
