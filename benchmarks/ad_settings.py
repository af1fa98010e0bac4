"""A&D vs the supervised and mean-teacher VNet in the four A&D settings, plus the Table 5
ablations, on synthetic abdominal CT/MR phantoms at a CPU-sized budget.

The structure of the A&D paper (NeurIPS 2023): Tables 1-4 (one setting each: SSL, IBSSL,
UDA, SemiDG; Dice % and ASD) and Table 5 (A&D w/o SVDA / Diffusion / DRS / RS in IBSSL,
UDA and SemiDG). Here every setting is the bundled ``seg-<setting>-cpu`` config (width-8
VNet, 8x6x6 mm grid) with a smaller budget (``--steps``, ``--every``, ``--patch``):

* ``supervised-seg``: the VNet on the labeled cases only;
* ``mean-teacher``: the VNet, labeled + unlabeled cases (SSL4MIS mean teacher);
* ``ad``: A&D (Diff-VNet; SVDA, diffusion branch, DRS, RS all on);
* ``ad-wo-svda`` / ``ad-wo-diffusion`` / ``ad-wo-drs`` / ``ad-wo-rs``: A&D with
  ``data.svda=false`` / ``ad.diffusion=false`` / ``ad.drs=false`` / ``ad.rs=false``
  (imbssl, uda and semidg only, as the paper's Table 5).

Data (generated once into ``--data``, default ``WORK/data``): ``write_organ_dataset`` for the
domains A, B, C, D, ct, mr, ``--cases`` training + ``--test-cases`` test cases each, the
domain's native grid, domain k seeded ``--seed-base + k*(cases + test_cases)`` — what
``medssl synth organs --domain A --domain B ... --domain mr`` writes. The split is the
same for every method and every seed (``data.split_seed=0``): the seed changes only the
training (``seed``: initialisation, crops, SVDA, noise). Every method trains the same
number of steps on the same labeled cases, picks its checkpoint by validation Dice on the
same held-out training cases, and is tested on the same test cases (``imagesTs`` of the
setting's test domains, at their source resolution, through the shared pipeline).

Each run is a fresh ``python benchmarks/ad_settings.py --one ...`` subprocess (no memory or
torch-thread state leaks between runs) calling ``medssl.training.seg_trainer.train_segmenter``
on the CPU with ``data.workers=0``; ``wall_s`` is that subprocess's wall-clock time (start-up,
training, validation and test included). Preprocessed volumes are shared through
``MEDSSL_CACHE=WORK/cache``, warmed once before the runs (its time is reported apart), so no
run pays for preprocessing the others reuse. Each run's result is written to
``WORK/results/<setting>-<method>-<seed>.json`` as soon as it ends; a rerun skips runs
already there, so an interrupted benchmark continues where it stopped. That protocol lives in
``benchmarks/seg_bench.py``, shared with ``benchmarks/seg_methods.py``.

Metrics (``run.test_report``, medssl.metrics.segmentation): per class Dice, Jaccard, HD95
and ASD (mm, prediction -> reference, medpy ``asd``), averaged over test cases, then over
classes. HD95/ASD are undefined (left out of the means) for a case where the class is
predicted but absent or absent from the prediction; ``undefined_asd`` counts those
(class, case) pairs so that an ASD that skipped missed organs stays visible.

Time (idle machine, 2-core Xeon @ 2.8 GHz, torch 2 threads; measured at 20 steps and
extrapolated): ~0.1 s/step supervised, ~0.2 mean teacher, ~0.55-0.7 A&D (its 10-step DDIM
pseudo-labels are half of it), ~0.35 w/o Diffusion, plus ~10-20 s per run for start-up,
validations and the test; 24 runs per seed: ~22 min per seed at 100 steps (the default,
~45 min for 2 seeds), ~31 min per seed at 150 steps. Checked at 100 steps: uda supervised
18 s, uda A&D 71 s, imbssl supervised 21 s, imbssl A&D 80 s. Another CPU-bound process on the
machine slows the runs down up to ~20x (torch's threads contend); ``load_average_1min``
around each run is recorded and a busy machine is flagged in the table.

    .venv/bin/python benchmarks/ad_settings.py [--steps 100] [--every 50] [--patch 16 32 32] \
        [--seeds 0 1] [--settings ssl imbssl uda semidg] [--methods ad mean-teacher ...] \
        [--work /tmp/medssl-ad-bench] [--out benchmarks/results/ad_settings] [--quick]

Writes ``OUT.json`` (device, config summary, every run, aggregates) and ``OUT.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import seg_bench  # benchmarks/seg_bench.py: the run protocol shared with seg_methods.py
from machine import cpu_device  # benchmarks/machine.py
from seg_bench import BUSY_LOAD, aggregate, dice_gap
from seg_bench import num as _num
from seg_bench import pm as _pm

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
SETTINGS = ("ssl", "imbssl", "uda", "semidg")
DOMAINS = ("A", "B", "C", "D", "ct", "mr")
#: Table 5 covers these settings.
ABLATION_SETTINGS = ("imbssl", "uda", "semidg")
#: variant -> (trainer method, config overrides)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "supervised-seg": ("supervised-seg", {}),
    "mean-teacher": ("mean-teacher", {}),
    "ad": ("ad", {}),
    "ad-wo-svda": ("ad", {"data.svda": False}),
    "ad-wo-diffusion": ("ad", {"ad.diffusion": False}),
    "ad-wo-drs": ("ad", {"ad.drs": False}),
    "ad-wo-rs": ("ad", {"ad.rs": False}),
}
BASELINES = ("supervised-seg", "mean-teacher", "ad")
ABLATIONS = ("ad-wo-svda", "ad-wo-diffusion", "ad-wo-drs", "ad-wo-rs")
LABELS = {"supervised-seg": "Supervised VNet", "mean-teacher": "Mean teacher", "ad": "A&D",
          "ad-wo-svda": "w/o SVDA", "ad-wo-diffusion": "w/o Diffusion", "ad-wo-drs": "w/o DRS",
          "ad-wo-rs": "w/o RS"}
PAPER_SETTING = {"ssl": "SSL (one domain, 20% labeled)", "imbssl": "IBSSL (11 imbalanced classes, 20% labeled)",
                 "uda": "UDA (ct labeled -> mr unlabeled, tested on mr)",
                 "semidg": "SemiDG (A, B, C 10% labeled -> tested on D)"}


@dataclass(frozen=True)
class Run:
    setting: str
    variant: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.setting}-{self.variant}-{self.seed}"


def plan(settings: list[str], variants: list[str], seeds: list[int]) -> list[Run]:
    """Seed-major, so a stopped benchmark has whole seeds done first."""
    runs = []
    for seed in seeds:
        for setting in settings:
            for variant in VARIANTS:
                if variant not in variants or (variant in ABLATIONS and setting not in ABLATION_SETTINGS):
                    continue
                runs.append(Run(setting, variant, seed))
    return runs


def overrides_of(run: Run, budget: dict[str, Any]) -> dict[str, Any]:
    method, extra = VARIANTS[run.variant]
    return {"method": method, "seed": run.seed, "data.split_seed": 0, "data.workers": 0,
            "optim.steps": budget["steps"], "eval.every": budget["every"], "data.patch": list(budget["patch"]),
            **extra}


# --------------------------------------------------------------------------- data


def ensure_data(data: Path, cases: int, test_cases: int, seed_base: int) -> dict[str, Any]:
    """Write the six domains if missing; refuse a folder written with other parameters."""
    return seg_bench.ensure_data(data, cases, test_cases, seed_base, DOMAINS, "ad_settings_data.json")


# --------------------------------------------------------------------------- child side


def _config(setting: str, overrides: dict[str, Any]) -> Any:
    return seg_bench.experiment(f"seg-{setting}-cpu", overrides)


def warm_cache(data: Path, settings: list[str], budget: dict[str, Any]) -> dict[str, Any]:
    """Preprocess every case a run of ``settings`` reads (in this process, once)."""
    return seg_bench.warm_cache(data, {s: _config(s, overrides_of(Run(s, "ad", 0), budget)) for s in settings})


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """Train and test one run in this process; the result row (without the parent's wall time)."""
    return seg_bench.run_one({**job, "config": f"seg-{job['setting']}-cpu",
                              "fields": {"setting": job["setting"], "variant": job["variant"]}})


# --------------------------------------------------------------------------- parent side


def execute(run: Run, args: argparse.Namespace, budget: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    out = args.work / "runs" / run.name
    scratch = args.work / "results" / f".{run.name}.partial.json"
    job = {"setting": run.setting, "variant": run.variant, "seed": run.seed, "overrides": overrides_of(run, budget),
           "data": str(args.data), "out": str(out), "result": str(scratch)}
    return seg_bench.execute(Path(__file__), job, env, name=run.name, quiet=args.quiet_runs,
                             sequential=args.jobs == 1, extra={"budget": budget})


def verdict(setting: str, agg: dict[str, dict[str, Any]]) -> str | None:
    """One sentence: does A&D beat each baseline by more than the seed noise?

    Noise = the larger of the two methods' sample std of Dice over seeds (no verdict beyond
    "higher"/"lower" with a single seed)."""
    ad = agg.get(f"{setting}/ad")
    if ad is None or ad["dice"]["mean"] is None:
        return None
    parts = []
    for base in ("supervised-seg", "mean-teacher"):
        other = agg.get(f"{setting}/{base}")
        if other is None or other["dice"]["mean"] is None:
            continue
        diff, noise = dice_gap(ad, other)
        name = "the supervised VNet" if base == "supervised-seg" else "the mean teacher"
        if noise is None:
            parts.append(f"is {'above' if diff > 0 else 'below'} {name} by {abs(diff):.1f} Dice points "
                         "(one seed: no noise estimate)")
            continue
        if diff > noise:
            parts.append(f"beats {name} by {diff:.1f} Dice points, more than the seed std ({noise:.1f})")
        elif diff >= -noise:
            parts.append(f"is within seed noise of {name} ({diff:+.1f} Dice points, seed std up to {noise:.1f})")
        else:
            parts.append(f"is worse than {name} by {-diff:.1f} Dice points, more than the seed std ({noise:.1f})")
    if not parts:
        return None
    return f"**{setting}**: A&D " + "; it ".join(parts) + "."


def render(report: dict[str, Any]) -> str:
    agg = report["aggregates"]
    b = report["budget"]
    lines = [
        "# A&D settings on synthetic phantoms (CPU budget)", "",
        f"{report['device']}; torch {report.get('torch', '?')} with {report.get('torch_threads', '?')} threads, "
        f"{report.get('jobs', 1)} run(s) at a time, each in a fresh process.",
        f"Budget per run: {b['steps']} SGD steps (batch 2 labeled + 2 unlabeled crops), validation every "
        f"{b['every']} steps (best checkpoint by validation Dice), crops {'x'.join(map(str, b['patch']))} on the "
        f"{report['config']['spacing_mm']} mm grid, VNet width {report['config']['width']}, lr "
        f"{report['config']['lr']}. Seeds {report['seeds']}: the split is the same for every method and seed "
        "(split_seed 0); the seed changes only the training. Data: synthetic organ phantoms, "
        f"{report['data']['cases']} training + {report['data']['test_cases']} test cases per domain.",
        "",
        "| setting | cases (labeled / unlabeled / validation / test) |", "|---|---|",
    ]
    for setting, c in report["split_counts"].items():
        lines.append(f"| {PAPER_SETTING[setting]} | {c['labeled']} / {c['unlabeled']} / {c['validation']} / "
                     f"{c['test']} |")
    lines += ["", "## Setting x method (Tables 1-4 shape)", "",
              "Dice % and ASD mm on the test cases: mean ± sample std over seeds. ASD (mm, prediction → "
              "reference) leaves out (class, case) pairs with an empty prediction or reference: "
              "*undef.* counts them (mean over seeds). Wall: seconds per run, mean over seeds (process start "
              "to test end: training, validations and test); s/step: median seconds per training step. "
              "Params: trained / used at test time (A&D: image stem + encoder + D_θ).", "",
              "| setting | method | seeds | Dice % | ASD mm | HD95 mm | Jaccard % | undef. | wall s | s/step "
              "| params |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for setting in SETTINGS:
        for variant in BASELINES:
            a = agg.get(f"{setting}/{variant}")
            if a is None:
                continue
            lines.append(
                f"| {setting} | {LABELS[variant]} | {len(a['seeds'])} | {_pm(a['dice'], 100)} | {_pm(a['asd_mm'])} | "
                f"{_pm(a['hd95_mm'])} | {_pm(a['jaccard'], 100)} | {a['undefined_asd']['mean']:.1f} | "
                f"{a['wall_s']['mean']:.0f} | {_num(a['step_s_median']['mean'], 2)} | "
                f"{a['params_trained'] / 1e3:.0f}k / {a['params_test_time'] / 1e3:.0f}k |")
    if any(k.split("/")[1] in ABLATIONS for k in agg):
        lines += ["", "## Ablations (Table 5 shape): Dice %, mean ± std over seeds", "",
                  "| setting | " + " | ".join(LABELS[v] for v in ("ad", *ABLATIONS)) + " |",
                  "|---|" + "---:|" * (1 + len(ABLATIONS))]
        for setting in ABLATION_SETTINGS:
            cells = [_pm(agg[f"{setting}/{v}"]["dice"], 100) if f"{setting}/{v}" in agg else "—"
                     for v in ("ad", *ABLATIONS)]
            if any(c != "—" for c in cells):
                lines.append(f"| {setting} | " + " | ".join(cells) + " |")
    imb = [v for v in BASELINES if f"imbssl/{v}" in agg]
    if imb:
        classes = list(agg[f"imbssl/{imb[0]}"]["dice_per_class"])
        lines += ["", "## imbssl: Dice % per class (mean over seeds)", "",
                  "| method | " + " | ".join(classes) + " |", "|---|" + "---:|" * len(classes)]
        for v in imb:
            per = agg[f"imbssl/{v}"]["dice_per_class"]
            lines.append(f"| {LABELS[v]} | " + " | ".join("—" if per[c] is None else f"{100 * per[c]:.1f}"
                                                         for c in classes) + " |")
    sentences = [s for s in (verdict(setting, agg) for setting in SETTINGS) if s]
    if sentences:
        lines += ["", "## Does A&D beat the baselines here?", "",
                  "A difference counts only when it exceeds the larger of the two methods' seed std of Dice.", ""]
        lines += [f"- {s}" for s in sentences]
    load = report.get("load_average_1min")
    if load and load["max"] > BUSY_LOAD:
        lines += ["", f"**Wall times are not clean:** the 1-min load average around the runs reached "
                      f"{load['max']:.1f} on {os.cpu_count()} cores (other work on the machine). With another "
                      "CPU-bound process running, torch's 2 threads here slowed down up to ~20x; the quality "
                      "numbers do not depend on it (the runs are deterministic per seed)."]
    lines += ["", f"Total wall time of the runs (summed; {report.get('jobs', 1)} at a time): {report['total_wall_s'] / 60:.1f} min "
                  f"({len(report['runs'])} runs; cache warm-up {report['warm_s']:.0f} s apart). "
                  "These are small-budget numbers on synthetic data: they check that the methods run and "
                  "compare under one protocol, not the paper's absolute values."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100,
                        help="SGD steps per run (100: ~45 min for the whole default run on an idle 2-core CPU; "
                             "150: ~62 min)")
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--patch", type=int, nargs=3, default=[16, 32, 32], metavar=("Z", "Y", "X"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS))
    parser.add_argument("--methods", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                        help="run a subset of the variants (ablations only run in imbssl, uda, semidg)")
    parser.add_argument("--work", type=Path, default=None,
                        help="runs, results, cache (default /tmp/medssl-ad-bench, with --quick "
                             "/tmp/medssl-ad-bench-quick)")
    parser.add_argument("--data", type=Path, default=None, help="the phantom domains (default WORK/data)")
    parser.add_argument("--cases", type=int, default=12, help="training cases per domain")
    parser.add_argument("--test-cases", type=int, default=3, help="test cases per domain")
    parser.add_argument("--seed-base", type=int, default=0, help="seed of domain A's first case")
    parser.add_argument("--out", type=Path, default=RESULTS / "ad_settings", help="writes OUT.json and OUT.md")
    parser.add_argument("--report-only", action="store_true",
                        help="render the tables from the runs already finished (missing runs are left out "
                        "and the seed counts say so); runs nothing")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs in parallel; with more than one, each run's torch uses one thread")
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 steps, every 2, seed 0")
    parser.add_argument("--quiet-runs", action="store_true", help="hide the runs' progress output")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--warm", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.one:
        job = json.loads(args.one)
        Path(job["result"]).write_text(json.dumps(run_one(job), indent=2) + "\n")
        return
    if args.warm:
        job = json.loads(args.warm)
        print(json.dumps(warm_cache(Path(job["data"]), job["settings"], job["budget"])))
        return
    if args.quick:
        args.steps, args.every, args.seeds = 4, 2, [0]
    args.work = args.work or Path("/tmp/medssl-ad-bench" + ("-quick" if args.quick else ""))
    args.data = args.data or args.work / "data"
    budget = {"steps": args.steps, "every": args.every, "patch": list(args.patch)}
    data_spec = ensure_data(args.data, args.cases, args.test_cases, args.seed_base)
    env = {**os.environ, "MEDSSL_CACHE": str(args.work / "cache")}
    os.environ["MEDSSL_CACHE"] = env["MEDSSL_CACHE"]
    results = args.work / "results"
    results.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    job = {"data": str(args.data), "settings": args.settings, "budget": budget}
    warm = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--warm", json.dumps(job)],
                          env=env, cwd=ROOT, capture_output=True, text=True)
    if warm.returncode != 0:
        raise SystemExit(f"cache warm-up failed:\n{warm.stderr}")
    split_counts = json.loads(warm.stdout.strip().splitlines()[-1])
    warm_s = time.perf_counter() - start
    print(f"cache warm ({warm_s:.0f} s): {split_counts}", file=sys.stderr, flush=True)

    runs = plan(args.settings, args.methods, args.seeds)
    if args.report_only:
        runs = [run for run in runs if (results / f"{run.name}.json").is_file()]
    if args.jobs > 1:
        env["OMP_NUM_THREADS"] = "1"  # two 2-thread torch processes on 2 cores run 10-20x slower

    rows = seg_bench.run_all(runs, results,
                             lambda run: {"budget": budget, "split": split_counts[run.setting]},
                             lambda run: execute(run, args, budget, env), args.jobs)

    configs = {}
    for row in rows:
        c = row["config"]
        configs.setdefault(row["setting"], {
            "config": f"seg-{row['setting']}-cpu", "spacing_mm": c["data"]["spacing_mm"],
            "width": c["model"]["width"], "lr": c["optim"]["lr"], "batch_size": c["optim"]["batch_size"],
            "normalisation": c["data"]["normalisation"], "domains": c["data"]["domains"],
            "unlabeled_domains": c["data"]["unlabeled_domains"], "test_domains": c["data"]["test_domains"],
            "classes": c["data"]["classes"], "labeled_fraction": c["data"]["labeled_fraction"],
            "n_validation": c["data"]["n_validation"], "split_json": row["split"]})
    first = rows[0]["config"]
    loads = [x for r in rows if "load_average_1min" in r for x in r["load_average_1min"]]
    report = {
        "benchmark": "ad_settings",
        "device": cpu_device(),
        "torch": rows[0]["torch"], "torch_threads": rows[0]["torch_threads"],
        "budget": budget, "jobs": args.jobs, "seeds": args.seeds, "settings": args.settings, "methods": args.methods,
        "split_policy": "data.split_seed=0 for every method and seed; the seed changes only training",
        "config": {"spacing_mm": first["data"]["spacing_mm"], "width": first["model"]["width"],
                   "lr": first["optim"]["lr"], "batch_size": first["optim"]["batch_size"],
                   "data.workers": 0, "device": "cpu", "per_setting": configs},
        "load_average_1min": {"min": min(loads), "max": max(loads)} if loads else None,
        "data": {**data_spec, "path": str(args.data)},
        "split_counts": {s: configs[s]["split_json"] for s in args.settings if s in configs},
        "warm_s": warm_s,
        "total_wall_s": sum(r["wall_s"] for r in rows),
        "aggregates": aggregate(rows),
        "runs": rows,
    }
    report["verdicts"] = {s: verdict(s, report["aggregates"]) for s in args.settings}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    text = render(report)
    args.out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
