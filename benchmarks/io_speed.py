"""DICOM read and index speed: medssl against SimpleITK (and plain pydicom) in one run.

1. Series read: a 300-slice 512x512 synthetic chest CT series (int16, ~157 MB of
   pixels) read by ``medssl.io.read_dicom_series`` and by SimpleITK's
   ``ImageSeriesReader`` (GDCM), file lists sorted by each. Target: medssl >= 0.8x
   SimpleITK's MB/s.
2. Header index: 10,000 small DICOM files (40 series) indexed by ``medssl.index``,
   against a serial ``pydicom.dcmread(stop_before_pixels=True)`` loop. Reported in files/s.

Runs are alternated and repeated; medians are reported (the machines are noisy).
Prints a table and writes ``benchmarks/results/io_speed.json``.

    python benchmarks/io_speed.py [--repeats 5] [--workdir /tmp/medssl-io-bench]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk

from medssl import Volume, affine_from_geometry
from medssl.index import index_tree
from medssl.io import SeriesInfo, read_dicom_series, write_dicom_series
from medssl.synth.chest import ChestConfig, generate_chest_ct

RESULTS = Path(__file__).parent / "results"


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _sitk_read(folder: Path) -> np.ndarray:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return sitk.GetArrayFromImage(reader.Execute())


def bench_series(workdir: Path, repeats: int) -> dict[str, object]:
    folder = workdir / "series300"
    if not folder.exists():
        case = generate_chest_ct(0, ChestConfig(matrix=512, n_slices=300))
        write_dicom_series(case.volume, folder, SeriesInfo(uid_seed="io-bench"))
    megabytes = 300 * 512 * 512 * 2 / 1e6
    ours = read_dicom_series(folder)
    theirs = _sitk_read(folder)
    assert ours.shape == (300, 512, 512) and np.array_equal(ours.array, theirs.astype(np.float32))
    times: dict[str, list[float]] = {"medssl": [], "SimpleITK": []}
    for _ in range(repeats):
        times["medssl"].append(_timed(lambda: read_dicom_series(folder)))
        times["SimpleITK"].append(_timed(lambda: _sitk_read(folder)))
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    return {
        "files": 300,
        "min_seconds": best,
        "ratio_of_min_medssl_over_sitk": best["SimpleITK"] / best["medssl"],
        "pixel_megabytes": megabytes,
        "median_seconds": med,
        "median_mb_per_s": {k: megabytes / v for k, v in med.items()},
        "ratio_medssl_over_sitk": med["SimpleITK"] / med["medssl"],
        "all_seconds": times,
    }


def bench_index(workdir: Path, repeats: int, n_series: int = 40, per_series: int = 250) -> dict:
    root = workdir / "index10k"
    if not root.exists():
        rng = np.random.default_rng(0)
        for s in range(n_series):
            array = rng.integers(-1000, 1000, (per_series, 64, 64)).astype(np.float32)
            volume = Volume(array, affine_from_geometry((-20, -20, -100), (1.25, 0.7, 0.7)))
            write_dicom_series(
                volume,
                root / f"P{s // 2:03d}" / f"S{s:03d}",
                SeriesInfo(uid_seed=f"index-bench-{s}", patient_id=f"P{s // 2:03d}"),
            )
    files = list(root.rglob("*.dcm"))
    index = index_tree(root)
    assert len(index.series) == n_series and index.n_files == len(files)

    def plain_pydicom() -> None:
        for f in files:
            pydicom.dcmread(f, stop_before_pixels=True)

    times: dict[str, list[float]] = {"medssl index": [], "pydicom loop (serial)": []}
    for _ in range(repeats):
        times["medssl index"].append(_timed(lambda: index_tree(root)))
        times["pydicom loop (serial)"].append(_timed(plain_pydicom))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "files": len(files),
        "series": n_series,
        "median_seconds": med,
        "median_files_per_s": {k: len(files) / v for k, v in med.items()},
        "all_seconds": times,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/medssl-io-bench"))
    parser.add_argument("--clean", action="store_true", help="delete the generated files after")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)

    series = bench_series(args.workdir, args.repeats)
    index = bench_index(args.workdir, args.repeats)
    result = {
        "benchmark": "io_speed",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
        "device": "CPU",
        "repeats": args.repeats,
        "series_read": series,
        "index": index,
    }
    print(
        f"\nSeries read: 300 x 512 x 512 int16 ({series['pixel_megabytes']:.0f} MB), "
        f"median of {args.repeats}"
    )
    print(f"{'reader':<24}{'median s':>10}{'MB/s':>10}{'min s':>10}")
    for name, seconds in series["median_seconds"].items():
        print(
            f"{name:<24}{seconds:>10.3f}{series['median_mb_per_s'][name]:>10.1f}"
            f"{series['min_seconds'][name]:>10.3f}"
        )
    print(
        f"ratio medssl / SimpleITK (medians): {series['ratio_medssl_over_sitk']:.2f}x "
        f"(target >= 0.8x); of the fastest runs: {series['ratio_of_min_medssl_over_sitk']:.2f}x"
    )
    print(f"\nHeader index: {index['files']} files, {index['series']} series")
    print(f"{'indexer':<24}{'seconds':>10}{'files/s':>10}")
    for name, seconds in index["median_seconds"].items():
        print(f"{name:<24}{seconds:>10.3f}{index['median_files_per_s'][name]:>10.0f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "io_speed.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")
    if args.clean:
        shutil.rmtree(args.workdir)


if __name__ == "__main__":
    main()
