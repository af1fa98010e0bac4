"""medssl-score: an NLST-like archive end to end, resume after SIGKILL, LUNA16 CPM, bad input."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from medssl.cli.score import score as score_command
from medssl.errors import ConfigError, MedsslError
from medssl.scoring import (
    RunnerSpec,
    ScoreOptions,
    build_manifest,
    parse_rules,
    score,
    select_series,
)
from tests.paths import MODEL_REPOSITORY, ROOT

pytestmark = [pytest.mark.slow]

REPOSITORY = MODEL_REPOSITORY
SPEC = RunnerSpec(REPOSITORY, "focalmix-nodules")
TIMINGS = ("read_s", "preprocess_s", "inference_s", "postprocess_s")


@pytest.fixture
def archive(scoring_archive) -> Path:
    return scoring_archive


def _series(out: Path) -> list[dict]:
    return pq.read_table(out / "series.parquet").to_pylist()


def test_an_archive_gives_ok_skipped_and_failed_rows_with_reasons(archive, tmp_path):
    result = CliRunner().invoke(
        score_command, [str(archive), "--out", str(tmp_path), "--workers", "1"]
    )
    assert result.exit_code == 3, (
        result.output
    )  # some series failed: non-zero, and it says how many
    assert "3 series failed" in result.output
    rows = _series(tmp_path)
    by_status = {s: [r for r in rows if r["status"] == s] for s in ("ok", "skipped", "failed")}
    assert (
        len(by_status["ok"]) == 20
        and len(by_status["failed"]) == 3
        and len(by_status["skipped"]) == 23
    )
    assert {r["error"] for r in by_status["skipped"]} == {"localizer (scout) series"}
    errors = sorted(r["error"].split(":")[0] for r in by_status["failed"])
    assert errors == ["CorruptFileError", "MissingSliceError", "NonUniformSpacingError"]
    assert all(r["model"] == "focalmix-nodules" and r["model_version"] == 1 for r in rows)
    assert all(
        r["inference_s"] > 0 and r["read_s"] > 0 and r["n_windows"] > 0 for r in by_status["ok"]
    )
    findings = pq.read_table(tmp_path / "findings.parquet").to_pylist()
    ok_keys = {r["key"] for r in by_status["ok"]}
    assert {f["key"] for f in findings} <= ok_keys
    assert sum(r["n_findings"] for r in by_status["ok"]) == len(findings)
    assert all(0 <= f["probability"] <= 1 and f["diameter_mm"] > 0 for f in findings)
    # the printout is what the run reports: the findings at the operating point, and a count of the
    # rest
    reported = sum(f["passed"] for f in findings)
    assert (
        f"{reported} finding(s) at the operating point" in result.output
        if reported
        else "no findings at the operating point" in result.output
    )
    assert f"{len(findings) - reported} candidate(s) below" in result.output


def test_a_rerun_resumes_and_retries_only_the_failed(archive, tmp_path):
    first = score(archive, tmp_path, SPEC, options=ScoreOptions(workers=0, limit=5))
    assert first.scored_now == 5 and first.counts["skipped"] == 23
    second = score(archive, tmp_path, SPEC, options=ScoreOptions(workers=0))
    assert second.resumed == first.counts.get("ok", 0) and second.scored_now == 23 - second.resumed
    third = score(archive, tmp_path, SPEC, options=ScoreOptions(workers=0))
    assert third.scored_now == 3 and third.counts == {"ok": 20, "skipped": 23, "failed": 3}


def _children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_run_killed_midway_resumes_without_scoring_any_series_twice(archive, tmp_path):
    exe = Path(sys.prefix) / "bin" / "medssl-score"
    proc = subprocess.Popen(
        [str(exe), str(archive), "--out", str(tmp_path), "--workers", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    db = tmp_path / "score.sqlite"
    deadline = time.monotonic() + 300
    done = 0
    while done < 5 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
        if db.exists():
            with sqlite3.connect(db) as con:
                try:
                    done = con.execute(
                        "SELECT COUNT(*) FROM series WHERE status = 'ok'"
                    ).fetchone()[0]
                except sqlite3.OperationalError:  # table not created yet
                    done = 0
    assert proc.poll() is None, "the run finished before it could be killed"
    workers = _children(proc.pid)
    assert workers, "the run had no worker process"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in workers if _alive(pid)], "worker processes outlived the killed run"
    with sqlite3.connect(db) as con:
        ok_before = {k for (k,) in con.execute("SELECT key FROM series WHERE status = 'ok'")}
    assert 5 <= len(ok_before) < 20
    resumed = score(archive, tmp_path, SPEC, options=ScoreOptions(workers=1))
    assert resumed.resumed == len(ok_before)
    rows = _series(tmp_path)
    ok = [r["key"] for r in rows if r["status"] == "ok"]
    assert len(ok) == len(set(ok)) == 20  # none missing, none twice
    assert resumed.scored_now == 23 - len(ok_before)  # the 20 - done, plus the 3 broken ones


def test_scoring_a_luna16_split_gives_the_cpm_of_the_training_evaluation(tmp_path):
    torch = pytest.importorskip("torch")
    from medssl.cli.main import cli
    from medssl.config import config_from_dict
    from medssl.datasets.luna16 import Luna16
    from medssl.metrics import evaluate_luna16_files
    from medssl.training.cache import VolumeCache
    from medssl.training.detection.config import DetectionExperiment
    from medssl.training.detection.eval import (
        TorchDetectionRunner,
        detection_params,
        evaluate,
        predict,
    )
    from medssl.training.networks.detector import FPNDetector

    luna = tmp_path / "luna16"
    made = CliRunner().invoke(
        cli,
        [
            "synth",
            "chest",
            "--cases",
            "4",
            "--matrix",
            "96",
            "--slices",
            "48",
            "--seed",
            "7",
            str(luna),
        ],
    )
    assert made.exit_code == 0, made.output
    # The training code's own evaluation (det_eval) of the shipped model's weights.
    state = torch.load(ROOT / "benchmarks/assets/focalmix-nodules.pt", weights_only=False)
    cfg = config_from_dict(DetectionExperiment, state["config"])
    net = FPNDetector(cfg.model, cfg.anchors)
    net.load_state_dict(state["model"])
    dataset = Luna16(luna)
    uids = dataset.seriesuids
    cache = VolumeCache(
        tmp_path / "cache", cfg.data.spacing_mm, detection_params(cfg).normalisation
    )
    volumes = {u: cache.get(u, lambda u=u: dataset.scan(u)) for u in uids}
    predictions = predict(TorchDetectionRunner(net, cfg.window), volumes, detection_params(cfg))
    trained = evaluate(predictions, dataset.annotations(), dataset.excluded(), uids, bootstrap=0)
    # medssl-score with the exported model, then `medssl evaluate luna16` on its CSV.
    out = tmp_path / "scored"
    summary = score(luna, out, SPEC, options=ScoreOptions(workers=0))
    assert summary.counts == {"ok": 4}
    (tmp_path / "seriesuids.csv").write_text("".join(f"{u}\n" for u in uids))
    scored = evaluate_luna16_files(
        luna / "annotations.csv",
        luna / "annotations_excluded.csv",
        tmp_path / "seriesuids.csv",
        out / "submission.csv",
        n_bootstrap=0,
    )
    assert trained.cpm > 0.2
    assert scored.cpm == pytest.approx(trained.cpm, abs=1e-9)
    assert scored.sensitivities == pytest.approx(trained.sensitivities, abs=1e-9)


def test_selection_rules_thinnest_per_study_and_config_errors(archive, tmp_path):
    items = build_manifest(archive).items
    chosen, skipped = select_series(items, parse_rules("per_study=thinnest,max_thickness_mm=1.5"))
    assert all(i.slice_thickness_mm <= 1.5 for i in chosen)
    assert any("thicker than 1.5 mm" in s.reason for s in skipped)
    assert len({i.study_uid for i in chosen}) == len(chosen)
    rules = tmp_path / "rules.yaml"
    rules.write_text("min_slices: 40\nimage_type: [ORIGINAL]\n")
    chosen, skipped = select_series(items, parse_rules(str(rules)))
    assert not chosen and any("36 slices, fewer than 40" in s.reason for s in skipped)
    with pytest.raises(ConfigError, match="unknown selection rule.*min_slice"):
        parse_rules("min_slice=3")
    with pytest.raises(ConfigError, match="per_study must be"):
        parse_rules("per_study=best")


def test_bad_inputs_are_clear_errors(tmp_path):
    with pytest.raises(MedsslError, match="no such file or folder"):
        score(tmp_path / "absent", tmp_path / "out", SPEC)
    (tmp_path / "list.json").write_text("{}")
    with pytest.raises(MedsslError, match="expected a folder, an index"):
        score(tmp_path / "list.json", tmp_path / "out", SPEC)
    with pytest.raises(MedsslError, match="no model 'nope'"):
        score(tmp_path, tmp_path / "out", RunnerSpec(REPOSITORY, "nope"))
    result = CliRunner().invoke(
        score_command, [str(tmp_path), "--out", str(tmp_path / "o"), "--backend", "triton"]
    )
    assert result.exit_code == 2 and "--triton-url" in result.output


def test_write_dicom_gives_one_valid_sr_per_scored_series_and_retries_reuse_its_uids(
    archive, tmp_path, dciodvfy
):
    import highdicom as hd
    import pydicom

    from medssl.scoring.series import DicomOutput

    options = ScoreOptions(
        workers=0, limit=2, dicom=DicomOutput(tmp_path / "dicom", min_probability=0.5)
    )
    score(archive, tmp_path, SPEC, options=options)
    ok = [r for r in _series(tmp_path) if r["status"] == "ok"]
    assert len(ok) == 2 and all(Path(r["dicom_outputs"]).is_file() for r in ok)
    findings = pq.read_table(tmp_path / "findings.parquet").to_pylist()
    first = ok[0]
    for row in ok:
        report = hd.sr.MeasurementReport.from_sequence([hd.sr.srread(row["dicom_outputs"])])
        groups = report.get_planar_roi_measurement_groups(
            graphic_type=hd.sr.GraphicTypeValues3D.POINT
        )
        reported = [f for f in findings if f["key"] == row["key"] and f["probability"] >= 0.5]
        assert len(groups) == len(reported)
        assert dciodvfy(Path(row["dicom_outputs"])) == []
    uid = pydicom.dcmread(first["dicom_outputs"]).SOPInstanceUID
    # a retry (the series failed in between) writes the same object again
    with sqlite3.connect(tmp_path / "score.sqlite") as con:
        con.execute("UPDATE series SET status = 'failed' WHERE key = ?", (first["key"],))
    score(archive, tmp_path, SPEC, options=options)
    assert pydicom.dcmread(first["dicom_outputs"]).SOPInstanceUID == uid


def test_an_unexpected_exception_in_either_stage_becomes_a_failed_row(archive, monkeypatch):
    from medssl.scoring import series

    card = SPEC.card()
    params = card.detection_params(2)
    item = next(i for i in build_manifest(archive).items if "LOCALIZER" not in i.image_type)
    prepared = series.prepare_series(item, params)

    def crash(*_):
        raise RuntimeError("runner crashed")

    monkeypatch.setattr(series, "detect_preprocessed", crash)
    scored = series.infer(prepared, None, card, params)
    assert scored.status == "failed" and scored.findings == [] and scored.finding_rows() == []
    # the type and where it was raised: an unexpected message may quote header values
    assert (
        scored.to_row()["error"]
        == f"unexpected RuntimeError at test_score.py:{crash.__code__.co_firstlineno + 1}"
    )

    def unreadable(*_):
        raise KeyError("PixelData of John Doe")

    monkeypatch.setattr(series, "_read", unreadable)
    broken = series.prepare_series(item, params)
    # the type only: an unexpected message may quote header values
    assert broken.volume is None and not broken.transient
    assert broken.error == "unexpected KeyError while reading or preprocessing the series"


def test_a_series_out_of_memory_while_preparing_fails_alone_and_is_not_retried(
    archive, monkeypatch
):
    """Its size is the series' own: retrying the study would read the same files again."""
    from medssl.scoring import series

    card = SPEC.card()
    item = next(i for i in build_manifest(archive).items if "LOCALIZER" not in i.image_type)

    def too_big(*_):
        raise MemoryError

    monkeypatch.setattr(series, "_read", too_big)
    prepared = series.prepare_series(item, card.detection_params(2))
    scored = series.infer(prepared, None, card, card.detection_params(2))
    assert not prepared.transient and not scored.transient
    assert scored.to_row()["status"] == "failed" and "MemoryError" in scored.to_row()["error"]


