"""Constants and volumes shared by the DICOM-writer tests (fixtures are in conftest.py)."""

from __future__ import annotations

import numpy as np

from medssl import Volume, affine_from_geometry
from tests.conftest import oblique_direction

SHAPE = (16, 64, 64)
#: Two nodules of the test series: voxel (z, y, x), diameter mm, probability.
NODULES = [((8.0, 30.0, 35.0), 8.0, 0.93), ((4.0, 50.0, 12.0), 5.0, 0.41)]
#: Patient and study attributes of the test series (values every result object must copy).
INFO = {
    "patient_name": "Doe^Jane",
    "patient_id": "P-0042",
    "patient_birth_date": "19580214",
    "patient_sex": "F",
    "study_id": "77",
    "accession_number": "ACC-9",
    "study_date": "20250304",
    "study_time": "101500",
}


def oblique_volume() -> Volume:
    """16 slices of 64 x 64 (2 x 1.25 x 1.25 mm), rotated 20 degrees about S; every voxel
    value differs (a flipped or shifted frame would show)."""
    values = (np.arange(np.prod(SHAPE)) % 2000 - 1000).astype(np.float32).reshape(SHAPE)
    return Volume(
        values,
        affine_from_geometry((-40.0, -60.0, -120.0), (2.0, 1.25, 1.25), oblique_direction(20)),
    )
