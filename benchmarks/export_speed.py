"""Per-patch latency and throughput of an exported detector: PyTorch eager vs onnxruntime vs Triton.

One run, one machine, the same checkpoint and the same patches for every runtime:

* ``pytorch``: the checkpoint's graph (``DetectorInference``) in eager mode, ``torch.no_grad``;
* ``onnxruntime``: the exported ``model.onnx`` in the embedded :class:`OnnxRunner`;
* ``onnxruntime-openvino``: the same file with onnxruntime's OpenVINO execution provider (fp32,
  CPU), timed by ``benchmarks/ort_timing.py`` in the ``--openvino-python`` environment
  (``make openvino-env``), since that wheel cannot share a venv with ``onnxruntime``;
* ``triton-http`` / ``triton-grpc``: :class:`TritonRunner` against a real ``tritonserver``
  on 127.0.0.1 (nvidia-pytriton's build: the Python backend running the same ``model.onnx``
  with onnxruntime, one CPU instance), so its figures add Triton's transport and batching
  on top of onnxruntime.

Models: the shipped CPU-sized network (8 blocks, 32³ windows) and the paper-sized one
(20 blocks, ``--paper-window``³), both with seeded random weights (speed does not depend on
the values). Batch sizes 1 and 4. Each cell: ``--warmup`` calls, then ``--repeats`` timed
calls; the table reports medians.

    .venv/bin/python benchmarks/export_speed.py  # table + benchmarks/results/export_speed.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from medssl.bench.machine import cpu_device
from medssl.cli.train import resolve_config
from medssl.config import config_to_dict, load_config
from medssl.export import ExportOptions, export_checkpoint
from medssl.export.models import exportable
from medssl.models.triton_config import ServingOptions
from medssl.runners import OnnxRunner, TritonRunner
from medssl.testing import LocalTritonServer
from medssl.testing.triton import python_backend_repository
from medssl.training.detection.config import DetectionExperiment
from medssl.training.networks.detector import FPNDetector

BATCHES = (1, 4)
RUNTIMES = ("pytorch", "onnxruntime", "onnxruntime-openvino", "triton-http", "triton-grpc")


def _checkpoint(folder: Path, config: str, window: int | None) -> Path:
    """A checkpoint of ``config`` with seeded random weights (and ``window``-edge inference)."""
    overrides = {"eval.window": window} if window else None
    cfg = load_config(DetectionExperiment, resolve_config(config), overrides)
    torch.manual_seed(0)
    net = FPNDetector(cfg.model, cfg.anchors)
    path = folder / f"{config}.pt"
    torch.save(
        {
            "model": net.state_dict(),
            "config": config_to_dict(cfg),
            "step": 0,
            "kind": "medssl.detector",
        },
        path,
    )
    return path


def _time(call: Callable[[], object], warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return times


def _row(label: str, runtime: str, batch: int, times: list[float]) -> dict:
    median = statistics.median(times)
    print(
        f"{label:32} {runtime:20} batch {batch}: {1000 * median / batch:9.1f} ms/patch",
        file=sys.stderr,
    )
    return {
        "model": label,
        "runtime": runtime,
        "batch": batch,
        "median_call_s": median,
        "per_patch_ms": 1000 * median / batch,
        "patches_per_s": batch / median,
        "calls_s": times,
    }


def _openvino_rows(args: argparse.Namespace, label: str, onnx_path: Path) -> list[dict]:
    """Time ``onnx_path`` with the OpenVINO provider in its own environment."""
    run = subprocess.run(
        [
            str(args.openvino_python),
            str(Path(__file__).with_name("ort_timing.py")),
            str(onnx_path),
            "--provider",
            "OpenVINOExecutionProvider",
            "--batches",
            *map(str, BATCHES),
            "--warmup",
            str(args.warmup),
            "--repeats",
            str(args.repeats),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    report = json.loads(run.stdout)
    if report["providers"][0] != "OpenVINOExecutionProvider":
        raise RuntimeError(f"OpenVINO provider did not load: {report['providers']}")
    rows = [_row(label, "onnxruntime-openvino", r["batch"], r["calls_s"]) for r in report["rows"]]
    for row in rows:
        row["onnxruntime_version"] = report["version"]
        row["max_abs_vs_cpu_provider"] = report["max_abs_vs_cpu_provider"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--paper-window", type=int, default=96, help="0 skips the paper-sized network"
    )
    parser.add_argument("--no-triton", action="store_true", help="skip the Triton rows")
    parser.add_argument(
        "--openvino-python",
        type=Path,
        default=Path(__file__).parents[1] / ".venv-openvino" / "bin" / "python",
        help="interpreter with onnxruntime-openvino (rows skipped if absent)",
    )
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "export_speed.json"
    )
    parser.add_argument("--render", action="store_true", help="only re-render --out's table")
    args = parser.parse_args()
    if args.render:
        args.out.with_suffix(".md").write_text(render(json.loads(args.out.read_text())))
        return

    models = [("cpu-small (shipped), 32^3", "focalmix-cpu", None)]
    if args.paper_window:
        models.append((f"paper (20 blocks), {args.paper_window}^3", "focalmix", args.paper_window))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        exported = []
        for label, config, window in models:
            ckpt = _checkpoint(tmp_path, config, window)
            result = export_checkpoint(
                ckpt,
                tmp_path / "repo",
                config.replace("-", "_"),
                ExportOptions(
                    max_batch_size=max(BATCHES),
                    serving=ServingOptions(kind="cpu"),
                    operating_point="none",
                ),
            )
            module = exportable(torch.load(ckpt, weights_only=False), ckpt).module.eval()
            exported.append((label, result, module))
        server = None
        if not args.no_triton:
            triton_repo = tmp_path / "triton"
            for _, result, _ in exported:
                python_backend_repository(result.model_dir, triton_repo)
            server = LocalTritonServer(triton_repo).start()
        try:
            for label, result, module in exported:
                runtimes: dict[str, Callable[[np.ndarray], object]] = {}

                def eager(x: np.ndarray, module: torch.nn.Module = module) -> object:
                    with torch.no_grad():
                        return module(torch.from_numpy(x))

                runtimes["pytorch"] = eager
                runtimes["onnxruntime"] = OnnxRunner(result.onnx_path, result.card)
                if server is not None:
                    runtimes["triton-http"] = TritonRunner(
                        server.http_url, result.card, protocol="http", timeout_s=600
                    )
                    runtimes["triton-grpc"] = TritonRunner(
                        server.grpc_url, result.card, protocol="grpc", timeout_s=600
                    )
                if args.openvino_python.exists():
                    rows += _openvino_rows(args, label, result.onnx_path)
                rng = np.random.default_rng(0)
                for batch in BATCHES:
                    patches = rng.standard_normal(
                        (batch, *result.card.input.shape), dtype=np.float32
                    )
                    for runtime, run in runtimes.items():
                        times = _time(lambda run=run, x=patches: run(x), args.warmup, args.repeats)
                        rows.append(_row(label, runtime, batch, times))
        finally:
            if server is not None:
                server.stop()
    labels = [m[0] for m in models]
    rows.sort(key=lambda r: (labels.index(r["model"]), r["batch"], RUNTIMES.index(r["runtime"])))
    for row in rows:
        eager_row = next(
            r
            for r in rows
            if r["model"] == row["model"]
            and r["batch"] == row["batch"]
            and r["runtime"] == "pytorch"
        )
        row["speedup_vs_pytorch"] = row["patches_per_s"] / eager_row["patches_per_s"]
    report = {
        "benchmark": "export_speed",
        "device": cpu_device(),
        "torch_threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "target": "onnxruntime >= 1.3x PyTorch eager patches/s on CPU",
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    text = render(report)
    print(text)
    args.out.with_suffix(".md").write_text(text)


def render(report: dict) -> str:
    """The Markdown table, and the target verdict per onnxruntime provider."""
    rows = report["rows"]
    lines = [
        "| model | runtime | batch | ms/patch (median) | patches/s | × PyTorch eager |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['runtime']} | {r['batch']} | {r['per_patch_ms']:.1f} | "
            f"{r['patches_per_s']:.2f} | {r['speedup_vs_pytorch']:.2f} |"
        )
    verdicts = []
    for runtime in ("onnxruntime", "onnxruntime-openvino"):
        ratios = [r["speedup_vs_pytorch"] for r in rows if r["runtime"] == runtime]
        if ratios:
            met = sum(x >= 1.3 for x in ratios)
            verdicts.append(
                f"- {runtime}: {min(ratios):.2f}-{max(ratios):.2f}x PyTorch eager; "
                f">= 1.3x in {met} of {len(ratios)} cells"
            )
    gaps = {r["max_abs_vs_cpu_provider"] for r in rows if "max_abs_vs_cpu_provider" in r}
    if gaps:
        verdicts.append(
            f"- OpenVINO provider vs CPU provider outputs: max abs difference {max(gaps):.2g}"
        )
    return (
        f"# export_speed\n\n{report['device']}; torch threads {report['torch_threads']}; "
        f"medians of {report['repeats']} calls after {report['warmup']} warm-up calls\n\n"
        + "\n".join(lines)
        + f"\n\nTarget: {report['target']}\n\n"
        + "\n".join(verdicts)
        + "\n"
    )


if __name__ == "__main__":
    main()
