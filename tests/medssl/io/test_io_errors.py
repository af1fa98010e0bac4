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
    ImplausibleGeometryError,
    LocalizerError,
    MissingSliceError,
    MultipleSeriesError,
    NonUniformSpacingError,
    NotAnImageError,
    SeriesGeometryError,
    UnsupportedFormatError,
    VolumeReadError,
)
from medssl.io import SeriesInfo, read_volume, write_dicom_series
from tests.conftest import ramp_volume
from tests.dicom_edits import blank_uids, edit, to_jpeg2000
from tests.paths import DETECTOR_DIR


def _files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.dcm"))


def _edit(path: Path, **changes) -> None:
    edit([path], **changes)


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
    for cls in (
        CorruptFileError,
        MissingSliceError,
        NotAnImageError,
        LocalizerError,
        GantryTiltError,
        DuplicateSliceError,
        NonUniformSpacingError,
    ):
        assert issubclass(cls, VolumeReadError)


# -- implausible geometry -----------------------------------------------------------------------


def _pixels_must_not_be_read(monkeypatch):
    from medssl.io import dicom_series

    def fail(*_):
        raise AssertionError("the pixels were read before the geometry was checked")

    monkeypatch.setattr(dicom_series, "frame_pixels", fail)


@pytest.mark.parametrize("spacing", [1000.0, 12.0])
def test_implausible_pixel_spacing_is_refused_before_the_pixels_are_read(
    dicom_series, monkeypatch, spacing
):
    """1000 mm asked the resampler for ~1.2 TiB; 12 mm made a 330 KB study 57x slower."""
    from medssl.io import read_dicom_series
    from medssl.io.limits import GeometryLimits

    edit(_files(dicom_series), PixelSpacing=[spacing, spacing])
    _pixels_must_not_be_read(monkeypatch)
    with pytest.raises(ImplausibleGeometryError) as err:
        read_dicom_series(dicom_series, limits=GeometryLimits(), target_spacing_mm=1.0)
    assert err.value.quantity == "PixelSpacing (row)" and err.value.value == f"{spacing:g} mm"
    assert "PixelSpacing (row) is" in str(err.value) and "the limit is [0.05, 5] mm" in str(
        err.value
    )
    assert err.value.path == dicom_series


def test_extent_and_voxel_counts_beyond_the_limits_are_refused(dicom_series, monkeypatch):
    from medssl.io import read_dicom_series
    from medssl.io.limits import GeometryLimits

    _pixels_must_not_be_read(monkeypatch)
    # the fixture: 6 slices 2.5 mm apart, 20 x 24 pixels of 0.7 x 0.8 mm
    cases = [
        (GeometryLimits(max_extent_mm=14.5), "extent along z (6 x 2.5 mm)", "15 mm"),
        (GeometryLimits(max_source_voxels=2000), "voxel count (6 x 20 x 24)", "2,880"),
        (
            GeometryLimits(max_resampled_voxels=3000),  # 13 x 14 x 19 voxels of 1 mm
            "voxel count resampled to the model's 1/1/1 mm grid",
            "3,458",
        ),
    ]
    for limits, quantity, value in cases:
        with pytest.raises(ImplausibleGeometryError) as err:
            read_dicom_series(dicom_series, limits=limits, target_spacing_mm=1.0)
        assert (err.value.quantity, err.value.value) == (quantity, value)


def test_the_resampled_count_is_what_the_resampler_makes(dicom_series):
    """The check predicts the grid :func:`resample_to_spacing` allocates, exactly."""
    from medssl.io.limits import GeometryLimits
    from medssl.pipeline.preprocess import resample_to_spacing

    volume = read_volume(dicom_series)
    made = resample_to_spacing(volume, 0.9).array.size
    GeometryLimits(max_resampled_voxels=made).check(volume.shape, volume.spacing, "v", 0.9)
    with pytest.raises(ImplausibleGeometryError):
        GeometryLimits(max_resampled_voxels=made - 1).check(volume.shape, volume.spacing, "v", 0.9)


