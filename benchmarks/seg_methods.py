"""Every segmentation method in medssl on the same data, split, budget, seeds and test cases:
the table a user reads before choosing a method (issue 8; issue 9's methods join it).

Tasks (synthetic abdominal CT phantoms of domain A, ``write_organ_dataset``; one data folder
serves all three):

* ``la5`` / ``la10``: an LA-like single-structure task: the ``ssl`` setting
  (``seg-ssl-cpu``: one domain, liver only, a single large structure) with
  ``data.labeled_fraction`` 0.05 / 0.10;
* ``organs``: the multi-organ class-imbalanced task: the ``imbssl`` setting
  (``seg-imbssl-cpu``: 11 organs from the liver down to the adrenal glands), 20% labeled.

Split (``medssl.training.seg_data.split_domains``, ``data.split_seed=0`` for every method and
seed; the seed changes only the training): ``data.n_validation`` = 2 training cases are held
out to pick the checkpoint (never the test set), then ``max(1, round(fraction * rest))`` are
labeled and the rest unlabeled. With the default 40 training + 6 test cases: la5 2 labeled /
36 unlabeled, la10 4 / 34, organs 8 / 30 (validation 2, test 6 each). 5% needs at least 32
training cases for 2 labeled ones; the script warns below that.

Methods are rows of :data:`METHODS` (trainer method + budget-dependent overrides):

* ``supervised-seg``: the VNet on the labeled cases only;
* ``mean-teacher``: SSL4MIS mean teacher (EMA teacher, MSE consistency with ramp-up);
* ``bcp``: Bidirectional Copy-Paste (CVPR 2023). Its pre-training counts inside the budget:
  ``bcp.pretrain_steps = round(--bcp-pretrain-fraction x steps)``, default 2000/17000 = the
  official 2000 pre-training of 2000 + 15000 iterations; the official lr x0.1 every 2500 of the
  15000 self-training iterations is scaled the same way: ``bcp.lr_step = round(self-training
  steps / 6)``;
* ``ad``: A&D (Diff-VNet; SVDA, diffusion branch, DRS, RS on);
* ``fixmatch``: FixMatch for segmentation (weak = the crop, strong = SVDA intensity ops, fixed
  τ 0.95); ``flexmatch``: the same with FlexMatch's CPL thresholds over a memory of every voxel of
  every unlabeled case (``threshold.memory_stride`` 1); ``patchcl``: mean teacher + PLGCL after a
  20% warm-up (defaults of ``PatchCLConfig``); ``patchcl-no-plgcl`` (γ 0: what PLGCL adds) and
  ``patchcl-beta1`` (β 1 instead of the official 4: what the consistency weight costs).

A method that the installed medssl does not know (not in ``seg_config.Method``) is reported "not
available" instead of run.

Same budget: every method trains ``--steps`` SGD steps of 2 labeled (+ 2 unlabeled) crops of
``--patch`` on the 8x6x6 mm grid, validates every ``--every`` steps (BCP also at the end of
pre-training) and is tested from its best checkpoint on the same test cases, on their source
grid, through the shared pipeline. Metrics (``run.test_report``): Dice, Jaccard, HD95 and ASD
(mm) per class, averaged over test cases then classes; HD95/ASD are undefined for a (class,
case) pair with an empty prediction or reference, *undef.* counts those. Params: trained /
used at test time (EMA teachers are not counted; A&D tests with its image stem + encoder + D_θ).

Protocol (``benchmarks/seg_bench.py``, shared with ``ad_settings.py``): each run is a fresh
``python benchmarks/seg_methods.py --one ...`` subprocess on the CPU (``data.workers=0``;
``--jobs`` runs at a time, each torch with one thread when more than one); the preprocessed
volumes are shared through ``MEDSSL_CACHE=WORK/cache`` (warmed once, its time reported apart);
each run's result is written to ``WORK/results/<task>-<method>-<seed>.json`` as soon as it ends
and a rerun skips those, so an interrupted benchmark continues where it stopped. The 1-min load
average around each run is recorded; a run whose machine was busy (above cores + 0.5) has its
wall time flagged.

Time (2-core Xeon @ 2.8 GHz, 2 runs at a time with 1 torch thread each, from ad_settings'
measured s/step at 16x32x32 crops and the smoke test): ~0.15 s/step supervised, ~0.3-0.35 mean
teacher, ~0.35 BCP (its pre-training steps are supervised-priced), ~1.15 A&D; on organs
~10-40% more; plus ~15-40 s per run for start-up, validations and the 6-case test. 24 runs
(2 seeds x 3 tasks x 4 methods) at the default 300 steps: ~3700 + ~700 run-seconds, ~37 min
wall on an idle machine two at a time (~42 min at 350 steps, ~22 min at 150); the 12 A&D
runs are about half of it. The smoke test (4 steps, load average 3-4 from other work) measured
0.26-0.41 s/step supervised, 0.43-1.0 mean teacher, 0.43 BCP self-training, 2.3-2.6 A&D:
about twice the idle figures above, as the load predicts. Another CPU-bound process on the
machine slows runs down several-fold; the quality numbers do not depend on it (runs are
deterministic per seed).

    .venv/bin/python benchmarks/seg_methods.py [--steps 300] [--every 100] [--patch 16 32 32] \\
        [--seeds 0 1] [--tasks la5 la10 organs] [--methods supervised-seg mean-teacher bcp ad ...] \\
        [--jobs 2] [--work /tmp/medssl-seg-methods] [--out benchmarks/results/seg_methods] [--quick]

Writes ``OUT.json`` (device, budget, data, splits, every run, aggregates, the facts) and
``OUT.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import seg_bench  # benchmarks/seg_bench.py
from machine import cpu_device  # benchmarks/machine.py
from seg_bench import BUSY_LOAD, dice_gap, mean_std, num, pm

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
DOMAINS = ("A",)
#: official BCP (LA): 2000 pre-training + 15000 self-training iterations, lr x0.1 every 2500
BCP_PRETRAIN_FRACTION = 2000 / 17000
BCP_LR_STAGES = 15000 // 2500


@dataclass(frozen=True)
class Task:
    config: str
    overrides: dict[str, Any]
    title: str


TASKS: dict[str, Task] = {
    "la5": Task("seg-ssl-cpu", {"data.domains": ["A"], "data.labeled_fraction": 0.05},
                "LA-like: one structure (liver), one domain, 5% labeled"),
    "la10": Task("seg-ssl-cpu", {"data.domains": ["A"], "data.labeled_fraction": 0.10},
                 "LA-like: one structure (liver), one domain, 10% labeled"),
    "organs": Task("seg-imbssl-cpu", {"data.domains": ["A"], "data.labeled_fraction": 0.2},
                   "multi-organ, 11 imbalanced classes, one domain, 20% labeled"),
}


def _bcp(budget: dict[str, Any]) -> dict[str, Any]:
    pretrain = max(1, round(budget["bcp_pretrain_fraction"] * budget["steps"]))
    return {"bcp.pretrain_steps": pretrain,
            "bcp.lr_step": max(1, round((budget["steps"] - pretrain) / BCP_LR_STAGES))}


def _bcp_constant_lr(budget: dict[str, Any]) -> dict[str, Any]:
    """BCP without the step decay: at a small budget the scaled official schedule (x0.1 six
    times) leaves the self-training lr near zero after a third of it; this row shows what that
    costs."""
    return {**_bcp(budget), "bcp.lr_step": budget["steps"]}


def _bcp_long_pretrain(budget: dict[str, Any]) -> dict[str, Any]:
    """BCP with a third of the budget pre-training and no step decay: at a small budget the
    official 2/17 pre-training share can leave a teacher that finds nothing (its
    pseudo-labels are then all background); this row shows whether a longer pre-training fixes it."""
    return {"bcp.pretrain_steps": max(1, round(budget["steps"] / 3)), "bcp.lr_step": budget["steps"]}


@dataclass(frozen=True)
class MethodRow:
    """One row of the table: a trainer method and the overrides it needs from the budget.

    ``cost``: rough seconds per step (one torch thread), only to start the long runs first."""

    label: str
    method: str
    overrides: Callable[[dict[str, Any]], dict[str, Any]] = field(default=lambda budget: {})
    cost: float = 0.35
    source: str = ""


METHODS: dict[str, MethodRow] = {
    "supervised-seg": MethodRow("Supervised VNet", "supervised-seg", cost=0.15, source="labeled cases only"),
    "mean-teacher": MethodRow("Mean teacher", "mean-teacher", cost=0.33, source="Tarvainen & Valpola 2017"),
    "bcp": MethodRow("BCP", "bcp", _bcp, cost=0.35, source="Bai et al., CVPR 2023"),
    "bcp-constant-lr": MethodRow("BCP, constant lr", "bcp", _bcp_constant_lr, cost=0.35,
                                 source="BCP without the step decay (same budget)"),
    "bcp-long-pretrain": MethodRow("BCP, 1/3 pre-training, constant lr", "bcp", _bcp_long_pretrain, cost=0.35,
                                   source="BCP, a third of the budget pre-training, no step decay"),
    "ad": MethodRow("A&D", "ad", cost=1.2, source="NeurIPS 2023"),
    "fixmatch": MethodRow("FixMatch (τ 0.95)", "fixmatch", source="Sohn et al. 2020, segmentation variant"),
    # Every voxel of every unlabeled case is a CPL sample (memory_stride 1): the phantoms' 32x64x64
    # cached volumes make that 4 MB, and the adrenal glands own only a few voxels on this grid.
    "flexmatch": MethodRow("FlexMatch (CPL)", "flexmatch", lambda budget: {"threshold.memory_stride": 1},
                           source="Zhang et al., NeurIPS 2021"),
    "patchcl": MethodRow("PatchCL", "patchcl", source="Basak & Yin, CVPR 2023"),
    "patchcl-no-plgcl": MethodRow("PatchCL without PLGCL (γ 0)", "patchcl", lambda budget: {"patchcl.gamma": 0.0},
                                  source="PatchCL's mean teacher alone: strong/weak views, β·CE on pseudo-labels"),
    "patchcl-beta1": MethodRow("PatchCL, β 1", "patchcl", lambda budget: {"patchcl.beta": 1.0},
                               source="PatchCL with FixMatch's unlabeled weight instead of the official β 4"),
}


@dataclass(frozen=True)
class Run:
    task: str
    variant: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.task}-{self.variant}-{self.seed}"


def plan(tasks: list[str], variants: list[str], seeds: list[int]) -> list[Run]:
    """Seed-major (a stopped benchmark has whole seeds done first); within a seed the
    expensive runs first, so two parallel workers finish close together."""
    runs = []
    for seed in seeds:
        block = [Run(t, v, seed) for t in tasks for v in variants]
        block.sort(key=lambda r: -METHODS[r.variant].cost)
        runs += block
    return runs


def overrides_of(run: Run, budget: dict[str, Any]) -> dict[str, Any]:
    row = METHODS[run.variant]
    return {"method": row.method, "seed": run.seed, "data.split_seed": 0, "data.workers": 0,
            "optim.steps": budget["steps"], "eval.every": budget["every"], "data.patch": list(budget["patch"]),
            **TASKS[run.task].overrides, **row.overrides(budget)}


# --------------------------------------------------------------------------- child side


def known_methods() -> list[str]:
    """The methods the installed medssl's segmentation trainer accepts."""
    import typing

    from medssl.training.seg_config import Method

    return list(typing.get_args(Method))


