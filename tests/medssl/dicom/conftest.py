"""Fixtures of the DICOM-writer tests: the shipped detector's card, an oblique CT series and
two detections in it."""

from __future__ import annotations

import pydicom
import pytest

from medssl.finding import Finding
from medssl.io import SeriesInfo, write_dicom_series
from medssl.models import load_card
from tests.medssl.dicom.helpers import INFO, NODULES, oblique_volume
from tests.paths import DETECTOR_DIR


@pytest.fixture(scope="module")
def card():
    """The shipped nodule detector's model card."""
    return load_card(DETECTOR_DIR)


@pytest.fixture(scope="module")
def ct(tmp_path_factory):
    """A 16-slice 64 x 64 oblique CT series: its Volume and its datasets (headers only), in
    slice order."""
    volume = oblique_volume()
    folder = tmp_path_factory.mktemp("ct")
    paths = write_dicom_series(volume, folder, SeriesInfo(uid_seed="serving", **INFO))
    return volume, [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]


@pytest.fixture(scope="module")
def detections(ct):
    """The two NODULES as detections in `ct`'s world coordinates (LPS mm)."""
    volume, _ = ct
    return [
        Finding(
            centre_lps=tuple(float(c) for c in volume.index_to_world(zyx)),
            diameter_mm=d,
            probability=p,
            centre_voxel=zyx,
        )
        for zyx, d, p in NODULES
    ]
