"""medssl-score --shard I/N and medssl score merge: the union of the shards is one run."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from medssl.cli.main import cli
from medssl.errors import MedsslError
from medssl.scoring import RunnerSpec, ScanItem, ScoreOptions, build_manifest, score
from medssl.scoring.merge import merge_outputs
from medssl.scoring.shard import Shard, parse_shard
from tests.paths import MODEL_REPOSITORY

pytestmark = [pytest.mark.slow]

REPOSITORY = MODEL_REPOSITORY
SPEC = RunnerSpec(REPOSITORY, "focalmix-nodules")
TIMINGS = {"read_s", "preprocess_s", "inference_s", "postprocess_s", "lung_mask_s"}


def _rows(out: Path, table: str = "series") -> list[dict]:
    rows = pq.read_table(out / f"{table}.parquet").to_pylist()
    return sorted(
        ({k: v for k, v in r.items() if k not in TIMINGS} for r in rows),
        key=lambda r: json.dumps(r, sort_keys=True),
    )


@pytest.mark.parametrize(
    "text, expected", [("1/4", Shard(1, 4)), (" 3 / 3 ", Shard(3, 3)), ("1/1", Shard(1, 1))]
)
def test_shard_text_parses(text, expected):
    assert parse_shard(text) == expected


@pytest.mark.parametrize("text", ["0/4", "5/4", "1/0", "2", "a/b", "-1/3", ""])
def test_a_bad_shard_is_refused_with_the_expected_form(text):
    with pytest.raises(MedsslError, match="I/N"):
        parse_shard(text)


def test_every_series_is_in_exactly_one_shard_and_a_study_is_never_split():
    items = [
        ScanItem(key=f"1.2.3.{s}.{k}", paths=("x.dcm",), study_uid=f"1.2.{s}" if s % 7 else "")
        for s in range(300)
        for k in range(3)
    ]
    shards = [Shard(i, 5) for i in range(1, 6)]
    owners = [[shard for shard in shards if shard.holds(item)] for item in items]
    assert all(len(o) == 1 for o in owners)
    by_study: dict[str, set[Shard]] = {}
    for item, owner in zip(items, owners):
        if item.study_uid:
            by_study.setdefault(item.study_uid, set()).add(owner[0])
    assert all(len(s) == 1 for s in by_study.values())
    sizes = [len(shard.select(items)) for shard in shards]
    assert sum(sizes) == len(items) and min(sizes) > 0.5 * len(items) / 5  # roughly balanced
    # the split does not depend on the manifest's order
    assert [i.key for i in shards[0].select(items[::-1])] == [
        i.key for i in shards[0].select(items)
    ][::-1]


@pytest.fixture(scope="module")
def runs(scoring_archive, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("shards")
    outs = {"whole": root / "whole"}
    score(scoring_archive, outs["whole"], SPEC, options=ScoreOptions(workers=0))
    for i in (1, 2, 3):
        outs[f"shard{i}"] = root / f"shard{i}"
        score(
            scoring_archive,
            outs[f"shard{i}"],
            SPEC,
            options=ScoreOptions(workers=0, shard=Shard(i, 3)),
        )
    return outs


def test_the_shards_partition_the_archive(runs, scoring_archive):
    keys = [{r["key"] for r in _rows(runs[f"shard{i}"])} for i in (1, 2, 3)]
    assert all(keys) and not (keys[0] & keys[1] or keys[0] & keys[2] or keys[1] & keys[2])
    assert set().union(*keys) == {item.key for item in build_manifest(scoring_archive).items}


def test_merged_shards_equal_one_run_over_the_whole_archive(runs, scoring_archive, tmp_path):
    merged = tmp_path / "merged"
    result = CliRunner().invoke(
        cli, ["score", "merge", *(str(runs[f"shard{i}"]) for i in (1, 2, 3)), "--out", str(merged)]
    )
    assert result.exit_code == 0, result.output
    assert "merged 3 folder(s): 46 series" in result.output
    assert _rows(merged) == _rows(runs["whole"])
    assert _rows(merged, "findings") == _rows(runs["whole"], "findings")
    whole = runs["whole"] / "unreadable.csv"
    if whole.exists():
        assert (merged / "unreadable.csv").read_text() == whole.read_text()
    # the merged folder resumes like one run's: only the failed series are tried again
    again = score(scoring_archive, merged, SPEC, options=ScoreOptions(workers=0))
    assert again.resumed == 20 and again.scored_now == 3


def test_medssl_score_without_a_subcommand_is_medssl_score(runs, scoring_archive, tmp_path):
    out = tmp_path / "cli"
    result = CliRunner().invoke(
        cli,
        [
            "score",
            str(scoring_archive),
            "--out",
            str(out),
            "--workers",
            "0",
            "--shard",
            "2/3",
            "--limit",
            "1",
        ],
    )
    assert result.exit_code in (0, 3), result.output
    assert "(shard 2/3)" in result.output
    assert {r["key"] for r in _rows(out)} <= {r["key"] for r in _rows(runs["shard2"])}


def test_merging_the_same_shard_twice_keeps_each_series_once(runs, tmp_path):
    summary = merge_outputs([runs["shard1"], runs["shard1"]], tmp_path / "m")
    assert summary.series == len(_rows(runs["shard1"]))


def test_merge_refuses_an_existing_store_a_folder_without_one_and_conflicting_rows(runs, tmp_path):
    with pytest.raises(MedsslError, match="already holds a result store"):
        merge_outputs([runs["shard1"]], runs["shard2"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(MedsslError, match="not a medssl-score output folder"):
        merge_outputs([tmp_path / "empty"], tmp_path / "m1")
    # one series scored twice with different results (e.g. two different runs) is an error
    changed = tmp_path / "changed"
    changed.mkdir()
    src = sqlite3.connect(runs["shard1"] / "score.sqlite")
    src.execute(f"VACUUM INTO '{changed / 'score.sqlite'}'")
    src.close()
    db = sqlite3.connect(changed / "score.sqlite")
    key, row = db.execute("SELECT key, row FROM series WHERE status = 'ok' LIMIT 1").fetchone()
    data = json.loads(row)
    data["n_findings"] = (data["n_findings"] or 0) + 1
    db.execute("UPDATE series SET row = ? WHERE key = ?", (json.dumps(data), key))
    db.commit()
    db.close()
    with pytest.raises(MedsslError, match="different results in two inputs"):
        merge_outputs([runs["shard1"], changed], tmp_path / "m2")


def test_the_result_tables_are_written_a_row_group_at_a_time(tmp_path, monkeypatch):
    from medssl.scoring import store as store_module

    monkeypatch.setattr(store_module, "_BATCH", 4)
    results = store_module.ResultStore(tmp_path)
    results.commit_many(
        [
            (
                {"key": f"1.2.{i}", "status": "ok", "model": "m", "model_version": 1},
                [{"key": f"1.2.{i}", "index": j, "probability": 0.5} for j in range(3)],
            )
            for i in range(7)
        ]
    )
    results.export()
    results.close()
    findings = pq.ParquetFile(tmp_path / "findings.parquet")
    assert findings.metadata.num_rows == 21 and findings.num_row_groups == 6  # 4 + 4 + ... + 1
    assert [(f["key"], f["index"]) for f in findings.read().to_pylist()] == [
        (f"1.2.{i}", j) for i in range(7) for j in range(3)
    ]
    empty = store_module.ResultStore(tmp_path / "empty")
    empty.export()
    empty.close()
    assert pq.read_table(tmp_path / "empty" / "series.parquet").num_rows == 0
