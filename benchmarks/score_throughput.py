"""Batch-scoring throughput on this CPU: ``medssl-score`` vs a PyTorch + MONAI baseline.

Acceptance check of the batch scorer: with the shipped detection model
(``model_repository/focalmix-nodules``) and synthetic 300x512x512 chest CT studies written
as DICOM, report scans/hour, the per-stage time split (read, preprocess, inference,
postprocess) and peak RSS, and compare in the same run against the same model in PyTorch
driven by MONAI's ``sliding_window_inference`` on the same scans. Goal: medssl with the
default install >= 2.5x the baseline's end-to-end scans/hour.

Sides (each runs in its own subprocess, so its peak RSS is its own; the local engine's
worker processes are part of its process tree and counted):

* ``medssl-w1`` / ``medssl-w0``: :func:`medssl.scoring.run.score` on the DICOM folder,
  ``ScoreOptions(engine="local", workers=1 | 0)``, as the default install runs it: runtime
  ``auto``, which on this CPU is OpenVINO's runtime (``model.onnx``, fp32) with its default
  threads. End to end includes indexing the DICOM headers, opening the model, and writing
  ``series.parquet``; the stage seconds come from ``series.parquet``.
* ``medssl-w1-ort``: as ``medssl-w1`` with runtime ``onnxruntime`` (its CPU provider).
* ``medssl-w1-nomask``: as ``medssl-w1`` with the card's lung mask switched off (a copy of the
  model folder whose ``decoding.lung_mask`` is false): every window of the scan runs, which
  shows what skipping the windows that cannot hold a nodule buys.
* ``medssl-openvino-ep``: as ``medssl-w1`` with runtime ``onnxruntime``, run by
  ``--openvino-python``: an environment where ``onnxruntime-openvino`` replaces
  ``onnxruntime`` (``make openvino-score-env``), so the OpenVINO execution provider runs it.
* ``monai`` (the baseline): the same weights (``benchmarks/assets/focalmix-nodules.pt``)
  in PyTorch eager (``torch.set_num_threads(2)``, ``torch.no_grad``), one scan after the
  other: SimpleITK ``ImageSeriesReader`` reads the DICOM files; MONAI ``Spacing`` (to the
  card's 1 mm, bilinear, border padding, float32 compute — MONAI's default float64 is
  ~2.5x slower here), ``ScaleIntensityRange`` (the card's HU window to [-1, 1], clipped)
  and ``DivisiblePad`` (to the largest stride, 16, with the card's padding value);
  ``sliding_window_inference`` with the card's patch (32^3) and overlap (0.25),
  ``sw_batch_size`` = medssl's batch size, on the ``FPNDetector`` returning its four
  pyramid levels (MONAI stitches each at its own resolution); then the anchors of the
  whole padded volume are decoded (``AnchorGrid.build`` + ``decode_boxes``, sigmoid) and
  selected the way MONAI's ``BoxSelector`` (RetinaNetDetector) does: the card's score
  threshold, the best ``pre_nms_top_k`` (card: 1000) per pyramid level, boxes centred in
  the padding dropped, then 3D NMS (``medssl.detection.nms.nms_3d``) with the card's IoU
  and max detections. (medssl applies the same top-k per window instead.)
* ``monai-loader``: the same baseline with reading + MONAI preprocessing prefetched by a
  ``torch.utils.data.DataLoader`` worker (``num_workers=1``), MONAI's usual way to
  overlap I/O with inference — the analogue of medssl's ``workers=1``.

Per scan: seconds between consecutive results (the first counted from the side's start,
so it also carries model loading and, for medssl, header indexing); "scans/hour (median)"
is 3600 / the median of those, "end to end" is scans x 3600 / the side's wall time.
Stage seconds are medians over scans of each scan's own stage times (with a prefetching
worker they overlap inference, so they add up to more than the wall time). CPU seconds
(user + system of the whole process tree) are reported too: the machine is shared and
wall times move with its load, CPU time much less. Peak RSS: the process tree's summed
RSS sampled every 0.1 s (shared pages counted per process), and the largest single
process (``ru_maxrss``).

Detections are compared per scan: findings with p >= 0.5, and how far (mm) each of
medssl's five best centres is from the nearest baseline finding; also how many of the
synthetic ground-truth nodules have a p >= 0.5 finding within max(radius, 3 mm).

    .venv/bin/python benchmarks/score_throughput.py [--scans 3] [--data DIR] \
        [--sides medssl-w1,medssl-w0,monai,monai-loader]

``--data DIR`` keeps the generated DICOM studies there (and reuses them on the next run).
Writes ``benchmarks/results/score_throughput.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from medssl.bench.data import write_scans
from medssl.bench.machine import TreeMemory, cpu_device

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
REPOSITORY = ROOT / "model_repository"
MODEL = "focalmix-nodules"
WEIGHTS = Path(__file__).parent / "assets" / "focalmix-nodules.pt"
SIDES = (
    "medssl-w1",
    "medssl-w1-ort",
    "medssl-w1-nomask",
    "medssl-w0",
    "medssl-openvino-ep",
    "monai",
    "monai-loader",
)
DEFAULT_SIDES = ("medssl-w1", "medssl-w1-nomask", "medssl-w1-ort", "monai", "monai-loader")
BASELINES = ("monai", "monai-loader")
GOAL = 2.5
TORCH_THREADS = 2
STAGES = ("read", "preprocess", "inference", "postprocess")


# --------------------------------------------------------------------------- data


def _warm_page_cache(folders: list[Path]) -> None:
    """Read every file once so that no side pays for a cold disk cache the others do not."""
    for folder in folders:
        for path in sorted(folder.glob("*.dcm")):
            path.read_bytes()


def run_side(
    side: str, data: Path, batch_size: int, workdir: Path, python: str = sys.executable
) -> dict[str, Any]:
    """Run one side in a subprocess of ``python`` (``nice`` level inherited); its result plus
    memory and CPU."""
    out = workdir / f"{side}.json"
    command = [
        python,
        str(Path(__file__).resolve()),
        "--run-side",
        side,
        "--data",
        str(data),
        "--batch-size",
        str(batch_size),
        "--side-out",
        str(out),
    ]
    print(f"running {side} ...", file=sys.stderr)
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT)
    monitor = TreeMemory(process.pid)
    monitor.start()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    monitor.stop()
    if process.returncode != 0:
        raise RuntimeError(f"side {side} failed with exit code {process.returncode}")
    result = json.loads(out.read_text())
    result.update(
        {
            "process_wall_s": time.perf_counter() - start,
            "peak_rss_tree_mb": monitor.peak_mb,
            "peak_rss_largest_process_mb": usage.ru_maxrss
            / 1024,  # includes waited-for grandchildren
            "processes_max": monitor.max_processes,
            "cpu_s": usage.ru_utime + usage.ru_stime,
            "load_average_1min": [load_before, *monitor.load, os.getloadavg()[0]],
        }
    )
    return result


# --------------------------------------------------------------------------- medssl side


def side_medssl(
    data: Path, workers: int, batch_size: int, side: str, runtime: str = "auto"
) -> dict[str, Any]:
    import pyarrow.parquet as pq

    from medssl.runners import OpenVinoRunner
    from medssl.scoring.run import RunnerSpec, ScoreOptions, score

    repository = REPOSITORY
    keep: tempfile.TemporaryDirectory[str] | None = None
    if side == "medssl-w1-nomask":  # the same model, its card's lung mask off
        import shutil

        keep = tempfile.TemporaryDirectory(prefix="nomask_")
        repository = Path(keep.name)
        shutil.copytree(REPOSITORY / MODEL, repository / MODEL)
        for card_path in (repository / MODEL).glob("*/medssl.json"):
            card = json.loads(card_path.read_text())
            card["decoding"]["lung_mask"] = False
            card_path.write_text(json.dumps(card, indent=2))
    spec = RunnerSpec(repository, MODEL, runtime=runtime)
    runner = spec.open()
    providers = runner.providers
    runner_version = (
        f"openvino {__import__('openvino').__version__}"
        if isinstance(runner, OpenVinoRunner)
        else f"onnxruntime {__import__('onnxruntime').__version__}"
    )
    runner.close()
    options = ScoreOptions(engine="local", workers=workers, batch_size=batch_size)
    stamps: list[float] = []
    with tempfile.TemporaryDirectory(prefix="score_throughput_") as tmp:
        start = time.perf_counter()
        summary = score(
            data,
            tmp,
            spec,
            options=options,
            progress=lambda done, total, counts: stamps.append(time.perf_counter()),
        )
        wall = time.perf_counter() - start
        series = pq.read_table(Path(tmp) / "series.parquet").to_pylist()
        findings = pq.read_table(Path(tmp) / "findings.parquet").to_pylist()
    scans = []
    for row in series:
        if row["status"] != "ok":
            raise RuntimeError(
                f"medssl did not score {row['source']}: {row['status']} {row['error']}"
            )
        name = Path(row["source"]).parent.name
        found = sorted(
            (
                {
                    "centre_lps": [f["x_mm"], f["y_mm"], f["z_mm"]],
                    "diameter_mm": f["diameter_mm"],
                    "probability": f["probability"],
                }
                for f in findings
                if f["key"] == row["key"]
            ),
            key=lambda f: -f["probability"],
        )
        scans.append(
            {
                "scan": name,
                "n_windows": row["n_windows"],
                "detections": found,
                **{f"{s}_s": row[f"{s}_s"] for s in STAGES},
            }
        )
    scans.sort(key=lambda s: s["scan"])
    if keep is not None:
        keep.cleanup()
    return {
        "side": side,
        "wall_s": wall,
        "scoring_stage_s": summary.elapsed_s,
        "n_scans": summary.scored_now,
        "per_scan_s": list(np.diff([start, *stamps])),
        "scans": scans,
        "setup": f"medssl.scoring.score(engine='local', workers={workers}, "
        f"batch_size={batch_size}{'; lung mask off' if keep is not None else ''}); "
        f"runtime {runtime}: {runner_version} {providers[0]}, default threads; "
        "reader: medssl (pydicom); preprocess: medssl.pipeline.prepare "
        "(separable threaded resample + HU window, lung mask)",
    }


# --------------------------------------------------------------------------- MONAI baseline side


class _ReadAndPreprocess:
    """DICOM folder -> ``(padded (1, Z, Y, X) float32 tensor, affine index->LPS, true shape,
    timings)``.

    SimpleITK reads; MONAI transforms resample, window and pad. A class so that a
    DataLoader worker can pickle it.
    """

    def __init__(
        self, spacing_mm: float, hu_min: float, hu_max: float, pad_value: float, divisor: int
    ) -> None:
        self.spacing_mm, self.hu_min, self.hu_max = spacing_mm, hu_min, hu_max
        self.pad_value, self.divisor = pad_value, divisor

    def __call__(self, folder: str) -> dict[str, Any]:
        import SimpleITK as sitk
        import torch
        from monai.data import MetaTensor
        from monai.transforms import Compose, DivisiblePad, ScaleIntensityRange, Spacing

        from medssl.io.sitk_bridge import from_sitk

        start = time.perf_counter()
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(folder))
        volume = from_sitk(reader.Execute())  # (Z, Y, X) int16 HU + affine index (z, y, x) -> LPS
        image = MetaTensor(
            torch.from_numpy(volume.array)[None], affine=torch.from_numpy(volume.affine)
        )
        read_s = time.perf_counter() - start
        start = time.perf_counter()
        transform = Compose(
            [
                Spacing(
                    pixdim=(self.spacing_mm,) * 3,
                    mode="bilinear",
                    padding_mode="border",
                    dtype=torch.float32,
                ),
                ScaleIntensityRange(
                    a_min=self.hu_min, a_max=self.hu_max, b_min=-1.0, b_max=1.0, clip=True
                ),
            ]
        )
        resampled = transform(image)
        shape = list(resampled.shape[1:])
        padded = DivisiblePad(k=self.divisor, method="end", mode="constant", value=self.pad_value)(
            resampled
        )
        preprocess_s = time.perf_counter() - start
        return {
            "folder": folder,
            "image": padded.as_tensor().contiguous(),
            "affine": np.asarray(resampled.affine, dtype=np.float64),
            "shape": shape,
            "read_s": read_s,
            "preprocess_s": preprocess_s,
        }


def side_monai(data: Path, batch_size: int, loader_workers: int) -> dict[str, Any]:
    import torch
    from monai.data import Dataset
    from monai.inferers import sliding_window_inference
    from torch.utils.data import DataLoader

    from medssl.config import config_from_dict
    from medssl.detection import AnchorGrid
    from medssl.detection.nms import nms_3d
    from medssl.scoring.run import RunnerSpec
    from medssl.training.detection.config import DetectionExperiment
    from medssl.training.networks.detector import FPNDetector, decode_boxes, flatten_levels

    warnings.filterwarnings(
        "ignore", message=".*output roi range is not int.*"
    )  # stride-16 level stitching
    torch.set_num_threads(TORCH_THREADS)
    start = time.perf_counter()
    card = RunnerSpec(REPOSITORY, MODEL).card()
    params = card.detection_params(batch_size)
    state = torch.load(WEIGHTS, map_location="cpu", weights_only=False)
    cfg = config_from_dict(DetectionExperiment, state["config"])
    net = FPNDetector(cfg.model, cfg.anchors)
    net.load_state_dict(state["model"])
    net.eval()
    if tuple(card.patch_size) != params.window or cfg.anchors.max_stride != params.divisor:
        raise RuntimeError(
            f"card patch {card.patch_size} / divisor {params.divisor} do not match the checkpoint"
        )

    def predictor(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(net(x))

    prepare = _ReadAndPreprocess(
        params.spacing_mm,
        params.normalisation.hu_min,
        params.normalisation.hu_max,
        params.normalisation.pad_value,
        params.divisor,
    )
    folders = [str(p) for p in sorted(data.glob("scan*")) if p.is_dir()]
    dataset = Dataset(folders, transform=prepare)
    source: Any = (
        DataLoader(dataset, batch_size=None, num_workers=loader_workers, prefetch_factor=1)
        if loader_workers
        else dataset
    )
    scans, stamps = [], []
    with torch.no_grad():
        for item in source:
            tic = time.perf_counter()
            levels = sliding_window_inference(
                item["image"][None],
                roi_size=params.window,
                sw_batch_size=params.batch_size,
                predictor=predictor,
                overlap=params.overlap,
                mode="constant",
                padding_mode="constant",
                cval=params.normalisation.pad_value,
            )
            inference_s = time.perf_counter() - tic
            tic = time.perf_counter()
            padded_shape = tuple(item["image"].shape[1:])
            grid = AnchorGrid.build(cfg.anchors, padded_shape)
            flat = flatten_levels(list(levels))[0]  # (N, 5) over the whole padded volume
            scores = torch.sigmoid(flat[:, 0])
            keep, n_above = [], 0
            for level in grid.level_slices:  # MONAI BoxSelector: threshold, then top-k per level
                index = torch.nonzero(scores[level] >= params.score_threshold).flatten()
                n_above += len(index)
                if len(index) > params.pre_nms_top_k:
                    index = index[torch.topk(scores[level][index], params.pre_nms_top_k).indices]
                keep.append(index + level.start)
            keep = torch.cat(keep)
            boxes = (
                decode_boxes(
                    flat[keep, 1:][None],
                    torch.from_numpy(grid.centres[keep.numpy()]),
                    torch.from_numpy(grid.sizes[keep.numpy()]),
                )[0]
                .numpy()
                .astype(np.float64)
            )
            kept_scores = scores[keep].numpy().astype(np.float64)
            inside = np.all(
                (boxes[:, :3] >= -0.5) & (boxes[:, :3] <= np.asarray(item["shape"]) - 0.5), axis=1
            )
            boxes, kept_scores = boxes[inside], kept_scores[inside]
            order = nms_3d(boxes, kept_scores, params.nms_iou, max_keep=params.max_detections)
            # the card's calibration (strictly increasing: NMS order unchanged), as medssl reports
            kept_scores = np.asarray(params.calibration.apply(kept_scores), dtype=np.float64)
            affine = np.asarray(
                item["affine"], dtype=np.float64
            )  # a tensor after DataLoader's convert
            lps = boxes[order, :3] @ affine[:3, :3].T + affine[:3, 3]
            detections = [
                {
                    "centre_lps": p.tolist(),
                    "diameter_mm": float(b[3] * params.spacing_mm),
                    "probability": float(s),
                }
                for p, b, s in zip(lps, boxes[order], kept_scores[order])
            ]
            postprocess_s = time.perf_counter() - tic
            stamps.append(time.perf_counter())
            scans.append(
                {
                    "scan": Path(item["folder"]).name,
                    "volume_shape": item["shape"],
                    "padded_shape": list(padded_shape),
                    "n_above_threshold": n_above,
                    "n_candidates": len(keep),
                    "read_s": float(item["read_s"]),
                    "preprocess_s": float(item["preprocess_s"]),
                    "inference_s": inference_s,
                    "postprocess_s": postprocess_s,
                    "detections": detections,
                }
            )
            del levels, flat, scores
    wall = time.perf_counter() - start
    name = "monai-loader" if loader_workers else "monai"
    reading = (
        f"prefetched by a DataLoader ({loader_workers} worker)"
        if loader_workers
        else "in the main process"
    )
    return {
        "side": name,
        "wall_s": wall,
        "n_scans": len(scans),
        "per_scan_s": list(np.diff([start, *stamps])),
        "scans": scans,
        "setup": f"PyTorch {torch.__version__} eager, {TORCH_THREADS} threads, "
        f"FPNDetector from {WEIGHTS.name}; SimpleITK ImageSeriesReader + "
        f"MONAI Spacing/ScaleIntensityRange/DivisiblePad {reading}; "
        f"monai.inferers.sliding_window_inference(roi {params.window}, "
        f"overlap {params.overlap}, sw_batch_size {params.batch_size}, "
        "constant blending); anchors decoded over the whole volume; "
        f"threshold {params.score_threshold}, top {params.pre_nms_top_k} per "
        f"level; nms_3d(iou {params.nms_iou}, max {params.max_detections})",
    }


# --------------------------------------------------------------------------- comparison + report


def _distance(a: list[float], b: list[float]) -> float:
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)))


def compare_detections(
    medssl: dict[str, Any], baseline: dict[str, Any], data: Path, threshold: float
) -> list[dict[str, Any]]:
    """Per scan: findings at or above the card's operating point on each side (both on the card's
    calibrated scale), medssl's top-5 vs the nearest baseline finding, truth hits at that point."""
    rows = []
    theirs = {s["scan"]: s["detections"] for s in baseline["scans"]}
    for scan in medssl["scans"]:
        ours, other = scan["detections"], theirs.get(scan["scan"], [])
        top = ours[:5]
        gaps = [
            min((_distance(d["centre_lps"], o["centre_lps"]) for o in other), default=float("inf"))
            for d in top
        ]
        truth_path = data / scan["scan"] / "truth.json"
        truth = json.loads(truth_path.read_text())["nodules"] if truth_path.is_file() else []

        def hits(found: list[dict[str, Any]], truth: list[dict[str, Any]]) -> int:
            confident = [d for d in found if d["probability"] >= threshold]
            return sum(
                any(
                    _distance(t["centre_lps"], d["centre_lps"]) <= max(t["diameter_mm"] / 2, 3.0)
                    for d in confident
                )
                for t in truth
            )

        rows.append(
            {
                "scan": scan["scan"],
                "threshold": threshold,
                "medssl_at_op": sum(d["probability"] >= threshold for d in ours),
                "baseline_at_op": sum(d["probability"] >= threshold for d in other),
                "top5_probabilities": [round(d["probability"], 3) for d in top],
                "top5_gap_mm": gaps,
                "truth_nodules": len(truth),
                "truth_found_medssl": hits(ours, truth),
                "truth_found_baseline": hits(other, truth),
            }
        )
    return rows


