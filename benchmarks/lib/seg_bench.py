"""The protocol shared by the segmentation benchmarks (``ad_settings.py``, ``seg_methods.py``).

One run = one fresh ``python <script> --one JOB`` subprocess that trains and tests a
``medssl.training.segmentation.trainer`` run on the CPU (:func:`run_one` on the child side,
:func:`execute` on the parent side); preprocessed volumes are shared through ``MEDSSL_CACHE``
(warmed once, :func:`warm_cache`); each finished run is a JSON file, so a rerun skips the runs
already done (:func:`run_all`); results are aggregated over seeds (:func:`aggregate`: mean ±
sample std) and rendered with :func:`pm` / :func:`num`. The 1-min load average around every run
is recorded; above :data:`BUSY_LOAD` the run's wall time is disturbed by other work.
"""

from __future__ import annotations

import itertools
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from medssl.bench.runs import resumable, train_wall_s

ROOT = Path(__file__).resolve().parents[1]
#: a 1-min load average above this (around a run) marks its wall time as disturbed
BUSY_LOAD = (os.cpu_count() or 1) + 0.5
#: metrics aggregated over seeds by :func:`aggregate`
METRICS = ("dice", "jaccard", "hd95_mm", "asd_mm", "wall_s", "step_s_median", "undefined_asd")


# --------------------------------------------------------------------------- data


def runs_folder(out: Path) -> Path:
    """Where a benchmark writing ``OUT.json`` keeps one JSON per finished run: ``OUT_runs/``,
    beside the report. Kept in the repository with it, they are the benchmark's state: the
    work folder (data, cache, run folders) lives in ``/tmp`` and does not outlive the machine,
    and a rerun on a new machine regenerates the data and skips the runs found here."""
    return out.with_name(out.name + "_runs")


def output_paths(out: Path | None, work: Path, name: str, quick: bool) -> Path:
    """``--out``: as given, else ``benchmarks/results/NAME``, or ``WORK/NAME`` for a ``--quick``
    smoke run (which must not overwrite the committed report or its runs)."""
    if out is not None:
        return out
    return work / name if quick else Path(__file__).resolve().parents[1] / "results" / name