def test_an_enhanced_ct_with_implausible_spacing_is_refused_before_decoding(tmp_path, monkeypatch):
    from medssl.io import dicom_enhanced, read_dicom_series
    from medssl.io.dicom_enhanced import write_enhanced_ct
    from medssl.io.limits import GeometryLimits
    from tests.conftest import ramp_volume as ramp

    path = write_enhanced_ct(ramp(spacing=(2.5, 25.0, 25.0)), tmp_path / "e" / "ct.dcm")
    monkeypatch.setattr(dicom_enhanced, "frame_pixels", lambda *_: pytest.fail("decoded"))
    with pytest.raises(ImplausibleGeometryError, match="PixelSpacing .row. is 25 mm"):
        read_dicom_series(path, limits=GeometryLimits(), target_spacing_mm=1.0)


# -- malformed headers are typed errors -----------------------------------------------------------


def test_a_one_valued_orientation_is_a_typed_geometry_error(dicom_series):
    victim = _files(dicom_series)[3]
    _edit(victim, ImageOrientationPatient="1")
    with pytest.raises(SeriesGeometryError) as err:
        read_volume(dicom_series)
    assert err.value.path == victim
    assert "ImageOrientationPatient has 1 value(s), 6 expected" in err.value.problem


def test_an_empty_shared_functional_groups_sequence_is_a_typed_geometry_error(tmp_path):
    from medssl.io.dicom_enhanced import write_enhanced_ct

    path = write_enhanced_ct(ramp_volume(), tmp_path / "e" / "ct.dcm")
    _edit(path, SharedFunctionalGroupsSequence=[])
    with pytest.raises(SeriesGeometryError, match="frame 1 lacks plane position, orientation"):
        read_volume(path)


@pytest.mark.parametrize(
    "keyword, value",
    [
        ("RescaleSlope", "x"),
        ("RescaleIntercept", "ZZPHI"),
        ("RescaleSlope", "nan"),
        ("RescaleSlope", "0"),
    ],
)
def test_a_rescale_value_that_is_no_finite_number_is_a_typed_error(dicom_series, keyword, value):
    """HU computed from a nonsense slope or intercept would be silently wrong; the error names
    the attribute and the file, never the value (a hostile header may hold PHI there)."""
    victim = _files(dicom_series)[1]
    raw = pydicom.dcmread(victim)
    tag = raw[keyword].tag
    del raw[keyword]
    raw.add_new(tag, "DS", None)
    raw[tag]._value = [value]  # the bytes a hostile sender writes, past pydicom's checks
    raw.save_as(victim)
    with pytest.raises(VolumeReadError) as err:
        read_volume(dicom_series)
    assert err.value.path == victim
    assert keyword in err.value.problem and value not in err.value.problem


def test_a_missing_rescale_keeps_the_defaults(dicom_series, volume):
    edit(_files(dicom_series), RescaleSlope=None, RescaleIntercept=None)
    assert np.array_equal(read_volume(dicom_series).array, volume.array)


def test_invalid_dates_do_not_stop_reading(dicom_series, volume):
    """``00000000`` birth dates are common in real archives; 20230231 is no date."""
    edit(
        _files(dicom_series),
        PatientBirthDate="00000000",
        StudyDate="20230231",
        SeriesDate="20231399",
        ContentDate="",
    )
    assert np.array_equal(read_volume(dicom_series).array, volume.array)


# -- anonymised DICOM: blank UIDs -------------------------------------------------------------


def test_a_series_with_blank_uids_reads_with_the_sop_identity_of_the_file_meta(
    dicom_series, volume
):
    files = _files(dicom_series)
    meta = [pydicom.dcmread(f).file_meta for f in files]
    blank_uids(files)
    read = read_volume(dicom_series)
    assert np.array_equal(read.array, volume.array)
    assert read.meta["series_uid"] == "" and read.meta["series_uid_absent"] is True
    assert read.meta["series_key"].startswith("nouid-")
    from medssl.io.dicom_files import read_dataset

    ds = read_dataset(files[0])
    assert ds.SOPClassUID == meta[0].MediaStorageSOPClassUID
    assert ds.SOPInstanceUID == meta[0].MediaStorageSOPInstanceUID


