"""benchmarks/focalmix_ssl.py: the plan, the fixed split, and the paired statistics, on hand-made
FROC results (no training)."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import numpy as np
import pytest

from benchmarks.focalmix_ssl import (
    ABLATIONS,
    CEILING,
    EXPERIMENT_KEYS,
    FOCALMIX,
    SUPERVISED,
    ZERO_WEIGHT,
    Run,
    experiment,
    keep_checkpoints,
    keep_submission,
    plan,
    pooled_paired_delta,
    resumable,
    resumable_runs,
    run_froc,
    summarise,
    train_wall_s,
    verdict,
)
from medssl.finding import Finding
from medssl.metrics import FrocResult, evaluate_luna16, paired_bootstrap_cpm, read_predictions

N_SCANS = 30


def _system(found: np.ndarray, fp_score: float) -> FrocResult:
    """One nodule per scan at the origin; the system marks it (score 0.9) where ``found``,
    and puts one false positive of ``fp_score`` far away on every scan."""
    uids = [f"scan{i:02d}" for i in range(N_SCANS)]
    nodules = [Finding(series_uid=u, centre_lps=(0.0, 0.0, 0.0), diameter_mm=10.0) for u in uids]
    marks = [
        Finding(series_uid=u, centre_lps=(0.0, 0.0, 0.0), probability=0.9)
        for u, hit in zip(uids, found)
        if hit
    ]
    marks += [
        Finding(series_uid=u, centre_lps=(100.0, 0.0, 0.0), probability=fp_score) for u in uids
    ]
    return evaluate_luna16(nodules, [], uids, marks, n_bootstrap=0)


def _found(share: float, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(N_SCANS) < round(share * N_SCANS)


def test_every_run_of_a_seed_trains_on_one_split_whatever_the_seed() -> None:
    # An earlier version set data.split_seed = seed: split noise mixed into training noise.
    settings = {
        "set": [],
        "split_seed": 0,
        "test_subsets": [7, 8, 9],
        "data_workers": 0,
        "config": "focalmix-cpu",
    }
    configs = [
        experiment(settings, Run(SUPERVISED, "supervised-det", 5, seed, {}), steps=10)
        for seed in (0, 3)
    ]
    assert [c.data.split_seed for c in configs] == [0, 0]
    assert [c.seed for c in configs] == [0, 3]
    assert configs[0].data.test_subsets == (7, 8, 9)


def test_plan_pairs_both_methods_on_each_seed_first_then_adds_the_reference_arms() -> None:
    runs = plan(
        labeled=[5, 10],
        seeds=[0, 1],
        zero_weight_labeled=[10],
        ceiling_labeled=125,
        ablation_labeled=10,
        ablation_seeds=[0],
    )
    keys = [r.key for r in runs]
    assert len(keys) == len(set(keys))
    # the decisive comparison comes first, complete pairs seed by seed
    assert [(r.name, r.labeled, r.seed) for r in runs[:8]] == [
        (name, n, seed) for seed in (0, 1) for n in (5, 10) for name in (SUPERVISED, FOCALMIX)
    ]
    zero = [r for r in runs if r.name == ZERO_WEIGHT]
    assert [(r.labeled, r.seed) for r in zero] == [(10, 0), (10, 1)]
    assert all(r.overrides == {"focalmix.unlabeled_weight": 0.0} for r in zero)
    assert [(r.labeled, r.seed) for r in runs if r.name == CEILING] == [(125, 0), (125, 1)]
    assert {r.name for r in runs if r.labeled == 10 and r.seed == 0} >= set(ABLATIONS)
    assert not any(r.name in ABLATIONS for r in runs if r.seed == 1)
    assert ABLATIONS["FocalMix, no MixUp"] == {
        "focalmix.image_mixup": False,
        "focalmix.object_mixup": False,
    }


def test_pooled_delta_of_one_seed_is_the_paired_bootstrap() -> None:
    a, b = _system(_found(0.9, 1), 0.5), _system(_found(0.6, 2), 0.5)
    pooled = pooled_paired_delta([(a, b)], [0], n_bootstrap=300, seed=4)
    paired = paired_bootstrap_cpm(a, b, n_bootstrap=300, seed=4)
    assert pooled.delta == pytest.approx(paired.delta)
    assert pooled.ci == pytest.approx(paired.ci)
    assert pooled.per_seed == ((pytest.approx(paired.delta), pytest.approx(paired.ci)),)


def test_pooled_interval_carries_the_seed_to_seed_spread() -> None:
    # Seed 0: a clearly better; seed 1: clearly worse. Each paired interval excludes 0, the
    # pooled mean is about 0 and its interval, which resamples seeds too, covers 0.
    better = (_system(_found(0.95, 1), 0.5), _system(_found(0.4, 2), 0.5))
    worse = (_system(_found(0.4, 3), 0.5), _system(_found(0.95, 4), 0.5))
    pooled = pooled_paired_delta([better, worse], [0, 1], n_bootstrap=400, seed=0)
    (d0, ci0), (d1, ci1) = pooled.per_seed
    assert ci0[0] > 0 and ci1[1] < 0
    assert pooled.delta == pytest.approx((d0 + d1) / 2)
    assert pooled.ci[0] < 0 < pooled.ci[1]
    assert pooled.ci[1] - pooled.ci[0] > max(ci0[1] - ci0[0], ci1[1] - ci1[0])


def test_pooled_delta_refuses_runs_on_other_scans() -> None:
    a = _system(_found(0.9, 1), 0.5)
    uids = [f"other{i}" for i in range(N_SCANS)]
    b = evaluate_luna16([], [], uids, [], n_bootstrap=0)
    with pytest.raises(ValueError, match="same test scans"):
        pooled_paired_delta([(a, b)], [0])
    with pytest.raises(ValueError, match="one \\(method, baseline\\) pair per seed"):
        pooled_paired_delta([(a, a)], [0, 1])


def test_verdict_needs_an_interval_that_excludes_zero() -> None:
    assert verdict((0.01, 0.2)) == "FocalMix better"
    assert verdict((-0.2, -0.01)) == "supervised better"
    assert verdict((-0.05, 0.1)) == "no difference shown"


def test_verdict_waits_for_every_planned_seed() -> None:
    """One seed's interval over test scans leaves out the seed-to-seed spread."""
    assert verdict((0.01, 0.2), n_seeds=1, min_seeds=5) == "pending (1 of 5 seeds)"
    assert verdict((0.01, 0.2), n_seeds=5, min_seeds=5) == "FocalMix better"