# -- anonymised archives: blank UIDs -----------------------------------------------------------


@pytest.fixture(scope="module")
def anonymised_archive(tmp_path_factory) -> Path:
    """Two chest CT series (64 x 64 x 36) whose dataset UIDs an anonymiser blanked (the file meta
    keeps the SOP UIDs): one JPEG 2000 compressed, like an anonymised Siemens series, and one
    without a FrameOfReferenceUID, like LIDC slices; a folder each, same geometry."""
    from medssl.io import write_dicom_series
    from medssl.synth.chest import ChestConfig, generate_chest_ct
    from medssl.synth.datasets import chest_series_info
    from tests.dicom_edits import blank_uids, edit, to_jpeg2000

    root = tmp_path_factory.mktemp("anonymised")
    for seed, name in ((11, "j2k"), (12, "no-frame-of-reference")):
        case = generate_chest_ct(seed, ChestConfig(matrix=64, n_slices=36))
        files = write_dicom_series(case.volume, root / "anon" / name, chest_series_info(seed, case))
        if name == "j2k":
            to_jpeg2000(files)
        else:
            edit(files, FrameOfReferenceUID=None, PositionReferenceIndicator=None)
        blank_uids(files)
    return root


def test_blank_uid_series_get_two_keys_are_both_scored_and_resumed(anonymised_archive, tmp_path):
    """They shared the key '' (the second 'resumed' as done) and failed 'has no SeriesInstanceUID';
    no SR can name a source series that has no UID, so none is written, with the reason."""
    out = tmp_path / "out"
    args = [str(anonymised_archive), "--out", str(out), "--workers", "0", "--write-dicom"]
    result = CliRunner().invoke(score_command, args)
    assert result.exit_code == 0, result.output
    rows = _series(out)
    assert len(rows) == 2 and len({r["key"] for r in rows}) == 2
    assert all(r["key"].startswith("nouid-") and r["series_uid"] == "" for r in rows)
    assert all(
        r["status"] == "ok" and r["series_uid_absent"] and r["dicom_outputs"] is None for r in rows
    )
    assert {r["note"] for r in rows} == {
        "no DICOM outputs: the source has no SeriesInstanceUID or StudyInstanceUID"
    }
    assert not (out / "dicom").exists() or not any((out / "dicom").rglob("*.dcm"))
    findings = pq.read_table(out / "findings.parquet").to_pylist()
    assert {f["key"] for f in findings} <= {r["key"] for r in rows}

    again = score(anonymised_archive, out, SPEC, options=ScoreOptions(workers=0))
    assert (again.resumed, again.scored_now) == (2, 0)
    assert {r["key"] for r in _series(out)} == {r["key"] for r in rows}


