"""Every segmentation method in medssl on the same data, split, budget, seeds and test cases,
measured as the share of the supervised gap it recovers: the table a user reads before choosing
a method.

Tasks (synthetic abdominal CT phantoms of domain A, ``write_organ_dataset``, with between-case
variation of contrast and noise; one data folder serves every task):

* ``pancreas``: one structure, the pancreas (``seg-ssl-cpu`` with ``data.classes [9]``), at 5,
  10 and 20 % labeled. The CT analogue of the LA / Pancreas-NIH benchmarks of the SSL papers
  (UA-MT, BCP): a single structure, but small, lobulated, low-contrast against bowel and vessels
  and variable between patients, so that a few labeled cases leave room for unlabeled data. The
  phantom's liver (the previous "LA-like" task) is too easy: 2 labeled cases came within 1.7
  Dice points of all labels.
* ``organs``: 11 organs from the liver down to the adrenal glands (``seg-imbssl-cpu``), the
  Synapse analogue (class-imbalanced SSL), at 20 % labeled.

Each task also has its **ceiling**: the supervised VNet on every training case labeled.

Split (``medssl.training.segmentation.data.split_domains``, ``data.split_seed=0`` for every method
and
seed; the seed changes only the training): ``data.n_validation`` training cases are held out to
pick the checkpoint (never the test set), then ``max(1, round(fraction * rest))`` are labeled
and the rest unlabeled. With 40 training cases and 4 for validation: 2 / 4 / 7 labeled at 5 /
10 / 20 %, 36 at the ceiling.

Methods (:data:`METHODS`; a method the installed medssl does not know is reported "not
available"): the supervised VNet (labeled cases only), mean teacher (SSL4MIS), BCP (CVPR 2023;
``--bcp-pretrain-steps`` of copy-paste pre-training inside the budget, then self-training with
the official absolute lr schedule, ×0.1 every 2500 steps, which a CPU budget never reaches),
A&D (NeurIPS 2023), FixMatch and FlexMatch (CPL) for segmentation, PatchCL (CVPR 2023).
Each method's deviations from its official code are listed in
``docs/explanation/methods.md``, section "Deviations from the official code we keep".

Statistics (``seg_bench.evidence``, ``medssl.metrics.seeds``): Dice per run is the test-set
mean over cases, then classes. Per (task, fraction, method): the mean over seeds with its
Student's t 95 % interval; the **paired** difference to the supervised VNet on the same seeds
and labeled cases, with its t interval; and the **gap recovered**
``(method − supervised) / (ceiling − supervised)`` with a bootstrap interval. Seed spread
dominates (per-case spread is far smaller), so the seeds, not the test cases, carry the
interval.

Protocol (``benchmarks/lib/seg_bench.py``, shared with ``ad_settings.py``): each run is a fresh
``python benchmarks/seg_methods.py --one ...`` subprocess on the CPU (``data.workers=0``;
``--jobs`` runs at a time, each torch with one thread when more than one); preprocessed volumes
are shared through ``MEDSSL_CACHE=WORK/cache``; each run's result is written to
``OUT_runs/<name>.json`` (``benchmarks/results/seg_methods_runs/``, kept in the repository) as
soon as it ends, with the data's fingerprint, and a rerun skips those: an interrupted benchmark
continues where it stopped, on this machine or a new one that regenerates the same data
(``--report-only`` renders what is done). A run cut off mid-way continues from its last
checkpoint (saved at every validation) when its folder is still there
(``medssl.bench.runs.resumable``); its wall time then adds the training time of the earlier
sittings.

Cost: 26 runs per seed with the default rows (19 pancreas, 7 organs); on this 2-core CPU, two
at a time, about 5 hours of wall time per seed (A&D is about half of it), so ~25 h for 5 seeds:
a job for several sittings (it resumes run by run) or for a GPU.

    .venv/bin/python benchmarks/seg_methods.py [--steps N] [--every N] [--seeds 0 1 2 3 4] \\
        [--tasks pancreas organs] [--methods supervised-seg mean-teacher ...] [--jobs 2] \\
        [--work /tmp/medssl-seg-methods] [--out benchmarks/results/seg_methods] [--quick]

Writes ``OUT.json`` (device, budget, data, splits, every run, the evidence, the facts) and
``OUT.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medssl.bench import seg_bench  # benchmarks/lib/seg_bench.py
from medssl.bench.data import dataset_fingerprint
from medssl.bench.machine import cpu_device, write_report
from medssl.bench.seg_bench import BUSY_LOAD, interval, mean_std, num, pm

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
DOMAINS = ("A",)
BASELINE = "supervised-seg"
#: validation interval (the step budgets are per task: Task.steps)
EVERY = 250
#: the labeled fraction of the ceiling rows
CEILING = 1.0


@dataclass(frozen=True)
class Task:
    """A task: its config, overrides, title, labeled fractions and its step budget (read off
    the supervised learning curve of its ceiling: benchmarks/results/seg_learning_curve.md)."""

    config: str
    overrides: dict[str, Any]
    title: str
    fractions: tuple[float, ...]
    steps: int


TASKS: dict[str, Task] = {
    "pancreas": Task(
        "seg-ssl-cpu",
        {"data.domains": ["A"], "data.classes": [9], "data.n_validation": 4},
        "one structure (pancreas), one domain",
        (0.05, 0.10, 0.20),
        steps=3000,
    ),
    "organs": Task(
        "seg-imbssl-cpu",
        {"data.domains": ["A"], "data.n_validation": 4},
        "11 imbalanced organs (liver to adrenal glands), one domain",
        (0.20,),
        steps=4000,
    ),
}


def steps_of(task: str, budget: dict[str, Any]) -> int:
    """The task's step budget, or ``--steps`` for every task when given."""
    return int(budget["steps"] or TASKS[task].steps)