def test_summary_table_has_one_decisive_row_per_labeled_count() -> None:
    frocs, records = {}, []
    for seed in (0, 1):
        for name, share in ((SUPERVISED, 0.4), (FOCALMIX, 0.95)):
            result = _system(_found(share, 10 * seed + len(name)), 0.5)
            run = Run(name, "x", 5, seed, {})
            frocs[run.key] = result
            records.append(
                {
                    "key": run.key,
                    "name": name,
                    "labeled": 5,
                    "seed": seed,
                    "cpm": result.cpm,
                    "sensitivities": list(result.sensitivities),
                    "cpm_ci": [0.0, 1.0],
                    "wall_s": 1.0,
                    "threads": 1,
                }
            )
    # a supervised run whose FocalMix pair has not finished: not in the paired means
    lone = _system(_found(0.05, 99), 0.5)
    frocs["lone"] = lone
    records.append({**records[0], "key": "lone", "seed": 2, "cpm": lone.cpm})
    text = summarise(records, frocs, ablation_labeled=None, n_bootstrap=200, min_seeds=2)
    row = next(line for line in text.splitlines() if line.startswith("| 5 |"))
    assert row.endswith("| FocalMix better |")
    sup = statistics.mean(r["cpm"] for r in records[:4] if r["name"] == SUPERVISED)
    assert row.startswith(f"| 5 | {sup:.3f} (n=2) |")
    text = summarise(records, frocs, ablation_labeled=None, n_bootstrap=200, min_seeds=5)
    row = next(line for line in text.splitlines() if line.startswith("| 5 |"))
    assert row.endswith("| pending (2 of 5 seeds) |")