def ensure_data(
    data: Path, cases: int, test_cases: int, seed_base: int, domains: Sequence[str], marker: str
) -> dict[str, Any]:
    """Write ``write_organ_dataset`` domains (native grid) into ``data/<domain>`` if missing.

    Domain ``k`` of ``domains`` holds ``cases`` training + ``test_cases`` test cases, seeded
    ``seed_base + k * (cases + test_cases)``. ``data/<marker>`` records the parameters; a folder
    written with other parameters is refused."""
    from medssl.synth.datasets import write_organ_dataset

    spec = {
        "cases": cases,
        "test_cases": test_cases,
        "seed_base": seed_base,
        "domains": list(domains),
        "shape": "native",
    }
    path = data / marker
    if path.is_file():
        found = json.loads(path.read_text())
        if found != spec:
            raise SystemExit(
                f"{data} holds data written with {found}, not {spec}: pass another --data/--work "
                "or delete that folder"
            )
        return spec
    data.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for k, domain in enumerate(domains):
        target = data / domain
        if target.exists():
            shutil.rmtree(target)  # a half-written domain of an interrupted generation
        write_organ_dataset(
            target,
            cases=cases,
            n_test=test_cases,
            domain=domain,
            seed=seed_base + k * (cases + test_cases),
        )
        print(
            f"wrote domain {domain}: {cases} training + {test_cases} test cases",
            file=sys.stderr,
            flush=True,
        )
    path.write_text(json.dumps(spec, indent=2) + "\n")
    print(f"data generated in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return spec


# --------------------------------------------------------------------------- child side


def experiment(config: str, overrides: Mapping[str, Any]) -> Any:
    """The :class:`SegmentationExperiment` of a bundled config (``seg-ssl-cpu``...) + overrides."""
    from medssl.cli.train import resolve_config
    from medssl.config import load_config
    from medssl.training.segmentation.config import SegmentationExperiment

    return load_config(SegmentationExperiment, resolve_config(config), dict(overrides))


def warm_cache(data: Path, configs: Mapping[str, Any]) -> dict[str, dict[str, int]]:
    """Preprocess every case the runs of ``configs`` (name -> experiment) read, in this
    process, once; returns each name's split counts (``split.json`` shape)."""
    from medssl.training.cache import VolumeCache, default_cache_dir
    from medssl.training.segmentation.data import cache_case, split_domains
    from medssl.training.segmentation.eval import normalisation

    counts = {}
    for name, cfg in configs.items():
        d = cfg.data
        split = split_domains(data, d)
        cache = VolumeCache(default_cache_dir(), d.spacing_mm, normalisation(d))
        for case in split.labeled + split.validation:
            cache_case(cache, case, True)
        for case in split.unlabeled:
            cache_case(cache, case, False)
        counts[name] = {k: len(v) for k, v in split.to_json().items()}
    return counts


def params(module: Any) -> int:
    return int(sum(p.numel() for p in module.parameters()))


def run_one(job: Mapping[str, Any]) -> dict[str, Any]:
    """Train and test one run in this process; the result row (without the parent's wall time).

    ``job``: ``config`` (bundled config name), ``overrides``, ``data``, ``out`` (run folder) and
    ``fields`` (copied to the front of the row, e.g. ``setting`` and ``variant``)."""
    import torch

    from medssl.config import config_to_dict
    from medssl.training.networks.segmenter import build_segmenter
    from medssl.training.segmentation.data import class_names, split_domains
    from medssl.training.segmentation.trainer import train_segmenter

    cfg = experiment(job["config"], job["overrides"])
    out = Path(job["out"])
    # an interrupted run of the same config continues from its last checkpoint (a session
    # ending mid-run loses minutes, not the run); any other folder is trained afresh
    resume = resumable(cfg, out)
    earlier_s = train_wall_s(out, before=time.time()) if resume else 0.0
    if out.exists() and not resume:
        shutil.rmtree(out)
    start = time.perf_counter()
    run = train_segmenter(cfg, job["data"], out, resume=resume, device="cpu")
    train_and_test_s = time.perf_counter() - start
    names = class_names(split_domains(job["data"], cfg.data), cfg.data)
    net = build_segmenter(cfg, len(names))
    if cfg.method == "ad":
        test_time = params(net.image_stem) + params(net.encoder) + params(net.decoder_theta)
    else:
        test_time = params(net)
    report = run.test_report
    if report is None:
        raise RuntimeError(f"{out}: the run has no test cases")
    mean = report["mean"]
    classes = report["classes"]
    split = json.loads((out / "split.json").read_text())
    index = json.loads((out / "checkpoints" / "index.json").read_text())
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    step_times = [row["time"] for row in log if "loss" in row]
    # seconds between consecutive training steps, leaving out the intervals that hold a validation
    intervals = [
        b["time"] - a["time"] for a, b in itertools.pairwise(log) if "loss" in a and "loss" in b
    ]
    return {
        **job["fields"],
        "method": cfg.method,
        "seed": cfg.seed,
        "overrides": job["overrides"],
        "dice": mean["dice"]["mean"],
        "jaccard": mean["jaccard"]["mean"],
        "hd95_mm": mean["hd95_mm"]["mean"],
        "asd_mm": mean["asd_mm"]["mean"],
        "asd_classes": mean["asd_mm"]["n_classes"],
        "undefined_asd": sum(report["n_cases"] - c["asd_mm"]["n_cases"] for c in classes.values()),
        "dice_per_class": {names[int(k)]: c["dice"]["mean"] for k, c in classes.items()},
        "false_negative_cases": sum(c["false_negative_cases"] for c in classes.values()),
        "n_test_cases": report["n_cases"],
        "n_classes": len(names) - 1,
        "params_trained": params(net),
        "params_test_time": test_time,
        "best_step": index.get("best_step"),
        "best_val_dice": index.get("best_value"),
        "split": {k: len(v) for k, v in split.items()},
        "train_and_test_s": train_and_test_s,
        "resumed": resume,
        "earlier_train_s": earlier_s,
        "log_span_s": (step_times[-1] - step_times[0]) if len(step_times) > 1 else None,
        "step_s_median": statistics.median(intervals) if intervals else None,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "config": config_to_dict(cfg),
        "run_dir": str(out),
    }


# --------------------------------------------------------------------------- parent side


def execute(
    script: Path,
    job: dict[str, Any],
    env: Mapping[str, str],
    *,
    name: str,
    quiet: bool,
    sequential: bool,
    extra: Mapping[str, Any],
) -> dict[str, Any]:
    """Run ``python script --one JOB`` (``job["out"]``: the run folder, which the child resumes
    when it holds an interrupted run of the same config, see :func:`run_one`;
    ``job["result"]``: where the child writes its row) and return the row plus ``name``,
    ``wall_s`` (the subprocess's wall clock, plus the training time of earlier sittings of a
    resumed run), ``extra``, ``cpu_s`` (only when ``sequential`` and not resumed: children's CPU
    time is attributable to one run only when runs go one at a time) and the 1-min load average
    before and after."""
    scratch = Path(job["result"])
    load_before = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    process = subprocess.run(
        [sys.executable, str(Path(script).resolve()), "--one", json.dumps(job)],
        cwd=ROOT,
        env=dict(env),
        stdout=subprocess.DEVNULL if quiet else None,
    )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if process.returncode != 0:
        raise SystemExit(
            f"run {name} failed (exit {process.returncode}); its folder is {job['out']}"
        )
    result = json.loads(scratch.read_text())
    scratch.unlink()
    result.update(
        {
            "name": name,
            "wall_s": wall + result.get("earlier_train_s", 0.0),
            **extra,
            "cpu_s": (
                (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
                if sequential and not result.get("resumed")
                else None
            ),
            "load_average_1min": [load_before, os.getloadavg()[0]],
        }
    )
    return result


def run_all(
    runs: Sequence[Any],
    results: Path,
    expected: Callable[[Any], dict[str, Any]],
    run: Callable[[Any], dict[str, Any]],
    jobs: int,
) -> list[dict[str, Any]]:
    """Every run (``.name``), ``jobs`` at a time, each result kept in ``results/<name>.json``.

    A result already there is reused when its fields match ``expected(run)`` (e.g. budget,
    split and ``data_fingerprint``) and refused otherwise; a new one must match the ``split``
    expected."""

    def one(i: int, item: Any) -> dict[str, Any]:
        path = results / f"{item.name}.json"
        want = expected(item)
        if path.is_file():
            row = json.loads(path.read_text())
            if any(row.get(k) != v for k, v in want.items()):
                raise SystemExit(
                    f"{path} was made with "
                    + " / ".join(f"{k} {row.get(k)}" for k in want)
                    + ", not "
                    + " / ".join(str(v) for v in want.values())
                    + ": use another --work or delete it"
                )
            print(
                f"[{i}/{len(runs)}] {item.name}: done before ({row['wall_s']:.0f} s)",
                file=sys.stderr,
            )
            return row
        print(f"[{i}/{len(runs)}] {item.name} ...", file=sys.stderr, flush=True)
        row = run(item)
        if "split" in want and row["split"] != want["split"]:
            raise SystemExit(
                f"{item.name}: split.json has {row['split']}, the warm-up saw {want['split']}"
            )
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(row, indent=2) + "\n")
        tmp.replace(path)
        print(
            f"[{i}/{len(runs)}] {item.name}: Dice {100 * row['dice']:.1f} %, ASD "
            f"{row['asd_mm'] if row['asd_mm'] is None else round(row['asd_mm'], 2)} mm, "
            f"{row['wall_s']:.0f} s",
            file=sys.stderr,
            flush=True,
        )
        return row

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return list(pool.map(one, range(1, len(runs) + 1), runs))


# --------------------------------------------------------------------------- aggregation, rendering


def mean_std(values: Iterable[float | None]) -> dict[str, Any]:
    """Mean and sample std of the values that are not None (``values`` keeps them all)."""
    values = list(values)
    xs = [float(v) for v in values if v is not None]
    return {
        "mean": statistics.mean(xs) if xs else None,
        "std": statistics.stdev(xs) if len(xs) > 1 else None,
        "n": len(xs),
        "values": values,
    }


def aggregate(
    rows: Sequence[dict[str, Any]],
    by: Sequence[str] = ("setting", "variant"),
    metrics: Sequence[str] = METRICS,
) -> dict[str, dict[str, Any]]:
    """Per ``"/".join(row[k] for k in by)``: mean ± sample std over seeds of each metric."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault("/".join(str(row[k]) for k in by), []).append(row)
    out = {}
    for key, group in groups.items():
        group.sort(key=lambda r: r["seed"])
        entry = {
            **{k: group[0][k] for k in by},
            "seeds": [r["seed"] for r in group],
            "params_trained": group[0]["params_trained"],
            "params_test_time": group[0]["params_test_time"],
        }
        for metric in metrics:
            entry[metric] = mean_std([r[metric] for r in group])
        entry["dice_per_class"] = {
            c: mean_std([r["dice_per_class"][c] for r in group])["mean"]
            for c in group[0]["dice_per_class"]
        }
        out[key] = entry
    return out


def evidence(
    cell: Mapping[str, Sequence[dict[str, Any]]],
    baseline: str = "supervised-seg",
    ceiling: Sequence[dict[str, Any]] = (),
) -> dict[str, dict[str, Any]]:
    """What the seeds of one cell (one task and labeled fraction, or one setting) say, per
    variant (``cell``: variant -> its rows, one per seed), in Dice points:

    * ``dice``: mean over seeds and its Student's t 95 % interval;
    * ``vs_baseline``: the paired per-seed difference to ``baseline`` on the same seeds, with
      its t interval (``None`` for the baseline itself or without common seeds);
    * ``gap_recovered``: ``(variant − baseline) / (ceiling − baseline)`` with a bootstrap
      interval, where ``ceiling`` are the rows of supervised training on every label (or, for
      a domain-shift setting, on the labeled target domain); ``None`` without a ceiling.
    """
    from medssl.metrics.seeds import gap_recovered, paired_difference, seed_interval

    def by_seed(rows: Sequence[dict[str, Any]]) -> dict[int, float]:
        return {int(r["seed"]): 100 * float(r["dice"]) for r in rows if r.get("dice") is not None}

    base = by_seed(cell.get(baseline, ()))
    top = list(by_seed(ceiling).values())
    out = {}
    for variant, rows in cell.items():
        scores = by_seed(rows)
        if not scores:
            continue
        entry: dict[str, Any] = {
            "dice": seed_interval(list(scores.values())).to_json(),
            "vs_baseline": None,
            "gap_recovered": None,
        }
        if variant != baseline and set(scores) & set(base):
            entry["vs_baseline"] = paired_difference(scores, base).to_json()
            if top:
                entry["gap_recovered"] = gap_recovered(scores, base, top).to_json()
        out[variant] = entry
    return out


def interval(entry: Mapping[str, Any] | None, digits: int = 1, signed: bool = False) -> str:
    """``"value [lo, hi]"`` of an :func:`evidence` interval (``—`` when absent)."""
    if not entry or entry.get("value") is None:
        return "—"
    fmt = f"{{:{'+' if signed else ''}.{digits}f}}"
    text = fmt.format(entry["value"])
    if entry.get("lo") is not None:
        text += f" [{fmt.format(entry['lo'])}, {fmt.format(entry['hi'])}]"
    return text


def dice_gap(a: Mapping[str, Any], b: Mapping[str, Any]) -> tuple[float, float | None]:
    """``a``'s mean Dice minus ``b``'s, in points, and the seed noise: the larger of the two
    sample stds of Dice over seeds, in points (None with a single seed each)."""
    diff = 100 * (a["dice"]["mean"] - b["dice"]["mean"])
    stds = [s for s in (a["dice"]["std"], b["dice"]["std"]) if s is not None]
    return diff, (100 * max(stds) if stds else None)


def num(value: float | None, digits: int) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def pm(stat: Mapping[str, Any], scale: float = 1.0, digits: int = 1) -> str:
    """``"mean ± std"`` of a :func:`mean_std` entry (``—`` without values)."""
    if stat["mean"] is None:
        return "—"
    text = f"{scale * stat['mean']:.{digits}f}"
    if stat["std"] is not None:
        text += f" ± {scale * stat['std']:.{digits}f}"
    return text