def _bcp(budget: dict[str, Any], steps: int) -> dict[str, Any]:
    """BCP's pre-training inside the budget: half of it (where the supervised learning curve
    has flattened), or ``--bcp-pretrain-steps``; the self-training keeps the official absolute
    schedule (lr x0.1 every 2500 steps)."""
    pretrain = budget["bcp_pretrain_steps"] or steps // 2
    return {"bcp.pretrain_steps": max(1, min(pretrain, steps - 1))}


@dataclass(frozen=True)
class MethodRow:
    """One row of the table: a trainer method and the overrides it needs from the budget.

    ``cost``: rough seconds per step relative to the others, only to start the long runs first."""

    label: str
    method: str
    overrides: Callable[[dict[str, Any], int], dict[str, Any]] = field(
        default=lambda budget, steps: {}
    )
    cost: float = 0.35
    source: str = ""


METHODS: dict[str, MethodRow] = {
    "supervised-seg": MethodRow(
        "Supervised VNet", "supervised-seg", cost=0.15, source="labeled cases only"
    ),
    "mean-teacher": MethodRow(
        "Mean teacher", "mean-teacher", cost=0.33, source="Tarvainen & Valpola 2017"
    ),
    "bcp": MethodRow("BCP", "bcp", _bcp, cost=0.35, source="Bai et al., CVPR 2023"),
    "ad": MethodRow("A&D", "ad", cost=1.2, source="Wang & Li, NeurIPS 2023"),
    "fixmatch": MethodRow(
        "FixMatch (τ 0.95)", "fixmatch", source="Sohn et al. 2020, segmentation variant"
    ),
    # Every voxel of every unlabeled case is a CPL sample (memory_stride 1); the adrenal glands
    # own only a few voxels on the model grid.
    "flexmatch": MethodRow(
        "FlexMatch (CPL)",
        "flexmatch",
        lambda budget, steps: {"threshold.memory_stride": 1},
        source="Zhang et al., NeurIPS 2021",
    ),
    "patchcl": MethodRow("PatchCL", "patchcl", cost=0.6, source="Basak & Yin, CVPR 2023"),
}


#: the default rows: every method but FixMatch (FlexMatch's fixed-threshold base; on request: it
#: would add a seventh of the CPU time)
DEFAULT_METHODS = [m for m in METHODS if m != "fixmatch"]


@dataclass(frozen=True)
class Run:
    task: str
    fraction: float
    variant: str
    seed: int

    @property
    def cell(self) -> str:
        """``pancreas5``, ``organs20``, ``pancreas100`` (the ceiling)."""
        return f"{self.task}{round(100 * self.fraction)}"

    @property
    def name(self) -> str:
        return f"{self.cell}-{self.variant}-{self.seed}"