def test_blank_uid_series_in_one_folder_are_told_apart_by_geometry(tmp_path):
    folder = tmp_path / "mixed"
    write_dicom_series(ramp_volume(), folder / "a", SeriesInfo(uid_seed="a"))
    write_dicom_series(
        ramp_volume(shape=(5, 16, 16), spacing=(2.0, 0.5, 0.5)),
        folder / "b",
        SeriesInfo(uid_seed="b"),
    )
    for sub in ("a", "b"):  # one flat folder, as many anonymised exports are
        for k, f in enumerate(sorted((folder / sub).glob("*.dcm"))):
            f.rename(folder / f"{sub}{k:03d}.dcm")
    blank_uids(_files(folder))
    with pytest.raises(MultipleSeriesError) as err:
        read_volume(folder)
    keys = err.value.series_uids
    assert len(keys) == 2 and all(k.startswith("nouid-") for k in keys)
    shapes = sorted(read_volume(folder, series_uid=k).shape for k in keys)
    assert shapes == [(5, 16, 16), (6, 20, 24)]


def test_a_jpeg2000_series_without_frame_of_reference_reads_losslessly(tmp_path):
    volume = ramp_volume(shape=(6, 64, 64))  # OpenJPEG's 6 resolutions need 32+ pixels a side
    dicom_series = tmp_path / "j2k"
    files = write_dicom_series(volume, dicom_series, SeriesInfo(uid_seed="j2k"))
    to_jpeg2000(files)
    edit(files, FrameOfReferenceUID=None, PositionReferenceIndicator=None)
    blank_uids(files)
    ds = pydicom.dcmread(files[0])
    assert (
        ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.90"
        and "FrameOfReferenceUID" not in ds
    )
    assert np.array_equal(read_volume(dicom_series).array, volume.array)


def test_medssl_info_reads_an_anonymised_series(dicom_series):
    blank_uids(_files(dicom_series))
    result = CliRunner().invoke(cli, ["info", str(dicom_series), "--json"])
    assert result.exit_code == 0, result.output
    assert '"shape": [6, 20, 24]' in result.output


def test_a_parser_error_is_named_by_its_type_not_its_message(dicom_series, monkeypatch):
    """A parser message may quote element values (a patient's name); the error keeps the type."""
    from medssl.io import dicom_files

    def quoting(*_, **__):
        raise ValueError("invalid literal for int() with base 10: 'DOE^JANE'")

    monkeypatch.setattr(dicom_files.pydicom, "dcmread", quoting)
    with pytest.raises(CorruptFileError) as err:
        dicom_files.read_dataset(_files(dicom_series)[0])
    assert err.value.problem == "truncated or malformed DICOM (ValueError)"
    assert "DOE" not in str(err.value)


@pytest.mark.parametrize("suffix", [".nii.gz", ".mhd"])
def test_volume_file_headers_give_the_grid_without_reading_the_data(tmp_path, suffix):
    from medssl.io import read_grid, write_volume

    volume = ramp_volume(spacing=(2.5, 0.7, 0.8))
    path = write_volume(volume, tmp_path / f"v{suffix}")
    shape, spacing = read_grid(path)
    read = read_volume(path)
    assert shape == read.shape and np.allclose(spacing, read.spacing)


def test_a_volume_file_of_implausible_spacing_is_refused_before_its_data_is_read(
    tmp_path, monkeypatch
):
    from medssl.io import write_volume
    from medssl.models.card import load_card
    from medssl.scoring import series
    from medssl.scoring.manifest import ScanItem

    path = write_volume(ramp_volume(spacing=(2.5, 1000.0, 1000.0)), tmp_path / "huge.nii.gz")
    monkeypatch.setattr(series, "read_volume", lambda *_: pytest.fail("the data was read"))
    card = load_card(DETECTOR_DIR / "medssl.json")
    prepared = series.prepare_series(
        ScanItem(key="huge", paths=(str(path),)), card.detection_params(2)
    )
    assert prepared.error.startswith("ImplausibleGeometryError") and "is 1000 mm" in prepared.error
    assert not prepared.transient
