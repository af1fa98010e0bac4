"""Segmentation training on the CPU: channels-last 3D weights against PyTorch's default layout.

``medssl.training.networks.segmenter.place`` puts a segmenter's 5-D tensors in the
channels-last layout on the CPU (oneDNN's 3D convolutions run in it). This measures what that
buys in whole training runs, method by method, against the peer: the same run in PyTorch's
default (contiguous, N C D H W) layout.

Each run is ``train_segmenter`` on the pancreas task of ``benchmarks/seg_methods.py`` (config
``seg-ssl-cpu``, one structure, 16x48x48 crops on the 8x3x3 mm grid, width-8 VNet; A&D's
Diff-VNet), ``--steps`` steps with one validation at the end, torch with one thread, in this
process. The figure is the median of the seconds between consecutive training steps in the
run's ``log.jsonl`` (validation left out). The two layouts alternate ``--repeats`` times per
method, so a change in the machine's load hits both alike; the table gives the median over
repeats and the ratio default / channels-last (> 1: channels-last is faster). The runs' last
losses are listed too. They are not equal: the layouts compute the same thing up to floating-
point summation order (``tests/training/segmentation/test_seg_models.py`` holds one pass to
that), and training trajectories drift apart from such differences within tens of steps.

    python benchmarks/seg_layout.py [--steps 60] [--repeats 2] [--methods supervised-seg ad ...]
        [--work /tmp/medssl-seg-layout] [--out benchmarks/results/seg_layout]

Writes ``OUT.json`` and ``OUT.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medssl.bench import seg_bench
from medssl.bench.machine import cpu_device, write_report
from medssl.training.methods import base
from medssl.training.networks.segmenter import place

RESULTS = Path(__file__).parent / "results"
METHODS = ("supervised-seg", "mean-teacher", "ad", "bcp", "flexmatch", "patchcl")
#: the pancreas task of seg_methods.py, 10 % labeled
OVERRIDES = {"data.domains": ["A"], "data.classes": [9], "data.labeled_fraction": 0.1}


def contiguous(net: nn.Module, device: torch.device) -> nn.Module:
    """The peer: PyTorch's default layout."""
    return net.to(device)


LAYOUTS: dict[str, Callable[[nn.Module, torch.device], nn.Module]] = {
    "default": contiguous,
    "channels-last": place,
}


def one_run(method: str, layout: str, data: Path, out: Path, steps: int) -> dict[str, Any]:
    """Train ``method`` for ``steps`` steps with ``layout``; median s/step and the last loss."""
    from medssl.training.segmentation.trainer import train_segmenter

    overrides = {
        **OVERRIDES,
        "method": method,
        "optim.steps": steps,
        "eval.every": steps,
        "data.workers": 0,
        "seed": 0,
    }
    if method == "bcp":
        overrides["bcp.pretrain_steps"] = steps // 2
    cfg = seg_bench.experiment("seg-ssl-cpu", overrides)
    base.place = LAYOUTS[layout]  # SegmentationMethod.build and TeacherMethod.build use it
    try:
        train_segmenter(cfg, data, out, device="cpu")
    finally:
        base.place = place
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps_logged = [row for row in log if "loss" in row]
    gaps = [b["time"] - a["time"] for a, b in pairwise(steps_logged) if b["step"] == a["step"] + 1]
    return {"step_s": statistics.median(gaps), "last_loss": steps_logged[-1]["loss"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--work", type=Path, default=Path("/tmp/medssl-seg-layout"))
    p.add_argument("--out", type=Path, default=RESULTS / "seg_layout")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    data = args.work / "data"
    seg_bench.ensure_data(data, 12, 2, 0, ["A"], "seg_layout_data.json")

    rows = []
    for method in args.methods:
        runs: dict[str, list[dict[str, Any]]] = {k: [] for k in LAYOUTS}
        for r in range(args.repeats):
            for layout in LAYOUTS:
                out = args.work / "runs" / f"{method}_{layout}_{r}"
                result = one_run(method, layout, data, out, args.steps)
                runs[layout].append(result)
                print(f"{method} {layout} #{r}: {result['step_s']:.3f} s/step", file=sys.stderr)
        med = {k: statistics.median(x["step_s"] for x in v) for k, v in runs.items()}
        rows.append(
            {
                "method": method,
                "step_s": med,
                "ratio": med["default"] / med["channels-last"],
                "runs": runs,
            }
        )

    report = {
        "device": cpu_device(),
        "torch": torch.__version__,
        "threads": 1,
        "steps": args.steps,
        "repeats": args.repeats,
        "task": OVERRIDES,
        "rows": rows,
    }
    lines = [
        "# Segmentation training step: channels-last 3D weights vs PyTorch's default layout",
        "",
        f"{report['device']}; torch {torch.__version__}, 1 thread; config seg-ssl-cpu, pancreas "
        f"task at 10 % labeled, {args.steps} steps per run, median s/step per run (validation "
        f"left out), median over {args.repeats} alternated repeats.",
        "",
        "| method | default s/step | channels-last s/step | default / channels-last | "
        "last loss (default, channels-last; repeat 0) |",
        "|---|---:|---:|---:|---|",
    ]
    for row in rows:
        s, runs = row["step_s"], row["runs"]
        lines.append(
            f"| {row['method']} | {s['default']:.3f} | {s['channels-last']:.3f} | "
            f"{row['ratio']:.2f}x | {runs['default'][0]['last_loss']:.4f}, "
            f"{runs['channels-last'][0]['last_loss']:.4f} |"
        )
    write_report(args.out, report, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
