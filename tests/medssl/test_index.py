"""Header-only index of DICOM trees, its tables, and `medssl index`."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from medssl.cli.main import cli
from medssl.index import index_files, index_tree, read_index, write_index
from medssl.io import SeriesInfo, write_dicom_series
from tests.conftest import oblique_direction, ramp_volume
from tests.dicom_edits import blank_uids, edit


@pytest.fixture
def tree(tmp_path):
    """patient/study/series tree: 2 patients, 3 series (one sagittal), a stray text file."""
    root = tmp_path / "tree"
    write_dicom_series(
        ramp_volume(),
        root / "P1" / "ST1" / "SE1",
        SeriesInfo(uid_seed="a", patient_id="P1", series_number=1),
    )
    write_dicom_series(
        ramp_volume(shape=(4, 20, 24)),
        root / "P1" / "ST1" / "SE2",
        SeriesInfo(
            uid_seed="b",
            patient_id="P1",
            series_number=2,
            study_uid=SeriesInfo(uid_seed="a").uid("study"),
        ),
    )
    sagittal = np.stack([[1.0, 0, 0], [0, 0, -1.0], [0, 1.0, 0]], axis=1)
    write_dicom_series(
        ramp_volume(direction=sagittal),
        root / "P2" / "ST" / "SE",
        SeriesInfo(uid_seed="c", patient_id="P2"),
    )
    (root / "README.txt").write_text("not dicom")
    return root


def test_one_row_per_series_with_counts_and_orientation(tree):
    index = index_tree(tree)
    assert len(index.series) == 3
    by_patient = [(s.patient_id, s.n_slices, s.orientation) for s in index.series]
    assert by_patient == [("P1", 6, "AXIAL"), ("P1", 4, "AXIAL"), ("P2", 6, "SAGITTAL")]
    first = index.series[0]
    assert first.modality == "CT" and first.image_type == "ORIGINAL\\PRIMARY\\AXIAL"
    assert first.slice_thickness == pytest.approx(2.5)
    assert index.series[0].study_uid == index.series[1].study_uid
    assert all(f.endswith(".dcm") for f in first.files) and len(first.files) == 6
    assert index.unreadable == [(str(tree / "README.txt"), "not a DICOM file (no DICM preamble)")]


def test_oblique_series_is_labelled(tmp_path):
    write_dicom_series(ramp_volume(direction=oblique_direction(60).T), tmp_path / "s")
    assert index_tree(tmp_path).series[0].orientation == "OBLIQUE"


def test_corrupt_files_are_listed_not_fatal(tree):
    victim = sorted((tree / "P2").rglob("*.dcm"))[0]
    victim.write_bytes(victim.read_bytes()[:300])
    index = index_tree(tree)
    assert [s.n_files for s in index.series] == [6, 4, 5]
    assert (str(victim),) == tuple(p for p, _ in index.unreadable if p.endswith(".dcm"))


def test_parallel_and_serial_indexes_agree(tree):
    assert index_tree(tree, workers=2).series == index_tree(tree, workers=1).series


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_tables_round_trip(tree, tmp_path, suffix):
    index = index_tree(tree)
    path = write_index(index, tmp_path / f"index{suffix}")
    assert read_index(path).series == index.series


def test_cli_prints_full_uids_and_writes_the_table(tree, tmp_path):
    out = tmp_path / "idx.parquet"
    result = CliRunner().invoke(cli, ["index", str(tree), "--out", str(out)])
    assert result.exit_code == 0, result.output
    index = index_tree(tree)
    lines = result.stdout.splitlines()
    assert lines[0].startswith("series_uid") and len(lines) == 1 + 3  # stdout: the table only
    for series in index.series:
        assert any(line.split()[0] == series.series_uid for line in lines[1:])
    assert read_index(out).series == index.series


# -- one file's header never fails the index -----------------------------------------------------


def test_any_exception_from_one_header_lists_that_file_by_type_only(tree, monkeypatch):
    """index_files caught only CorruptFileError: one odd header failed the whole study."""
    from medssl import index as index_module

    files = sorted(str(p) for p in tree.rglob("*.dcm"))
    victim = files[0]
    real = index_module.read_dataset

    def poisoned(path, **kwargs):
        if path == victim:
            raise TypeError("object of type 'DSfloat' has no len() -- PatientName^Quoted")
        return real(path, **kwargs)

    monkeypatch.setattr(index_module, "read_dataset", poisoned)
    index = index_files(files)
    assert index.unreadable == [(victim, "header could not be read (TypeError)")]
    assert index.n_files == len(files) - 1


def test_malformed_orientation_and_empty_shared_groups_are_indexed(tmp_path):
    """A one-valued ImageOrientationPatient (TypeError) and an empty Shared Functional Groups
    Sequence (IndexError) used to escape; now the series is listed, its orientation unknown,
    and reading it fails as that series' own error."""
    from medssl.io.dicom_enhanced import write_enhanced_ct

    classic = write_dicom_series(ramp_volume(), tmp_path / "classic", SeriesInfo(uid_seed="c"))
    edit(classic[:1], ImageOrientationPatient="1")
    enhanced = write_enhanced_ct(
        ramp_volume(), tmp_path / "enhanced" / "ct.dcm", SeriesInfo(uid_seed="e")
    )
    edit([enhanced], SharedFunctionalGroupsSequence=[])
    index = index_files([*classic, enhanced])
    assert index.unreadable == []
    by_files = sorted((s.n_files, s.orientation) for s in index.series)
    assert by_files == [(1, ""), (6, "MIXED")]


def test_invalid_dates_are_indexed_as_received(tree):
    files = sorted((tree / "P2").rglob("*.dcm"))
    edit(files, PatientBirthDate="00000000", StudyDate="20230231")
    [series] = [s for s in index_tree(tree).series if s.patient_id == "P2"]
    assert series.study_date == "20230231" and series.n_files == 6


# -- anonymised series: blank UIDs --------------------------------------------------------------


def test_blank_uid_series_get_distinct_keys_stable_across_runs_and_moves(tree, tmp_path):
    for folder in ("P1/ST1/SE1", "P1/ST1/SE2"):
        blank_uids(sorted((tree / folder).glob("*.dcm")))
    index = index_tree(tree)
    absent = [s for s in index.series if s.series_uid_absent]
    assert len(absent) == 2 and index.unreadable[-1][0].endswith("README.txt")
    keys = {s.series_key for s in absent}
    assert len(keys) == 2 and all(k.startswith("nouid-") for k in keys)
    assert all(s.series_uid == "" and s.study_uid == "" for s in absent)
    assert {s.sop_class_uid for s in absent} == {"1.2.840.10008.5.1.4.1.1.2"}  # from the file meta
    assert {s.n_files for s in absent} == {6, 4}
    assert index_tree(tree).series == index.series  # the same keys on every run
    moved = tmp_path / "elsewhere"
    shutil.copytree(tree, moved)
    assert {s.series_key for s in index_tree(moved).series if s.series_uid_absent} == keys


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_tables_keep_the_derived_keys(tree, tmp_path, suffix):
    blank_uids(sorted((tree / "P2").rglob("*.dcm")))
    index = index_tree(tree)
    assert read_index(write_index(index, tmp_path / f"index{suffix}")).series == index.series