def test_medssl_info_reads_each_anonymised_series_under_the_scorer_s_key(anonymised_archive):
    import json

    from medssl.cli.main import cli

    keys = {item.key for item in build_manifest(anonymised_archive).items}
    shown = set()
    for folder in sorted((anonymised_archive / "anon").iterdir()):
        result = CliRunner().invoke(cli, ["info", str(folder)])
        assert result.exit_code == 0, result.output
        assert "shape:       [36, 64, 64]" in result.output
        assert "series:      nouid-" in result.output and "no SeriesInstanceUID" in result.output
        shown.add(
            json.loads(CliRunner().invoke(cli, ["info", str(folder), "--json"]).output)[
                "series_key"
            ]
        )
    assert shown == keys
    # from the archive's root, either series is chosen by that key
    for key in keys:
        result = CliRunner().invoke(cli, ["info", str(anonymised_archive), "--series-uid", key])
        assert result.exit_code == 0 and key in result.output, result.output


def test_score_options_limits_refuse_a_series_beyond_them(anonymised_archive, tmp_path):
    from medssl.io.limits import GeometryLimits

    tight = GeometryLimits(max_resampled_voxels=10_000)  # 64 x 64 x 36 voxels under 1 mm: more
    summary = score(
        anonymised_archive, tmp_path, SPEC, options=ScoreOptions(workers=0, limits=tight)
    )
    assert summary.counts == {"failed": 2}
    for row in _series(tmp_path):
        assert (
            row["error"].startswith("ImplausibleGeometryError") and "at most 10,000" in row["error"]
        )