def plan(
    tasks: Sequence[str],
    variants: Sequence[str],
    seeds: Sequence[int],
    fractions: Sequence[float] | None = None,
) -> list[Run]:
    """Seed-major (a stopped benchmark has whole seeds done first); each seed has every task's
    ceiling and every (fraction, method); within a seed the expensive runs first, so two
    parallel workers finish close together."""
    runs = []
    for seed in seeds:
        block = []
        for task in tasks:
            for fraction in fractions or TASKS[task].fractions:
                block += [Run(task, fraction, v, seed) for v in variants]
            if BASELINE in variants:
                block.append(Run(task, CEILING, BASELINE, seed))
        block.sort(key=lambda r: -METHODS[r.variant].cost)
        runs += block
    return runs


def overrides_of(run: Run, budget: dict[str, Any]) -> dict[str, Any]:
    row = METHODS[run.variant]
    steps = steps_of(run.task, budget)
    extra = {"data.patch": list(budget["patch"])} if budget.get("patch") else {}
    return {
        "method": row.method,
        "seed": run.seed,
        "data.split_seed": 0,
        "data.workers": 0,
        "optim.steps": steps,
        "eval.every": budget["every"],
        **extra,
        **TASKS[run.task].overrides,
        "data.labeled_fraction": run.fraction,
        **row.overrides(budget, steps),
    }


# --------------------------------------------------------------------------- child side


def known_methods() -> list[str]:
    """The methods the installed medssl's segmentation trainer accepts."""
    from medssl.training.methods.registry import method_names

    return list(method_names("segmentation"))


def warm(job: dict[str, Any]) -> dict[str, Any]:
    """Preprocess every case of the tasks; check that every (task, available method) config
    loads; return the split counts per cell and the known methods."""
    budget = job["budget"]
    known = known_methods()
    runs = plan(
        job["tasks"],
        [v for v in job["variants"] if METHODS[v].method in known],
        [0],
        job.get("fractions"),
    )
    for run in runs:
        seg_bench.experiment(TASKS[run.task].config, overrides_of(run, budget))
    cells = {run.cell: run for run in runs if run.variant == BASELINE}
    configs = {
        cell: seg_bench.experiment(TASKS[run.task].config, overrides_of(run, budget))
        for cell, run in cells.items()
    }
    splits = seg_bench.warm_cache(Path(job["data"]), configs)
    first = {run.task: configs[cell] for cell, run in cells.items()}
    return {
        "splits": splits,
        "known_methods": known,
        "test_class_share": {t: class_share(Path(job["data"]), c) for t, c in first.items()},
        "config": {
            t: {
                "spacing_mm": list(c.data.spacing_mm),
                "patch": list(c.data.patch),
                "width": c.model.width,
                "lr": c.optim.lr,
                "batch_size": c.optim.batch_size,
                "n_validation": c.data.n_validation,
                "classes": list(c.data.classes),
                "foreground_fraction": c.data.foreground_fraction,
            }
            for t, c in first.items()
        },
    }


def class_share(data: Path, cfg: Any) -> dict[str, float]:
    """Each class's share of the labeled voxels of the test cases (source grid), so that a
    reader sees which organs are small."""
    import numpy as np

    from medssl.training.segmentation.data import class_names, label_lookup, split_domains

    split = split_domains(data, cfg.data)
    names, lookup = class_names(split, cfg.data), label_lookup(split, cfg.data)
    counts = np.zeros(len(names), dtype=np.int64)
    for case in split.test:
        labels = lookup[np.asarray(case.dataset.label(case.case).array, dtype=np.int64)]
        counts += np.bincount(labels.ravel(), minlength=len(names))[: len(names)]
    foreground = max(int(counts[1:].sum()), 1)
    return {names[k]: float(counts[k]) / foreground for k in range(1, len(names))}


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """One run (seg_bench.run_one) plus the logged loss terms (what the trainer optimised)."""
    task = TASKS[job["task"]]
    row = seg_bench.run_one(
        {
            **job,
            "config": task.config,
            "fields": {
                "task": job["task"],
                "fraction": job["fraction"],
                "cell": job["cell"],
                "variant": job["variant"],
            },
        }
    )
    log = [json.loads(line) for line in (Path(job["out"]) / "log.jsonl").read_text().splitlines()]
    row["loss_terms"] = sorted({k for r in log if "loss" in r for k in r} - {"step", "time", "lr"})
    return row