def test_budget_curve_keeps_the_checkpoints_the_trainer_prunes(tmp_path: Path) -> None:
    run, kept = tmp_path / "run", tmp_path / "kept"
    (run / "checkpoints").mkdir(parents=True)
    with keep_checkpoints(run, kept, poll_s=0.01):
        for step in (1, 2, 3, 4):
            (run / "checkpoints" / f"step_{step:08d}.pt").write_bytes(bytes([step]))
            time.sleep(0.1)
            if step > 3:  # the trainer keeps its last three
                (run / "checkpoints" / f"step_{step - 3:08d}.pt").unlink()
    assert sorted(p.name for p in kept.iterdir()) == [f"step_{s:08d}.pt" for s in (1, 2, 3, 4)]
    assert (kept / "step_00000001.pt").read_bytes() == bytes([1])


def test_a_results_file_of_another_experiment_is_not_resumed(tmp_path: Path) -> None:
    # The previous benchmark's file (500 steps, split_seed = seed, no split_seed in its meta)
    # must not lend its runs to this one.
    path = tmp_path / "focalmix_ssl.json"
    meta = dict.fromkeys(EXPERIMENT_KEYS) | {"steps": 1500, "split_seed": 0, "device": "here"}
    assert resumable_runs(path, meta) == []
    (tmp_path / "a.csv.gz").write_bytes(b"")
    run = {"key": "a", "submission": "a.csv.gz"}
    path.write_text(json.dumps({"meta": meta | {"device": "elsewhere", "jobs": 2}, "runs": [run]}))
    assert resumable_runs(path, meta) == [run]
    path.write_text(json.dumps({"meta": {"steps": 500, "config": None}, "runs": [{"key": "a"}]}))
    with pytest.raises(SystemExit, match="another experiment.*steps"):
        resumable_runs(path, meta)


def test_an_interrupted_run_resumes_only_with_its_own_config(tmp_path: Path) -> None:
    """Sessions end without warning: a run folder with a last checkpoint of the same config
    continues; one of another budget (another cosine schedule) is trained afresh."""
    from medssl.config import dump_config

    settings = {
        "set": [],
        "split_seed": 0,
        "test_subsets": [7, 8, 9],
        "data_workers": 0,
        "config": "focalmix-cpu",
    }
    run = Run(FOCALMIX, "focalmix", 10, 1, {})
    cfg = experiment(settings, run, steps=1500)
    out = tmp_path / run.folder
    assert not resumable(cfg, out)  # nothing there
    (out / "checkpoints").mkdir(parents=True)
    dump_config(cfg, out / "config.yaml")
    assert not resumable(cfg, out)  # no checkpoint yet
    (out / "checkpoints" / "last.pt").write_bytes(b"")
    assert resumable(cfg, out)
    assert not resumable(experiment(settings, run, steps=3000), out)
    assert not resumable(
        experiment(settings, Run(FOCALMIX, "focalmix", 10, 2, {}), steps=1500), out
    )
    # a config written before a field existed reads back with the field's default: same config
    text = (out / "config.yaml").read_text()
    assert "scanner_augment: 0.0" in text
    (out / "config.yaml").write_text(text.replace("  scanner_augment: 0.0\n", ""))
    assert resumable(cfg, out)


def test_training_wall_time_counts_every_segment_of_a_resumed_run_and_no_pause(
    tmp_path: Path,
) -> None:
    # 10 steps of 2 s, a 100 s validation, killed; resumed 3 hours later for 5 more steps of 2 s
    times = [2.0 * i for i in range(10)] + [118.0] + [118.0 + 3 * 3600 + 2.0 * i for i in range(5)]
    (tmp_path / "log.jsonl").write_text(
        "".join(json.dumps({"step": i, "time": t}) + "\n" for i, t in enumerate(times))
    )
    assert train_wall_s(tmp_path) == pytest.approx(18.0 + 100.0 + 8.0)
    assert train_wall_s(tmp_path, pause_s=50.0) == pytest.approx(18.0 + 8.0)


