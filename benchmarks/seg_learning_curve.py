"""Supervised learning curves of the segmentation benchmarks' tasks: the budget of
``seg_methods.py`` and ``ad_settings.py`` is read off them, so that methods are compared
where supervised training has converged, not at an arbitrary step count.

For each (task, labeled fraction) one supervised VNet run (``seg_methods.TASKS``' configs, the
same data, split and crops as the benchmark) validates every ``--every`` steps; the table is
the validation Dice at each checkpoint, the test Dice of the best one, and the first step
within ``--tolerance`` Dice points of the best validation Dice (the plateau), per run.

    .venv/bin/python benchmarks/seg_learning_curve.py [--steps 5000] [--every 250] \\
        [--cells pancreas5 pancreas100 organs100] [--seed 0] [--jobs 2] \\
        [--work /tmp/medssl-seg-methods] [--out benchmarks/results/seg_learning_curve]

Writes ``OUT.json`` and ``OUT.md``. Runs go to ``WORK/curves/``; the data and cache are
``seg_methods.py``'s (same ``--work``), so the curves describe the benchmark's own instrument.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import seg_methods  # benchmarks/seg_methods.py

from medssl.bench import seg_bench  # benchmarks/lib/seg_bench.py
from medssl.bench.machine import cpu_device

RESULTS = Path(__file__).parent / "results"


def parse_cell(cell: str) -> tuple[str, float]:
    """``pancreas5`` → ``("pancreas", 0.05)``."""
    task = cell.rstrip("0123456789")
    if task not in seg_methods.TASKS or task == cell:
        raise SystemExit(
            f"unknown cell {cell!r}: a task of {list(seg_methods.TASKS)} followed by a percentage"
        )
    return task, int(cell[len(task) :]) / 100


def curve(out: Path) -> list[dict[str, float]]:
    """``[{"step", "dice"}]`` of a run's validations."""
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [{"step": r["step"], "dice": r["val/dice"]} for r in rows if "val/dice" in r]


def plateau(points: list[dict[str, float]], tolerance: float) -> int | None:
    """The first step whose validation Dice is within ``tolerance`` (fraction) of the best."""
    if not points:
        return None
    best = max(p["dice"] for p in points)
    return next(p["step"] for p in points if p["dice"] >= best - tolerance)


def render(report: dict[str, Any]) -> str:
    lines = [
        "# Supervised learning curves of the segmentation benchmarks",
        "",
        f"{report['device']}; seed {report['seed']}; validation every "
        f"{report['every']} steps on the benchmark's held-out training cases; "
        "test Dice of the best checkpoint. Plateau: the first step within "
        f"{100 * report['tolerance']:.0f} Dice points of the best validation Dice.",
        "",
        "| cell | labeled | steps | best val Dice % (step) | plateau step | test Dice % | wall s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for cell, r in report["runs"].items():
        best = max(r["curve"], key=lambda p: p["dice"])
        lines.append(
            f"| {cell} | {r['split']['labeled']} | {r['steps']} | {100 * best['dice']:.1f} "
            f"({best['step']}) | {r['plateau_step']} | {100 * r['dice']:.1f} | {r['wall_s']:.0f} |"
        )
    steps = sorted({p["step"] for r in report["runs"].values() for p in r["curve"]})
    lines += [
        "",
        "Validation Dice % per step:",
        "",
        "| step | " + " | ".join(report["runs"]) + " |",
        "|---:|" + "---:|" * len(report["runs"]),
    ]
    for step in steps:
        cells = []
        for r in report["runs"].values():
            found = [p["dice"] for p in r["curve"] if p["step"] == step]
            cells.append(f"{100 * found[0]:.1f}" if found else "")
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--every", type=int, default=250)
    parser.add_argument("--cells", nargs="+", default=["pancreas5", "pancreas100", "organs100"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--tolerance",
        type=float,
        default=0.01,
        help="plateau: within this Dice fraction of the best",
    )
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/medssl-seg-methods"))
    parser.add_argument("--cases", type=int, default=40)
    parser.add_argument("--test-cases", type=int, default=8)
    parser.add_argument("--out", type=Path, default=RESULTS / "seg_learning_curve")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        job = json.loads(args.one)
        row = seg_methods.run_one(job)
        row["curve"] = curve(Path(job["out"]))
        Path(job["result"]).write_text(json.dumps(row, indent=2) + "\n")
        return
    data = args.work / "data"
    seg_bench.ensure_data(
        data, args.cases, args.test_cases, 0, seg_methods.DOMAINS, "seg_methods_data.json"
    )
    env = {**os.environ, "MEDSSL_CACHE": str(args.work / "cache")}
    if args.jobs > 1:
        env["OMP_NUM_THREADS"] = "1"
    results = args.work / "curves" / "results"
    results.mkdir(parents=True, exist_ok=True)
    budget = {"steps": args.steps, "every": args.every, "patch": None, "bcp_pretrain_steps": None}

    class Item:
        def __init__(self, cell: str) -> None:
            self.task, self.fraction = parse_cell(cell)
            self.run = seg_methods.Run(self.task, self.fraction, seg_methods.BASELINE, args.seed)
            self.name = f"{cell}-{args.steps}"

    def execute(item: Item) -> dict[str, Any]:
        run = item.run
        job = {
            "task": run.task,
            "fraction": run.fraction,
            "cell": run.cell,
            "variant": run.variant,
            "seed": run.seed,
            "overrides": seg_methods.overrides_of(run, budget),
            "data": str(data),
            "out": str(args.work / "curves" / item.name),
            "result": str(results / f".{item.name}.partial.json"),
        }
        return seg_bench.execute(
            Path(__file__),
            job,
            env,
            name=item.name,
            quiet=True,
            sequential=args.jobs == 1,
            extra={},
        )

    items = [Item(c) for c in args.cells]
    rows = seg_bench.run_all(items, results, lambda item: {}, execute, args.jobs)
    report = {
        "benchmark": "seg_learning_curve",
        "device": cpu_device(),
        "seed": args.seed,
        "every": args.every,
        "tolerance": args.tolerance,
        "runs": {
            item.name.rsplit("-", 1)[0]: {
                **{
                    k: r[k]
                    for k in ("dice", "dice_per_class", "split", "wall_s", "best_step", "curve")
                },
                "steps": args.steps,
                "plateau_step": plateau(r["curve"], args.tolerance),
            }
            for item, r in zip(items, rows)
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    text = render(report)
    args.out.with_suffix(".md").write_text(text)
    print(text, file=sys.stdout)


if __name__ == "__main__":
    main()
