"""benchmarks/ad_settings.py: its ssl and imbssl settings are seg_methods.py's cells, read from
seg_methods' kept runs instead of trained twice (no training here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import ad_settings, seg_methods
from medssl.config import config_to_dict

BUDGET = {"steps": None, "every": 250, "patch": None}


def _seg_methods_budget() -> dict[str, object]:
    return {**BUDGET, "bcp_pretrain_steps": None}


@pytest.mark.parametrize("variant", ["supervised-seg", "mean-teacher", "ad", "ceiling"])
@pytest.mark.parametrize("setting", ["ssl", "imbssl"])
def test_a_borrowed_setting_is_the_same_experiment_as_its_seg_methods_cell(setting, variant):
    """The premise of borrowing: the config seg_methods trains for the cell is the config this
    benchmark would train for the setting, seed for seed."""
    cell, top = ad_settings.BORROWED[setting]
    task = cell.rstrip("0123456789")
    fraction = 1.0 if variant == "ceiling" else 0.2
    method = "supervised-seg" if variant == "ceiling" else variant
    theirs_run = seg_methods.Run(task, fraction, method, 3)
    theirs = seg_bench_config(
        seg_methods.TASKS[task].config,
        seg_methods.overrides_of(theirs_run, _seg_methods_budget()),
    )
    ours = seg_bench_config(
        f"seg-{setting}-cpu",
        ad_settings.overrides_of(ad_settings.Run(setting, variant, 3), BUDGET),
    )
    assert ours == theirs
    assert theirs_run.cell == (top if variant == "ceiling" else cell)


def seg_bench_config(config: str, overrides: dict[str, object]) -> dict[str, object]:
    from medssl.bench import seg_bench

    return config_to_dict(seg_bench.experiment(config, overrides))


def test_borrowed_settings_are_not_planned_here():
    runs = ad_settings.plan(list(ad_settings.SETTINGS), list(ad_settings.BASELINES), [0, 1])
    assert {r.setting for r in runs} == {"uda", "semidg"}
    assert len(runs) == 2 * 2 * 4  # seeds x settings x (3 methods + ceiling)


def _kept(folder: Path, name: str, steps: int, **extra: object) -> None:
    row = {
        "task": "x",
        "variant": "x",
        "dice": 0.5,
        "split": {"labeled": 7},
        "overrides": {"optim.steps": steps, "eval.every": 250},
        **extra,
    }
    (folder / f"{name}.json").write_text(json.dumps(row))


def test_borrowed_rows_come_from_the_kept_runs_relabelled_and_missing_ones_are_named(tmp_path):
    for v in ("supervised-seg", "ad"):
        _kept(tmp_path, seg_methods.Run("pancreas", 0.2, v, 0).name, 3000)
    _kept(tmp_path, seg_methods.Run("pancreas", 1.0, "supervised-seg", 0).name, 3000)
    _kept(tmp_path, seg_methods.Run("organs", 0.2, "ad", 0).name, 4000)
    rows, missing = ad_settings.borrowed_rows(
        ["ssl", "imbssl", "uda"], ["supervised-seg", "mean-teacher", "ad"], [0], tmp_path, BUDGET
    )
    got = {(r["setting"], r["variant"], r["borrowed_from"]) for r in rows}
    assert got == {
        ("ssl", "supervised-seg", "pancreas20-supervised-seg-0"),
        ("ssl", "ad", "pancreas20-ad-0"),
        ("ssl", "ceiling", "pancreas100-supervised-seg-0"),
        ("imbssl", "ad", "organs20-ad-0"),
    }
    assert sorted(missing) == sorted(
        [
            "pancreas20-mean-teacher-0",
            "organs20-supervised-seg-0",
            "organs20-mean-teacher-0",
            "organs100-supervised-seg-0",
        ]
    )


def test_a_kept_run_on_another_budget_is_refused(tmp_path):
    _kept(tmp_path, "pancreas20-ad-0", 300)
    with pytest.raises(SystemExit, match="optim.steps"):
        ad_settings.borrowed_rows(["ssl"], ["ad"], [0], tmp_path, BUDGET)
    rows, _ = ad_settings.borrowed_rows(["ssl"], ["ad"], [0], tmp_path, {**BUDGET, "steps": 300})
    assert [r["dice"] for r in rows] == [0.5]
