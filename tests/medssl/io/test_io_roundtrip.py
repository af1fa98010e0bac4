"""Write -> read round trips in every format, and agreement with SimpleITK's readers."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from pydicom.data import get_testdata_file
from pydicom.uid import JPEG2000Lossless, RLELossless

from medssl import Volume
from medssl.io import read_volume, write_dicom_series, write_volume
from medssl.io.sitk_bridge import from_sitk
from tests.conftest import assert_same_in_world, oblique_direction, ramp_volume, require_tool

WORLD_POINT = np.array([-80.3, -101.7, -243.9])  # LPS mm, inside ramp_volume()


def _write(volume: Volume, tmp_path: Path, fmt: str, **kwargs) -> Path:
    if fmt == "dicom":
        write_dicom_series(volume, tmp_path / "dcm", **kwargs)
        return tmp_path / "dcm"
    return write_volume(volume, tmp_path / f"vol{fmt}")


def _sitk_read(path: Path) -> Volume:
    if path.is_dir():
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(path)))
        return from_sitk(reader.Execute())
    return from_sitk(sitk.ReadImage(str(path)))


@pytest.mark.parametrize("fmt", [".nii", ".nii.gz", ".mhd", "dicom"])
@pytest.mark.parametrize("degrees", [0.0, 25.0])
def test_world_point_survives_write_and_read(tmp_path, fmt, degrees):
    original = ramp_volume(direction=oblique_direction(degrees))
    back = read_volume(_write(original, tmp_path, fmt))
    index_before = original.world_to_index(WORLD_POINT)
    assert np.all(index_before > 0) and np.all(index_before < np.array(original.shape) - 1)
    # the same index must map to the same world point, within 0.01 mm
    assert np.linalg.norm(back.index_to_world(index_before) - WORLD_POINT) < 0.01
    assert np.array_equal(back.array, original.array)
    assert back.array.dtype == np.float32


@pytest.mark.parametrize("fmt", [".nii.gz", ".mhd", "dicom"])
def test_reader_agrees_with_simpleitk(tmp_path, fmt):
    path = _write(ramp_volume(direction=oblique_direction(15)), tmp_path, fmt)
    ours, theirs = read_volume(path), _sitk_read(path)
    assert np.allclose(ours.affine, theirs.affine, atol=1e-4)
    assert np.array_equal(ours.array, theirs.array.astype(np.float32))


def test_nifti_is_stored_in_ras(tmp_path):
    import nibabel as nib

    vol = ramp_volume()
    path = write_volume(vol, tmp_path / "v.nii.gz")
    nii = nib.load(str(path))
    # voxel (i=x, j=y, k=z) = (0, 0, 0) sits at LPS origin -> RAS (-x, -y, z)
    assert np.allclose(nii.affine[:3, 3], vol.origin * [-1, -1, 1])
    assert nii.get_fdata()[3, 2, 1] == vol.array[1, 2, 3]


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless])
def test_compressed_transfer_syntaxes_decode_to_the_same_volume(tmp_path, syntax, dciodvfy):
    original = ramp_volume(shape=(4, 64, 64))  # OpenJPEG needs images of at least 32x32
    path = _write(original, tmp_path, "dicom", transfer_syntax=syntax)
    assert all(dciodvfy(f) == [] for f in sorted(path.glob("*.dcm")))
    back = read_volume(path)
    assert np.array_equal(back.array, original.array)
    assert np.allclose(back.affine, original.affine)


def test_jpeg_lossless_from_dcmtk_decodes(tmp_path, dicom_series, volume):
    dcmcjpeg = require_tool("dcmcjpeg", "dcmtk")
    out = tmp_path / "jpeg"
    out.mkdir()
    for f in sorted(dicom_series.iterdir()):
        # --encode-lossless-sv1: JPEG Lossless, Process 14, first-order prediction (.4.70)
        subprocess.run([dcmcjpeg, "--encode-lossless-sv1", str(f), str(out / f.name)], check=True)
    back = read_volume(out)
    assert np.array_equal(back.array, volume.array)


def test_pydicom_ct_small_matches_simpleitk():
    path = get_testdata_file("CT_small.dcm")
    ours, theirs = read_volume(path), from_sitk(sitk.ReadImage(path))
    assert ours.shape == (1, 128, 128)
    assert np.allclose(ours.affine, theirs.affine)
    assert np.allclose(ours.origin, [-158.135803, -179.035797, -75.699997])
    assert np.allclose(ours.spacing, [5.0, 0.661468, 0.661468])
    assert np.array_equal(ours.array, theirs.array)


def test_enhanced_ct_supplemental_matches_simpleitk():
    path = get_testdata_file("eCT_Supplemental.dcm")
    assert path is not None, "pydicom-data is not installed"
    ours, theirs = read_volume(path), from_sitk(sitk.ReadImage(path))
    assert ours.meta["format"] == "dicom-enhanced"
    assert ours.shape == (2, 512, 512)
    assert np.allclose(ours.spacing, [10.0, 0.388672, 0.388672])
    # frames are sorted along the slice normal, (-x row) x (+y col) = -z: z descends
    assert np.allclose(ours.origin, [99.5, -301.5, -149.0])
    assert_same_in_world(ours, theirs)
    assert ours.array.min() == -1024.0  # shared-group RescaleIntercept applied


def test_the_dciodvfy_check_catches_a_broken_object(tmp_path, dicom_series, dciodvfy):
    import pydicom

    victim = sorted(dicom_series.glob("*.dcm"))[0]
    assert dciodvfy(victim) == []
    ds = pydicom.dcmread(victim)
    del ds.ImageOrientationPatient  # Type 1 in the Image Plane module
    ds.save_as(victim)
    assert any("ImageOrientationPatient" in line for line in dciodvfy(victim))


def test_writer_refuses_what_it_cannot_encode(tmp_path):
    with pytest.raises(ValueError, match="cannot write transfer syntax"):
        write_dicom_series(ramp_volume(), tmp_path / "a", transfer_syntax="1.2.840.10008.1.2.4.50")
    with pytest.raises(ValueError, match="cannot encode slice 0"):
        write_dicom_series(
            ramp_volume(shape=(2, 8, 8)), tmp_path / "b", transfer_syntax=JPEG2000Lossless
        )
    sheared = ramp_volume()
    sheared.affine[:3, 0] += [0.0, 1.0, 0.0]  # z axis no longer normal to the slices
    with pytest.raises(ValueError, match="not perpendicular"):
        write_dicom_series(sheared, tmp_path / "c")