def warm(job: dict[str, Any]) -> dict[str, Any]:
    """Preprocess every case of the tasks; check that every (task, available method) config
    loads; return the split counts and the known methods."""
    budget = job["budget"]
    known = known_methods()
    for task in job["tasks"]:
        for variant in job["variants"]:
            if METHODS[variant].method in known:
                seg_bench.experiment(TASKS[task].config, overrides_of(Run(task, variant, 0), budget))
    configs = {t: seg_bench.experiment(TASKS[t].config, overrides_of(Run(t, "supervised-seg", 0), budget))
               for t in job["tasks"]}
    splits = seg_bench.warm_cache(Path(job["data"]), configs)
    return {"splits": splits, "known_methods": known,
            "test_class_share": {t: class_share(Path(job["data"]), c) for t, c in configs.items()},
            "config": {t: {"spacing_mm": list(c.data.spacing_mm), "width": c.model.width, "lr": c.optim.lr,
                           "batch_size": c.optim.batch_size, "n_validation": c.data.n_validation,
                           "classes": list(c.data.classes), "labeled_fraction": c.data.labeled_fraction}
                       for t, c in configs.items()}}


def class_share(data: Path, cfg: Any) -> dict[str, float]:
    """Each class's share of the labeled voxels of the test cases (source grid), so that a
    reader sees which organs are small."""
    import numpy as np

    from medssl.training.seg_data import class_names, label_lookup, split_domains

    split = split_domains(data, cfg.data)
    names, lookup = class_names(split, cfg.data), label_lookup(split, cfg.data)
    counts = np.zeros(len(names), dtype=np.int64)
    for case in split.test:
        labels = lookup[np.asarray(case.dataset.label(case.case).array, dtype=np.int64)]
        counts += np.bincount(labels.ravel(), minlength=len(names))[: len(names)]
    foreground = max(int(counts[1:].sum()), 1)
    return {names[k]: float(counts[k]) / foreground for k in range(1, len(names))}


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """One run (seg_bench.run_one) plus what the table needs beyond ad_settings: the logged
    loss terms (what the trainer actually optimised) and BCP's s/step per phase."""
    task = TASKS[job["task"]]
    row = seg_bench.run_one({**job, "config": task.config,
                             "fields": {"task": job["task"], "setting": task.config.removeprefix("seg-")
                                        .removesuffix("-cpu"), "variant": job["variant"]}})
    log = [json.loads(line) for line in (Path(job["out"]) / "log.jsonl").read_text().splitlines()]
    row["loss_terms"] = sorted({k for r in log if "loss" in r for k in r} - {"step", "time", "lr"})
    pretrain = job["overrides"].get("bcp.pretrain_steps")
    if pretrain is not None:
        pairs = [(a, b) for a, b in zip(log, log[1:]) if "loss" in a and "loss" in b]
        pre = [b["time"] - a["time"] for a, b in pairs if b["step"] <= pretrain]
        self_train = [b["time"] - a["time"] for a, b in pairs if a["step"] > pretrain]
        row["bcp_phases"] = {"pretrain_steps": pretrain,
                             "pretrain_step_s_median": statistics.median(pre) if pre else None,
                             "self_train_step_s_median": statistics.median(self_train) if self_train else None}
    return row


