"""The Ray engine scores an archive exactly as the local engine does (one Ray start per module)."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytest.importorskip("ray.data")

import ray

from medssl.scoring import ray_engine
from medssl.scoring.manifest import ScanItem, build_manifest
from medssl.scoring.result import SeriesResult
from medssl.scoring.run import RunnerSpec, ScoreOptions, score
from tests.paths import MODEL_REPOSITORY

# One runtime on both sides: the Ray actors run in their own processes, where runtime "auto" would
# pick OpenVINO, while this process keeps to onnxruntime (tests/conftest.py); outputs of two
# runtimes agree to ~1e-5, not bit for bit.
SPEC = RunnerSpec(
    MODEL_REPOSITORY,
    "focalmix-nodules",
    runtime="onnxruntime",
)
# DataContext.copy() (inside Ray Data too) warns about its own deprecated fields.
pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context"),
    pytest.mark.integration,
    pytest.mark.slow,
]

TIMINGS = ("read_s", "preprocess_s", "inference_s", "postprocess_s", "lung_mask_s")


@pytest.fixture(scope="module")
def archive(scoring_archive) -> Path:
    return scoring_archive


@pytest.fixture(scope="module")
def runs(archive, tmp_path_factory):
    """Both engines on the archive; the Ray run records what ``run_ray`` was given and yielded."""
    if ray.is_initialized():
        pytest.skip("another test left Ray running; this module checks that run_ray starts its own")
    out = tmp_path_factory.mktemp("runs")
    local = score(archive, out / "local", SPEC, options=ScoreOptions(engine="local", workers=1))
    seen: dict[str, list] = {"given": [], "yielded": [], "chunks": []}
    real = ray_engine.run_ray
    real_dataset = ray_engine._dataset

    def chunk(items, *args):
        seen["chunks"].append([item.key for item in items])
        return real_dataset(items, *args)

    def recording(items, spec, card, options):
        seen["given"] = [item.key for item in items]
        for result in real(items, spec, card, options):
            seen["yielded"].append(result.key)
            yield result

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ray_engine, "run_ray", recording)
        patch.setattr(ray_engine, "_dataset", chunk)
        # chunks of 7: the 23 series cross three chunk boundaries
        on_ray = score(
            archive, out / "ray", SPEC, options=ScoreOptions(engine="ray", workers=2, ray_chunk=7)
        )
    return {
        "local": (local, out / "local"),
        "ray": (on_ray, out / "ray"),
        "seen": seen,
        "ray_left_running": ray.is_initialized(),
    }


def _rows(folder: Path, table: str, drop: tuple[str, ...] = ()) -> list[dict]:
    rows = pq.read_table(folder / f"{table}.parquet").to_pylist()
    return [{k: v for k, v in row.items() if k not in drop} for row in rows]


def test_ray_series_rows_equal_local_ones_except_timings(runs):
    local, ray_out = runs["local"][1], runs["ray"][1]
    assert _rows(ray_out, "series", TIMINGS) == _rows(local, "series", TIMINGS)
    ok = [row for row in _rows(ray_out, "series") if row["status"] == "ok"]
    assert all(row[column] is not None for row in ok for column in TIMINGS)


def test_ray_findings_equal_local_ones(runs):
    local, ray_out = runs["local"][1], runs["ray"][1]
    findings = _rows(ray_out, "findings")
    assert findings and findings == _rows(local, "findings")


def test_ray_run_scores_good_series_fails_broken_ones_and_skips_localizers(runs):
    summary, folder = runs["ray"]
    assert summary.counts == {"ok": 20, "failed": 3, "skipped": 23}
    assert summary.scored_now == 23
    rows = _rows(folder, "series")
    failed = sorted(row["error"].split(":")[0] for row in rows if row["status"] == "failed")
    assert failed == ["CorruptFileError", "MissingSliceError", "NonUniformSpacingError"]
    assert all("localizer" in row["error"] for row in rows if row["status"] == "skipped")


def test_ray_results_arrive_in_manifest_order(runs):
    seen = runs["seen"]
    assert len(seen["given"]) == 23
    assert seen["yielded"] == seen["given"]


def test_the_manifest_is_fed_to_ray_in_chunks_in_order(runs):
    chunks = runs["seen"]["chunks"]
    assert [len(c) for c in chunks] == [7, 7, 7, 2]
    assert [key for c in chunks for key in c] == runs["seen"]["given"]


def test_run_ray_shuts_down_the_ray_it_started(runs):
    assert runs["ray_left_running"] is False


def test_run_ray_leaves_a_callers_ray_running(monkeypatch, archive):
    """A Ray the caller initialised is used as is and not shut down (no real Ray needed here)."""
    item = build_manifest(archive).items[0]
    scored = SeriesResult(item, "model", 1, "ok")
    batch = pa.table({"scored": pa.array([pickle.dumps(scored)], pa.large_binary())})

    class FakeDataset:
        def iter_batches(self, **_):
            yield batch

    calls: list[str] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "init", lambda *a, **k: calls.append("init"))
    monkeypatch.setattr(ray, "shutdown", lambda *a, **k: calls.append("shutdown"))
    monkeypatch.setattr(ray_engine, "_dataset", lambda *a, **k: FakeDataset())
    results = list(ray_engine.run_ray([item], SPEC, SPEC.card(), ScoreOptions(engine="ray")))
    assert [r.to_row() for r in results] == [scored.to_row()]
    assert calls == []


def test_run_ray_with_nothing_to_score_starts_no_ray(monkeypatch):
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("ray.init called"))
    assert list(ray_engine.run_ray([], SPEC, SPEC.card(), ScoreOptions(engine="ray"))) == []


def _item(archive: Path) -> ScanItem:
    return next(i for i in build_manifest(archive).items if "LOCALIZER" not in i.image_type)


def test_the_ray_engine_does_not_import_torch():
    code = (
        "import sys, medssl.scoring.ray_engine, ray.data; "
        "sys.exit(3 if 'torch' in sys.modules else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr or "medssl.scoring.ray_engine imported torch"
