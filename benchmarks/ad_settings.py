"""A&D against the supervised and mean-teacher VNet in the four A&D settings, on synthetic
abdominal CT/MR phantoms at a CPU-sized budget, measured as the share of each setting's gap it
recovers; the Table 5 ablations on request (``--ablations``).

The structure of the A&D paper (NeurIPS 2023): Tables 1-4, one setting each (Dice % and ASD):

* ``ssl``: one structure (the pancreas) of one domain, 20 % labeled (``seg-ssl-cpu``);
* ``imbssl``: 11 imbalanced organs of one domain, 20 % labeled (``seg-imbssl-cpu``);
* ``uda``: CT (every case labeled) → MR (unlabeled), tested on MR (``seg-uda-cpu``);
* ``semidg``: CT vendors A, B, C at 10 % labeled, tested on vendor D, never seen
  (``seg-semidg-cpu``).

**Ceilings.** Each setting's gap closes at its ceiling: supervised training on every case of the
test domain labeled (ssl, imbssl: every training case; uda: the labeled MR cases; semidg: the
labeled vendor-D cases). The gap recovered is ``(method − supervised) / (ceiling − supervised)``.

**Source-domain sanity** (uda, semidg): every run is also tested on its source domains' test
cases. A transfer number means something only when the method segments its own domains: a
method below :data:`SANE_SOURCE_DICE` there gets no transfer figure (the previous version of this
benchmark reported "+13 on domain D" for networks that scored 0 on every domain).

**ssl and imbssl are seg_methods.py's runs.** Those two settings are the cells ``pancreas20``
and ``organs20`` of ``benchmarks/seg_methods.py`` (same config, overrides, step budget and
seeds; its ceilings ``pancreas100`` and ``organs100``), so they are not trained again here:
their rows are read from seg_methods' kept runs (``--borrow-from``, default
``benchmarks/results/seg_methods_runs/``), on seg_methods' data (domain A, 40 + 8 cases by
default). A run
seg_methods has not finished yet is listed as missing. The Table 5 ablations therefore run in
uda and semidg only.

Data of uda and semidg (generated once into ``--data``): ``write_organ_dataset`` for the
domains A, B, C, D, ct, mr, ``--cases`` training + ``--test-cases`` test cases each, the
domain's native grid, domain k seeded ``--seed-base + k*(cases + test_cases)`` (``medssl synth
organs --domain A ... --domain mr``). The split is the same for every method and every seed
(``data.split_seed=0``): the seed changes only the training.

Statistics (``seg_bench.evidence``, ``medssl.metrics.seeds``): per (setting, method) the mean
Dice over seeds with its Student's t 95 % interval, the paired per-seed difference to the
supervised VNet and the gap recovered with a bootstrap interval. Protocol (fresh subprocess per
run, shared cache, results resumable across machines in ``OUT_runs/``) as
``benchmarks/seg_methods.py``.

    .venv/bin/python benchmarks/ad_settings.py [--steps N] [--every N] [--seeds 0 1 2 3 4] \
        [--settings ssl imbssl uda semidg] [--methods supervised-seg mean-teacher ad] \
        [--ablations] [--jobs 2] [--work /tmp/medssl-ad-bench] \
        [--out benchmarks/results/ad_settings] [--quick]

Writes ``OUT.json`` (device, config summary, every run, the evidence) and ``OUT.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from medssl.bench import (
    seg_bench,  # the run protocol shared with seg_methods.py (benchmarks/lib/seg_bench.py)
)
from medssl.bench.data import dataset_fingerprint
from medssl.bench.machine import cpu_device, write_report
from medssl.bench.seg_bench import BUSY_LOAD, aggregate, interval
from medssl.bench.seg_bench import num as _num
from medssl.bench.seg_bench import pm as _pm

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
SETTINGS = ("ssl", "imbssl", "uda", "semidg")
DOMAINS = ("A", "B", "C", "D", "ct", "mr")
#: Table 5 covers imbssl, uda and semidg; imbssl's runs are seg_methods' (BORROWED), so its
#: ablations would need seg_methods' data: they run in these two.
ABLATION_SETTINGS = ("uda", "semidg")
#: a method whose source-domain Dice (%) is below this gets no domain-transfer figure
SANE_SOURCE_DICE = 70.0
BASELINE, CEILING = "supervised-seg", "ceiling"
#: the step budget per setting, from the supervised learning curves
#: (benchmarks/results/seg_learning_curve.md: the pancreas at 5 % flat from ~2000 steps, its
#: ceiling within ~2 points of 5000 from 2500; the 11 organs flat from 3750); uda and semidg
#: (4 large organs) take the one-structure budget
SETTING_STEPS = {"ssl": 3000, "imbssl": 4000, "uda": 3000, "semidg": 3000}
EVERY = 250
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
LABELS = {
    "supervised-seg": "Supervised VNet",
    "mean-teacher": "Mean teacher",
    "ad": "A&D",
    "ad-wo-svda": "w/o SVDA",
    "ad-wo-diffusion": "w/o Diffusion",
    "ad-wo-drs": "w/o DRS",
    "ad-wo-rs": "w/o RS",
    CEILING: "Supervised, target labeled (ceiling)",
}
PAPER_SETTING = {
    "ssl": "SSL (one structure, one domain, 20% labeled)",
    "imbssl": "IBSSL (11 imbalanced organs, 20% labeled)",
    "uda": "UDA (ct labeled -> mr unlabeled, tested on mr)",
    "semidg": "SemiDG (A, B, C 10% labeled -> tested on D)",
}
#: the ceiling of each setting: supervised, every case of the test domain labeled
CEILING_OVERRIDES: dict[str, dict[str, Any]] = {
    "ssl": {"data.labeled_fraction": 1.0},
    "imbssl": {"data.labeled_fraction": 1.0},
    "uda": {
        "data.domains": ["mr"],
        "data.unlabeled_domains": [],
        "data.test_domains": ["mr"],
        "data.labeled_fraction": 1.0,
    },
    "semidg": {"data.domains": ["D"], "data.test_domains": ["D"], "data.labeled_fraction": 1.0},
}
#: the SSL setting's one structure: the pancreas, as seg_methods.py's one-structure task (the
#: phantom's liver, seg-ssl-cpu's default, leaves nothing for unlabeled data to add)
SETTING_OVERRIDES: dict[str, dict[str, Any]] = {"ssl": {"data.classes": [9]}}
#: settings whose test domain is not a training domain: their runs are also tested on the source
SHIFTED = ("uda", "semidg")
#: settings that are seg_methods.py cells: setting -> (cell, ceiling cell). The configs agree
#: (seg-ssl-cpu with the pancreas / seg-imbssl-cpu, domain A, 20 % labeled, 4 validation
#: cases, split_seed 0, 3000 / 4000 steps), so their runs are read, not trained again.
BORROWED: dict[str, tuple[str, str]] = {
    "ssl": ("pancreas20", "pancreas100"),
    "imbssl": ("organs20", "organs100"),
}
SEG_METHODS_RUNS = RESULTS / "seg_methods_runs"


@dataclass(frozen=True)
class Run:
    setting: str
    variant: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.setting}-{self.variant}-{self.seed}"


def plan(settings: list[str], variants: list[str], seeds: list[int]) -> list[Run]:
    """The runs to train here: seed-major, so a stopped benchmark has whole seeds done first;
    every setting's ceiling with its supervised baseline; none of the :data:`BORROWED`
    settings."""
    runs = []
    for seed in seeds:
        for setting in settings:
            if setting in BORROWED:
                continue
            for variant in (*VARIANTS, CEILING):
                if variant == CEILING:
                    if BASELINE in variants:
                        runs.append(Run(setting, CEILING, seed))
                    continue
                if variant not in variants or (
                    variant in ABLATIONS and setting not in ABLATION_SETTINGS
                ):
                    continue
                runs.append(Run(setting, variant, seed))
    return runs


def overrides_of(run: Run, budget: dict[str, Any]) -> dict[str, Any]:
    method, extra = VARIANTS[BASELINE] if run.variant == CEILING else VARIANTS[run.variant]
    if run.variant == CEILING:
        extra = CEILING_OVERRIDES[run.setting]
    patch = {"data.patch": list(budget["patch"])} if budget.get("patch") else {}
    task = {"data.n_validation": 4, **SETTING_OVERRIDES.get(run.setting, {})}
    steps = int(budget["steps"] or SETTING_STEPS[run.setting])
    return {
        "method": method,
        "seed": run.seed,
        "data.split_seed": 0,
        "data.workers": 0,
        "optim.steps": steps,
        "eval.every": budget["every"],
        "bcp.pretrain_steps": steps // 2,
        **patch,
        **task,
        **extra,
    }


def borrowed_rows(
    settings: list[str],
    variants: list[str],
    seeds: list[int],
    folder: Path,
    budget: dict[str, Any],
) -> tuple[list[dict[str, Any]], list[str]]:
    """The rows of the :data:`BORROWED` settings among ``settings``: seg_methods' kept runs in
    ``folder`` (``<cell>-<variant>-<seed>.json``), relabelled with this benchmark's ``setting``
    and ``variant`` (the ceiling: ``<ceiling cell>-supervised-seg-<seed>``); and the names of
    the runs not there yet. A kept run made with another step budget or validation interval
    than ``budget`` gives for the setting is refused (SystemExit)."""
    rows, missing = [], []
    for seed in seeds:
        for setting in settings:
            if setting not in BORROWED:
                continue
            cell, top = BORROWED[setting]
            wanted = [(v, f"{cell}-{v}-{seed}") for v in BASELINES if v in variants]
            if BASELINE in variants:
                wanted.append((CEILING, f"{top}-{BASELINE}-{seed}"))
            for variant, name in wanted:
                path = folder / f"{name}.json"
                if not path.is_file():
                    missing.append(name)
                    continue
                row = json.loads(path.read_text())
                made = {k: row["overrides"].get(k) for k in ("optim.steps", "eval.every")}
                want = {
                    "optim.steps": int(budget["steps"] or SETTING_STEPS[setting]),
                    "eval.every": budget["every"],
                }
                if made != want:
                    raise SystemExit(
                        f"{path} was made with {made}, {setting} here needs {want}: run "
                        "seg_methods.py with the same budget, or pass another --borrow-from"
                    )
                rows.append({**row, "setting": setting, "variant": variant, "borrowed_from": name})
    return rows, missing


# --------------------------------------------------------------------------- data


def ensure_data(data: Path, cases: int, test_cases: int, seed_base: int) -> dict[str, Any]:
    """Write the six domains if missing; refuse a folder written with other parameters."""
    return seg_bench.ensure_data(
        data, cases, test_cases, seed_base, DOMAINS, "ad_settings_data.json"
    )


# --------------------------------------------------------------------------- child side


def _config(setting: str, overrides: dict[str, Any]) -> Any:
    return seg_bench.experiment(f"seg-{setting}-cpu", overrides)


def warm_cache(data: Path, settings: list[str], budget: dict[str, Any]) -> dict[str, Any]:
    """Preprocess every case a run of ``settings`` reads (in this process, once); split counts
    per setting and per setting's ceiling (``<setting>/ceiling``)."""
    configs = {}
    for s in settings:
        configs[s] = _config(s, overrides_of(Run(s, "ad", 0), budget))
        configs[f"{s}/{CEILING}"] = _config(s, overrides_of(Run(s, CEILING, 0), budget))
    return seg_bench.warm_cache(data, configs)