# --------------------------------------------------------------------------- report


def _busy(row: dict[str, Any]) -> bool:
    return max(row.get("load_average_1min") or [0.0]) > BUSY_LOAD


def aggregate(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """seg_bench.aggregate by (task, method) plus per-class Dice mean ± std and the busy flag."""
    agg = seg_bench.aggregate(rows, by=("task", "variant"))
    for key, entry in agg.items():
        group = [r for r in rows if f"{r['task']}/{r['variant']}" == key]
        entry["dice_per_class_stats"] = {c: mean_std(r["dice_per_class"][c] for r in group)
                                         for c in group[0]["dice_per_class"]}
        entry["busy_runs"] = sum(_busy(r) for r in group)
        entry["loss_terms"] = group[0].get("loss_terms")
    return agg


def _relation(a: dict[str, Any], b: dict[str, Any], name: str) -> str:
    diff, noise = dice_gap(a, b)
    if noise is None:
        return (f"is {'above' if diff > 0 else 'below'} {name} by {abs(diff):.1f} Dice points "
                "(one seed: no noise estimate)")
    if diff > noise:
        return f"beats {name} by {diff:.1f} Dice points, more than the seed std ({noise:.1f})"
    if diff >= -noise:
        return f"is within seed noise of {name} ({diff:+.1f} Dice points, seed std up to {noise:.1f})"
    return f"is worse than {name} by {-diff:.1f} Dice points, more than the seed std ({noise:.1f})"


def facts(report: dict[str, Any]) -> list[str]:
    """Sentences that follow from the numbers alone: the best Dice per task, whether its lead
    exceeds the seed noise, the cheapest method within noise of it, BCP against the baselines
    at 5% labeled, and the organs no method segments."""
    agg = report["aggregates"]
    out = []
    for task in report["tasks"]:
        rows = {v: agg[f"{task}/{v}"] for v in METHODS
                if f"{task}/{v}" in agg and agg[f"{task}/{v}"]["dice"]["mean"] is not None}
        if not rows:
            continue
        ranked = sorted(rows, key=lambda v: -rows[v]["dice"]["mean"])
        best = ranked[0]
        text = (f"**{task}** ({TASKS[task].title}): best Dice {METHODS[best].label} "
                f"({pm(rows[best]['dice'], 100)} %)")
        if len(ranked) > 1:
            text += f"; it {_relation(rows[best], rows[ranked[1]], METHODS[ranked[1]].label)}"
            within = [v for v in ranked[1:] if dice_gap(rows[best], rows[v])[1] is not None
                      and dice_gap(rows[best], rows[v])[0] <= dice_gap(rows[best], rows[v])[1]]
            cheaper = [v for v in within if rows[v]["wall_s"]["mean"] < rows[best]["wall_s"]["mean"]]
            if cheaper:
                fast = min(cheaper, key=lambda v: rows[v]["wall_s"]["mean"])
                text += (f". Cheapest within seed noise of it: {METHODS[fast].label} "
                         f"({rows[fast]['wall_s']['mean']:.0f} s per run against {rows[best]['wall_s']['mean']:.0f} s)")
        out.append(text + ".")
    bcp = agg.get("la5/bcp")
    if bcp is not None and bcp["dice"]["mean"] is not None:
        parts = [_relation(bcp, agg[f"la5/{b}"], name)
                 for b, name in (("supervised-seg", "the supervised VNet"), ("mean-teacher", "the mean teacher"))
                 if f"la5/{b}" in agg]
        if parts:
            out.append("At 5% labeled (la5), BCP " + "; it ".join(parts) + ".")
    organ_rows = {v: agg[f"organs/{v}"] for v in METHODS if f"organs/{v}" in agg}
    if organ_rows:
        classes = list(next(iter(organ_rows.values()))["dice_per_class"])
        missed = [c for c in classes
                  if all((e["dice_per_class"][c] or 0.0) < 0.05 for e in organ_rows.values())]
        if missed:
            out.append(f"On organs, no method reaches 5% Dice on: {', '.join(missed)} "
                       f"({len(missed)} of {len(classes)} classes).")
    return out


def render(report: dict[str, Any]) -> str:
    agg = report["aggregates"]
    b = report["budget"]
    cfg = next(iter(report["config"].values()))
    bcp = report.get("bcp_schedule")
    lines = [
        "# Segmentation methods on one protocol (synthetic phantoms, CPU budget)", "",
        f"{report['device']}; torch {report.get('torch', '?')} with {report.get('torch_threads', '?')} thread(s), "
        f"{report['jobs']} run(s) at a time, each in a fresh process.",
        f"Budget per run, the same for every method: {b['steps']} SGD steps (batch {cfg['batch_size']} labeled + "
        f"{cfg['batch_size']} unlabeled crops; the supervised VNet draws only the labeled ones), validation every "
        f"{b['every']} steps on {cfg['n_validation']} held-out training cases (best checkpoint by validation Dice; "
        f"never the test set), crops {'x'.join(map(str, b['patch']))} on the {cfg['spacing_mm']} mm grid, "
        f"VNet width {cfg['width']}, lr {cfg['lr']}. Seeds {report['seeds']}: the split is the same for every "
        "method and seed (split_seed 0); the seed changes only the training.",
    ]
    if bcp:
        lines.append(f"BCP: its pre-training is inside the budget: {bcp['bcp.pretrain_steps']} of the {b['steps']} "
                     f"steps ({b['bcp_pretrain_fraction']:.1%}; official 2000 of 2000 + 15000), then "
                     f"{b['steps'] - bcp['bcp.pretrain_steps']} self-training steps, lr ×0.1 every "
                     f"{bcp['bcp.lr_step']} (official every 2500 of 15000).")
    d = report["data"]
    lines += [f"Data: synthetic abdominal CT phantoms (`write_organ_dataset`), domain {', '.join(d['domains'])}, "
              f"{d['cases']} training + {d['test_cases']} test cases (seed base {d['seed_base']}), native grid; "
              "every task reads the same cases.", "",
              "| task | what | cases (labeled / unlabeled / validation / test) |", "|---|---|---|"]
    for task in report["tasks"]:
        c = report["split_counts"][task]
        lines.append(f"| {task} | {TASKS[task].title} | {c['labeled']} / {c['unlabeled']} / {c['validation']} / "
                     f"{c['test']} |")
    for warning in report.get("warnings", []):
        lines += ["", f"**Note:** {warning}"]
    busy_any = any(e["busy_runs"] for e in agg.values())
    lines += ["", "## Task × method", "",
              "Test-set Dice %, Jaccard %, HD95 mm, ASD mm: mean ± sample std over seeds. *undef.*: (class, case) "
              "pairs where HD95/ASD are undefined (empty prediction or reference), left out of those means (mean "
              "over seeds). Wall: seconds per run, mean over seeds (process start to test end)"
              + (", † when the machine was busy during a run" if busy_any else "")
              + "; s/step: median seconds per training step. Params: trained / used at test time.", "",
              "| task | method | seeds | Dice % | Jaccard % | HD95 mm | ASD mm | undef. | wall s | s/step | params |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for task in report["tasks"]:
        for variant in report["methods"]:
            label = METHODS[variant].label
            a = agg.get(f"{task}/{variant}")
            if a is None:
                continue
            wall = f"{a['wall_s']['mean']:.0f}" + (" †" if a["busy_runs"] else "")
            lines.append(
                f"| {task} | {label} | {len(a['seeds'])} | {pm(a['dice'], 100)} | {pm(a['jaccard'], 100)} | "
                f"{pm(a['hd95_mm'])} | {pm(a['asd_mm'])} | {a['undefined_asd']['mean']:.1f} | {wall} | "
                f"{num(a['step_s_median']['mean'], 2)} | "
                f"{a['params_trained'] / 1e3:.0f}k / {a['params_test_time'] / 1e3:.0f}k |")
    if report["not_available"]:
        lines += ["", "**Not available** in the installed medssl, so not run (their rows fill in once "
                      "`medssl.training.seg_config.Method` names them): "
                  + ", ".join(f"{METHODS[v].label} (`{METHODS[v].method}`)" for v in report["not_available"]) + "."]
    organs = [v for v in report["methods"] if f"organs/{v}" in agg]
    if organs:
        classes = list(agg[f"organs/{organs[0]}"]["dice_per_class"])
        share = report.get("test_class_share", {}).get("organs", {})
        lines += ["", "## organs: Dice % per class (mean ± std over seeds)", "",
                  "The first row is each organ's share of the labeled voxels of the test cases, so that the "
                  "small organs are visible.", "",
                  "| method | " + " | ".join(classes) + " |", "|---|" + "---:|" * len(classes)]
        if share:
            lines.append("| *voxel share %* | " + " | ".join(
                "—" if c not in share else f"{100 * share[c]:.{1 if share[c] >= 0.01 else 2}f}" for c in classes)
                + " |")
        for v in organs:
            per = agg[f"organs/{v}"]["dice_per_class_stats"]
            lines.append(f"| {METHODS[v].label} | " + " | ".join(pm(per[c], 100) for c in classes) + " |")
    if report["facts"]:
        lines += ["", "## Which method to pick when (facts from this table only)", "",
                  "A difference counts only when it exceeds the larger of the two methods' seed std of Dice.", ""]
        lines += [f"- {s}" for s in report["facts"]]
    load = report.get("load_average_1min")
    if load and load["max"] > BUSY_LOAD:
        lines += ["", f"**Wall times are not clean:** the 1-min load average around the runs reached "
                      f"{load['max']:.1f} on {os.cpu_count()} cores (other work on the machine), above "
                      f"{BUSY_LOAD:.1f}; the runs marked † saw it. The quality numbers do not depend on it "
                      "(the runs are deterministic per seed)."]
    lines += ["", f"Total wall time of the runs: {report['total_wall_s'] / 60:.1f} min summed over "
                  f"{len(report['runs'])} runs, {report['jobs']} at a time (cache warm-up {report['warm_s']:.0f} s "
                  "apart). These are small-budget numbers on synthetic data: they compare the methods under one "
                  "protocol, not the papers' absolute values."]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- parent side


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300,
                        help="SGD steps per run, every method (300: ~35 min for the default run on an idle "
                             "2-core CPU, 2 jobs)")
    parser.add_argument("--every", type=int, default=100, help="validate every this many steps")
    parser.add_argument("--patch", type=int, nargs=3, default=[16, 32, 32], metavar=("Z", "Y", "X"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS),
                        help="rows to run; a method the installed medssl lacks is reported 'not available'")
    parser.add_argument("--bcp-pretrain-fraction", type=float, default=BCP_PRETRAIN_FRACTION,
                        help="share of --steps BCP spends pre-training (default 2000/17000, the official ratio)")
    parser.add_argument("--work", type=Path, default=None,
                        help="runs, results, cache (default /tmp/medssl-seg-methods, with --quick "
                             "/tmp/medssl-seg-methods-quick)")
    parser.add_argument("--data", type=Path, default=None, help="the phantom domain (default WORK/data)")
    parser.add_argument("--cases", type=int, default=None, help="training cases (default 40; --quick 12)")
    parser.add_argument("--test-cases", type=int, default=None, help="test cases (default 6; --quick 2)")
    parser.add_argument("--seed-base", type=int, default=0, help="seed of the first case")
    parser.add_argument("--out", type=Path, default=RESULTS / "seg_methods", help="writes OUT.json and OUT.md")
    parser.add_argument("--jobs", type=int, default=2,
                        help="runs in parallel (default 2); with more than one, each run's torch uses one thread")
    parser.add_argument("--report-only", action="store_true",
                        help="render the tables from the runs already finished; runs nothing")
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 steps, every 2, seed 0, 12 + 2 cases")
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
    test_cases = args.test_cases if args.test_cases is not None else (2 if args.quick else 6)
    if not 0 < args.bcp_pretrain_fraction < 1:
        parser.error("--bcp-pretrain-fraction must be in (0, 1)")
    args.work = args.work or Path("/tmp/medssl-seg-methods" + ("-quick" if args.quick else ""))
    args.data = args.data or args.work / "data"
    budget = {"steps": args.steps, "every": args.every, "patch": list(args.patch),
              "bcp_pretrain_fraction": args.bcp_pretrain_fraction}
    data_spec = seg_bench.ensure_data(args.data, cases, test_cases, args.seed_base, DOMAINS, "seg_methods_data.json")
    env = {**os.environ, "MEDSSL_CACHE": str(args.work / "cache")}
    os.environ["MEDSSL_CACHE"] = env["MEDSSL_CACHE"]
    results = args.work / "results"
    results.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    job = {"data": str(args.data), "tasks": args.tasks, "variants": args.methods, "budget": budget}
    warmed = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--warm", json.dumps(job)],
                            env=env, cwd=ROOT, capture_output=True, text=True)
    if warmed.returncode != 0:
        raise SystemExit(f"cache warm-up / config check failed:\n{warmed.stderr}")
    info = json.loads(warmed.stdout.strip().splitlines()[-1])
    split_counts = info["splits"]
    warm_s = time.perf_counter() - start
    print(f"cache warm ({warm_s:.0f} s): {split_counts}", file=sys.stderr, flush=True)
    not_available = {v: f"medssl has no segmentation method {METHODS[v].method!r} yet"
                     for v in args.methods if METHODS[v].method not in info["known_methods"]}
    for v, why in not_available.items():
        print(f"{v}: not available ({why}); reported as such", file=sys.stderr)
    warnings = []
    for t in args.tasks:
        if t.startswith("la") and split_counts[t]["labeled"] < 2:
            fraction, n_val = info["config"][t]["labeled_fraction"], info["config"][t]["n_validation"]
            need = next(n for n in range(n_val + 1, 10**6) if round(fraction * (n - n_val)) >= 2)
            warnings.append(f"{t} has {split_counts[t]['labeled']} labeled case; {fraction:.0%} labeled needs "
                            f"--cases {need} or more for 2 (this data: --cases {cases})")
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)

    variants = [v for v in args.methods if v not in not_available]
    runs = plan(args.tasks, variants, args.seeds)
    if args.report_only:
        runs = [run for run in runs if (results / f"{run.name}.json").is_file()]
    if args.jobs > 1:
        env["OMP_NUM_THREADS"] = "1"  # two 2-thread torch processes on 2 cores run 10-20x slower

    def execute(run: Run) -> dict[str, Any]:
        job = {"task": run.task, "variant": run.variant, "seed": run.seed, "overrides": overrides_of(run, budget),
               "data": str(args.data), "out": str(args.work / "runs" / run.name),
               "result": str(results / f".{run.name}.partial.json")}
        return seg_bench.execute(Path(__file__), job, env, name=run.name, quiet=args.quiet_runs,
                                 sequential=args.jobs == 1, extra={"budget": budget})

    started = time.perf_counter()
    rows = seg_bench.run_all(
        runs, results,
        lambda run: {"budget": budget, "split": split_counts[run.task], "overrides": overrides_of(run, budget)},
        execute, args.jobs)
    elapsed = time.perf_counter() - started
    if not rows:
        raise SystemExit("no runs to report")

    loads = [x for r in rows for x in r.get("load_average_1min") or []]
    report: dict[str, Any] = {
        "benchmark": "seg_methods",
        "device": cpu_device(),
        "torch": rows[0]["torch"], "torch_threads": rows[0]["torch_threads"],
        "budget": budget, "bcp_schedule": _bcp(budget) if "bcp" in variants else None,
        "jobs": args.jobs, "seeds": args.seeds, "tasks": args.tasks, "methods": args.methods,
        "not_available": not_available, "known_methods": info["known_methods"],
        "task_definitions": {t: {"config": TASKS[t].config, "overrides": TASKS[t].overrides, "title": TASKS[t].title}
                             for t in args.tasks},
        "split_policy": "data.split_seed=0 for every method and seed; the seed changes only training",
        "config": info["config"],
        "load_average_1min": {"min": min(loads), "max": max(loads), "busy_above": BUSY_LOAD} if loads else None,
        "data": {**data_spec, "path": str(args.data)},
        "split_counts": split_counts,
        "test_class_share": info["test_class_share"],
        "warnings": warnings,
        "warm_s": warm_s,
        "total_wall_s": sum(r["wall_s"] for r in rows),
        "elapsed_s_this_invocation": elapsed,
        "aggregates": aggregate(rows),
        "runs": rows,
    }
    report["facts"] = facts(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    text = render(report)
    args.out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
