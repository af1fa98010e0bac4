"""Corrupt or irregular inputs give typed errors that name the file and the problem."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from click.testing import CliRunner
from pydicom.data import get_testdata_file

from medssl.cli.main import cli
from medssl.errors import (
    CorruptFileError,
    DuplicateSliceError,
    GantryTiltError,
    LocalizerError,
    MissingSliceError,
    MultipleSeriesError,
    NonUniformSpacingError,
    NotAnImageError,
    UnsupportedFormatError,
    VolumeReadError,
)
from medssl.io import SeriesInfo, read_volume, write_dicom_series
from tests.conftest import ramp_volume


def _files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.dcm"))


def _edit(path: Path, **changes) -> None:
    ds = pydicom.dcmread(path)
    for key, value in changes.items():
        setattr(ds, key, value)
    ds.save_as(path)


def test_truncated_file_names_the_file(dicom_series):
    victim = _files(dicom_series)[2]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptFileError) as err:
        read_volume(dicom_series)
    assert err.value.path == victim
    assert "truncated" in err.value.problem


def test_header_cut_short_is_corrupt(tmp_path, dicom_series):
    victim = _files(dicom_series)[0]
    victim.write_bytes(victim.read_bytes()[:200])
    with pytest.raises(CorruptFileError, match=victim.name):
        read_volume(victim)


def test_missing_slice_is_reported_with_its_neighbours(dicom_series):
    files = _files(dicom_series)
    files[3].unlink()
    with pytest.raises(MissingSliceError) as err:
        read_volume(dicom_series)
    assert "1 slice(s) missing" in err.value.problem
    assert files[2].name in err.value.problem and files[4].name in err.value.problem


def test_slices_are_sorted_by_position_not_instance_number_or_name(dicom_series, volume):
    files = _files(dicom_series)
    shuffled = [3, 0, 5, 1, 4, 2]  # file names and instance numbers out of position order
    for k, f in enumerate(files):
        _edit(f, InstanceNumber=shuffled[k] + 1)
        f.rename(dicom_series / f"slice_{shuffled[k]}.dcm")
    assert np.array_equal(read_volume(dicom_series).array, volume.array)


def test_duplicate_positions(dicom_series):
    files = _files(dicom_series)
    ds = pydicom.dcmread(files[1])
    _edit(files[2], ImagePositionPatient=ds.ImagePositionPatient)
    with pytest.raises(DuplicateSliceError, match="share positions"):
        read_volume(dicom_series)


def test_non_uniform_spacing(dicom_series):
    f = _files(dicom_series)[2]
    pos = [float(v) for v in pydicom.dcmread(f).ImagePositionPatient]
    _edit(f, ImagePositionPatient=[pos[0], pos[1], pos[2] + 0.8])
    with pytest.raises(NonUniformSpacingError, match="slice spacing varies"):
        read_volume(dicom_series)


def test_gantry_tilt(tmp_path):
    vol = ramp_volume()
    folder = tmp_path / "tilt"
    write_dicom_series(vol, folder)
    for k, f in enumerate(_files(folder)):
        pos = [float(v) for v in pydicom.dcmread(f).ImagePositionPatient]
        _edit(f, ImagePositionPatient=[pos[0], pos[1] + k * 2.5 * np.tan(np.radians(15)), pos[2]])
    with pytest.raises(GantryTiltError, match="15.0 degrees"):
        read_volume(folder)


def test_localizer(dicom_series):
    for f in _files(dicom_series):
        _edit(f, ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    with pytest.raises(LocalizerError, match="LOCALIZER"):
        read_volume(dicom_series)


def test_non_image_dicom_is_rejected():
    sr = get_testdata_file("test-SR.dcm")
    with pytest.raises(NotAnImageError, match="holds no image"):
        read_volume(sr)


def test_two_interleaved_series_in_one_folder(tmp_path):
    folder = tmp_path / "mixed"
    write_dicom_series(ramp_volume(), tmp_path / "a", SeriesInfo(uid_seed="a"))
    write_dicom_series(ramp_volume(), tmp_path / "b", SeriesInfo(uid_seed="b"))
    folder.mkdir()
    for side in ("a", "b"):
        for f in _files(tmp_path / side):
            shutil.copy(f, folder / f"{side}_{f.name}")
    with pytest.raises(MultipleSeriesError) as err:
        read_volume(folder)
    uids = err.value.series_uids
    assert len(uids) == 2 and all(u in str(err.value) for u in uids)
    chosen = read_volume(folder, series_uid=uids[0])
    assert chosen.meta["series_uid"] == uids[0] and chosen.shape == (6, 20, 24)


def test_unknown_format(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(UnsupportedFormatError):
        read_volume(path)
    with pytest.raises(UnsupportedFormatError, match="does not exist"):
        read_volume(tmp_path / "absent.nii.gz")


def test_corrupt_nifti(tmp_path):
    path = tmp_path / "bad.nii.gz"
    path.write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(CorruptFileError, match="NIfTI"):
        read_volume(path)


@pytest.mark.parametrize("mangle", ["truncate", "missing", "mixed"])
def test_cli_reports_errors_without_a_traceback(tmp_path, dicom_series, mangle):
    files = _files(dicom_series)
    if mangle == "truncate":
        files[1].write_bytes(files[1].read_bytes()[:1000])
    elif mangle == "missing":
        files[2].unlink()
    else:
        write_dicom_series(ramp_volume(), dicom_series / "other", SeriesInfo(uid_seed="other"))
    result = CliRunner().invoke(cli, ["info", str(dicom_series)])
    assert result.exit_code == 1
    assert result.output.startswith("Error: ")
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)


def test_all_read_errors_are_volume_read_errors():
    for cls in (CorruptFileError, MissingSliceError, NotAnImageError, LocalizerError,
                GantryTiltError, DuplicateSliceError, NonUniformSpacingError):
        assert issubclass(cls, VolumeReadError)