def source_dice(out: Path, data: str) -> dict[str, Any]:
    """The run's best checkpoint tested on the test cases of its labeled domains (its source)."""
    import torch

    from medssl.config import config_from_dict
    from medssl.training.networks.segmenter import inference_net
    from medssl.training.segmentation.config import SegmentationExperiment
    from medssl.training.segmentation.data import class_names, label_lookup, split_domains
    from medssl.training.segmentation.eval import segmentation_params, test_segmenter

    state = torch.load(out / "checkpoints" / "best.pt", map_location="cpu", weights_only=False)
    cfg = config_from_dict(SegmentationExperiment, state["config"])
    source = replace(cfg.data, test_domains=cfg.data.domains)
    split = split_domains(data, source)
    names = class_names(split, source)
    report = test_segmenter(
        inference_net(state),
        split.test,
        label_lookup(split, source),
        segmentation_params(cfg, len(names)),
        names,
        torch.device("cpu"),
        False,
        out / "test-source",
    )
    return {
        "dice": report["mean"]["dice"]["mean"],
        "n_cases": report["n_cases"],
        "domains": list(cfg.data.domains),
    }


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """Train and test one run in this process; the result row (without the parent's wall time).
    Runs of a shifted setting (not their ceiling) are also tested on their source domains."""
    row = seg_bench.run_one(
        {
            **job,
            "config": f"seg-{job['setting']}-cpu",
            "fields": {"setting": job["setting"], "variant": job["variant"]},
        }
    )
    if job["setting"] in SHIFTED and job["variant"] != CEILING:
        row["source"] = source_dice(Path(job["out"]), job["data"])
    return row


