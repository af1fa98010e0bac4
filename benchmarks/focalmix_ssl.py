"""FocalMix vs the fully supervised detector on synthetic chest CT: a benchmark that can decide,
with the structure of the paper's Table 1 (labeled counts, one fixed
unlabeled pool, one budget and one test set for every run) and Table 3 (ablations).

Data (generated into ``--data`` if missing, all of the generator's ``train`` family, 128-matrix
scans by default, ``--matrix``): ``--cases`` annotated scans in a LUNA16 folder (scan ``i`` in
``subset{i % 10}``) and ``--unlabeled-pool`` plain scans in ``unlabeled/``. The test split is
the ``--test-subsets`` (default 7, 8, 9: 57 of the default 190 scans, about 140 nodules), of the
same family as the training data: this benchmark asks whether unlabeled scans help on the
distribution they come from, as the paper's LUNA16 test folds do. Generalisation to the
held-out family is ``benchmarks/detector_quality.py``'s question. The training pool (the other
subsets) holds ``data.n_validation`` validation scans and the labeled scans.

Arms, per labeled count (default 5, 10, 25) and seed (default 0..4), the main comparison:

* ``supervised``: labeled scans only;
* ``FocalMix``: the same labeled scans plus the whole unlabeled pool (default 100 scans, the
  same pool at every labeled count: ``unlabeled/`` is read first);

the reference arms, per seed: ``FocalMix, unlabeled weight 0`` (FocalMix's pipeline with
``focalmix.unlabeled_weight: 0``: what the unlabeled loss itself buys) at ``--zero-weight-labeled``
(default: the ablation count, 10), and the ceiling ``all labeled``: supervised on every scan of the
training pool but the validation ones (129 with the defaults and ``focalmix-cpu``'s 4 validation
scans: at least as many scans as FocalMix sees at 25 labeled, 25 + 100, all with labels); and at
``--ablation-labeled`` the Table 3 ablations (SFL without soft alpha / soft beta, K = 1 and 2, image
MixUp only, no MixUp: the rows of Table 3 (a)-(c)) for ``--ablation-seeds`` (default: the first 3
seeds). The reference arms and ablations are descriptive and cost most of the CPU (a FocalMix run
costs about 3 supervised ones), so they run at one labeled count and, for the ablations, fewer
seeds; the decisive comparison has every count and every seed, and runs first.

One split for every run: ``data.split_seed`` is ``--split-seed`` (constant), so labeled and
validation scans do not change with the seed (the labeled sets are nested: 5 within 10 within
25); the seed (``seed``) moves only initialisation and sampling, and both methods share it.

Statistics. Every run's test CPM comes from its ``test/submission.csv``. ΔCPM = method −
supervised is paired: per seed, :func:`medssl.metrics.paired_bootstrap_cpm` draws test scans
with replacement and scores both runs on the same draw. Pooled over seeds, ΔCPM is the mean of
the per-seed deltas; its 95 % interval comes from a two-level bootstrap: each replicate draws
the seeds with replacement and the test scans with replacement (one scan draw shared by every
seed, as every run scores the same test scans), and averages the paired deltas
(:func:`pooled_paired_delta`). The verdict: FocalMix better (or worse) where that interval
excludes 0, else no difference shown.

Budget. ``--learning-curve`` trains supervised once at the largest labeled count for ``--steps``
steps, keeps its checkpoint of every ``eval.every`` steps (the config's, 250 for ``focalmix-cpu``;
it also paces hard-negative mining, so it is the runs' own) and scores each on the test split
(``focalmix_ssl_budget.{json,md,png}``): choose ``--steps`` where the curve flattens. The cosine
learning rate has not reached 0 at an intermediate checkpoint, so the curve is, if anything,
pessimistic for shorter budgets.

Results are appended to ``benchmarks/results/focalmix_ssl.json`` after every run (a run already
there is skipped, so an interrupted benchmark resumes), with its wall time, and summarised in
``focalmix_ssl.md`` and ``focalmix_ssl.png`` (CPM vs labeled count). Each finished run's test
submission is kept beside them, gzipped, in ``focalmix_ssl_runs/`` (``--results``' folder): the
statistics read those, not the work folder, so the results file and that folder are the whole
state of a benchmark that spans machines (a session's ``/tmp`` does not outlive it). The data are
regenerated from the same settings on a new machine, and the meta's ``data_fingerprint``
(:func:`medssl.bench.data.dataset_fingerprint`) refuses to mix runs made on other bytes.
``--jobs N`` runs N trainings side by side, each in its own process with ``--threads`` (default
1) torch/OpenMP threads.

    python benchmarks/focalmix_ssl.py --learning-curve --steps 3000
    python benchmarks/focalmix_ssl.py --steps 1500 --jobs 2
    python benchmarks/focalmix_ssl.py --smoke --cases 20 --unlabeled-pool 4 --labeled 2 --seeds 0 \\
        --steps 10 --matrix 64 --test-subsets 8 9 --set data.n_validation=2 --work /tmp/fm-smoke
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import math
import multiprocessing
import os
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medssl.bench.data import dataset_fingerprint, generated_dataset
from medssl.bench.machine import cpu_device
from medssl.bench.runs import resumable, train_wall_s
from medssl.datasets.luna16 import Luna16
from medssl.metrics import (
    FrocResult,
    evaluate_luna16,
    paired_bootstrap_cpm,
    read_predictions,
    read_seriesuids,
)
from medssl.metrics.froc import cpm_points, order_statistic_interval, paired_bootstrap_sensitivities
from medssl.metrics.seeds import seed_interval

RESULTS = Path(__file__).parent / "results"
#: The smallest test set whose CPM intervals can separate the methods; ``--smoke`` runs
#: below it and the report says so.
MIN_TEST_SCANS = 40
MIN_TEST_NODULES = 100
CONFIDENCE = 0.95

SUPERVISED = "supervised"
FOCALMIX = "FocalMix"
ZERO_WEIGHT = "FocalMix, unlabeled weight 0"
CEILING = "all labeled (ceiling)"

#: Table 3 of the paper, at one labeled count: each removes one part of FocalMix.
ABLATIONS: dict[str, dict[str, Any]] = {
    "FocalMix, SFL without soft alpha": {"loss.soft_alpha": False},
    "FocalMix, SFL without soft beta": {"loss.soft_beta": False},
    "FocalMix, K=1": {"focalmix.k": 1},
    "FocalMix, K=2": {"focalmix.k": 2},
    "FocalMix, image MixUp only": {"focalmix.object_mixup": False},
    "FocalMix, no MixUp": {"focalmix.image_mixup": False, "focalmix.object_mixup": False},
}


@dataclass(frozen=True)
class Run:
    """One training run of the benchmark.

    Attributes:
        name: the arm (:data:`SUPERVISED`, :data:`FOCALMIX`, ... or an ablation name).
        method: the trainer's ``method``.
        labeled: labeled scans.
        seed: the training seed (initialisation and sampling); the split is fixed.
        overrides: config overrides of this arm.
    """

    name: str
    method: str
    labeled: int
    seed: int
    overrides: dict[str, Any]

    @property
    def key(self) -> str:
        return f"{self.name}|L{self.labeled}|s{self.seed}"

    @property
    def folder(self) -> str:
        return "".join(c if c.isalnum() or c in "-=." else "_" for c in self.key)


def plan(
    *,
    labeled: Sequence[int],
    seeds: Sequence[int],
    zero_weight_labeled: Sequence[int],
    ceiling_labeled: int | None,
    ablation_labeled: int | None,
    ablation_seeds: Sequence[int],
) -> list[Run]:
    """Every run of the benchmark, in the order that makes a partial benchmark most useful:
    the main comparison first, seed by seed (supervised and FocalMix at every labeled count, so
    a partial benchmark already holds complete pairs), then the unlabeled-weight-0 arm at
    ``zero_weight_labeled``, the ceiling, and the ablations at ``ablation_labeled`` for
    ``ablation_seeds``."""
    runs = []
    for seed in seeds:
        for n in labeled:
            runs += [
                Run(SUPERVISED, "supervised-det", n, seed, {}),
                Run(FOCALMIX, "focalmix", n, seed, {}),
            ]
    for seed in seeds:
        runs += [
            Run(ZERO_WEIGHT, "focalmix", n, seed, {"focalmix.unlabeled_weight": 0.0})
            for n in zero_weight_labeled
        ]
    if ceiling_labeled is not None:
        runs += [Run(CEILING, "supervised-det", ceiling_labeled, seed, {}) for seed in seeds]
    if ablation_labeled is not None:
        for seed in ablation_seeds:
            runs += [
                Run(name, "focalmix", ablation_labeled, seed, o) for name, o in ABLATIONS.items()
            ]
    return runs


# --------------------------------------------------------------------------- data


def prepare_data(
    data: Path, *, cases: int, unlabeled: int, matrix: int, seed: int = 1000
) -> dict[str, Any]:
    """Generate the benchmark's LUNA16 folder (``train`` family) if missing; check it otherwise.

    ``data/benchmark_data.json`` records how it was made; an existing folder made otherwise
    (another matrix, count or family) is an error rather than silently reused.

    Raises:
        SystemExit: the folder exists with other settings.
    """
    return generated_dataset(
        data,
        {"cases": cases, "unlabeled": unlabeled, "matrix": matrix, "family": "train", "seed": seed},
    )


def test_seriesuids(luna: Luna16, test_subsets: Sequence[int]) -> list[str]:
    """The scans of the test subsets, in the dataset's order: every run is scored on these."""
    return [u for u in luna.seriesuids if luna.subset_of(u) in test_subsets]


