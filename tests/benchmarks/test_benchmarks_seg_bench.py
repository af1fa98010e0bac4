"""benchmarks/lib/seg_bench.py: where the segmentation benchmarks keep their runs, and which
kept runs they reuse (no training)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medssl.bench import seg_bench
from tests.paths import ROOT


def test_kept_runs_live_beside_the_report_and_a_smoke_run_stays_out_of_the_results() -> None:
    out = ROOT / "benchmarks" / "results" / "seg_methods"
    assert seg_bench.output_paths(None, Path("/w"), "seg_methods", quick=False) == out
    assert seg_bench.runs_folder(out) == out.with_name("seg_methods_runs")
    assert seg_bench.output_paths(None, Path("/w"), "seg_methods", quick=True) == Path(
        "/w/seg_methods"
    )
    assert seg_bench.output_paths(Path("/x/r"), Path("/w"), "seg_methods", quick=True) == Path(
        "/x/r"
    )


class _Run:
    def __init__(self, name: str) -> None:
        self.name = name


def test_a_kept_run_is_reused_only_on_the_same_data(tmp_path: Path) -> None:
    row = {"dice": 0.5, "asd_mm": 1.0, "wall_s": 3.0, "split": {"labeled": 2}}
    (tmp_path / "a.json").write_text(json.dumps(row | {"data_fingerprint": "f1"}))
    trained = []

    def train(run: _Run) -> dict[str, object]:
        trained.append(run.name)
        return row | {"data_fingerprint": "f1"}

    def expected(_: _Run) -> dict[str, object]:
        return {"split": {"labeled": 2}, "data_fingerprint": "f1"}

    rows = seg_bench.run_all([_Run("a"), _Run("b")], tmp_path, expected, train, jobs=1)
    assert trained == ["b"]  # a was kept
    assert [r["data_fingerprint"] for r in rows] == ["f1", "f1"]
    assert json.loads((tmp_path / "b.json").read_text())["data_fingerprint"] == "f1"
    with pytest.raises(SystemExit, match="data_fingerprint"):
        seg_bench.run_all(
            [_Run("a")],
            tmp_path,
            lambda _: {"split": {"labeled": 2}, "data_fingerprint": "f2"},
            train,
            jobs=1,
        )