def summarise(result: dict[str, Any]) -> dict[str, Any]:
    n = result["n_scans"]
    scans = result["scans"]
    return {
        "scans_per_hour_median": 3600 / statistics.median(result["per_scan_s"]),
        "scans_per_hour_end_to_end": 3600 * n / result["wall_s"],
        "median_stage_s": {s: statistics.median(x[f"{s}_s"] for x in scans) for s in STAGES},
        "median_scan_s": statistics.median(result["per_scan_s"]),
        "cpu_s_per_scan": result["cpu_s"] / n,
        "peak_rss_tree_mb": result["peak_rss_tree_mb"],
        "peak_rss_largest_process_mb": result["peak_rss_largest_process_mb"],
    }


def _n_anchors(padded_shape: list[int], strides: tuple[int, ...] = (2, 4, 8, 16)) -> int:
    """Anchors of a whole padded volume (one per output cell and level)."""
    return sum(int(np.prod([n // s for n in padded_shape])) for s in strides)


def render(report: dict[str, Any]) -> str:
    s = report["summary"]
    lines = [
        "| side | scans/h (median scan) | scans/h (end to end) | read s | preprocess s | inference "
        "s | postprocess s | CPU s/scan | peak RSS MB (tree) | peak RSS MB (largest proc) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for side, row in s.items():
        st = row["median_stage_s"]
        lines.append(
            f"| {side} | {row['scans_per_hour_median']:.1f} | "
            f"{row['scans_per_hour_end_to_end']:.1f} | {st['read']:.2f} | {st['preprocess']:.2f} "
            f"| {st['inference']:.2f} | {st['postprocess']:.2f} | {row['cpu_s_per_scan']:.1f} | "
            f"{row['peak_rss_tree_mb']:.0f} | {row['peak_rss_largest_process_mb']:.0f} |"
        )
    ratio_lines = []
    for r in report["ratios"]:
        ratio_lines.append(
            f"| {r['medssl']} | {r['baseline']} | {r['end_to_end']:.2f}x | {r['median_scan']:.2f}x "
            f"| {r['cpu']:.2f}x | {'met' if r['end_to_end'] >= GOAL else 'NOT met'} |"
        )
    op = report["detections"][0]["threshold"] if report["detections"] else float("nan")
    det_lines = [
        f"| scan | marks p>={op:.3f} medssl | marks p>={op:.3f} baseline | medssl top-5 p | top-5 "
        "gap to nearest baseline finding, mm | truth nodules found (medssl / baseline / total) |",
        "|---|---:|---:|---|---|---|",
    ]
    for d in report["detections"]:
        gaps = ", ".join(f"{g:.1f}" for g in d["top5_gap_mm"])
        det_lines.append(
            f"| {d['scan']} | {d['medssl_at_op']} | {d['baseline_at_op']} | "
            f"{d['top5_probabilities']} | {gaps} | {d['truth_found_medssl']} "
            f"/ {d['truth_found_baseline']} / {d['truth_nodules']} |"
        )
    notes = []
    for side, row in s.items():
        st = row["median_stage_s"]
        top = max(st, key=st.get)
        notes.append(
            f"- {side}: largest stage {top} ({st[top]:.1f} s of "
            f"{sum(st.values()):.1f} s stage time per scan, medians)"
        )
    for side in (x for x in BASELINES if x in report["sides"]):
        fractions = [
            x["n_above_threshold"] / _n_anchors(x["padded_shape"])
            for x in report["sides"][side]["scans"]
        ]
        notes.append(
            f"- {side}: anchors scoring >= the card's threshold: "
            f"{100 * min(fractions):.1f}-{100 * max(fractions):.1f}% of all anchors (so the "
            f"threshold removes {'almost nothing' if min(fractions) > 0.9 else 'some'}; the "
            "top-k per level bounds NMS)"
        )
        break
    for side in (x for x in report["sides"] if x.startswith("medssl")):
        windows = [x["n_windows"] for x in report["sides"][side]["scans"]]
        notes.append(
            f"- {side}: windows per scan {min(windows)}-{max(windows)}; each keeps up to "
            "pre_nms_top_k = 1000 candidates before one global NMS"
        )
    setups = "\n".join(f"- `{side}`: {report['sides'][side]['setup']}" for side in report["sides"])
    shapes = "; ".join(f"{t['scan']}: {t['shape']} @ {t['spacing_mm']} mm" for t in report["scans"])
    return (
        f"# score_throughput\n\n{report['device']}; {report['n_scans']} synthetic chest CT "
        f"studies (DICOM, {shapes}); model `{MODEL}` (card patch 32^3, overlap 0.25, batch "
        f"{report['batch_size']}); run under nice {report['nice']}; 1-min load average "
        f"during the run {min(report['load_average']):.1f}-{max(report['load_average']):.1f} "
        "(shared machine)\n\n"
        + "\n".join(lines)
        + "\n\nStage seconds: medians over scans (with a prefetching worker they "
        "overlap inference). scans/h (median scan): 3600 / median seconds "
        "between consecutive results; end to end: scans x 3600 / wall time of "
        "the side (model loading, DICOM indexing and outputs included).\n\n"
        + "| medssl | baseline | end-to-end ratio | median-scan ratio | "
        f"CPU-time ratio | goal >= {GOAL}x |\n|---|---|---:|---:|---:|---|\n"
        + "\n".join(ratio_lines)
        + "\n\nDetections ({} vs {}):\n\n".format(*report["detections_compared"])
        + "\n".join(det_lines)
        + "\n\nWhere the time goes:\n"
        + "\n".join(notes)
        + f"\n\nSides:\n{setups}\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scans", type=int, default=3, help="synthetic studies to score")
    parser.add_argument("--seed", type=int, default=100, help="seed of the first study")
    parser.add_argument(
        "--data", type=Path, help="folder for the studies (kept and reused); default a temp folder"
    )
    parser.add_argument(
        "--sides", default=",".join(DEFAULT_SIDES), help=f"comma-separated, of {', '.join(SIDES)}"
    )
    parser.add_argument(
        "--batch-size", type=int, default=2, help="windows per model call (medssl's default: 2)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "score_throughput.json")
    parser.add_argument("--render", action="store_true", help="only re-render --out's table")
    parser.add_argument(
        "--openvino-python",
        type=Path,
        default=ROOT / ".venv-openvino-score" / "bin" / "python",
        help="interpreter of an env with medssl and onnxruntime-openvino (instead of "
        "onnxruntime), for the medssl-openvino-ep side",
    )
    parser.add_argument("--run-side", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--side-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.render:
        args.out.with_suffix(".md").write_text(render(json.loads(args.out.read_text())))
        return
    if args.run_side:
        if args.run_side.startswith("medssl"):
            workers = 0 if args.run_side == "medssl-w0" else 1
            runtime = (
                "onnxruntime"
                if args.run_side in ("medssl-w1-ort", "medssl-openvino-ep")
                else "auto"
            )
            result = side_medssl(args.data, workers, args.batch_size, args.run_side, runtime)
        else:
            result = side_monai(
                args.data, args.batch_size, 1 if args.run_side == "monai-loader" else 0
            )
        args.side_out.write_text(json.dumps(result))
        return

    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    unknown = sorted(set(sides) - set(SIDES))
    if (
        unknown
        or not any(s.startswith("medssl") for s in sides)
        or not any(s in BASELINES for s in sides)
    ):
        parser.error(f"--sides needs a medssl side and a baseline from {SIDES}, got {sides}")
    with tempfile.TemporaryDirectory(prefix="score_throughput_") as tmp:
        data = args.data or Path(tmp) / "data"
        data.mkdir(parents=True, exist_ok=True)
        folders = write_scans(data, args.scans, args.seed)
        stray = [p for p in data.glob("scan*") if p.is_dir() and p not in folders]
        if stray:
            parser.error(
                f"{data} holds more studies than --scans {args.scans}: {[p.name for p in stray]}"
            )
        _warm_page_cache(folders)
        work = Path(tmp) / "work"
        work.mkdir()
        results = {
            side: run_side(
                side,
                data,
                args.batch_size,
                work,
                str(args.openvino_python) if side == "medssl-openvino-ep" else sys.executable,
            )
            for side in sides
        }
        truth = [
            {
                "scan": f.name,
                **{
                    k: v
                    for k, v in json.loads((f / "truth.json").read_text()).items()
                    if k in ("shape", "spacing_mm", "seed")
                },
            }
            for f in folders
        ]
        reference = (
            "medssl-w1"
            if "medssl-w1" in results
            else next(s for s in sides if s.startswith("medssl"))
        )
        baseline = "monai" if "monai" in results else next(s for s in sides if s in BASELINES)
        from medssl.scoring.run import RunnerSpec

        op = RunnerSpec(REPOSITORY, MODEL).card().operating_point
        detections = compare_detections(
            results[reference], results[baseline], data, op.threshold if op is not None else 0.5
        )
    summary = {side: summarise(r) for side, r in results.items()}
    ratios = []
    for ours in (s for s in sides if s.startswith("medssl")):
        for base in (s for s in sides if s in BASELINES):
            a, b = summary[ours], summary[base]
            ratios.append(
                {
                    "medssl": ours,
                    "baseline": base,
                    "end_to_end": a["scans_per_hour_end_to_end"] / b["scans_per_hour_end_to_end"],
                    "median_scan": a["scans_per_hour_median"] / b["scans_per_hour_median"],
                    "cpu": b["cpu_s_per_scan"] / a["cpu_s_per_scan"],
                }
            )
    load = [x for r in results.values() for x in r["load_average_1min"]]
    report = {
        "benchmark": "score_throughput",
        "device": cpu_device(),
        "n_scans": args.scans,
        "batch_size": args.batch_size,
        "nice": os.nice(0),
        "scans": truth,
        "goal": f"medssl end-to-end scans/hour >= {GOAL}x the baseline's",
        "load_average": load,
        "summary": summary,
        "ratios": ratios,
        "detections_compared": [reference, baseline],
        "detections": detections,
        "sides": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    text = render(report)
    args.out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