# --------------------------------------------------------------------------- parent side


def execute(
    run: Run,
    args: argparse.Namespace,
    budget: dict[str, Any],
    env: dict[str, str],
    fingerprint: str,
) -> dict[str, Any]:
    """Train and test ``run`` in a subprocess; its result row (``fingerprint``: the data's)."""
    out = args.work / "runs" / run.name
    scratch = args.work / "scratch" / f"{run.name}.partial.json"
    job = {
        "setting": run.setting,
        "variant": run.variant,
        "seed": run.seed,
        "overrides": overrides_of(run, budget),
        "data": str(args.data),
        "out": str(out),
        "result": str(scratch),
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


def evidence(rows: list[dict[str, Any]], agg: dict[str, dict[str, Any]]) -> None:
    """Adds ``evidence`` (interval, paired difference to supervised, gap recovered against the
    setting's ceiling) and, for shifted settings, ``source`` (source-domain Dice over seeds and
    whether it is sane) to each aggregate entry."""
    from medssl.metrics.seeds import seed_interval

    for setting in {r["setting"] for r in rows}:
        members: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            if r["setting"] == setting:
                members.setdefault(r["variant"], []).append(r)
        ceiling = members.get(CEILING, [])
        found = seg_bench.evidence(
            {v: m for v, m in members.items() if v != CEILING}, BASELINE, ceiling
        )
        found.update(seg_bench.evidence({CEILING: ceiling}) if ceiling else {})
        for variant, entry in found.items():
            agg[f"{setting}/{variant}"]["evidence"] = entry
        for variant, group in members.items():
            sources = [100 * r["source"]["dice"] for r in group if r.get("source")]
            if sources:
                iv = seed_interval(sources).to_json()
                agg[f"{setting}/{variant}"]["source"] = {
                    **iv,
                    "sane": iv["value"] >= SANE_SOURCE_DICE,
                    "domains": group[0]["source"]["domains"],
                }


def verdict(setting: str, agg: dict[str, dict[str, Any]]) -> str | None:
    """One sentence per setting from the intervals: A&D's and the mean teacher's paired
    difference to supervised, their gap recovered, and (shifted settings) whether their
    source-domain Dice is sane enough for the transfer figure to count."""
    parts = []
    for variant in ("ad", "mean-teacher"):
        a = agg.get(f"{setting}/{variant}")
        if a is None or "evidence" not in a:
            continue
        source = a.get("source")
        if source is not None and not source["sane"]:
            parts.append(
                f"{LABELS[variant]}: source-domain Dice {source['value']:.1f} % is below "
                f"{SANE_SOURCE_DICE:.0f} %, so no transfer figure"
            )
            continue
        d, gap = a["evidence"]["vs_baseline"], a["evidence"]["gap_recovered"]
        if d is None:
            continue
        call = (
            "better than"
            if d["lo"] is not None and d["lo"] > 0
            else "worse than"
            if d["hi"] is not None and d["hi"] < 0
            else "not shown different from"
        )
        text = f"{LABELS[variant]} is {call} supervised (Δ {interval(d, signed=True)} points"
        if gap and gap.get("value") is not None:
            text += f"; gap recovered {interval(gap, 2)}"
        parts.append(text + ")")
    base = agg.get(f"{setting}/{BASELINE}", {}).get("source")
    if base is not None and not base["sane"]:
        parts.append(
            f"the supervised VNet itself scores {base['value']:.1f} % on its source domains: the "
            "setting does not measure transfer at this budget"
        )
    return f"**{setting}**: " + "; ".join(parts) + "." if parts else None


def _borrowed_note(report: dict[str, Any]) -> list[str]:
    b = report.get("borrowed") or {}
    if not b.get("settings"):
        return []
    cells = ", ".join(f"{s}: `{c}` (ceiling `{t}`)" for s, (c, t) in b["settings"].items())
    text = (
        f"**{', '.join(b['settings'])}** are benchmarks/seg_methods.py's runs ({cells}; "
        "same config, budget and seeds, on its own domain-A data: the case counts below), "
        "read from its kept runs, not trained again."
    )
    if b.get("missing"):
        text += f" Not finished there yet: {len(b['missing'])} run(s)."
    return ["", text]


def render(report: dict[str, Any]) -> str:
    agg = report["aggregates"]
    b = report["budget"]
    cfg = report["config"]
    lines = [
        "# A&D settings on synthetic phantoms: the gap each method recovers (CPU budget)",
        "",
        f"{report['device']}; torch {report.get('torch', '?')} with "
        f"{report.get('torch_threads', '?')} threads, "
        f"{report.get('jobs', 1)} run(s) at a time, each in a fresh process.",
        f"Budget per run: {b['steps'] or SETTING_STEPS} SGD steps (batch 2 labeled + "
        f"2 unlabeled crops), validation every {b['every']} steps (best checkpoint "
        f"by validation Dice), VNet width {cfg['width']}, lr {cfg['lr']}, the "
        f"{cfg['spacing_mm']} mm grid. Seeds {report['seeds']}: the split is the "
        "same for every method and seed (split_seed 0); the seed changes only the "
        f"training. Data: synthetic organ phantoms, {report['data']['cases']} "
        f"training + {report['data']['test_cases']} test cases per domain.",
        *_borrowed_note(report),
        "",
        "| setting | cases (labeled / unlabeled / validation / test) | ceiling's cases |",
        "|---|---|---|",
    ]
    for setting in report["settings"]:
        c, top = (
            report["split_counts"].get(setting),
            report["split_counts"].get(f"{setting}/{CEILING}"),
        )
        if c:
            ceiling = (
                f"{top['labeled']} / {top['unlabeled']} / {top['validation']} / {top['test']}"
                if top
                else "—"
            )
            lines.append(
                f"| {PAPER_SETTING[setting]} | {c['labeled']} / {c['unlabeled']} "
                f"/ {c['validation']} / {c['test']} | {ceiling} |"
            )
    lines += [
        "",
        "## Setting × method (Tables 1-4 shape)",
        "",
        "Dice % on the test domain's test cases: mean over seeds [Student's t 95 % CI]. "
        "Δ: the paired per-seed difference to the supervised VNet [t 95 % CI]. Gap: "
        "(method − supervised) / (ceiling − supervised) [bootstrap 95 % CI], the ceiling "
        "being supervised training with the test domain labeled. Source: Dice % on the "
        f"source domains' test cases (shifted settings); below {SANE_SOURCE_DICE:.0f} % "
        "the transfer figures are struck (~~x~~). ASD mm: mean ± std over seeds. Wall: "
        "seconds per run; s/step: median seconds per training step.",
        "",
        "| setting | method | seeds | Dice % | Δ Dice points | gap "
        "recovered | source Dice % | ASD mm | wall s | s/step |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for setting in SETTINGS:
        for variant in (*BASELINES, *ABLATIONS, CEILING):
            a = agg.get(f"{setting}/{variant}")
            if a is None:
                continue
            e, source = a.get("evidence", {}), a.get("source")
            strike = source is not None and not source["sane"]
            delta, gap = interval(e.get("vs_baseline"), signed=True), e.get("gap_recovered")
            gap_text = interval(gap, 2) if gap else "—"
            if strike:
                delta, gap_text = f"~~{delta}~~", f"~~{gap_text}~~"
            lines.append(
                f"| {setting} | {LABELS[variant]} | {len(a['seeds'])} | "
                f"{interval(e.get('dice'))} | {delta} | {gap_text} | "
                f"{interval(source) if source else '—'} | {_pm(a['asd_mm'])} | "
                f"{a['wall_s']['mean']:.0f} | {_num(a['step_s_median']['mean'], 2)} |"
            )
    imb = [v for v in (*BASELINES, CEILING) if f"imbssl/{v}" in agg]
    if imb:
        classes = list(agg[f"imbssl/{imb[0]}"]["dice_per_class"])
        lines += [
            "",
            "## imbssl: Dice % per class (mean over seeds)",
            "",
            "| method | " + " | ".join(classes) + " |",
            "|---|" + "---:|" * len(classes),
        ]
        for v in imb:
            per = agg[f"imbssl/{v}"]["dice_per_class"]
            lines.append(
                f"| {LABELS[v]} | "
                + " | ".join("—" if per[c] is None else f"{100 * per[c]:.1f}" for c in classes)
                + " |"
            )
    sentences = [s for s in (verdict(setting, agg) for setting in SETTINGS) if s]
    if sentences:
        lines += [
            "",
            "## What the intervals say",
            "",
            "A difference counts only when its paired 95 % interval excludes zero.",
            "",
        ]
        lines += [f"- {s}" for s in sentences]
    load = report.get("load_average_1min")
    if load and load["max"] > BUSY_LOAD:
        lines += [
            "",
            f"**Wall times are not clean:** the 1-min load average around the runs reached "
            f"{load['max']:.1f} on {os.cpu_count()} cores (other work on the machine); the quality "
            "numbers do not depend on it (the runs are deterministic per seed).",
        ]
    lines += [
        "",
        f"Total wall time of the runs (summed; {report.get('jobs', 1)} at a "
        f"time): {report['total_wall_s'] / 3600:.1f} h ({len(report['runs'])} "
        "runs). Synthetic data at a CPU budget: the table compares the "
        "methods under one protocol, not the paper's absolute values.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"SGD steps per run in every setting (default: per setting, {SETTING_STEPS})",
    )
    parser.add_argument("--every", type=int, default=EVERY)
    parser.add_argument(
        "--patch",
        type=int,
        nargs=3,
        default=None,
        metavar=("Z", "Y", "X"),
        help="training crop (default: each setting's config)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS))
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=list(VARIANTS),
        default=list(BASELINES),
        help="the variants to run (default: supervised, mean teacher, A&D)",
    )
    parser.add_argument(
        "--ablations", action="store_true", help="add A&D's Table 5 ablations (imbssl, uda, semidg)"
    )
    parser.add_argument(
        "--work",
        type=Path,
        default=None,
        help="runs, results, cache (default /tmp/medssl-ad-bench, with --quick "
        "/tmp/medssl-ad-bench-quick)",
    )
    parser.add_argument(
        "--data", type=Path, default=None, help="the phantom domains (default WORK/data)"
    )
    parser.add_argument("--cases", type=int, default=24, help="training cases per domain")
    parser.add_argument("--test-cases", type=int, default=6, help="test cases per domain")
    parser.add_argument("--seed-base", type=int, default=0, help="seed of domain A's first case")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="writes OUT.json and OUT.md, and one JSON per finished run in OUT_runs/ (default "
        "benchmarks/results/ad_settings; with --quick WORK/ad_settings)",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="render the tables from the runs already finished; runs nothing",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=2,
        help="runs in parallel; with more than one, each run's torch uses one thread",
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 4 steps, every 2, seed 0, 6 + 2 cases"
    )
    parser.add_argument(
        "--borrow-from",
        type=Path,
        default=None,
        help="seg_methods.py's kept runs, the rows of ssl and imbssl (default "
        "benchmarks/results/seg_methods_runs; with --quick, those of seg_methods.py --quick)",
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
        job = json.loads(args.warm)
        print(json.dumps(warm_cache(Path(job["data"]), job["settings"], job["budget"])))
        return
    if args.quick:
        args.steps, args.every, args.seeds, args.cases, args.test_cases = 4, 2, [0], 6, 2
    if args.ablations:
        args.methods = [*args.methods, *(a for a in ABLATIONS if a not in args.methods)]
    args.work = args.work or Path("/tmp/medssl-ad-bench" + ("-quick" if args.quick else ""))
    args.data = args.data or args.work / "data"
    args.out = seg_bench.output_paths(args.out, args.work, "ad_settings", args.quick)
    if args.borrow_from is None:
        quick_runs = seg_bench.runs_folder(Path("/tmp/medssl-seg-methods-quick/seg_methods"))
        args.borrow_from = quick_runs if args.quick else SEG_METHODS_RUNS
    budget = {
        "steps": args.steps,
        "every": args.every,
        "patch": list(args.patch) if args.patch else None,
    }
    own = [s for s in args.settings if s not in BORROWED]
    data_spec = ensure_data(args.data, args.cases, args.test_cases, args.seed_base)
    env = {**os.environ, "MEDSSL_CACHE": str(args.work / "cache")}
    os.environ["MEDSSL_CACHE"] = env["MEDSSL_CACHE"]
    results = seg_bench.runs_folder(args.out)
    results.mkdir(parents=True, exist_ok=True)
    (args.work / "scratch").mkdir(parents=True, exist_ok=True)
    fingerprint = dataset_fingerprint(args.data)

    start = time.perf_counter()
    job = {"data": str(args.data), "settings": own, "budget": budget}
    warm = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--warm", json.dumps(job)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
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

    def split_of(run: Run) -> dict[str, int]:
        return split_counts[f"{run.setting}/{CEILING}" if run.variant == CEILING else run.setting]

    rows = seg_bench.run_all(
        runs,
        results,
        lambda run: {"budget": budget, "split": split_of(run), "data_fingerprint": fingerprint},
        lambda run: execute(run, args, budget, env, fingerprint),
        args.jobs,
    )
    borrowed, missing = borrowed_rows(
        args.settings, args.methods, args.seeds, args.borrow_from, budget
    )
    if missing:
        print(
            f"{len(missing)} run(s) of ssl/imbssl not finished by seg_methods.py yet: "
            + ", ".join(missing),
            file=sys.stderr,
        )
    for row in borrowed:
        key = f"{row['setting']}/{CEILING}" if row["variant"] == CEILING else row["setting"]
        split_counts.setdefault(key, row["split"])
    rows = [*rows, *borrowed]
    if not rows:
        raise SystemExit("no runs to report")
    first = rows[0]["config"]
    loads = [x for r in rows if "load_average_1min" in r for x in r["load_average_1min"]]
    agg = aggregate(rows)
    evidence(rows, agg)
    report = {
        "benchmark": "ad_settings",
        "device": cpu_device(),
        "torch": rows[0]["torch"],
        "torch_threads": rows[0]["torch_threads"],
        "budget": budget,
        "jobs": args.jobs,
        "seeds": args.seeds,
        "settings": args.settings,
        "methods": args.methods,
        "split_policy": "data.split_seed=0 for every method "
        "and seed; the seed changes only training",
        "sane_source_dice": SANE_SOURCE_DICE,
        "config": {
            "spacing_mm": first["data"]["spacing_mm"],
            "width": first["model"]["width"],
            "lr": first["optim"]["lr"],
            "batch_size": first["optim"]["batch_size"],
            "data.workers": 0,
            "device": "cpu",
        },
        "load_average_1min": {"min": min(loads), "max": max(loads)} if loads else None,
        "data": {**data_spec, "path": str(args.data)},
        "borrowed": {
            "settings": {s: BORROWED[s] for s in args.settings if s in BORROWED},
            "from": str(args.borrow_from),
            "missing": missing,
        },
        "split_counts": split_counts,
        "warm_s": warm_s,
        "total_wall_s": sum(r["wall_s"] for r in rows),
        "aggregates": agg,
        "runs": rows,
    }
    report["verdicts"] = {s: verdict(s, agg) for s in args.settings}
    write_report(args.out, report, render(report))


if __name__ == "__main__":
    main()
