"""Which sliding-window size a trained detector should run at: validation FROC and time per scan.

The detector is fully convolutional, so its exported graph can take larger windows than its
training patch: fewer windows and less overlap work per scan, but deep features that see more
context (and less zero padding) than in training. This script measures both sides on a finished
``medssl-train`` run: for each ``--windows`` edge W it loads the run's best weights, re-estimates
the BatchNorm statistics on W-sized inference windows of the labeled scans (as the trainer does
for its own window, :func:`medssl.training.batchnorm.reestimate_batchnorm`), and runs the shared
pipeline (:func:`medssl.pipeline.detect.detect_preprocessed`, the run's lung-mask setting) on the
run's validation scans, never its test scans. Per window: CPM (LUNA16, exact rates) with its
bootstrap CI, sensitivity at 1 FP per scan, windows per scan and median inference seconds per
scan (PyTorch on the CPU, ``--threads``).

Writes ``benchmarks/results/detector_window.{json,md}`` and prints the table.

    python benchmarks/detector_window.py build/default-models/supervised \\
        [--windows 32 48 64] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from medssl.config import load_config
from medssl.datasets.splits import read_split
from medssl.metrics import FP_RATES
from medssl.pipeline.detect import detect_preprocessed
from medssl.training.batchnorm import reestimate_batchnorm
from medssl.training.detection.config import DetectionExperiment
from medssl.training.detection.eval import TorchDetectionRunner, detection_params, evaluate
from medssl.training.detection.scans import split_luna16
from medssl.training.detection.trainer import _cache, _scan_boxes, _statistics_windows
from medssl.training.networks.detector import FPNDetector

RESULTS = Path(__file__).parent / "results"


def measure(run: Path, windows: list[int], *, bootstrap: int = 1000) -> list[dict[str, Any]]:
    """One row per window edge (see the module doc)."""
    cfg = load_config(DetectionExperiment, run / "config.yaml")
    state = torch.load(run / "checkpoints" / "best.pt", map_location="cpu", weights_only=False)
    split_file = read_split(run / "split.json")
    data = Path(state["provenance"]["data"])
    d = cfg.data
    split = split_luna16(
        data,
        len(split_file.labeled),
        0,
        d.test_subsets,
        d.n_validation,
        d.split_seed,
        d.unlabeled_dirs,
    )
    if split.validation != split_file.validation:
        raise SystemExit(f"{run}: split.json's validation scans differ from a re-split of {data}")
    cache = _cache(cfg)
    labeled = [
        _scan_boxes(cache.get(u, split.source(u).load), split.nodules(u), d.spacing_mm)
        for u in split.labeled
    ]
    validation = {u: cache.get(u, split.source(u).load) for u in split.validation}
    nodules = [f for u in split.validation for f in split.nodules(u)]
    excluded = [f for u in split.validation for f in split.luna.excluded(u)]
    pad = detection_params(cfg).normalisation.pad_value
    rows = []
    for w in windows:
        wcfg = replace(cfg, eval=replace(cfg.eval, window=w))
        net = FPNDetector(cfg.model, cfg.anchors)
        net.load_state_dict(state["model"])
        picked = _statistics_windows(labeled, wcfg)
        reestimate_batchnorm(
            net,
            [s.volume.array for s in labeled],
            picked,
            window=w,
            pad_value=pad,
            batch_size=cfg.optim.batch_size,
        )
        runner = TorchDetectionRunner(net, w)
        params = detection_params(wcfg, batch_size=4)
        predictions, seconds, counts = [], [], []
        for uid, cached in validation.items():
            tic = time.perf_counter()
            result = detect_preprocessed(cached.to_volume(), runner, params)
            seconds.append(time.perf_counter() - tic)
            counts.append(result.n_windows - result.n_windows_skipped)
            predictions += [replace(p, series_uid=uid) for p in result.detections]
        froc = evaluate(predictions, nodules, excluded, split.validation, bootstrap, cfg.seed)
        rows.append(
            {
                "window": w,
                "cpm": froc.cpm,
                "cpm_ci": list(froc.cpm_ci),
                "sensitivity_at_1fp": froc.sensitivities[FP_RATES.index(1.0)],
                "sensitivities": list(froc.sensitivities),
                "windows_per_scan": statistics.mean(counts),
                "seconds_per_scan": statistics.median(seconds),
                "n_scans": froc.n_scans,
                "n_nodules": froc.n_nodules,
                "bn_windows": len(picked),
            }
        )
        print(
            f"window {w}: CPM {froc.cpm:.3f} {rows[-1]['seconds_per_scan']:.2f} s/scan", flush=True
        )
    return rows


def table(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The markdown report."""
    lines = [
        "# Detector window size: validation FROC and time",
        "",
        f"Run {meta['run']} (trained on {meta['patch']}^3 patches); "
        f"{rows[0]['n_scans']} validation scans, {rows[0]['n_nodules']} nodules; "
        f"PyTorch CPU, {meta['threads']} thread(s), {meta['machine']}. BatchNorm "
        "statistics re-estimated on each window size; CPM by the exact LUNA16 rates.",
        "",
        "| window | CPM | CPM 95 % CI | sens. @ 1 FP/scan | windows/scan | s/scan (median) |",
        "|---:|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['window']} | {r['cpm']:.3f} | [{r['cpm_ci'][0]:.3f}, "
            f"{r['cpm_ci'][1]:.3f}] | {r['sensitivity_at_1fp']:.3f} | "
            f"{r['windows_per_scan']:.0f} | {r['seconds_per_scan']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run", type=Path, help="a finished medssl-train detector run folder")
    parser.add_argument("--windows", type=int, nargs="+", default=[32, 48, 64])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--results", type=Path, default=RESULTS / "detector_window.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(DetectionExperiment, args.run / "config.yaml")
    rows = measure(args.run, args.windows, bootstrap=args.bootstrap)
    meta = {
        "run": str(args.run),
        "patch": cfg.data.patch,
        "threads": args.threads,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    report = table(rows, meta)
    args.results.with_suffix(".md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