def test_set_size(data: Path, test_subsets: Sequence[int]) -> tuple[int, int]:
    """``(scans, nodules)`` of the test subsets."""
    luna = Luna16(data)
    test = test_seriesuids(luna, test_subsets)
    return len(test), sum(len(luna.annotations(u)) for u in test)


def pool_size(data: Path, test_subsets: Sequence[int]) -> int:
    """Annotated scans outside the test subsets (validation + labeled)."""
    luna = Luna16(data)
    return sum(luna.subset_of(u) not in test_subsets for u in luna.seriesuids)


# --------------------------------------------------------------------------- training


def _one_process_threads(threads: int) -> None:
    """Pool initializer: ``threads`` torch intra-op threads in this worker."""
    import torch

    torch.set_num_threads(threads)


def throughput(run_dir: Path, patches_per_step: int) -> float:
    """Median training patches/s from the step timestamps in ``log.jsonl`` (validation excluded)."""
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    times = [r["time"] for r in rows if "loss" in r]
    deltas = sorted(b - a for a, b in itertools.pairwise(times))
    if not deltas:
        return float("nan")
    deltas = deltas[: max(1, int(len(deltas) * 0.95))]  # drop the steps that include a validation
    return patches_per_step / statistics.median(deltas)


#: ``log.jsonl`` keys of the FocalMix diagnostics → result keys (means over the logged steps).
DIAGNOSTICS = {
    "objects": "objects_per_patch",
    "pseudo_precision": "pseudo_object_precision",
    "mining/candidate_precision": "candidate_precision",
}


def object_stats(run_dir: Path) -> dict[str, float]:
    """FocalMix diagnostics from ``log.jsonl``, means over the steps that logged them: unlabeled
    objects per patch, the share of those pseudo-objects that are true nodules (the unlabeled
    pool's hidden truth), and the share of mined unlabeled candidates that are."""
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    out = {}
    for key, name in DIAGNOSTICS.items():
        values = [r[key] for r in rows if key in r]
        if values:
            out[name] = statistics.mean(values)
    return out


