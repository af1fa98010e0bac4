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


@pytest.mark.slow
@pytest.mark.usefixtures("torch_one_thread")
def test_an_interrupted_run_resumes_and_another_config_starts_afresh(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sitting that ends mid-run loses minutes, not the run: run_one continues a folder of the
    same config from its last checkpoint (its earlier training time counted), and trains a folder
    of another config (another budget) from scratch."""
    from medssl.synth.datasets import write_organ_dataset
    from medssl.training.methods import supervised_seg

    monkeypatch.setenv("MEDSSL_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "data"
    write_organ_dataset(data / "A", cases=5, n_test=1, domain="A", seed=0, shape=(32, 48, 48))
    tiny = {
        "method": "supervised-seg",
        "optim.steps": 4,
        "eval.every": 2,
        "data.patch": [16, 16, 16],
        "data.workers": 0,
        "data.n_validation": 1,
        "model.width": 4,
    }
    out = tmp_path / "run"
    job = {
        "config": "seg-ssl-cpu",
        "overrides": tiny,
        "data": str(data),
        "out": str(out),
        "fields": {"variant": "supervised-seg"},
    }
    real, calls = supervised_seg.supervised_seg_step, {"n": 0}

    def interrupted(*args: object, **kwargs: object) -> object:
        calls["n"] += 1
        if calls["n"] == 3:  # after the step-2 checkpoint
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(supervised_seg, "supervised_seg_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        seg_bench.run_one(job)
    monkeypatch.setattr(supervised_seg, "supervised_seg_step", real)
    index = out / "checkpoints" / "index.json"
    assert json.loads(index.read_text())["last_step"] == 2

    row = seg_bench.run_one(job)
    assert row["resumed"] and row["earlier_train_s"] >= 0
    assert json.loads(index.read_text())["last_step"] == 4
    assert _trained_steps(out) == [1, 2, 3, 4]  # steps 1-2 were not redone

    other = seg_bench.run_one({**job, "overrides": {**tiny, "optim.steps": 6}})
    assert not other["resumed"] and other["earlier_train_s"] == 0.0
    assert _trained_steps(out) == [1, 2, 3, 4, 5, 6]  # the old log went with the old folder


def _trained_steps(run: Path) -> list[int]:
    rows = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "loss" in r]