def test_a_run_is_resumed_from_its_kept_submission_only(tmp_path: Path) -> None:
    """The results file and the kept submissions are the benchmark's whole state across
    machines: a record whose submission file is missing (or that predates them) runs again."""
    meta = dict.fromkeys(EXPERIMENT_KEYS)
    submission = tmp_path / "work" / "submission.csv"
    submission.parent.mkdir()
    submission.write_text("seriesuid,coordX,coordY,coordZ,probability\nscan00,1.5,-2.25,3,0.75\n")
    kept = keep_submission(submission, tmp_path / "r_runs", "FocalMix_L10_s1")
    assert kept == "r_runs/FocalMix_L10_s1.csv.gz"
    again = keep_submission(submission, tmp_path / "r_runs", "other")
    assert (tmp_path / kept).read_bytes() == (tmp_path / again).read_bytes()
    assert (tmp_path / kept).read_bytes()[4:8] == bytes(4)  # gzip's MTIME field: none
    runs = [{"key": "a", "submission": kept}, {"key": "b", "submission": "r_runs/gone.csv.gz"}]
    (tmp_path / "r.json").write_text(json.dumps({"meta": meta, "runs": [*runs, {"key": "c"}]}))
    assert [r["key"] for r in resumable_runs(tmp_path / "r.json", meta)] == ["a"]


def test_the_statistics_read_the_kept_submission(tmp_path: Path) -> None:
    from medssl.datasets.luna16 import Luna16
    from medssl.synth.datasets import write_chest_dataset

    data = tmp_path / "luna"
    write_chest_dataset(data, cases=2, unlabeled=0, matrix=48, seed=3)
    luna = Luna16(data)
    uids = luna.seriesuids
    nodule = luna.annotations(uids[0])[0]
    x, y, z = nodule.centre_lps
    (tmp_path / "submission.csv").write_text(
        "seriesuid,coordX,coordY,coordZ,probability\n"
        f"{uids[0]},{x!r},{y!r},{z!r},0.9\n{uids[1]},{x + 500},{y},{z},0.8\n"
    )
    record = {"submission": keep_submission(tmp_path / "submission.csv", tmp_path / "runs", "r")}
    froc = run_froc(record, luna, uids, tmp_path)
    direct = evaluate_luna16(
        [f for u in uids for f in luna.annotations(u)],
        [f for u in uids for f in luna.excluded(u)],
        uids,
        read_predictions(tmp_path / "submission.csv"),
        n_bootstrap=0,
    )
    assert froc.cpm == direct.cpm
    assert froc.n_nodules == direct.n_nodules > 0
    assert froc.cpm > 0


def test_the_data_fingerprint_sees_every_byte_but_its_own_record(tmp_path: Path) -> None:
    from medssl.bench.data import dataset_fingerprint

    (tmp_path / "subset0").mkdir()
    (tmp_path / "subset0" / "a.raw").write_bytes(b"\x00\x01")
    (tmp_path / "annotations.csv").write_text("x\n")
    before = dataset_fingerprint(tmp_path)
    (tmp_path / "benchmark_data.json").write_text("{}")
    assert dataset_fingerprint(tmp_path) == before
    (tmp_path / "subset0" / "a.raw").write_bytes(b"\x00\x02")
    assert dataset_fingerprint(tmp_path) != before
    (tmp_path / "subset0" / "a.raw").write_bytes(b"\x00\x01")
    (tmp_path / "subset0" / "a.raw").rename(tmp_path / "subset0" / "b.raw")
    assert dataset_fingerprint(tmp_path) != before


def test_the_learning_curve_plots_a_partial_and_a_full_matrix(tmp_path: Path) -> None:
    """The plot is redrawn after every run: one run of one arm (no interval yet), several seeds,
    and the ceiling must all draw (it once indexed an Interval as a tuple, and the first finished
    run stopped the matrix)."""
    from benchmarks.focalmix_ssl import plot_learning_curve

    def run(name: str, labeled: int, seed: int, cpm: float) -> dict[str, object]:
        return {"name": name, "labeled": labeled, "seed": seed, "cpm": cpm}

    first = [run(SUPERVISED, 5, 0, 0.5)]
    assert plot_learning_curve(first, tmp_path / "one.png").stat().st_size > 0
    full = [
        run(name, n, s, 0.4 + 0.01 * n + 0.02 * s + (0.03 if name == FOCALMIX else 0.0))
        for name in (SUPERVISED, FOCALMIX, ZERO_WEIGHT)
        for n in (5, 10, 25)
        for s in range(3)
    ] + [run(CEILING, 129, s, 0.8 + 0.01 * s) for s in range(3)]
    assert plot_learning_curve(full, tmp_path / "full.png").stat().st_size > 0
