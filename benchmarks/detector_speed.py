"""Detector speed on this machine: training throughput and whole-scan inference by stage.

1. Training throughput (patches/s, median step time over ``--steps`` steps after warm-up)
   of the supervised step and the FocalMix step (8 labeled + 8 unlabeled patches, K
   guessing passes), for the CPU variant (``focalmix-cpu``: 32^3 patches) — or the paper
   size (``--config focalmix``, 160^3) on a GPU.
2. Inference on a 300x512x512 synthetic chest CT (0.6-0.9 mm pixels) through the shared
   pipeline (``medssl.pipeline.detect``), split into preprocess (resample to 1 mm +
   window), inference (sliding windows through the network) and postprocess (decode
   threshold, 3D NMS, world coordinates). Peers in the same run:
   * preprocess vs SimpleITK's linear ``ResampleImageFilter`` to the same 1 mm grid;
   * inference vs plain PyTorch running the same windows with no pipeline around it.

3. Preprocessing alone (``--preprocess-only``, or always after 2.), alternated over
   ``--preprocess-repeats`` rounds on the same scan: ``prepare`` (resample to 1 mm + HU
   window), its resample alone, SimpleITK's ``Resample`` to the same grid (the peer; all cores),
   and ``scipy.ndimage.affine_transform`` (order 1, one thread: medssl's resampler until
   2026-12). Ratios are peer time / medssl time (> 1: medssl is faster). Writes
   ``benchmarks/results/detector_speed_preprocess.{json,md}``.

Medians of ``--repeats`` runs. Prints a table; writes ``benchmarks/results/detector_speed.json``.

    python benchmarks/detector_speed.py [--repeats 3] [--steps 20] [--config focalmix-cpu] \\
        [--device cpu]
    python benchmarks/detector_speed.py --preprocess-only [--preprocess-repeats 15]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from medssl.cli.train import resolve_config
from medssl.config import load_config
from medssl.detection import AnchorGrid
from medssl.io.sitk_bridge import to_sitk
from medssl.pipeline import Preparation, prepare
from medssl.pipeline.detect import detect
from medssl.pipeline.windows import extract_window, plan_windows
from medssl.synth.chest import ChestConfig, generate_chest_ct
from medssl.training.detection.config import DetectionExperiment
from medssl.training.detection.eval import TorchDetectionRunner, detection_params
from medssl.training.methods.focalmix import focalmix_step
from medssl.training.methods.supervised_det import supervised_step
from medssl.training.networks.detector import FPNDetector

RESULTS = Path(__file__).parent / "results"


def _batch(
    cfg: DetectionExperiment, grid: AnchorGrid, device: torch.device
) -> dict[str, torch.Tensor]:
    """A synthetic labeled batch: random patches, one nodule-sized box each (shapes as the
    loader's)."""
    from medssl.detection import assign_anchors

    b, p = cfg.optim.batch_size, cfg.data.patch
    rng = np.random.default_rng(0)
    boxes = np.zeros((b, 16, 4), dtype=np.float32)
    labels, deltas = [], []
    for i in range(b):
        boxes[i, 0] = [*rng.uniform(8, p - 8, 3), rng.uniform(4, 20)]
        t = assign_anchors(grid, boxes[i, :1])
        labels.append(t.labels)
        deltas.append(t.deltas)
    return {
        "image": torch.randn(b, 1, p, p, p, device=device),
        "labels": torch.from_numpy(np.stack(labels)).to(device),
        "deltas": torch.from_numpy(np.stack(deltas)).to(device),
        "boxes": torch.from_numpy(boxes).to(device),
        "n_boxes": torch.ones(b, dtype=torch.long, device=device),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_training(cfg: DetectionExperiment, device: torch.device, steps: int) -> dict[str, float]:
    grid = AnchorGrid.build(cfg.anchors, (cfg.data.patch,) * 3)
    model = FPNDetector(cfg.model, cfg.anchors).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    batch = _batch(cfg, grid, device)
    unlabeled = {"image": torch.randn_like(batch["image"])}
    amp = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda" and cfg.amp
        else torch.autocast("cpu", enabled=False)
    )
    out = {}
    for method in ("supervised-det", "focalmix"):
        times = []
        for step in range(steps + 2):
            _sync(device)
            start = time.perf_counter()
            with amp:
                if method == "focalmix":
                    losses = focalmix_step(
                        model, model, batch, unlabeled, grid, step, cfg, np.random.default_rng(step)
                    )
                else:
                    losses = supervised_step(model, batch, cfg)
            optimizer.zero_grad()
            losses["loss"].backward()
            optimizer.step()
            _sync(device)
            if step >= 2:  # warm-up
                times.append(time.perf_counter() - start)
        patches = cfg.optim.batch_size * (2 if method == "focalmix" else 1)
        out[method] = patches / statistics.median(times)
    return out


def bench_inference(
    cfg: DetectionExperiment, device: torch.device, repeats: int
) -> dict[str, object]:
    case = generate_chest_ct(3, ChestConfig(matrix=512, n_slices=300))
    volume = case.volume
    params = detection_params(cfg, batch_size=2)
    runner = TorchDetectionRunner(FPNDetector(cfg.model, cfg.anchors), cfg.window, device, cfg.amp)
    stages: dict[str, list[float]] = {
        "preprocess": [],
        "inference": [],
        "postprocess": [],
        "total": [],
        "SimpleITK resample": [],
        "plain PyTorch windows": [],
    }
    n_windows = 0
    for _ in range(repeats):
        start = time.perf_counter()
        result = detect(volume, runner, params)
        stages["total"].append(time.perf_counter() - start)
        for name in ("preprocess", "inference", "postprocess"):
            stages[name].append(result.timings[name])
        n_windows = result.n_windows
        image = to_sitk(volume)
        start = time.perf_counter()
        size = [
            int(n)
            for n in np.floor((np.array(image.GetSize()) - 1) * np.array(image.GetSpacing()) + 1e-6)
            + 1
        ]
        sitk.Resample(
            image,
            size,
            sitk.Transform(),
            sitk.sitkLinear,
            image.GetOrigin(),
            (1.0, 1.0, 1.0),
            image.GetDirection(),
            -1000.0,
            sitk.sitkFloat32,
        )
        stages["SimpleITK resample"].append(time.perf_counter() - start)
        prepared = prepare(volume, params)
        window = params.window
        starts = plan_windows(prepared.shape, window, params.overlap)
        patches = [
            extract_window(prepared.array, s, window, params.normalisation.pad_value)
            for s in starts
        ]
        start = time.perf_counter()
        with torch.no_grad():
            for i in range(0, len(patches), params.batch_size):
                x = torch.from_numpy(np.stack(patches[i : i + params.batch_size])[:, None]).to(
                    device
                )
                runner.net(x)
        _sync(device)
        stages["plain PyTorch windows"].append(time.perf_counter() - start)
    medians = {k: statistics.median(v) for k, v in stages.items()}
    return {
        "scan_shape": list(volume.shape),
        "scan_spacing_mm": [float(s) for s in volume.spacing],
        "window": params.window,
        "overlap": params.overlap,
        "n_windows": n_windows,
        "median_s": medians,
        "all_s": stages,
        "preprocess_vs_simpleitk_resample": medians["preprocess"] / medians["SimpleITK resample"],
        "inference_vs_plain_pytorch": medians["inference"] / medians["plain PyTorch windows"],
    }


def bench_preprocess(repeats: int) -> dict[str, object]:
    """Preprocessing against SimpleITK and scipy on a 300 x 512 x 512 chest CT, alternated."""
    from scipy import ndimage

    from medssl.pipeline.preprocess import Intensity

    volume = generate_chest_ct(3, ChestConfig(matrix=512, n_slices=300)).volume
    image = to_sitk(volume)
    size = [
        int(n)
        for n in np.floor((np.array(image.GetSize()) - 1) * np.array(image.GetSpacing()) + 1e-6) + 1
    ]
    scale = 1.0 / volume.spacing
    shape = tuple(size[::-1])

    def simpleitk() -> None:
        sitk.Resample(
            image,
            size,
            sitk.Transform(),
            sitk.sitkLinear,
            image.GetOrigin(),
            (1.0, 1.0, 1.0),
            image.GetDirection(),
            -1000.0,
            sitk.sitkFloat32,
        )

    def scipy_one_thread() -> None:
        ndimage.affine_transform(
            volume.array.astype(np.float32, copy=False),
            scale,
            output_shape=shape,
            order=1,
            mode="nearest",
        )

    runs = {
        "medssl prepare (resample + window)": lambda: prepare(
            volume, Preparation(1.0, Intensity())
        ),
        "medssl resample": lambda: volume.resample(1.0),
        "SimpleITK Resample": simpleitk,
        "scipy affine_transform (previous)": scipy_one_thread,
    }
    from medssl.bench.machine import alternate

    times = alternate(runs, repeats)
    medians = {k: statistics.median(v) for k, v in times.items()}
    peer = medians["SimpleITK Resample"]
    return {
        "scan_shape": list(volume.shape),
        "scan_spacing_mm": [float(v) for v in volume.spacing],
        "output_shape": list(shape),
        "repeats": repeats,
        "median_s": medians,
        "all_s": times,
        "speed_vs_simpleitk": {k: peer / v for k, v in medians.items()},
    }


def _preprocess_table(result: dict[str, object]) -> str:
    lines = [
        f"## Preprocessing a {result['scan_shape']} chest CT to 1 mm "
        f"(median of {result['repeats']}, alternated)",
        "",
        "| step | median s | speed vs SimpleITK |",
        "|---|---:|---:|",
    ]
    for name, seconds in result["median_s"].items():  # type: ignore[union-attr]
        lines.append(f"| {name} | {seconds:.3f} | {result['speed_vs_simpleitk'][name]:.2f}x |")  # type: ignore[index]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="focalmix-cpu")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--skip-inference", action="store_true")
    parser.add_argument(
        "--preprocess-only", action="store_true", help="only part 3 (preprocessing)"
    )
    parser.add_argument("--preprocess-repeats", type=int, default=15)
    args = parser.parse_args()
    if args.preprocess_only:
        from medssl.bench.machine import cpu_device, write_report

        prep = bench_preprocess(args.preprocess_repeats)
        prep["device"] = cpu_device()
        write_report(RESULTS / "detector_speed_preprocess", prep, _preprocess_table(prep))
        return
    device = torch.device(args.device)
    cfg = load_config(DetectionExperiment, resolve_config(args.config))
    name = (
        torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    )
    result: dict[str, object] = {
        "device": name,
        "config": args.config,
        "patch": cfg.data.patch,
        "training_patches_per_s": bench_training(cfg, device, args.steps),
    }
    if not args.skip_inference:
        result["inference"] = bench_inference(cfg, device, args.repeats)
    print(f"device: {name}; config {args.config}; patch {cfg.data.patch}^3")
    for method, rate in result["training_patches_per_s"].items():  # type: ignore[union-attr]
        print(f"  training {method:15s} {rate:8.2f} patches/s")
    if "inference" in result:
        inf = result["inference"]
        print(
            f"  inference on {inf['scan_shape']} ({inf['n_windows']} "
            f"windows of {inf['window']}^3), median s:"
        )
        for stage, seconds in inf["median_s"].items():
            print(f"    {stage:22s} {seconds:8.2f}")
        print(
            f"  preprocess / SimpleITK resample = {inf['preprocess_vs_simpleitk_resample']:.2f}x; "
            f"inference / plain PyTorch = {inf['inference_vs_plain_pytorch']:.2f}x"
        )
    RESULTS.mkdir(exist_ok=True)
    suffix = "" if device.type == "cpu" else "_gpu"
    (RESULTS / f"detector_speed{suffix}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