# --------------------------------------------------------------------------- report


def _busy(row: dict[str, Any]) -> bool:
    return max(row.get("load_average_1min") or [0.0]) > BUSY_LOAD


def aggregate(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """seg_bench.aggregate by (cell, method), plus per-class Dice and the busy flag, plus the
    seed evidence (interval, paired difference to the supervised VNet, gap recovered)."""
    agg = seg_bench.aggregate(rows, by=("cell", "variant"))
    for key, entry in agg.items():
        group = [r for r in rows if f"{r['cell']}/{r['variant']}" == key]
        entry["task"], entry["fraction"] = group[0]["task"], group[0]["fraction"]
        entry["dice_per_class_stats"] = {
            c: mean_std(r["dice_per_class"][c] for r in group) for c in group[0]["dice_per_class"]
        }
        entry["busy_runs"] = sum(_busy(r) for r in group)
    for cell in {r["cell"] for r in rows}:
        task = next(r["task"] for r in rows if r["cell"] == cell)
        ceiling = [
            r
            for r in rows
            if r["task"] == task and r["fraction"] == CEILING and r["variant"] == BASELINE
        ]
        members: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            if r["cell"] == cell:
                members.setdefault(r["variant"], []).append(r)
        found = seg_bench.evidence(members, BASELINE, () if cell.endswith("100") else ceiling)
        for variant, entry in found.items():
            agg[f"{cell}/{variant}"]["evidence"] = entry
    return agg


def _cells(report: dict[str, Any]) -> list[tuple[str, str, float]]:
    """(task, cell, fraction) in reading order, ceilings first."""
    out = []
    for task in report["tasks"]:
        fractions = [CEILING, *(report.get("fractions") or TASKS[task].fractions)]
        out += [(task, f"{task}{round(100 * f)}", f) for f in fractions]
    return out


def facts(report: dict[str, Any]) -> list[str]:
    """Sentences that follow from the intervals alone: per cell, the methods whose paired
    difference to the supervised VNet excludes zero, and the ceiling gap."""
    agg = report["aggregates"]
    out = []
    for task, cell, fraction in _cells(report):
        if fraction == CEILING:
            continue
        base, top = agg.get(f"{cell}/{BASELINE}"), agg.get(f"{task}100/{BASELINE}")
        if base is None:
            continue
        text = (
            f"**{cell}** ({fraction:.0%} labeled): supervised {interval(base['evidence']['dice'])}"
        )
        if top is not None:
            text += f", ceiling {interval(top['evidence']['dice'])}"
        better, worse, level = [], [], []
        for v in METHODS:
            e = agg.get(f"{cell}/{v}", {}).get("evidence")
            if v == BASELINE or not e or not e["vs_baseline"]:
                continue
            d = e["vs_baseline"]
            name = f"{METHODS[v].label} ({interval(d, signed=True)})"
            if d["lo"] is not None and d["lo"] > 0:
                better.append(name)
            elif d["hi"] is not None and d["hi"] < 0:
                worse.append(name)
            else:
                level.append(METHODS[v].label)
        if better:
            text += f". Better than supervised, paired 95 % CI above 0: {', '.join(better)}"
        if worse:
            text += f". Worse than supervised: {', '.join(worse)}"
        if level:
            text += f". No difference shown: {', '.join(level)}"
        out.append(text + ".")
    return out


def render(report: dict[str, Any]) -> str:
    agg = report["aggregates"]
    b = report["budget"]
    cfg = next(iter(report["config"].values()))
    lines = [
        "# Segmentation methods on one protocol: the supervised gap each recovers",
        "",
        f"{report['device']}; torch {report.get('torch', '?')} with "
        f"{report.get('torch_threads', '?')} thread(s), "
        f"{report['jobs']} run(s) at a time, each in a fresh process.",
        "Budget per run, the same for every method of a task: "
        + ", ".join(f"{t} {steps_of(t, b)}" for t in report["tasks"])
        + f" SGD steps (batch {cfg['batch_size']} labeled + {cfg['batch_size']} unlabeled "
        f"crops), validation every {b['every']} steps on {cfg['n_validation']} held-out "
        "training cases (best checkpoint by validation Dice; never the test set), crops "
        f"{'x'.join(map(str, cfg['patch']))} on the {cfg['spacing_mm']} mm grid "
        f"({cfg['foreground_fraction']:.0%} centred on foreground), VNet width "
        f"{cfg['width']}, lr {cfg['lr']}. BCP pre-trains {b['bcp_pretrain_steps'] or 'half'} "
        f"of the steps. Seeds {report['seeds']}: the split is the same for every method and "
        "seed (split_seed 0); the seed changes only the training.",
    ]
    d = report["data"]
    lines += [
        "Data: synthetic abdominal CT phantoms (`write_organ_dataset`), domain "
        f"{', '.join(d['domains'])}, {d['cases']} training + {d['test_cases']} "
        f"test cases (seed base {d['seed_base']}), native grid.",
        "",
        "| cell | task | labeled / unlabeled / validation / test |",
        "|---|---|---|",
    ]
    for task, cell, fraction in _cells(report):
        c = report["split_counts"].get(cell)
        if c:
            lines.append(
                f"| {cell} | {TASKS[task].title}, {fraction:.0%} labeled | {c['labeled']} / "
                f"{c['unlabeled']} / {c['validation']} / {c['test']} |"
            )
    busy_any = any(e["busy_runs"] for e in agg.values())
    lines += [
        "",
        "## Dice, paired difference to supervised, gap recovered",
        "",
        "Dice % on the test cases: mean over seeds [Student's t 95 % CI]. Δ: the "
        "paired per-seed difference to the supervised VNet at the same labels [t "
        "95 % CI]. Gap: (method − supervised) / (ceiling − supervised) "
        "[bootstrap 95 % CI]; 1 = all of the gap to every label closed. HD95 and "
        "ASD mm: mean ± std over seeds. Wall: seconds per run (mean over seeds)"
        + (", † when the machine was busy during a run" if busy_any else "")
        + "; s/step: median.",
        "",
        "| cell | method | seeds | Dice % | Δ Dice points | "
        "gap recovered | HD95 mm | ASD mm | wall s | s/step |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for _task, cell, fraction in _cells(report):
        for variant in report["methods"]:
            a = agg.get(f"{cell}/{variant}")
            if a is None:
                continue
            e = a.get("evidence", {})
            label = METHODS[variant].label + (
                " — ceiling (every label)" if fraction == CEILING else ""
            )
            wall = f"{a['wall_s']['mean']:.0f}" + (" †" if a["busy_runs"] else "")
            gap = e.get("gap_recovered")
            lines.append(
                f"| {cell} | {label} | {len(a['seeds'])} | {interval(e.get('dice'))} "
                f"| {interval(e.get('vs_baseline'), signed=True)} | "
                f"{interval(gap, 2) if gap else '—'} | {pm(a['hd95_mm'])} | "
                f"{pm(a['asd_mm'])} | {wall} | {num(a['step_s_median']['mean'], 2)} |"
            )
    if report["not_available"]:
        lines += [
            "",
            "**Not available** in the installed medssl, so not run: "
            + ", ".join(
                f"{METHODS[v].label} (`{METHODS[v].method}`)" for v in report["not_available"]
            )
            + ".",
        ]
    organ_cells = [(cell, f) for task, cell, f in _cells(report) if task == "organs"]
    if organ_cells:
        share = report.get("test_class_share", {}).get("organs", {})
        for cell, _fraction in organ_cells:
            present = [v for v in report["methods"] if f"{cell}/{v}" in agg]
            if not present:
                continue
            classes = list(agg[f"{cell}/{present[0]}"]["dice_per_class"])
            lines += [
                "",
                f"## {cell}: Dice % per organ (mean ± std over seeds)",
                "",
                "| method | " + " | ".join(classes) + " |",
                "|---|" + "---:|" * len(classes),
            ]
            if share:
                lines.append(
                    "| *voxel share %* | "
                    + " | ".join(
                        "—"
                        if c not in share
                        else f"{100 * share[c]:.{1 if share[c] >= 0.01 else 2}f}"
                        for c in classes
                    )
                    + " |"
                )
            for v in present:
                per = agg[f"{cell}/{v}"]["dice_per_class_stats"]
                lines.append(
                    f"| {METHODS[v].label} | " + " | ".join(pm(per[c], 100) for c in classes) + " |"
                )
    if report["facts"]:
        lines += [
            "",
            "## What the intervals say",
            "",
            "A difference counts only when its paired 95 % interval excludes zero.",
            "",
        ]
        lines += [f"- {s}" for s in report["facts"]]
    load = report.get("load_average_1min")
    if load and load["max"] > BUSY_LOAD:
        lines += [
            "",
            "**Wall times are not clean:** the 1-min load average around the "
            f"runs reached {load['max']:.1f} on {os.cpu_count()} cores (other "
            "work on the machine); the runs marked † saw it. The quality "
            "numbers do not depend on it (the runs are deterministic per seed).",
        ]
    lines += [
        "",
        f"Total wall time of the runs: {report['total_wall_s'] / 3600:.1f} h summed over "
        f"{len(report['runs'])} runs, {report['jobs']} at a time. Synthetic data at a CPU budget: "
        "the table compares the methods under one protocol, not the papers' absolute values.",
    ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- parent side


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="SGD steps per run for every task (default: each task's own budget, "
        + ", ".join(f"{t} {task.steps}" for t, task in TASKS.items())
        + ")",
    )
    parser.add_argument(
        "--every", type=int, default=EVERY, help=f"validate every this many steps (default {EVERY})"
    )
    parser.add_argument(
        "--patch",
        type=int,
        nargs=3,
        default=None,
        metavar=("Z", "Y", "X"),
        help="training crop (default: the task's config)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    parser.add_argument(
        "--fractions",
        type=float,
        nargs="+",
        default=None,
        help="labeled fractions (default: each task's own; the ceiling always runs)",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=list(METHODS),
        default=DEFAULT_METHODS,
        help="rows to run (default: every method but FixMatch, FlexMatch's fixed-threshold base); "
        "a method the installed medssl lacks is reported 'not available'",
    )
    parser.add_argument(
        "--bcp-pretrain-steps",
        type=int,
        default=None,
        help="BCP's copy-paste pre-training steps inside the budget (default: half of the task's "
        "budget, where the supervised learning curve has flattened)",
    )
    parser.add_argument(
        "--work",
        type=Path,
        default=None,
        help="runs, results, cache (default /tmp/medssl-seg-methods, with --quick "
        "/tmp/medssl-seg-methods-quick)",
    )
    parser.add_argument(
        "--data", type=Path, default=None, help="the phantom domain (default WORK/data)"
    )
    parser.add_argument(
        "--cases", type=int, default=None, help="training cases (default 40; --quick 12)"
    )
    parser.add_argument(
        "--test-cases", type=int, default=None, help="test cases (default 8; --quick 2)"
    )
    parser.add_argument("--seed-base", type=int, default=0, help="seed of the first case")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="writes OUT.json and OUT.md, and one JSON per finished run in OUT_runs/ (default "
        "benchmarks/results/seg_methods; with --quick WORK/seg_methods)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=2,
        help="runs in parallel (default 2); with more than one, each run's torch uses one thread",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="render the tables from the runs already finished; runs nothing",
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 4 steps, every 2, seed 0, 12 + 2 cases"
    )
    parser.add_argument("--quiet-runs", action="store_true", help="hide the runs' progress output")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--warm", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.one:
        job = json.loads(args.one)
        Path(job["result"]).write_text(json.dumps(run_one(job), indent=2) + "\n")
        return
    if args.warm:
        print(json.dumps(warm(json.loads(args.warm))))
        return
    if args.quick:
        args.steps, args.every, args.seeds = 4, 2, [0]
    cases = args.cases if args.cases is not None else (12 if args.quick else 40)
    test_cases = args.test_cases if args.test_cases is not None else (2 if args.quick else 8)
    pretrain = args.bcp_pretrain_steps
    if pretrain is not None and not 0 < pretrain < min(
        (args.steps or TASKS[t].steps) for t in args.tasks
    ):
        parser.error("--bcp-pretrain-steps must be in (0, the smallest task budget)")
    args.work = args.work or Path("/tmp/medssl-seg-methods" + ("-quick" if args.quick else ""))
    args.data = args.data or args.work / "data"
    args.out = seg_bench.output_paths(args.out, args.work, "seg_methods", args.quick)
    budget = {
        "steps": args.steps,
        "every": args.every,
        "patch": list(args.patch) if args.patch else None,
        "bcp_pretrain_steps": pretrain,
    }
    data_spec = seg_bench.ensure_data(
        args.data, cases, test_cases, args.seed_base, DOMAINS, "seg_methods_data.json"
    )
    env = {**os.environ, "MEDSSL_CACHE": str(args.work / "cache")}
    os.environ["MEDSSL_CACHE"] = env["MEDSSL_CACHE"]
    results = seg_bench.runs_folder(args.out)
    results.mkdir(parents=True, exist_ok=True)
    (args.work / "scratch").mkdir(parents=True, exist_ok=True)
    fingerprint = dataset_fingerprint(args.data)

    start = time.perf_counter()
    job = {
        "data": str(args.data),
        "tasks": args.tasks,
        "variants": args.methods,
        "budget": budget,
        "fractions": args.fractions,
    }
    warmed = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--warm", json.dumps(job)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if warmed.returncode != 0:
        raise SystemExit(f"cache warm-up / config check failed:\n{warmed.stderr}")
    info = json.loads(warmed.stdout.strip().splitlines()[-1])
    split_counts = info["splits"]
    warm_s = time.perf_counter() - start
    print(f"cache warm ({warm_s:.0f} s): {split_counts}", file=sys.stderr, flush=True)
    not_available = {
        v: f"medssl has no segmentation method {METHODS[v].method!r} yet"
        for v in args.methods
        if METHODS[v].method not in info["known_methods"]
    }
    variants = [v for v in args.methods if v not in not_available]
    runs = plan(args.tasks, variants, args.seeds, args.fractions)
    if args.report_only:
        runs = [run for run in runs if (results / f"{run.name}.json").is_file()]
    if args.jobs > 1:
        env["OMP_NUM_THREADS"] = "1"  # two 2-thread torch processes on 2 cores run 10-20x slower

    def execute(run: Run) -> dict[str, Any]:
        job = {
            "task": run.task,
            "fraction": run.fraction,
            "cell": run.cell,
            "variant": run.variant,
            "seed": run.seed,
            "overrides": overrides_of(run, budget),
            "data": str(args.data),
            "out": str(args.work / "runs" / run.name),
            "result": str(args.work / "scratch" / f"{run.name}.partial.json"),
        }
        return seg_bench.execute(
            Path(__file__),
            job,
            env,
            name=run.name,
            quiet=args.quiet_runs,
            sequential=args.jobs == 1,
            extra={"budget": budget, "data_fingerprint": fingerprint},
        )

    started = time.perf_counter()
    rows = seg_bench.run_all(
        runs,
        results,
        lambda run: {
            "budget": budget,
            "split": split_counts[run.cell],
            "overrides": overrides_of(run, budget),
            "data_fingerprint": fingerprint,
        },
        execute,
        args.jobs,
    )
    elapsed = time.perf_counter() - started
    if not rows:
        raise SystemExit("no runs to report")

    loads = [x for r in rows for x in r.get("load_average_1min") or []]
    report: dict[str, Any] = {
        "benchmark": "seg_methods",
        "device": cpu_device(),
        "torch": rows[0]["torch"],
        "torch_threads": rows[0]["torch_threads"],
        "budget": budget,
        "jobs": args.jobs,
        "seeds": args.seeds,
        "tasks": args.tasks,
        "fractions": args.fractions,
        "methods": args.methods,
        "not_available": not_available,
        "known_methods": info["known_methods"],
        "task_definitions": {
            t: {
                "config": TASKS[t].config,
                "overrides": TASKS[t].overrides,
                "title": TASKS[t].title,
                "fractions": list(TASKS[t].fractions),
            }
            for t in args.tasks
        },
        "split_policy": "data.split_seed=0 for every method "
        "and seed; the seed changes only training",
        "config": info["config"],
        "load_average_1min": {"min": min(loads), "max": max(loads), "busy_above": BUSY_LOAD}
        if loads
        else None,
        "data": {**data_spec, "path": str(args.data)},
        "split_counts": split_counts,
        "test_class_share": info["test_class_share"],
        "warm_s": warm_s,
        "total_wall_s": sum(r["wall_s"] for r in rows),
        "elapsed_s_this_invocation": elapsed,
        "aggregates": aggregate(rows),
        "runs": rows,
    }
    report["facts"] = facts(report)
    write_report(args.out, report, render(report))


if __name__ == "__main__":
    main()