def experiment(settings: dict[str, Any], run: Run, *, steps: int) -> Any:
    """The validated config of ``run``: the base config, ``--set`` overrides, the arm's overrides,
    the method, the seed, the fixed split seed and the budget. ``eval.every`` stays the config's
    (or ``--set``'s): it also paces hard-negative and candidate mining, which must not differ
    between the budget curve and the runs."""
    from medssl.cli.train import resolve_config
    from medssl.config import load_config, parse_overrides
    from medssl.training.detection.config import DetectionExperiment

    overrides = {
        **parse_overrides(settings["set"]),
        **run.overrides,
        "method": run.method,
        "seed": run.seed,
        "data.split_seed": settings["split_seed"],
        "data.test_subsets": list(settings["test_subsets"]),
        "optim.steps": steps,
        "data.workers": settings["data_workers"],
    }
    return load_config(DetectionExperiment, resolve_config(settings["config"]), overrides)


def execute(run: Run, settings: dict[str, Any]) -> dict[str, Any]:
    """Train and test one run (in this process); its result record."""
    import torch

    from medssl.training.detection.trainer import train_detector

    steps = settings["steps"]
    cfg = experiment(settings, run, steps=steps)
    out = Path(settings["work"]) / "runs" / run.folder
    unlabeled = settings["unlabeled_pool"] if run.method == "focalmix" else 0
    start = time.perf_counter()
    result = train_detector(
        cfg,
        settings["data"],
        out,
        run.labeled,
        unlabeled,
        device=settings["device"],
        resume=resumable(cfg, out),
    )
    wall = time.perf_counter() - start
    report = result.test_report or {}
    tested = set(read_seriesuids(out / "test" / "seriesuids.csv"))
    if tested != set(settings["test_uids"]):
        raise RuntimeError(f"{run.key} was tested on other scans than the benchmark's test subsets")
    submission = keep_submission(
        out / "test" / "submission.csv", Path(settings["runs_dir"]), run.folder
    )
    return {
        "key": run.key,
        "name": run.name,
        "method": run.method,
        "labeled": run.labeled,
        "unlabeled": unlabeled,
        "seed": run.seed,
        "split_seed": settings["split_seed"],
        "overrides": run.overrides,
        "steps": steps,
        "sensitivities": report.get("sensitivities"),
        "cpm": report.get("cpm"),
        "cpm_ci": report.get("cpm_ci"),
        "n_test_scans": report.get("n_scans"),
        "n_test_nodules": report.get("n_nodules"),
        "patches_per_s": throughput(
            out, cfg.optim.batch_size * (2 if run.method == "focalmix" else 1)
        ),
        "wall_s": wall,
        "train_wall_s": train_wall_s(out),
        "threads": torch.get_num_threads(),
        "run_dir": str(out),
        "submission": submission,
        **object_stats(out),
    }


def run_all(
    runs: Sequence[Run], settings: dict[str, Any], done: list[dict[str, Any]], jobs: int, save: Any
) -> None:
    """Run ``runs`` not yet in ``done``, ``jobs`` at a time, each in a spawned process with
    ``settings["threads"]`` threads; ``save(done)`` after every finished run."""
    finished = {r["key"] for r in done}
    todo = [r for r in runs if r.key not in finished]
    if not todo:
        return
    os.environ["OMP_NUM_THREADS"] = str(
        settings["threads"]
    )  # read by torch when a child imports it
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        max_workers=jobs,
        mp_context=context,
        initializer=_one_process_threads,
        initargs=(settings["threads"],),
    ) as pool:
        pending: dict[Future[dict[str, Any]], Run] = {}
        queue = iter(todo)
        for run in itertools.islice(queue, jobs):
            print(f"== {run.key}", flush=True)
            pending[pool.submit(execute, run, settings)] = run
        while pending:
            ready, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in ready:
                del pending[future]
                done.append(future.result())
                save(done)
                nxt = next(queue, None)
                if nxt is not None:
                    print(f"== {nxt.key}", flush=True)
                    pending[pool.submit(execute, nxt, settings)] = nxt


# --------------------------------------------------------------------------- statistics


def keep_submission(submission: Path, runs_dir: Path, name: str) -> str:
    """Copy a finished run's ``submission.csv`` to ``runs_dir/name.csv.gz`` (gzip with no
    timestamp, so the same submission gives the same bytes); its name, relative to
    ``runs_dir``'s parent (the results folder)."""
    runs_dir.mkdir(parents=True, exist_ok=True)
    target = runs_dir / f"{name}.csv.gz"
    partial = target.with_suffix(".part")
    with (
        open(submission, "rb") as src,
        open(partial, "wb") as raw,
        gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as dst,
    ):
        shutil.copyfileobj(src, dst)
    partial.replace(target)
    return target.relative_to(runs_dir.parent).as_posix()


def run_froc(
    record: dict[str, Any], luna: Luna16, test_uids: Sequence[str], results: Path
) -> FrocResult:
    """The LUNA16 evaluation of a finished run on the scans ``test_uids``, from its kept
    submission (``record["submission"]``, relative to the folder ``results``), no bootstrap:
    the paired analysis draws its own."""
    with tempfile.TemporaryDirectory() as tmp:
        plain = Path(tmp) / "submission.csv"
        with gzip.open(results / record["submission"], "rb") as src, open(plain, "wb") as dst:
            shutil.copyfileobj(src, dst)
        predictions = read_predictions(plain)
    return evaluate_luna16(
        [f for u in test_uids for f in luna.annotations(u)],
        [f for u in test_uids for f in luna.excluded(u)],
        test_uids,
        predictions,
        n_bootstrap=0,
    )


@dataclass(frozen=True)
class PooledDelta:
    """ΔCPM = method − baseline over seeds.

    Attributes:
        seeds: the seeds with both runs.
        per_seed: ``(delta, (lo, hi))`` per seed: the paired bootstrap over test scans.
        delta: mean of the per-seed deltas.
        ci: 95 % interval of ``delta`` from the two-level bootstrap (seeds, then scans).
    """

    seeds: tuple[int, ...]
    per_seed: tuple[tuple[float, tuple[float, float]], ...]
    delta: float
    ci: tuple[float, float]


def pooled_paired_delta(
    pairs: Sequence[tuple[FrocResult, FrocResult]],
    seeds: Sequence[int],
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> PooledDelta:
    """Paired ΔCPM of ``(method, baseline)`` FROC results, one pair per seed, all on the same
    test scans in the same order.

    Per seed: :func:`medssl.metrics.paired_bootstrap_cpm`. Pooled: replicate ``b`` draws the
    test scans once (:func:`medssl.metrics.froc.paired_bootstrap_sensitivities` with the same
    generator seed for every pair, hence the same scan draws) and ``len(pairs)`` seeds with
    replacement, and averages those seeds' paired deltas on those scans; the interval is the
    order statistics of :func:`~medssl.metrics.froc.order_statistic_interval`. Seed-to-seed
    spread and test-scan sampling both enter it; with one seed it is that seed's paired interval.

    Raises:
        ValueError: no pairs, ``seeds`` of another length, runs on different test scans, or
            ``n_bootstrap`` < 1.
    """
    if not pairs or len(pairs) != len(seeds):
        raise ValueError(
            "need one (method, baseline) pair per seed, "
            f"got {len(pairs)} pairs for seeds {list(seeds)}"
        )
    if n_bootstrap < 1:
        raise ValueError(f"n_bootstrap must be >= 1, got {n_bootstrap}")
    if len({r.seriesuids for pair in pairs for r in pair}) != 1:
        raise ValueError(
            "every run must be scored on the same test scans in the same order; evaluate them "
            "with one seriesuids list"
        )
    per_seed = [paired_bootstrap_cpm(a, b, n_bootstrap=n_bootstrap, seed=seed) for a, b in pairs]
    points = cpm_points(pairs[0][0].cpm_definition)  # type: ignore[arg-type]
    replicates = []
    for a, b in pairs:
        assert a.vectors is not None and b.vectors is not None  # paired_bootstrap_cpm checked
        sens_a, sens_b = paired_bootstrap_sensitivities(
            a.vectors,
            b.vectors,
            n_bootstrap=n_bootstrap,
            rng=np.random.default_rng(seed),
            points=points,
        )
        replicates.append(sens_a.mean(axis=1) - sens_b.mean(axis=1))
    samples = np.stack(
        replicates
    )  # (seeds, n_bootstrap), column b: the same scan draw for every seed
    if len(pairs) == 1:
        pooled = samples[0]
    else:
        drawn = np.random.default_rng([seed, 1]).integers(
            0, len(pairs), size=(n_bootstrap, len(pairs))
        )
        pooled = samples[drawn, np.arange(n_bootstrap)[:, None]].mean(axis=1)
    lo, hi = order_statistic_interval(pooled, CONFIDENCE)
    return PooledDelta(
        seeds=tuple(seeds),
        per_seed=tuple((d.delta, d.ci) for d in per_seed),
        delta=float(np.mean([d.delta for d in per_seed])),
        ci=(float(lo), float(hi)),
    )


def verdict(
    ci: tuple[float, float],
    method: str = FOCALMIX,
    baseline: str = SUPERVISED,
    *,
    n_seeds: int | None = None,
    min_seeds: int = 1,
) -> str:
    """What a 95 % interval of ΔCPM = method − baseline decides, once ``n_seeds`` (when given)
    reaches ``min_seeds`` (the seeds the benchmark plans for the comparison). Before that it
    decides nothing: the interval of one or two seeds holds the test scans' spread but hardly
    the seed-to-seed spread (SD about 0.05 CPM), which dominates."""
    if n_seeds is not None and n_seeds < min_seeds:
        return f"pending ({n_seeds} of {min_seeds} seeds)"
    if ci[0] > 0:
        return f"{method} better"
    if ci[1] < 0:
        return f"{baseline} better"
    return "no difference shown"


def compare(
    results: Sequence[dict[str, Any]],
    frocs: dict[str, FrocResult],
    method: str,
    baseline: str,
    labeled: int,
    *,
    n_bootstrap: int,
) -> PooledDelta | None:
    """Pooled paired ΔCPM of arm ``method`` against ``baseline`` at ``labeled`` over the seeds
    both have; None where they share none."""
    a = {r["seed"]: r["key"] for r in results if r["name"] == method and r["labeled"] == labeled}
    b = {r["seed"]: r["key"] for r in results if r["name"] == baseline and r["labeled"] == labeled}
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    return pooled_paired_delta(
        [(frocs[a[s]], frocs[b[s]]) for s in seeds], seeds, n_bootstrap=n_bootstrap
    )


def _ci(ci: tuple[float, float]) -> str:
    return f"[{ci[0]:+.3f}, {ci[1]:+.3f}]"


def summarise(
    results: Sequence[dict[str, Any]],
    frocs: dict[str, FrocResult],
    *,
    ablation_labeled: int | None,
    n_bootstrap: int = 1000,
    min_seeds: int = 1,
    min_ablation_seeds: int = 1,
) -> str:
    """The markdown report: the decisive table per labeled count, the reference arms, the
    ablations, then every run. A comparison gets a verdict once it holds ``min_seeds`` seeds
    (``min_ablation_seeds`` for the ablations): the seeds the benchmark plans for it."""

    def call(d: PooledDelta, method: str, baseline: str, need: int = min_seeds) -> str:
        return verdict(d.ci, method, baseline, n_seeds=len(d.seeds), min_seeds=need)

    def mean_cpm(name: str, labeled: int, seeds: Sequence[int]) -> str:
        """Over the seeds of the paired comparison, so that the two means differ by ΔCPM."""
        cpms = [
            r["cpm"]
            for r in results
            if r["name"] == name and r["labeled"] == labeled and r["seed"] in seeds
        ]
        return f"{statistics.mean(cpms):.3f} (n={len(cpms)})" if cpms else "—"

    counts = sorted({r["labeled"] for r in results if r["name"] == SUPERVISED})
    main = {
        n: d
        for n in counts
        if (d := compare(results, frocs, FOCALMIX, SUPERVISED, n, n_bootstrap=n_bootstrap))
    }
    lines = [
        "## FocalMix − supervised (paired over test scans, pooled over seeds)",
        "",
        "Means over the seeds both arms have finished (n), so that they differ by ΔCPM; a run "
        "without its pair yet is only in the last table.",
        "",
        "| labeled | supervised mean CPM | FocalMix mean CPM | ΔCPM | 95 % CI | verdict |",
        "|---:|---:|---:|---:|---|---|",
    ]
    lines += [
        f"| {n} | {mean_cpm(SUPERVISED, n, d.seeds)} | {mean_cpm(FOCALMIX, n, d.seeds)} "
        f"| {d.delta:+.3f} | {_ci(d.ci)} | {call(d, FOCALMIX, SUPERVISED)} |"
        for n, d in main.items()
    ]
    lines += [
        "",
        "Per seed (paired bootstrap over test scans):",
        "",
        "| labeled | seed | supervised CPM | FocalMix CPM | ΔCPM | 95 % CI |",
        "|---:|---:|---:|---:|---:|---|",
    ]
    for n, d in main.items():
        for s, (delta, ci) in zip(d.seeds, d.per_seed):
            cpm = {r["name"]: r["cpm"] for r in results if r["labeled"] == n and r["seed"] == s}
            lines.append(
                f"| {n} | {s} | {cpm[SUPERVISED]:.3f} | "
                f"{cpm[FOCALMIX]:.3f} | {delta:+.3f} | {_ci(ci)} |"
            )

    lines += [
        "",
        "## Reference arms",
        "",
        "| arm | labeled | mean CPM | against | ΔCPM | 95 % CI | verdict |",
        "|---|---:|---:|---|---:|---|---|",
    ]
    for n in counts:
        d = compare(results, frocs, ZERO_WEIGHT, SUPERVISED, n, n_bootstrap=n_bootstrap)
        if d is not None:
            lines.append(
                f"| {ZERO_WEIGHT} | {n} | {mean_cpm(ZERO_WEIGHT, n, d.seeds)} | supervised "
                f"| {d.delta:+.3f} | {_ci(d.ci)} | {call(d, ZERO_WEIGHT, SUPERVISED)} |"
            )
        d = compare(results, frocs, FOCALMIX, ZERO_WEIGHT, n, n_bootstrap=n_bootstrap)
        if d is not None:
            lines.append(
                f"| {FOCALMIX} | {n} | {mean_cpm(FOCALMIX, n, d.seeds)} | unlabeled weight 0 | "
                f"{d.delta:+.3f} | {_ci(d.ci)} | {call(d, FOCALMIX, ZERO_WEIGHT)} |"
            )
    for n in sorted({r["labeled"] for r in results if r["name"] == CEILING}):
        cpms = [r["cpm"] for r in results if r["name"] == CEILING]
        iv = seed_interval(cpms)
        mean, lo, hi = iv.value, iv.lo, iv.hi
        lines.append(
            f"| {CEILING} | {n} | {mean:.3f} (n={len(cpms)}, "
            f"seeds 95 % [{lo:.3f}, {hi:.3f}]) | | | | |"
        )

    if ablation_labeled is not None and any(r["name"] in ABLATIONS for r in results):
        lines += [
            "",
            f"## Table 3 ablations at {ablation_labeled} "
            "labeled (against full FocalMix, same seeds)",
            "",
            "| ablation | mean CPM | ΔCPM vs FocalMix | 95 % CI | verdict |",
            "|---|---:|---:|---|---|",
        ]
        for name in ABLATIONS:
            d = compare(results, frocs, name, FOCALMIX, ablation_labeled, n_bootstrap=n_bootstrap)
            if d is not None:
                lines.append(
                    f"| {name} | {mean_cpm(name, ablation_labeled, d.seeds)} | {d.delta:+.3f} "
                    f"| {_ci(d.ci)} | {call(d, 'ablation', 'full FocalMix', min_ablation_seeds)} |"
                )

    rates = ("1/8", "1/4", "1/2", "1", "2", "4", "8")
    lines += [
        "",
        "## Every run",
        "",
        "| arm | labeled | seed | "
        + " | ".join(f"{r} FP/scan" for r in rates)
        + " | CPM | CPM 95 % CI | objects/patch | pseudo-object "
        "precision | training wall s | threads |",
        "|---|---:|---:|" + "---:|" * (len(rates) + 6),
    ]
    for r in sorted(results, key=lambda r: (r["labeled"], r["name"], r["seed"])):
        sens = " | ".join(f"{s:.3f}" for s in r["sensitivities"])
        diag = " | ".join(
            f"{r[k]:.2f}" if k in r else "—"
            for k in ("objects_per_patch", "pseudo_object_precision")
        )
        lines.append(
            f"| {r['name']} | {r['labeled']} | {r['seed']} | {sens} | {r['cpm']:.3f} | "
            f"[{r['cpm_ci'][0]:.3f}, {r['cpm_ci'][1]:.3f}] | {diag} | {_wall(r)} | {r['threads']} |"
        )
    return "\n".join(lines) + "\n"


def _wall(record: Mapping[str, Any]) -> str:
    """A run's training wall time for the table (``train_wall_s``; records written before it
    existed show the finishing process's ``wall_s``, marked)."""
    if "train_wall_s" in record:
        return f"{record['train_wall_s']:.0f}"
    return f"{record['wall_s']:.0f} (last process)"


def plot_learning_curve(results: Sequence[dict[str, Any]], path: Path) -> Path:
    """CPM vs labeled count: mean ± 95 % t-interval over seeds for supervised, FocalMix and
    FocalMix with unlabeled weight 0; the ceiling as a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, style in ((SUPERVISED, "o-"), (FOCALMIX, "s-"), (ZERO_WEIGHT, "^--")):
        counts = sorted({r["labeled"] for r in results if r["name"] == name})
        if not counts:
            continue
        stats_ = [
            seed_interval([r["cpm"] for r in results if r["name"] == name and r["labeled"] == n])
            for n in counts
        ]
        mean = np.array([s.value for s in stats_])
        lo = np.array([s.lo for s in stats_])
        hi = np.array([s.hi for s in stats_])
        ax.plot(counts, mean, style, label=name)
        ax.fill_between(
            counts, np.where(np.isnan(lo), mean, lo), np.where(np.isnan(hi), mean, hi), alpha=0.2
        )
    ceiling = [r for r in results if r["name"] == CEILING]
    if ceiling:
        iv = seed_interval([r["cpm"] for r in ceiling])
        mean, lo, hi = iv.value, iv.lo, iv.hi
        ax.axhline(mean, color="k", lw=1, label=f"{CEILING}, {ceiling[0]['labeled']} scans")
        if not math.isnan(lo):
            ax.axhspan(lo, hi, color="k", alpha=0.08)
    ax.set_xscale("log")
    ax.minorticks_off()
    counts = sorted({r["labeled"] for r in results if r["name"] != CEILING})
    ax.set_xticks(counts, [str(c) for c in counts])
    ax.set_ylim(0, 1)
    ax.set_xlabel("labeled scans")
    ax.set_ylabel("test CPM (mean ± 95 % CI over seeds)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- budget curve


@contextmanager
def keep_checkpoints(run_dir: Path, into: Path, *, poll_s: float = 0.5) -> Iterator[None]:
    """Hard-link every ``checkpoints/step_*.pt`` the trainer writes into ``into`` while the block
    runs (the trainer prunes all but its last three; a step file lives at least three
    validation intervals, far longer than ``poll_s``)."""
    into.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()

    def poll() -> None:
        while True:
            for path in (run_dir / "checkpoints").glob("step_*.pt"):
                target = into / path.name
                if not target.exists():
                    # pruned between glob and link: reported below
                    with suppress(FileNotFoundError):
                        os.link(path, target)
            if stop.is_set():
                return
            stop.wait(poll_s)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def budget_curve(settings: dict[str, Any], labeled: int, seed: int) -> list[dict[str, Any]]:
    """Train supervised once at ``labeled`` for ``settings["steps"]`` steps and score the
    checkpoint of every ``eval.every`` steps on the test split as the trainer's test does
    (the checkpoints hold the re-estimated BatchNorm statistics)."""
    import torch

    from medssl.pipeline import Intensity
    from medssl.training.cache import VolumeCache, default_cache_dir
    from medssl.training.checkpoint import load_checkpoint
    from medssl.training.detection.eval import (
        TorchDetectionRunner,
        detection_params,
        evaluate,
        predict,
    )
    from medssl.training.detection.scans import split_luna16
    from medssl.training.detection.trainer import train_detector
    from medssl.training.networks.detector import FPNDetector

    steps = settings["steps"]
    run = Run(SUPERVISED, "supervised-det", labeled, seed, {})
    cfg = experiment(settings, run, steps=steps)
    every = cfg.eval.every
    out = Path(settings["work"]) / "budget" / run.folder
    kept = out / "kept_checkpoints"
    wanted = sorted({*range(every, steps + 1, every), steps})
    trained = resumable(cfg, out) and all((kept / f"step_{s:08d}.pt").is_file() for s in wanted)
    if not trained:  # (an interrupted training resumes from its last checkpoint)
        with keep_checkpoints(out, kept):
            train_detector(
                cfg,
                settings["data"],
                out,
                labeled,
                0,
                device=settings["device"],
                resume=resumable(cfg, out),
            )
    wall = train_wall_s(out)
    missing = [s for s in wanted if not (kept / f"step_{s:08d}.pt").is_file()]
    if missing:
        raise RuntimeError(
            f"checkpoints of steps {missing} were pruned before they could be kept; "
            "rerun with a larger eval.every (--set eval.every=N)"
        )
    done_path = out / "curve.jsonl"  # one row per scored checkpoint: an interrupted curve resumes
    rows = (
        [json.loads(line) for line in done_path.read_text().splitlines()]
        if done_path.is_file()
        else []
    )
    scored = {r["step"] for r in rows}
    d = cfg.data
    split = split_luna16(settings["data"], labeled, 0, d.test_subsets, d.n_validation, d.split_seed)
    cache = VolumeCache(
        Path(d.cache_dir) if d.cache_dir else default_cache_dir(),
        d.spacing_mm,
        Intensity(d.hu_min, d.hu_max),
    )
    volumes = {u: cache.get(u, split.source(u).load) for u in split.test}
    nodules = [f for u in split.test for f in split.nodules(u)]
    excluded = [f for u in split.test for f in split.luna.excluded(u)]
    for step in (s for s in wanted if s not in scored):
        net = FPNDetector(cfg.model, cfg.anchors)
        net.load_state_dict(load_checkpoint(kept / f"step_{step:08d}.pt")["model"])
        runner = TorchDetectionRunner(
            net, cfg.window, torch.device(settings["device"] or "cpu"), cfg.amp
        )
        result = evaluate(
            predict(runner, volumes, detection_params(cfg)),
            nodules,
            excluded,
            split.test,
            cfg.eval.bootstrap,
            cfg.seed,
        )
        rows.append(
            {
                "step": step,
                "cpm": result.cpm,
                "cpm_ci": list(result.cpm_ci),
                "sensitivities": list(result.sensitivities),
                "train_wall_s": wall,
                "n_test_scans": result.n_scans,
                "n_test_nodules": result.n_nodules,
            }
        )
        with done_path.open("a") as f:
            f.write(json.dumps(rows[-1]) + "\n")
        print(
            f"step {step}: test CPM {result.cpm:.3f} "
            f"[{result.cpm_ci[0]:.3f}, {result.cpm_ci[1]:.3f}]",
            flush=True,
        )
    return sorted(rows, key=lambda r: r["step"])


def budget_report(rows: Sequence[dict[str, Any]], meta: dict[str, Any], stem: Path) -> None:
    """``stem.{json,md,png}`` of the budget curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(
        json.dumps({"meta": meta, "checkpoints": list(rows)}, indent=2) + "\n"
    )
    lines = [
        f"# Supervised test CPM vs training steps ({meta['labeled']} labeled, seed {meta['seed']})",
        "",
        f"Device: {meta['device']}; config {meta['config']} {' '.join(meta['overrides'])}; one run "
        f"of {meta['steps']} steps (cosine to 0 at the last step), {rows[0]['train_wall_s']:.0f} s "
        f"of training; {rows[0]['n_test_scans']} test scans, {rows[0]['n_test_nodules']} nodules.",
        "",
        "| step | test CPM | 95 % CI |",
        "|---:|---:|---|",
    ]
    lines += [
        f"| {r['step']} | {r['cpm']:.3f} | [{r['cpm_ci'][0]:.3f}, {r['cpm_ci'][1]:.3f}] |"
        for r in rows
    ]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(6, 4))
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r["cpm"] for r in rows], "o-")
    ax.fill_between(
        steps, [r["cpm_ci"][0] for r in rows], [r["cpm_ci"][1] for r in rows], alpha=0.2
    )
    ax.set_xlabel("training step")
    ax.set_ylabel("test CPM (95 % bootstrap CI over scans)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- main

#: The meta keys that define the experiment: a results file is resumed only where they agree.
EXPERIMENT_KEYS = (
    "config",
    "overrides",
    "steps",
    "data_fingerprint",
    "matrix",
    "test_subsets",
    "unlabeled_pool",
    "split_seed",
    "n_validation",
    "smoke",
)


def resumable_runs(path: Path, meta: dict[str, Any]) -> list[dict[str, Any]]:
    """The runs already in the results file ``path`` (none if it does not exist).

    Raises:
        SystemExit: the file holds another experiment (another budget, data, split, config...):
            its runs must not be mixed into this one.
    """
    if not path.is_file():
        return []
    saved = json.loads(path.read_text())
    old = {k: saved.get("meta", {}).get(k) for k in EXPERIMENT_KEYS}
    new = {k: meta[k] for k in EXPERIMENT_KEYS}
    if old != new:
        differ = {k: (old[k], new[k]) for k in EXPERIMENT_KEYS if old[k] != new[k]}
        raise SystemExit(
            f"{path} holds another experiment (saved vs now: {differ}); move it away to start "
            "afresh, or pass --results with another file"
        )
    runs = []
    for r in saved["runs"]:
        if "submission" not in r or not (path.parent / r["submission"]).is_file():
            print(f"{r.get('key')}: its test submission is not in {path.parent}; it runs again")
            continue
        runs.append(r)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=Path("/tmp/medssl-focalmix18/luna"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/medssl-focalmix18"))
    parser.add_argument(
        "--cases", type=int, default=190, help="annotated scans to generate if --data is missing"
    )
    parser.add_argument("--unlabeled-pool", type=int, default=100)
    parser.add_argument(
        "--matrix", type=int, default=128, help="in-plane matrix of the generated scans"
    )
    parser.add_argument("--test-subsets", type=int, nargs="+", default=[7, 8, 9])
    parser.add_argument("--labeled", type=int, nargs="+", default=[5, 10, 25])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--split-seed", type=int, default=0, help="data.split_seed of every run")
    parser.add_argument(
        "--steps",
        type=int,
        default=1500,
        help="training steps of every run (choose with "
        "--learning-curve); with --learning-curve: the longest budget",
    )
    parser.add_argument("--no-ceiling", action="store_true", help="skip the all-labeled arm")
    parser.add_argument("--ablation-labeled", type=int, default=10)
    parser.add_argument(
        "--ablation-seeds",
        type=int,
        nargs="*",
        default=None,
        help="seeds of the ablations (default: the first 3 of --seeds; none: no ablations)",
    )
    parser.add_argument(
        "--zero-weight-labeled",
        type=int,
        nargs="*",
        default=None,
        help="labeled counts of the unlabeled-weight-0 arm (default: --ablation-labeled; none: no "
        "such arm)",
    )
    parser.add_argument(
        "--learning-curve", action="store_true", help="only the budget curve (see above)"
    )
    parser.add_argument("--jobs", type=int, default=1, help="runs side by side, one process each")
    parser.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads per run")
    parser.add_argument("--data-workers", type=int, default=0, help="data.workers of every run")
    parser.add_argument(
        "--bootstrap", type=int, default=1000, help="bootstrap replicates of the paired CIs"
    )
    parser.add_argument("--config", default="focalmix-cpu")
    parser.add_argument("--device", default=None)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for every run, e.g. --set data.n_validation=8",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help=f"allow a test set below the minimum that can separate the methods "
        f"({MIN_TEST_SCANS} scans, {MIN_TEST_NODULES} nodules); the report says SMOKE",
    )
    parser.add_argument("--results", type=Path, default=RESULTS / "focalmix_ssl.json")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="redraw RESULTS' .md and .png from the runs kept so far (same arguments as the "
        "matrix); trains nothing and leaves the results file alone",
    )
    args = parser.parse_args()
    for name in ("jobs", "threads", "steps", "bootstrap", "unlabeled_pool", "cases", "matrix"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    prepare_data(args.data, cases=args.cases, unlabeled=args.unlabeled_pool, matrix=args.matrix)
    n_test, n_nodules = test_set_size(args.data, args.test_subsets)
    if (n_test < MIN_TEST_SCANS or n_nodules < MIN_TEST_NODULES) and not args.smoke:
        raise SystemExit(
            f"the test subsets {args.test_subsets} hold {n_test} scans and {n_nodules} "
            f"nodules; the benchmark needs >= {MIN_TEST_SCANS} and >= {MIN_TEST_NODULES}: "
            "generate more --cases (into a new --data folder) or pass more --test-subsets"
        )
    luna = Luna16(args.data)
    test_uids = test_seriesuids(luna, args.test_subsets)
    settings = {
        "test_uids": test_uids,
        "runs_dir": str(args.results.with_name(args.results.stem + "_runs")),
        "data": str(args.data),
        "work": str(args.work),
        "config": args.config,
        "set": args.set,
        "split_seed": args.split_seed,
        "test_subsets": args.test_subsets,
        "steps": args.steps,
        "unlabeled_pool": args.unlabeled_pool,
        "device": args.device,
        "threads": args.threads,
        "data_workers": args.data_workers,
    }
    base = experiment(settings, Run(SUPERVISED, "supervised-det", 1, 0, {}), steps=args.steps)
    n_validation, every = base.data.n_validation, base.eval.every
    meta = {
        "device": cpu_device() if args.device in (None, "cpu") else args.device,
        "config": args.config,
        "overrides": args.set,
        "steps": args.steps,
        "data": str(args.data),
        "data_fingerprint": dataset_fingerprint(args.data),
        "matrix": args.matrix,
        "generator_family": "train (training, validation, unlabeled and test scans)",
        "test_subsets": args.test_subsets,
        "n_test_scans": n_test,
        "n_test_nodules": n_nodules,
        "unlabeled_pool": args.unlabeled_pool,
        "split_seed": args.split_seed,
        "n_validation": n_validation,
        "jobs": args.jobs,
        "threads_per_run": args.threads,
        "smoke": args.smoke,
    }
    if args.learning_curve:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        _one_process_threads(args.threads)
        labeled, seed = max(args.labeled), args.seeds[0]
        rows = budget_curve(settings, labeled, seed)
        stem = args.results.with_name(args.results.stem + "_budget")
        budget_report(
            rows, {**meta, "labeled": labeled, "seed": seed, "checkpoint_every": every}, stem
        )
        print(stem.with_suffix(".md").read_text())
        return
    ceiling = None if args.no_ceiling else pool_size(args.data, args.test_subsets) - n_validation
    ablation_seeds = args.seeds[:3] if args.ablation_seeds is None else args.ablation_seeds
    zero_weight = (
        [args.ablation_labeled] if args.zero_weight_labeled is None else args.zero_weight_labeled
    )
    runs = plan(
        labeled=args.labeled,
        seeds=args.seeds,
        zero_weight_labeled=zero_weight,
        ceiling_labeled=ceiling,
        ablation_labeled=args.ablation_labeled if ablation_seeds else None,
        ablation_seeds=ablation_seeds,
    )
    done = resumable_runs(args.results, meta)
    frocs: dict[str, FrocResult] = {}

    def save(results: list[dict[str, Any]]) -> None:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps({"meta": meta, "runs": results}, indent=2) + "\n")
        render(results)

    def render(results: list[dict[str, Any]]) -> None:
        for r in results:
            if r["key"] not in frocs:
                frocs[r["key"]] = run_froc(r, luna, test_uids, args.results.parent)
        title = "# FocalMix vs supervised on synthetic chest CT" + (
            " — SMOKE RUN, NOT A RESULT" if args.smoke else ""
        )
        head = (
            f"{title}\n\nDevice: {meta['device']}; {args.jobs} run(s) side by side, {args.threads} "
            f"thread(s) each; config {args.config} {' '.join(args.set)}; {args.steps} steps per "
            f"run; one split (data.split_seed {args.split_seed}, {n_validation} validation scans) "
            f"for every seed and method; unlabeled pool {args.unlabeled_pool} scans; test: subsets "
            f"{args.test_subsets}, {n_test} scans, {n_nodules} nodules, generator family train (as "
            f"the training data), matrix {args.matrix}.\n\n"
        )
        args.results.with_suffix(".md").write_text(
            head
            + summarise(
                results,
                frocs,
                ablation_labeled=args.ablation_labeled,
                n_bootstrap=args.bootstrap,
                min_seeds=len(args.seeds),
                min_ablation_seeds=len(ablation_seeds),
            )
        )
        plot_learning_curve(results, args.results.with_suffix(".png"))

    if args.report_only:
        # the tables and the plot from the kept runs; the results file is left to the matrix
        render(done)
        print(args.results.with_suffix(".md").read_text())
        return
    if done:
        save(done)
    run_all(runs, settings, done, args.jobs, save)
    print(args.results.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
